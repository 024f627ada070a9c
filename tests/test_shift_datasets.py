"""data.py section 5b: ProReg's benchmarks (DomainNet, PACS, OfficeHome, ImageNet-LT) read from fixtures in
their release layouts (real folder names and list formats, tiny generated images): items, labels, class
names, which list trains / validates / tests, the shifted test sets and groups, and the refusals."""
import argparse
from pathlib import Path

import pytest
from PIL import Image

import data
from conftest import DN_CLASSES, image, make_domain_net, write_list


# ------------------------------------------------------------------------------------------------ DomainNet
def test_domain_net_trains_on_sketch_validates_on_its_test_and_tests_three_domains(tmp_path):
    ds = make_domain_net(tmp_path)
    bench = data.load_dataset("domain_net", tmp_path)
    assert bench.classnames == DN_CLASSES and bench.template == "a photo of a {}."
    assert [Path(it.source).relative_to(ds).parts[0] for it in bench.train] == ["sketch"] * 6
    assert {Path(it.source).name[-10:] for it in bench.train} == {"000001.jpg", "000002.jpg"}
    assert bench.val == bench.test and {Path(it.source).name[-10:] for it in bench.test} == {"000003.jpg"}
    assert set(bench.shifts) == {"clipart", "painting", "real"} and bench.mean_of == ("clipart", "painting", "real")
    for domain, items in bench.shifts.items():
        assert [(Path(it.source).parts[-3], it.label, it.classname) for it in items] == \
            [(domain, label, c) for label, c in enumerate(DN_CLASSES)]
    assert bench.augment and not bench.groups


# ------------------------------------------------------------------------------------------------ PACS
PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]


def make_pacs(root, lists="pacs_label"):
    """pacs/kfold/<domain>/<class>/<n>.jpg and pacs_label/<domain>_{train,crossval,test}_kfold.txt with
    1-based labels ('art_painting/dog/pic_001.jpg 1'); train and crossval split the domain, test is all of it."""
    ds = Path(root) / "pacs"
    (ds / lists).mkdir(parents=True, exist_ok=True)
    for domain in PACS_DOMAINS:
        rows = {"train": [], "crossval": [], "test": []}
        for label, c in enumerate(PACS_CLASSES[:3]):
            for n in (1, 2, 3):
                rel = f"{domain}/{c}/pic_{n:03d}.jpg"
                image(ds / "kfold" / rel)
                rows["train" if n < 3 else "crossval"].append(f"{rel} {label + 1}")
                rows["test"].append(f"{rel} {label + 1}")
        for split, lines in rows.items():
            write_list(ds / lists / f"{domain}_{split}_kfold.txt", lines)
    return ds


def domains_of(items):
    return sorted({Path(it.source).parts[-3] for it in items})


@pytest.mark.parametrize("held_out", [None, "photo"])
def test_pacs_leaves_one_domain_out(tmp_path, held_out):
    make_pacs(tmp_path)
    bench = data.load_dataset("pacs", tmp_path, test_domain=held_out)
    held_out = held_out or "sketch"  # the official config's default
    others = [d for d in PACS_DOMAINS if d != held_out]
    assert domains_of(bench.train) == domains_of(bench.val) == others and domains_of(bench.test) == [held_out]
    assert len(bench.train) == 3 * 3 * 2 and len(bench.val) == 3 * 3 and len(bench.test) == 3 * 3
    assert bench.classnames == PACS_CLASSES[:3] and bench.template == "this is {}."
    assert all(it.classname == PACS_CLASSES[it.label] == Path(it.source).parent.name for it in bench.test)
    assert {Path(it.source).name for it in bench.val} == {"pic_003.jpg"}


def test_pacs_lists_beside_the_images_folder_and_bad_domains(tmp_path):
    make_pacs(tmp_path, lists=".")
    assert len(data.load_dataset("pacs", tmp_path, test_domain="cartoon").test) == 9
    with pytest.raises(data.UsageError, match="--test-domain 'drawing' is not a domain of pacs: one of photo"):
        data.load_dataset("pacs", tmp_path, test_domain="drawing")
    with pytest.raises(data.UsageError,
                       match="--train-domain apply to pacs, office_home, shapes_domains only, not caltech101"):
        data.load_dataset("caltech101", tmp_path, train_domain="art")


# ------------------------------------------------------------------------------------------------ OfficeHome
def make_office_home(root, real="Real World"):
    """OfficeHomeDataset_10072016 renamed office_home/: Art/, Clipart/, Product/, 'Real World'/, each with the
    same class folders (capitalised, '_' for spaces) of numbered JPEGs."""
    ds = Path(root) / "office_home"
    for domain, n in (("Art", 2), ("Clipart", 3), ("Product", 1), (real, 2)):
        for c in ("Alarm_Clock", "Backpack", "Desk_Lamp"):
            for i in range(1, n + 1):
                image(ds / domain / c / f"{i:05d}.jpg")
    return ds


@pytest.mark.parametrize("real", ["Real World", "Real_World"])
def test_office_home_trains_on_one_domain_and_tests_on_another(tmp_path, real):
    make_office_home(tmp_path, real)
    bench = data.load_dataset("office_home", tmp_path)  # default: art -> clipart
    assert domains_of(bench.train) == ["Art"] and domains_of(bench.test) == ["Clipart"] and bench.val == []
    assert bench.classnames == ["alarm_clock", "backpack", "desk_lamp"]
    assert [it.label for it in bench.test] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    other = data.load_dataset("office_home", tmp_path, train_domain="real_world", test_domain="product")
    assert domains_of(other.train) == [real] and len(other.train) == 6 and domains_of(other.test) == ["Product"]
    with pytest.raises(data.UsageError, match="both art"):
        data.load_dataset("office_home", tmp_path, train_domain="art", test_domain="art")


