"""Your own images: a folder of class folders as --dataset (data.load_folder: the splits, the class
names, the refusals), a trained run as a classifier (data.RunClassifier, coop.load_classifier,
--predict), and the run's saved split and class names. Runs are CoOp on the world's images written as
PNG files, with the world's tiny CLIP, a few images and epochs."""
import json
import shutil

import pytest
import torch
from PIL import Image

import coop
import data
from conftest import COMMON

TINY = ["--model", "tiny", "--pretrained", "shapes"]  # the world's pretrained tiny CLIP (48 px, 24 tokens)


def world_folder(root, per_class=10, classes=4, layout=None):
    """The world's images of its first `classes` classes as PNG files: root/<colour>_<shape>/NNNN.png
    (layout=('train', 'test'): the same under each split folder). Returns the class names."""
    from world.shapes import world_classname, world_images, world_task_classes

    pairs = world_task_classes()[:classes]
    for split in layout or [""]:
        images, labels = world_images(pairs, per_class, "outline", 0, f"test-{split}")
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            folder = root / split / world_classname(*pairs[label]).replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return [world_classname(*pair) for pair in pairs]


# ---------------------------------------------------------------------------- the folder reader
def test_a_folder_is_split_50_20_30_per_class_with_a_fixed_seed_and_names_from_folders(tmp_path):
    names = world_folder(tmp_path / "my-shapes")
    (tmp_path / "my-shapes" / "red_triangle").rename(tmp_path / "my-shapes" / "red-triangle")  # '-' too
    bench = data.load_dataset(str(tmp_path / "my-shapes"), root=None)
    assert bench.name == "my-shapes" and bench.augment and bench.template == "a photo of a {}."
    assert names == ["red triangle", "red star", "red cross", "green triangle"]  # World v3's first four
    assert bench.classnames == ["green triangle", "red triangle", "red cross", "red star"]  # folders sorted, _ - spaces
    for label in range(4):
        sizes = [sum(it.label == label for it in split) for split in (bench.train, bench.val, bench.test)]
        assert sizes == [5, 2, 3]
    files = [it.source for split in (bench.train, bench.val, bench.test) for it in split]
    assert len(set(files)) == 40 and all(bench.classnames[y] == c for split in (bench.train, bench.test)
                                         for _, y, c in split)
    again = data.load_dataset(str(tmp_path / "my-shapes"), root=None)
    assert (again.train, again.val, again.test) == (bench.train, bench.val, bench.test)
    assert data.dataset_name(str(tmp_path / "my-shapes")) == "my-shapes" and data.dataset_name("dtd") == "dtd"
    (tmp_path / "my-shapes" / "classnames.txt").write_text(
        "red_cross\tcross of red\n\ngreen_triangle\tgreen tri\nred-triangle\tt\nred_star\t r s \nother\tunused\n")
    assert data.load_dataset(str(tmp_path / "my-shapes"), None).classnames == ["green tri", "t", "cross of red",
                                                                               "r s"]


def test_train_and_test_folders_are_the_splits(tmp_path):
    world_folder(tmp_path / "d", per_class=2, classes=3, layout=("train", "test"))
    bench = data.load_dataset(str(tmp_path / "d"), None)
    assert (len(bench.train), len(bench.val), len(bench.test)) == (6, 0, 6)
    assert all("/train/" in it.source for it in bench.train) and all("/test/" in it.source for it in bench.test)
    world_folder(tmp_path / "d", per_class=1, classes=3, layout=("val",))
    assert len(data.load_dataset(str(tmp_path / "d"), None).val) == 3


@pytest.mark.parametrize("break_it, message", [
    (lambda d: (d / "red_stars").mkdir(), "red_stars holds no images"),
    (lambda d: shutil.rmtree(d / "red_star"), "holds 1 class folder"),
    (lambda d: (d / "blue_star" / "notes.txt").write_text("x"), "notes.txt is not an image"),
    (lambda d: [p.unlink() for p in list((d / "blue_star").iterdir())[1:]], "too few for the 50/20/30 split"),
    (lambda d: (d / "classnames.txt").write_text("blue_star\tstar\n"), "names no class for folder 'red_star'"),
    (lambda d: (d / "classnames.txt").write_text("blue_star star\n"), "expected 'folder<TAB>name'"),
    (lambda d: (d / "classnames.txt").write_text("blue_star\tx\nred_star\tx\n"), "have the name 'x'"),
])
def test_a_bad_folder_is_refused_with_one_line(tmp_path, break_it, message):
    from world.shapes import world_images, world_task_classes

    images, _ = world_images(world_task_classes()[:1], 4, "outline", 0, "t")
    for c in ("blue_star", "red_star"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "d" / c / f"{i}.png")
    break_it(tmp_path / "d")
    with pytest.raises(data.UsageError, match=message) as err:
        data.load_dataset(str(tmp_path / "d"), None)
    assert "\n" not in str(err.value)


