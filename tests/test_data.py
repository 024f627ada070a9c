"""data.py: dataset layouts (fixtures that reproduce the real on-disk trees), splits, few-shot
sampling, base/new split, images, loaders, backbones, results. Everything runs on tiny JPEGs made
in tmp_path; no dataset or weights are downloaded."""
import json
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

import data


# ------------------------------------------------------------------------------------------------
# fixtures: the real layouts, with a few 8x8 images per class
# ------------------------------------------------------------------------------------------------

def jpeg(path, mode="RGB", color=None, size=(8, 8)):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    color = color if color is not None else {"RGB": (200, 30, 30), "L": 128, "CMYK": (0, 255, 255, 0)}[mode]
    Image.new(mode, size, color).save(path, "JPEG")
    return path


CALTECH_FOLDERS = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "accordion", "airplanes"]


def make_caltech(root, per_class=10):
    base = Path(root) / "caltech-101" / "101_ObjectCategories"
    for c in CALTECH_FOLDERS:
        for i in range(1, per_class + 1):
            jpeg(base / c / f"image_{i:04d}.jpg")
    return base


def caltech_split_json(root):
    # The real file's format: relative path under 101_ObjectCategories, 0-based label, renamed name.
    split = {
        "train": [["Faces/image_0001.jpg", 0, "face"], ["Faces/image_0002.jpg", 0, "face"],
                  ["Leopards/image_0001.jpg", 1, "leopard"], ["accordion/image_0003.jpg", 2, "accordion"],
                  ["airplanes/image_0004.jpg", 3, "airplane"]],
        "val": [["Faces/image_0003.jpg", 0, "face"], ["airplanes/image_0005.jpg", 3, "airplane"]],
        "test": [["Leopards/image_0009.jpg", 1, "leopard"], ["accordion/image_0010.jpg", 2, "accordion"],
                 ["airplanes/image_0010.jpg", 3, "airplane"]],
    }
    path = Path(root) / "caltech-101" / "split_zhou_Caltech101.json"
    path.write_text(json.dumps(split))
    return split


# ------------------------------------------------------------------------------------------------
# real layouts
# ------------------------------------------------------------------------------------------------

def test_caltech_split_json_is_read_as_is(tmp_path, capsys):
    make_caltech(tmp_path)
    split = caltech_split_json(tmp_path)
    bench = data.load_dataset("caltech101", tmp_path)
    assert [len(bench.train), len(bench.val), len(bench.test)] == [5, 2, 3]
    assert bench.classnames == ["face", "leopard", "accordion", "airplane"]
    base = tmp_path / "caltech-101" / "101_ObjectCategories"
    assert bench.train[2] == (str(base / "Leopards" / "image_0001.jpg"), 1, "leopard")
    assert [it.label for it in bench.test] == [lab for _, lab, _ in split["test"]]
    assert bench.template == "a photo of a {}." and bench.augment and bench.shifts == {}
    assert bench.open_image(bench.train[0].source).mode == "RGB"
    assert "not be comparable" not in capsys.readouterr().err


def test_caltech_auto_split_ignores_renames_and_is_fixed(tmp_path, capsys):
    make_caltech(tmp_path, per_class=10)
    bench = data.load_dataset("caltech101", tmp_path)
    assert "not be comparable" in capsys.readouterr().err  # no JSON: the note says so
    # sorted folders (upper case first), BACKGROUND_Google and Faces_easy dropped, CoOp's renames
    assert bench.classnames == ["face", "leopard", "accordion", "airplane"]
    for label in range(4):  # 50/20/30 of 10 images per class
        assert [sum(it.label == label for it in s) for s in (bench.train, bench.val, bench.test)] == [5, 2, 3]
    all_sources = [it.source for s in (bench.train, bench.val, bench.test) for it in s]
    assert len(set(all_sources)) == 40 and not any("Faces_easy" in s for s in all_sources)
    again = data.load_dataset("caltech101", tmp_path)  # the auto-split does not depend on global RNG
    random.seed(123)
    assert again.train == bench.train and again.test == bench.test


def test_eurosat_layout_and_renames(tmp_path):
    for folder in ["AnnualCrop", "SeaLake", "Highway"]:
        for i in range(1, 6):
            jpeg(tmp_path / "eurosat" / "2750" / folder / f"{folder}_{i}.jpg")
    bench = data.load_dataset("eurosat", tmp_path)
    assert bench.classnames == ["Annual Crop Land", "Highway or Road", "Sea or Lake"]
    assert bench.template == "a centered satellite photo of {}."
    assert [len(bench.train), len(bench.val), len(bench.test)] == [6, 3, 6]  # round(2.5)=2, round(1)=1