# ------------------------------------------------------------------------------------------------ ImageNet-LT
LT_COUNTS = {"n01440764": 101, "n01443537": 20, "n01484850": 19}  # many (> 100), medium (20-100), few (< 20)


def make_imagenet_lt(root):
    """imagenet/images/{train,val}/<wnid>/ with classnames.txt (the CoOp ImageNet layout), and imagenet_lt/
    ImageNet_LT_{train,val,test}.txt ('train/n01440764/n01440764_190.JPEG 0'; test images from val/)."""
    root = Path(root)
    images = root / "imagenet" / "images"
    (root / "imagenet").mkdir(parents=True)
    (root / "imagenet" / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    rows = {"train": [], "val": [], "test": []}
    for label, (wnid, count) in enumerate(LT_COUNTS.items()):
        for i in range(count + 1):
            rel = f"train/{wnid}/{wnid}_{i}.JPEG"
            image(images / rel)
            rows["train" if i < count else "val"].append(f"{rel} {label}")
        for i in range(2):
            rel = f"val/{wnid}/ILSVRC2012_val_{label * 10 + i:08d}.JPEG"
            image(images / rel)
            rows["test"].append(f"{rel} {label}")
    (root / "imagenet_lt").mkdir()
    for split, lines in rows.items():
        write_list(root / "imagenet_lt" / f"ImageNet_LT_{split}.txt", lines)


def test_imagenet_lt_reads_the_lists_and_groups_classes_by_training_images(tmp_path):
    make_imagenet_lt(tmp_path)
    bench = data.load_dataset("imagenet_lt", tmp_path)
    assert bench.classnames == ["tench", "goldfish", "great white shark"]
    assert len(bench.train) == 140 and len(bench.val) == 3 and len(bench.test) == 6
    assert all(Path(it.source).parts[-3] == "val" for it in bench.test)
    assert {g: [it.label for it in items] for g, items in bench.groups.items()} == \
        {"many": [0, 0], "medium": [1, 1], "few": [2, 2]}
    assert [data.lt_group(n) for n in (101, 100, 20, 19)] == ["many", "medium", "medium", "few"]
    # each group is scored in the whole label space, beside the whole test set
    task = data.Task(bench, {}, None, "all", bench.classnames)
    splits = data.evaluation_sets(task, "all")
    assert list(splits) == ["all", "many", "medium", "few"] and splits["few"][1] == bench.classnames


def test_the_mean_of_the_test_domains_is_a_column_of_the_record(tmp_path, capsys):
    make_domain_net(tmp_path)
    bench = data.load_dataset("domain_net", tmp_path)
    backbone = data.Backbone(None, None, "ViT-B-32", "openai", 224, data.CLIP_MEAN, data.CLIP_STD)
    task = data.Task(bench, {}, backbone, "all", bench.classnames)
    args = argparse.Namespace(protocol="all", shots=0, seed=1, epochs=10, dataset="domain_net")
    rows = {"zero-shot CLIP": {"all": 50.0, "clipart": 40.0, "painting": 30.0, "real": 80.0},
            "proreg": {"all": 70.0, "clipart": 45.0, "painting": 35.0, "real": 70.0}}
    record = data.result_record("proreg", args, task, rows, "proreg", data.evaluation_sets(task, "all"), {})
    assert record["shifts"] == {"clipart": 45.0, "painting": 35.0, "real": 70.0, "mean": 50.0}
    assert record["zero_shot"]["mean"] == 50.0 and record["classes"] == {s: 3 for s in ("all", "clipart", "painting", "real")}
    assert "mean" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("name, url, tree", [
    ("domain_net", "ai.bu.edu/M3SDA", "sketch_train.txt"), ("pacs", "domaingeneralization", "kfold/art_painting"),
    ("office_home", "hemanthdv.org", "Real World"), ("imagenet_lt", "OLTR", "ImageNet_LT_train.txt")])
def test_a_missing_benchmark_names_its_url_and_tree(tmp_path, name, url, tree):
    with pytest.raises(data.MissingFileError) as err:
        data.load_dataset(name, tmp_path)
    assert f"{name}: " in str(err.value) and url in str(err.value) and tree in str(err.value)


def test_partial_benchmarks_are_refused(tmp_path):
    ds = make_domain_net(tmp_path)
    (ds / "real" / "zebra" / "real_003_000003.jpg").unlink()
    with pytest.raises(data.MissingFileError, match="1 listed images are missing, e.g. .*real_003_000003.jpg"):
        data.load_dataset("domain_net", tmp_path)
    (ds / "painting_test.txt").unlink()
    with pytest.raises(data.MissingFileError, match="incomplete folder .*painting_test.txt"):
        data.load_dataset("domain_net", tmp_path)
    make_pacs(tmp_path)
    (tmp_path / "pacs" / "pacs_label" / "photo_crossval_kfold.txt").write_text("photo/dog/pic_003.jpg\n")
    with pytest.raises(data.MissingFileError, match="incomplete folder"):  # a line without its label
        data.load_dataset("pacs", tmp_path)
    make_imagenet_lt(tmp_path)
    (tmp_path / "imagenet" / "images" / "val").rename(tmp_path / "imagenet" / "images" / "v")
    with pytest.raises(data.MissingFileError, match="6 listed images are missing"):
        data.load_dataset("imagenet_lt", tmp_path)