def test_split_folders_with_other_classes_or_without_test_are_refused(tmp_path):
    world_folder(tmp_path / "d", per_class=1, classes=3, layout=("train", "test"))
    (tmp_path / "d" / "test" / "red_star").rename(tmp_path / "d" / "test" / "red_stars")
    with pytest.raises(data.UsageError, match=r"classes of .*/test/ and train/ differ \(e.g. red_star\)"):
        data.load_dataset(str(tmp_path / "d"), None)
    (tmp_path / "d" / "test").rename(tmp_path / "d" / "val")
    with pytest.raises(data.UsageError, match="but not test/"):
        data.load_dataset(str(tmp_path / "d"), None)
    with pytest.raises(data.MissingFileError, match="no such folder"):
        data.load_dataset(str(tmp_path / "nothing"), None)
    with pytest.raises(data.UsageError, match=r"a folder of class folders \(./mine in this folder\)"):
        data.load_dataset("mine", None)


def test_a_class_name_or_template_too_long_for_the_text_context_is_refused(tmp_path):
    backbone = data.load_backbone("tiny", None)  # the world's tokenizer: 24 positions
    data.check_prompts(backbone, ["red star", "a " * 15 + "star"], "a photo of a {}.")  # 23 of 24
    with pytest.raises(data.UsageError, match=r"class name 'a a .* too long for the text context of 24"):
        data.check_prompts(backbone, ["red star", "a " * 16 + "star"], "a photo of a {}.")
    for bad in ("a photo of a thing.", "{} and {}", "a {x} {}"):
        with pytest.raises(data.UsageError, match="--template must hold one '{}'"):
            coop.resolve_settings(coop.parse_args(["--template", bad, *TINY, "--epochs", "1"]))


# ---------------------------------------------------------------------------- a run on a folder, as a classifier
@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """CoOp trained 2 epochs on a folder of 4 world classes (base2new: 2 base, 2 new)."""
    tmp = tmp_path_factory.mktemp("own")
    names = world_folder(tmp / "shapes4")
    run = tmp / "runs" / "coop"
    coop.main(coop.parse_args(["--dataset", str(tmp / "shapes4"), *TINY, "--shots", "2", "--epochs", "2",
                               "--output-dir", str(run), *COMMON]))
    return tmp, run, sorted(names)


def test_the_run_keeps_its_split_and_class_names_and_the_table_shows_the_folder(folder_run):
    tmp, run, names = folder_run
    results = json.loads((run / "results.json").read_text())
    assert results["dataset"] == "shapes4" and json.loads((run / "args.json").read_text())["dataset"] == str(
        tmp / "shapes4")
    assert json.loads((run / "classes.json").read_text()) == {"classnames": names[:2], "template": "a photo of a {}."}
    split = json.loads((run / "split.json").read_text())
    assert [len(split[s]) for s in ("train", "val", "test")] == [20, 8, 12]
    assert all(not rel.startswith("/") for rel, _, _ in split["test"])  # relative to the folder
    assert "| coop | shapes4 | tiny/shapes | 2 |" in data.results_table(data.read_results(tmp / "runs"))


def test_evaluate_reads_the_saved_split_even_when_the_folder_grew(folder_run, tmp_path):
    tmp, run, _ = folder_run
    results = json.loads((run / "results.json").read_text())
    extra = tmp / "shapes4" / "red_star" / "extra.png"
    Image.new("RGB", (48, 48)).save(extra)  # a new image: a fresh split would differ
    try:
        coop.main(coop.parse_args(["--evaluate", str(run), *COMMON]))
    finally:
        extra.unlink()
    again = json.loads((run / "eval.json").read_text())
    assert (again["base"], again["new"], again["test_loss"]) == (results["base"], results["new"], results["test_loss"])


def test_predictions_on_the_runs_test_images_equal_what_its_evaluation_counted(folder_run):
    tmp, run, names = folder_run
    results = json.loads((run / "results.json").read_text())
    bench = data.load_dataset(str(tmp / "shapes4"), None, split_file=run / "split.json")
    classifier = coop.load_classifier(run, device="cpu")
    assert classifier.classnames == names[:2]
    for half, classes in (("base", names[:2]), ("new", names[2:])):
        items, half_names = data.subsample_classes(bench.test, bench.classnames, half)
        classifier.classnames = half_names
        probs = classifier([it.source for it in items])
        assert probs.shape == (6, 2) and torch.allclose(probs.sum(-1), torch.ones(6))
        accuracy = 100 * (probs.argmax(-1) == torch.tensor([it.label for it in items])).float().mean().item()
        assert accuracy == pytest.approx(results[half])
        nll = -probs[torch.arange(6), [it.label for it in items]].log().mean().item()
        assert nll == pytest.approx(results["test_loss"][half], rel=1e-4)  # the same model, not only argmax


def test_other_class_orders_permute_the_probabilities_and_nothing_else(folder_run):
    tmp, run, names = folder_run
    classifier = coop.load_classifier(run, names, device="cpu")
    images = [Image.open(p) for p in sorted((tmp / "shapes4").rglob("*.png"))[::5]]
    probs = classifier(images)
    order = [2, 0, 3, 1]
    classifier.classnames = [names[i] for i in order]
    assert torch.allclose(classifier(images), probs[:, order], atol=1e-6)