def test_oxford_pets_annotations(tmp_path):
    ds = tmp_path / "oxford_pets"
    breeds = ["Abyssinian", "american_bulldog"]
    lines = {"trainval.txt": [], "test.txt": []}
    for b, breed in enumerate(breeds):
        for i in range(1, 8):
            jpeg(ds / "images" / f"{breed}_{i}.jpg")
            lines["test.txt" if i > 5 else "trainval.txt"].append(f"{breed}_{i} {b + 1} 1 {b + 1}")
    (ds / "annotations").mkdir()
    for name, rows in lines.items():
        (ds / "annotations" / name).write_text("\n".join(rows) + "\n")
    bench = data.load_dataset("oxford_pets", tmp_path)
    assert bench.classnames == ["abyssinian", "american_bulldog"]
    assert (len(bench.train), len(bench.val), len(bench.test)) == (8, 2, 4)  # val = round(5 * 0.2) per class
    assert bench.template == "a photo of a {}, a type of pet."


def test_fgvc_aircraft_variant_files(tmp_path):
    ds = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (ds / "images").mkdir(parents=True)
    (ds / "variants.txt").write_text("\n".join(variants) + "\n")
    for s, start in (("train", 100), ("val", 200), ("test", 300)):
        rows = []
        for v, name in enumerate(variants):
            img = f"{start + v:07d}"
            jpeg(ds / "images" / f"{img}.jpg")
            rows.append(f"{img} {name}")
        (ds / f"images_variant_{s}.txt").write_text("\n".join(rows) + "\n")
    bench = data.load_dataset("fgvc_aircraft", tmp_path)
    assert bench.classnames == variants  # names with spaces survive
    assert [it.label for it in bench.test] == [0, 1, 2] and len(bench.train) == 3


def test_imagenet_and_its_shifts_share_the_label_space(tmp_path):
    wnids = ["n01", "n02", "n03", "n04"]
    names = ["tench", "goldfish", "crane", "crane"]  # CLIP's list repeats names: labels are per wnid
    text = "".join(f"{w} {n}\n" for w, n in zip(wnids, names))
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text(text)
    for w in wnids:
        for i in range(2):
            jpeg(tmp_path / "imagenet" / "images" / "train" / w / f"{w}_{i}.JPEG")
            jpeg(tmp_path / "imagenet" / "images" / "val" / w / f"val_{w}_{i}.JPEG")
    for w in ["n02", "n04"]:  # ImageNet-A: 200 of the 1000 classes
        jpeg(tmp_path / "imagenet-adversarial" / "imagenet-a" / w / "a.jpg")
    for i in range(4):  # ImageNetV2: folders 0..999 in classnames.txt order
        jpeg(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(i) / "x.jpeg")
    bench = data.load_dataset("imagenet", tmp_path)
    assert bench.classnames == names and bench.val == bench.test and len(bench.train) == 8
    assert set(bench.shifts) == {"imagenet_a", "imagenetv2"}
    assert [(it.label, it.classname) for it in bench.shifts["imagenet_a"]] == [(1, "goldfish"), (3, "crane")]
    assert [it.label for it in bench.shifts["imagenetv2"]] == [0, 1, 2, 3]
    # the 200-class protocol of A: its own classes, relabelled 0..; repeated full-list names keep labels
    a_names = ["goldfish", "crane"]
    assert [it.label for it in data.shift_items(bench.shifts["imagenet_a"], a_names)] == [0, 1]
    assert data.shift_items(bench.shifts["imagenetv2"], names) == bench.shifts["imagenetv2"]
    alone = data.load_dataset("imagenet_a", tmp_path)  # standalone: sorted-folder labels, test only
    assert alone.classnames == ["goldfish", "crane"] and alone.train == [] and len(alone.test) == 2


def test_class_name_rules():
    assert data.sun397_name("/a/apse/indoor") == "indoor apse"
    assert data.sun397_name("/b/badlands") == "badlands"
    assert data.ucf101_name("ApplyEyeMakeup") == "Apply_Eye_Makeup"
    assert data.cars_name("AM General Hummer SUV 2000") == "2000 AM General Hummer SUV"
    assert len(data.IMAGENET_TEMPLATES) == 80 and len(set(data.IMAGENET_TEMPLATES)) == 80
    assert data.IMAGENET_TEMPLATES[60] == "a jpeg corrupted photo of the {}."  # PromptSRC keeps the first 60
    assert set(data.CUSTOM_TEMPLATES) == set(data.DATASETS) | set(data.SHIFT_DATASETS)


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------

def test_missing_dataset_says_where_to_get_it_and_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.load_dataset("caltech101", tmp_path)
    msg = str(err.value)
    assert "data.caltech.edu" in msg and "DATASETS.md" in msg and "101_ObjectCategories/<class>" in msg
    assert "download=True" in msg


def test_partial_folders_are_errors(tmp_path):
    make_caltech(tmp_path)
    caltech_split_json(tmp_path)
    os.remove(tmp_path / "caltech-101" / "101_ObjectCategories" / "airplanes" / "image_0010.jpg")
    with pytest.raises(FileNotFoundError, match="1 listed images are missing.*image_0010"):
        data.load_dataset("caltech101", tmp_path)
    jpeg(tmp_path / "oxford_pets" / "images" / "Abyssinian_1.jpg")  # images but no annotations/
    with pytest.raises(FileNotFoundError, match=r"(?s)incomplete.*annotations/trainval.txt"):
        data.load_dataset("oxford_pets", tmp_path)


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="caltech101.*imagenet_r"):
        data.load_dataset("caltech-101", tmp_path)


def test_images_of_any_mode_become_rgb_and_corrupt_ones_name_the_file(tmp_path):
    paths = [jpeg(tmp_path / "gray.jpg", "L"), jpeg(tmp_path / "cmyk.jpg", "CMYK")]
    Image.new("P", (8, 8), 3).save(tmp_path / "palette.png")
    Image.new("RGBA", (9, 7), (1, 2, 3, 0)).save(tmp_path / "rgba.png")
    paths += [tmp_path / "palette.png", tmp_path / "rgba.png"]
    items = [data.Item(str(p), 0, "x") for p in paths]
    bench = data.Benchmark("t", ["x"], items, [], items, "{}", {}, data.open_rgb, True)
    images, labels = next(iter(data.make_loader(items, bench, tiny_backbone(), False, 4)))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 and labels.tolist() == [0] * 4
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(jpeg(tmp_path / "ok.jpg").read_bytes()[:60])  # a truncated JPEG
    with pytest.raises(ValueError, match="corrupt.jpg"):
        next(iter(data.make_loader([data.Item(str(bad), 0, "x")], bench, tiny_backbone(), False, 1)))


# ------------------------------------------------------------------------------------------------
# few-shot sampling, base/new split
# ------------------------------------------------------------------------------------------------

def items_per_class(counts):
    return [data.Item(f"c{c}/{i}.jpg", c, f"class{c}") for c, n in enumerate(counts) for i in range(n)]


def test_fewshot_k_per_class_seeded_and_independent_of_global_rng():
    items = items_per_class([20] * 6)
    a = data.fewshot(items, 4, seed=1)
    random.seed(999)
    random.random()
    assert data.fewshot(items, 4, seed=1) == a
    assert data.fewshot(items, 4, seed=2) != a
    assert [sum(it.label == c for it in a) for c in range(6)] == [4] * 6
    assert set(a) <= set(items) and len(set(a)) == 24