def test_coop_from_a_photo_of_a_predicts_as_zero_shot_clip_on_new_names(folder_run):
    tmp, run, names = folder_run
    classifier = coop.load_classifier(run, ["green circle", "yellow square", "purple heart"], device="cpu")
    untrained, _ = coop.build(classifier.run.backbone, names, classifier.run.args, torch.device("cpu"))
    data.load_learned(classifier.model, {"prompt_learner.ctx": untrained.prompt_learner.ctx})  # "a photo of a"
    images = [str(p) for p in sorted((tmp / "shapes4").rglob("*.png"))[::4]]
    clip = classifier.run.backbone
    zero_shot = data.ZeroShotCLIP(clip.model, clip.tokenize, classifier.classnames, "a photo of a {}.")
    x = torch.stack([classifier.transform(data.open_rgb(p)) for p in images])
    with torch.no_grad():
        expected = zero_shot(x).softmax(-1)
    assert torch.allclose(classifier(images), expected, atol=1e-5)


def test_predict_prints_each_images_top_classes(folder_run, capsys):
    tmp, run, names = folder_run
    images = [str(min((tmp / "shapes4" / "red_star").iterdir())), str(tmp / "shapes4" / "red_cross")]
    probs = coop.main(coop.parse_args(["--predict", str(run), *images, "--top-k", "2", *COMMON]))
    out = capsys.readouterr().out.splitlines()
    files = [images[0], *sorted(str(p) for p in (tmp / "shapes4" / "red_cross").iterdir())]
    assert probs.shape == (11, 2) and out[0] == files[0] and out[3] == files[1] and len(out) == 33
    for k, path in enumerate(files):
        top = probs[k].topk(2)
        assert out[3 * k + 1:3 * k + 3] == [f"  {100 * p:6.2f} %  {names[i]}"
                                            for p, i in zip(top.values.tolist(), top.indices.tolist())]
    probs = coop.main(coop.parse_args(["--predict", str(run), images[0], "--classes", "red star,blue star,ox",
                                       *COMMON]))
    out = capsys.readouterr().out.splitlines()
    assert probs.shape == (1, 3) and len(out) == 4 and {line.split("%  ")[1] for line in out[1:]} == {
        "red star", "blue star", "ox"}


@pytest.mark.parametrize("argv, message", [
    (["--predict", "RUN"], "name images"),
    (["--predict", "nowhere", "IMG"], "nowhere: no such run folder"),
    (["--predict", "RUN", "nothing.png"], "nothing.png: no such image or folder"),
    (["--predict", "RUN", "args.json"], "args.json is not an image"),
    (["--predict", "RUN", "IMG", "--classes", "red star"], "two or more distinct"),
    (["--predict", "RUN", "IMG", "--classes", "a,b,a"], "two or more distinct"),
    (["--predict", "RUN", "IMG", "--top-k", "0"], "--top-k must be an integer >= 1"),
    (["--predict", "RUN", "IMG", "--classes", "a,b," + "c " * 30], "too long for the text context"),
    (["--classes", "a,b", "--epochs", "1"], "--classes goes with --predict"),
])
def test_bad_predict_input_is_one_line(folder_run, argv, message):
    tmp, run, _ = folder_run
    image = str(min((tmp / "shapes4" / "red_star").iterdir()))
    argv = [str(run / a) if a == "args.json" else {"RUN": str(run), "IMG": image}.get(a, a) for a in argv]
    with pytest.raises(data.UsageError, match=message) as err:
        coop.main(coop.parse_args([*argv, *TINY, *COMMON]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method, extra", [("vprompt", ["--epochs", "2"]), ("promptsrc", ["--epochs", "2"]),
                                           ("proreg", ["--epochs", "1", "--batch-size", "4"])])
def test_every_method_predicts_its_test_images_as_its_evaluation_counted(folder_run, method, extra):
    import importlib

    module = importlib.import_module(method)
    tmp, _, names = folder_run
    run = tmp / "runs" / method
    module.main(module.parse_args(["--dataset", str(tmp / "shapes4"), *TINY, "--shots", "2", *extra,
                                   "--output-dir", str(run), *COMMON]))
    results = json.loads((run / "results.json").read_text())
    bench = data.load_dataset(str(tmp / "shapes4"), None, split_file=run / "split.json")
    classifier = module.load_classifier(run, device="cpu")
    for split in ("base", "new", "all"):
        if results.get(split) is None:
            continue
        items, split_names = data.subsample_classes(bench.test, bench.classnames, split)
        classifier.classnames = split_names
        probs, labels = classifier([it.source for it in items]), torch.tensor([it.label for it in items])
        assert 100 * (probs.argmax(-1) == labels).float().mean().item() == pytest.approx(results[split])
        nll = -probs[torch.arange(len(items)), labels].log().mean().item()
        assert nll == pytest.approx(results["test_loss"][split], rel=1e-4), split