@given(st.lists(st.integers(1, 12), min_size=1, max_size=8), st.integers(1, 10), st.integers(0, 2**31))
def test_fewshot_property(counts, shots, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chosen = data.fewshot(items_per_class(counts), shots, seed)
    assert [sum(it.label == c for it in chosen) for c in range(len(counts))] == [min(n, shots) for n in counts]
    assert len(set(chosen)) == len(chosen)


def test_fewshot_short_classes_bad_shots_and_cache(tmp_path):
    items = items_per_class([10, 2, 10])
    with pytest.warns(UserWarning, match="class1 \\(2\\)"):
        chosen = data.fewshot(items, 4, seed=1)
    assert [sum(it.label == c for it in chosen) for c in range(3)] == [4, 2, 4]
    with pytest.raises(ValueError, match="shots"):
        data.fewshot(items, 0, seed=1)
    cache = tmp_path / "split" / "shot_4-seed_1.json"
    with pytest.warns(UserWarning):
        first = data.fewshot(items, 4, seed=1, cache=cache)
    saved = json.loads(cache.read_text())  # JSON, readable, in the run folder
    assert saved["shots"] == 4 and saved["seed"] == 1 and len(saved["items"]) == 10
    saved["items"] = saved["items"][:3]  # a reused cache is what is returned, not a new draw
    cache.write_text(json.dumps(saved))
    assert data.fewshot(items, 4, seed=1, cache=cache) == first[:3]
    with pytest.raises(ValueError, match="other data"):
        data.fewshot(items, 4, seed=2, cache=cache)


def test_shift_items_relabels_and_resolves_repeated_names():
    names = ["crane", "tench", "goldfish", "crane"]  # ImageNet's list repeats a name
    items = [data.Item(f"{i}.jpg", i, n) for i, n in enumerate(names)]
    assert data.shift_items(items, names[:2]) == [("0.jpg", 0, "crane"), ("1.jpg", 1, "tench")]  # base
    assert data.shift_items(items, names[2:]) == [("2.jpg", 0, "goldfish"), ("3.jpg", 1, "crane")]  # new
    assert data.shift_items(items, ["goldfish", "tench"]) == [("1.jpg", 1, "tench"), ("2.jpg", 0, "goldfish")]
    with pytest.raises(ValueError, match="repeated"):
        data.shift_items(items, ["goldfish", "tench", "crane"])  # no single offset: which crane?


def test_base_new_split():
    names = [f"class{c}" for c in range(5)]
    items = items_per_class([2] * 5)
    base, base_names = data.subsample_classes(items, names, "base")
    new, new_names = data.subsample_classes(items, names, "new")
    assert base_names == names[:3] and new_names == names[3:]  # ceil(5/2) = 3 base classes
    assert sorted({it.label for it in base}) == [0, 1, 2] and sorted({it.label for it in new}) == [0, 1]
    assert all(new_names[it.label] == it.classname for it in new)
    assert len(base) + len(new) == len(items)
    assert data.subsample_classes(items, names, "all") == (items, names)
    with pytest.raises(ValueError):
        data.subsample_classes(items, names, "novel")


# ------------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------------

def tiny_backbone():
    return data.Backbone(model=None, tokenize=None, name="none", pretrained=None, image_size=16,
                         mean=data.CLIP_MEAN, std=data.CLIP_STD)


def test_loader_shuffle_is_seeded_and_drop_last_follows_dassl(tmp_path):
    items = [data.Item(str(jpeg(tmp_path / f"{i}.jpg", color=(i * 20, 0, 0))), i, str(i)) for i in range(10)]
    bench = data.Benchmark("t", [str(i) for i in range(10)], items, [], items, "{}", {}, data.open_rgb, False)

    def labels(seed, train=True, batch=4):
        return [y.tolist() for _, y in data.make_loader(items, bench, tiny_backbone(), train, batch, seed)]
    assert labels(1) == labels(1) and labels(1) != labels(2)
    assert [len(b) for b in labels(1)] == [4, 4]  # drop_last: 10 >= 4
    assert [len(b) for b in labels(1, batch=32)] == [10]  # fewer items than a batch: keep them
    assert labels(1, train=False) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # augment=False (the world): the training transform is the test transform
    x_train = next(iter(data.make_loader(items[:1], bench, tiny_backbone(), True, 1, 0)))[0]
    x_test = next(iter(data.make_loader(items[:1], bench, tiny_backbone(), False, 1, 0)))[0]
    assert torch.equal(x_train, x_test)


# ------------------------------------------------------------------------------------------------
# backbones
# ------------------------------------------------------------------------------------------------

TEST_MODEL = "nanoprompt-test-clip"


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    import open_clip
    cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=16, head_width=32),
               text_cfg=dict(context_length=20, vocab_size=49408, width=32, heads=2, layers=1))
    path = tmp_path_factory.mktemp("configs") / f"{TEST_MODEL}.json"  # the file name is the model name
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return cfg


def test_load_backbone_random_init_is_frozen_and_tokenizes(small_config):
    import open_clip
    bb = data.load_backbone(TEST_MODEL, None, "cpu")
    assert isinstance(bb.model, open_clip.model.CLIP) and not bb.model.training
    assert not any(p.requires_grad for p in bb.model.parameters())
    tokens = bb.tokenize(["a photo of a dog.", "a cat"])
    assert tokens.shape == (2, 20) and tokens.dtype == torch.long
    assert (bb.image_size, bb.mean, bb.std) == (32, data.CLIP_MEAN, data.CLIP_STD)
    acts = {type(m).__name__ for m in bb.model.modules()}
    assert "GELU" in acts and "QuickGELU" not in acts


def test_openai_weights_get_quick_gelu(small_config):
    import open_clip
    assert data._open_clip_kwargs("ViT-B-16", "openai") == {"force_quick_gelu": True}
    assert data._open_clip_kwargs("RN50", "openai") == {"force_quick_gelu": True}
    assert data._open_clip_kwargs("ViT-B-16", "laion2b_s34b_b88k") == {}
    assert data._open_clip_kwargs("ViT-B-16", None) == {}
    # the flag load_backbone passes really switches the activation
    model = open_clip.create_model(TEST_MODEL, None, **data._open_clip_kwargs("ViT-B-16", "openai"))
    assert "QuickGELU" in {type(m).__name__ for m in model.modules()}


def test_bad_backbones_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'ViT-B-99'.*ViT-B-16"):
        data.load_backbone("ViT-B-99", None)
    with pytest.raises(ValueError, match="unknown pretrained tag 'opneai'.*openai.*laion2b_s34b_b88k"):
        data.load_backbone("ViT-B-16", "opneai")
    with pytest.raises(ValueError, match="not supported"):
        data.load_backbone("ViT-B-16-SigLIP", None)  # text tower with its own tokenizer and pooling
    assert data.default_backbone("caltech101") == ("ViT-B-16", "openai")
    assert data.default_backbone("shapes") == ("tiny", "shapes")


def test_data_py_alone_loads_real_backbones_and_names_the_missing_world(tmp_path, small_config):
    """data.py reaches world/ only when the world is asked for: alone in a folder it imports and loads
    an open_clip model; asking for the world says which folder is missing."""
    shutil.copy(Path(data.__file__), tmp_path / "data.py")
    config = tmp_path / f"{TEST_MODEL}.json"
    config.write_text(json.dumps(small_config))
    code = f"""
import open_clip, pytest, sys
open_clip.add_model_config({str(config)!r})
import data
bb = data.load_backbone({TEST_MODEL!r}, None, "cpu")
print("loaded", bb.name, bb.image_size)
for ask in (lambda: data.load_dataset("shapes", None), lambda: data.load_backbone("tiny", "shapes")):
    with pytest.raises(ModuleNotFoundError, match="world/"):
        ask()
assert not any(name == "world" or name.startswith("world.") for name in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"loaded {TEST_MODEL} 32" in proc.stdout


# ------------------------------------------------------------------------------------------------
# utilities and results
# ------------------------------------------------------------------------------------------------

def test_atomic_writes_leave_no_temp_files(tmp_path):
    data.atomic_save({"ctx": torch.ones(2)}, tmp_path / "ck" / "model.pt")
    assert torch.equal(torch.load(tmp_path / "ck" / "model.pt")["ctx"], torch.ones(2))
    data.atomic_write_text("hello", tmp_path / "a.txt")
    data.atomic_write_text("world", tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "world"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "ck", "model.pt"]


def test_results_table(tmp_path, capsys):
    assert data.harmonic_mean(80.0, 60.0) == pytest.approx(68.5714, abs=1e-4)
    assert data.harmonic_mean(0, 0) == 0.0
    for seed, (b, n) in enumerate([(80, 60), (82, 62), (84, 64)], 1):
        data.append_result(tmp_path / "run" / "results.jsonl", dict(method="coop", dataset="dtd",
                           backbone="ViT-B-16", shots=16, seed=seed, protocol="base2new", base=b, new=n, hm=0, wall_s=1.0))
    data.append_result(tmp_path / "other" / "results.jsonl", dict(method="coop", dataset="eurosat",
                       backbone="ViT-B-16", shots=16, seed=1, protocol="base2new", base=90.0, new=70.0, hm=0, wall_s=1.0))
    data.main(["table", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| method | dataset |")
    assert "| coop | dtd | ViT-B-16 | 16 | 3 | 82.00 ± 2.00 | 62.00 ± 2.00 | 70.61 |" in lines
    # average row: HM of the averaged base (86) and new (66), not the mean of the HMs
    assert any(l.startswith("| coop | average (2) |") and l.endswith("| 74.68 |") for l in lines)
    with pytest.raises(SystemExit):
        data.main(["nonsense"])


def test_results_table_zero_shot_row_and_shift_columns():
    records = [dict(method="coop", dataset="shapes", backbone="tiny", pretrained="shapes", shots=16, seed=s,
                    protocol="base2new",
                    base=b, new=n, hm=0, shifts={"photo": p}, wall_s=1.0,
                    zero_shot={"base": 40.0, "new": 50.0, "hm": 44.44, "photo": 90.0})
               for s, b, n, p in [(1, 60.0, 40.0, 70.0), (2, 62.0, 42.0, 72.0)]]
    lines = data.results_table(records).splitlines()
    assert lines[0] == "| method | dataset | backbone | shots | runs | base | new | HM | photo |"
    assert "| coop | shapes | tiny/shapes | 16 | 2 | 61.00 ± 1.41 | 41.00 ± 1.41 | 49.04 | 71.00 ± 1.41 |" in lines
    # zero-shot once per seed (not once per method run), from the runs' own zero-shot numbers
    assert "| zero-shot | shapes | tiny/shapes | 0 | 2 | 40.00 ± 0.00 | 50.00 ± 0.00 | 44.44 | 90.00 ± 0.00 |" in lines
    assert len(lines) == 4


# ------------------------------------------------------------------------------------------------
# more layouts: list-file datasets, .mat datasets, torchvision downloads
# ------------------------------------------------------------------------------------------------

def test_sun397_partition_files(tmp_path):
    ds = tmp_path / "sun397"
    cats = ["/a/abbey", "/a/apse/indoor"]
    ds.mkdir()
    (ds / "ClassName.txt").write_text("\n".join(cats) + "\n")
    rows = {"Training_01.txt": [], "Testing_01.txt": []}
    for cat in cats:
        for i in range(7):
            rel = f"{cat}/sun_{i}.jpg"
            jpeg(ds / "SUN397" / rel[1:])
            rows["Testing_01.txt" if i >= 5 else "Training_01.txt"].append(rel)
    for name, lines in rows.items():
        (ds / name).write_text("\n".join(lines) + "\n")
    bench = data.load_dataset("sun397", tmp_path)
    assert bench.classnames == ["abbey", "indoor apse"]
    assert (len(bench.train), len(bench.val), len(bench.test)) == (8, 2, 4)


def test_ucf101_midframes(tmp_path):
    ds = tmp_path / "ucf101"
    lists = ds / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 YoYo\n")
    rows = {"trainlist01.txt": [], "testlist01.txt": []}
    for label, action in enumerate(["ApplyEyeMakeup", "YoYo"], 1):
        for g in range(1, 7):
            jpeg(ds / "UCF-101-midframes" / data.ucf101_name(action) / f"v_{action}_g{g:02d}_c01.jpg")
            name = "testlist01.txt" if g > 5 else "trainlist01.txt"
            rows[name].append(f"{action}/v_{action}_g{g:02d}_c01.avi" + (f" {label}" if g <= 5 else ""))
    for name, lines in rows.items():
        (lists / name).write_text("\n".join(lines) + "\n")
    bench = data.load_dataset("ucf101", tmp_path)
    assert bench.classnames == ["Apply_Eye_Makeup", "Yo_Yo"]
    assert (len(bench.train), len(bench.val), len(bench.test)) == (8, 2, 2)
    assert bench.template == "a photo of a person doing {}."


def test_oxford_flowers_labels_and_names(tmp_path):
    import scipy.io as scipy_io  # in requirements.txt: a missing scipy must fail, not skip
    import numpy as np
    ds = tmp_path / "oxford_flowers"
    labels = [1, 2] * 5
    for i in range(len(labels)):
        jpeg(ds / "jpg" / f"image_{i + 1:05d}.jpg")
    scipy_io.savemat(ds / "imagelabels.mat", {"labels": np.array([labels])})
    (ds / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "2": "sweet pea"}))
    bench = data.load_dataset("oxford_flowers", tmp_path)
    assert bench.classnames == ["pink primrose", "sweet pea"]
    assert (len(bench.train), len(bench.val), len(bench.test)) == (4, 2, 4)  # 5 per class: round(2.5)=2, 1, 2
    (ds / "cat_to_name.json").unlink()  # torchvision's download has none: its class list is used
    assert data.load_dataset("oxford_flowers", tmp_path).classnames[1] == "hard-leaved pocket orchid"


def test_download_lays_torchvision_files_out_as_coop(tmp_path, monkeypatch):
    import torchvision.datasets

    def fake_eurosat(root, download):  # what torchvision leaves on disk: <root>/eurosat/2750/...
        assert download
        for folder in ["Forest", "River"]:
            for i in range(5):
                jpeg(Path(root) / "eurosat" / "2750" / folder / f"{folder}_{i}.jpg")
        (Path(root) / "EuroSAT.zip").write_bytes(b"archive")
    monkeypatch.setattr(torchvision.datasets, "EuroSAT", fake_eurosat)
    bench = data.load_dataset("eurosat", tmp_path, download=True)
    assert bench.classnames == ["Forest", "River"] and len(bench.test) == 4
    assert sorted(os.listdir(tmp_path / "eurosat")) == ["2750"]  # archives removed
    with pytest.raises(FileNotFoundError, match="torchvision cannot download"):
        data.load_dataset("sun397", tmp_path, download=True)


def test_stanford_cars_devkit_mat_files(tmp_path):
    import scipy.io as scipy_io  # in requirements.txt: a missing scipy must fail, not skip
    import numpy as np
    ds = tmp_path / "stanford_cars"
    meta = np.empty((1, 2), dtype=object)
    meta[0, 0], meta[0, 1] = np.array(["AM General Hummer SUV 2000"]), np.array(["Acura RL Sedan 2012"])
    (ds / "devkit").mkdir(parents=True)
    scipy_io.savemat(ds / "devkit" / "cars_meta.mat", {"class_names": meta})

    def annotations(folder, n):
        rows = np.zeros((1, n), dtype=[("fname", object), ("class", object)])
        for i in range(n):
            rows[0, i] = (np.array([f"{i:05d}.jpg"]), np.array([[i % 2 + 1]]))
            jpeg(ds / folder / f"{i:05d}.jpg")
        return {"annotations": rows}
    scipy_io.savemat(ds / "devkit" / "cars_train_annos.mat", annotations("cars_train", 10))
    scipy_io.savemat(ds / "cars_test_annos_withlabels.mat", annotations("cars_test", 4))
    bench = data.load_dataset("stanford_cars", tmp_path)
    assert bench.classnames == ["2000 AM General Hummer SUV", "2012 Acura RL Sedan"]
    assert (len(bench.train), len(bench.val), len(bench.test)) == (8, 2, 4)
    assert bench.test[1] == (str(ds / "cars_test" / "00001.jpg"), 1, "2012 Acura RL Sedan")


def test_plot_draws_each_runs_epochs_from_its_log_and_names_what_is_missing(tmp_path):
    import xml.etree.ElementTree as ET
    logs = {"a": [2.0, 1.0, 0.5], "b": [1.5, 1.5, 1.0]}
    for name, losses in logs.items():
        (tmp_path / name).mkdir()
        data.atomic_write_text("".join(json.dumps({"epoch": e + 1, "loss": v, "terms": {"ce": v / 2}}) + "\n"
                                       for e, v in enumerate(losses)), tmp_path / name / "log.jsonl")
    svg = ET.fromstring(data.plot_logs([tmp_path / "a", tmp_path / "b"]))
    lines = [p for p in svg.iter("{http://www.w3.org/2000/svg}polyline")][1:]  # the first: the axes
    points = [[tuple(map(float, xy.split(","))) for xy in p.get("points").split()] for p in lines]
    assert [len(p) for p in points] == [3, 3]
    (a1, a2, a3), (b1, b2, b3) = points
    assert a1[1] < b1[1] < a2[1] < a3[1] and b1[1] == b2[1] and a3[1] == max(y for p in points for _, y in p)
    assert a1[0] == b1[0] < a2[0] == b2[0] < a3[0] == b3[0]  # the same epochs, left to right
    assert data.log_curve(tmp_path / "a", "terms.ce") == [(1, 1.0), (2, 0.5), (3, 0.25)]
    with pytest.raises(data.UsageError, match="no log.jsonl"):
        data.log_curve(tmp_path, "loss")
    with pytest.raises(data.UsageError, match="has no 'terms.kl'; it has epoch, loss, terms, terms.ce"):
        data.log_curve(tmp_path / "a", "terms.kl")
