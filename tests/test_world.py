"""The built-in offline world (world/): determinism, captions that match pixels, the shipped tiny
CLIP, and the pretraining entry point."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from world import shapes, tiny_clip

ROOT = Path(data.__file__).resolve().parent


def _render(seed, n=24, style="photo"):
    gen = shapes.world_generator(seed, "test-render")
    colour, shape = torch.arange(n) % 8, (torch.arange(n) // 3) % 8
    size, background = torch.arange(n) % 2, torch.arange(n) % 5
    return shapes.world_render(colour, shape, size, background, style, gen)


def test_rendering_is_deterministic_per_seed_and_differs_across_seeds():
    a, mask_a = _render(0)
    b, mask_b = _render(0)
    c, _ = _render(1)
    res = shapes.WORLD_RES
    assert a.dtype == torch.uint8 and a.shape == (24, 3, res, res)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert (a != c).float().mean() > 0.5  # another seed: other positions, textures, noise


@pytest.mark.parametrize("style", ["photo", "outline", "vivid", "lowcontrast"])
def test_caption_colour_is_the_dominant_colour_of_the_shape_region(style):
    gen = shapes.world_generator(3, "colour-check", style)
    n = 64
    colour, shape = torch.arange(n) % 8, torch.arange(n) // 8
    size = torch.ones(n, dtype=torch.long)  # large: enough pure shape pixels to measure
    images, mask = shapes.world_render(colour, shape, size, torch.arange(n) % 5, style, gen)
    pixels = images.float() / 255
    inside = (mask > 0.99).float()[:, None]  # pixels fully covered by the painted shape
    assert (inside.sum((1, 2, 3)) >= 4).all()
    mean_rgb = (pixels * inside).sum((2, 3)) / inside.sum((2, 3))  # [n, 3]
    if style == "lowcontrast":  # undo the known contrast squeeze before naming the colour
        mean_rgb = 0.5 + (mean_rgb - 0.5) / 0.3
    nearest = torch.cdist(mean_rgb, shapes.WORLD_RGB).argmin(1)
    assert torch.equal(nearest, colour)


def test_world_benchmark_protocol():
    bench = data.load_dataset("shapes", root=None)
    assert len(bench.classnames) == 24 and len(set(bench.classnames)) == 24
    per_class = {split: torch.bincount(torch.tensor([it[1] for it in items]), minlength=24)
                 for split, items in [("train", bench.train), ("test", bench.test)]}
    assert (per_class["train"] == 32).all() and (per_class["test"] >= 50).all()
    assert all(bench.classnames[label] == name for _, label, name in bench.test)
    # World v3: base (first half) and new are each a 4 colours x 3 shapes block of one grid
    base, new = bench.classnames[:12], bench.classnames[12:]
    assert {n.split()[0] for n in base} == {"red", "green", "blue", "yellow"}
    assert {n.split()[1] for n in base} == {"triangle", "star", "cross"}
    assert {n.split()[0] for n in new} == {"purple", "orange", "pink", "white"}
    assert {n.split()[1] for n in new} == {"circle", "square", "heart"}
    assert set(bench.shifts) == {"photo", "noisy", "vivid", "lowcontrast"}
    assert all(len(items) == len(bench.test) for items in bench.shifts.values())
    image = bench.open_image(bench.test[0][0])
    assert image.size == (shapes.WORLD_RES,) * 2 and image.mode == "RGB"
    # train and test images are different renderings
    train0 = np.asarray(bench.open_image(bench.train[0][0]))
    assert not np.array_equal(train0, np.asarray(image))
    with pytest.raises(ValueError, match="world datasets"):
        data.load_dataset("shapes_sepia", root=None)


def test_world_v3_halves_follow_one_rule_share_no_word_and_hold_out_pairs_in_both():
    """World v3's criterion 2 (world/README.md): base and new are each a full colour x shape grid of
    the same size, drawn by the same renderer, sharing no word, each with pairs pretraining never drew;
    shapes2 is the grid's other blocks: the task's words in pairs the task never uses."""
    task, task2 = shapes.world_task_classes(), shapes.world_task2_classes()
    base, new = task[:len(task) // 2], task[len(task) // 2:]
    _, heldout = shapes.world_combo_split()
    for half in (base, new):
        colours, kinds = {c for c, _ in half}, {s for _, s in half}
        assert sorted(half) == sorted((c, s) for c in colours for s in kinds)  # a full grid
        assert len(half) == 12 and any(pair in heldout for pair in half)
    words = lambda pairs: {w for p in pairs for w in shapes.world_classname(*p).split()}
    assert not words(base) & words(new)
    assert len(set(task2)) == len(task2) == 24 and not set(task2) & set(task)
    assert words(task2) == words(task)


def test_positive_mask_counts_every_matching_image():
    attributes = (torch.tensor([0, 0, 1]), torch.tensor([2, 2, 2]), torch.tensor([0, 1, 0]),
                  torch.tensor([0, 0, 0]))
    named = torch.tensor([[True, True, False, False],    # "a red star."
                          [True, True, True, False],     # "a photo of a large red star."
                          [False, True, False, False]])  # "a star."
    m = shapes.world_positive_mask(attributes, named)
    expected = torch.tensor([[1., 0., 1.], [1., 1., 1.], [0., 0., 1.]])
    assert torch.equal(m, expected)


def test_shipped_tiny_clip_zero_shot_within_band():
    """Guards the loader, the checkpoint and the transform path: accuracies measured when the
    checkpoint was made (README), with a band for rendering noise on 20 images per class."""
    model = tiny_clip.load_tiny_clip()
    seen, heldout = shapes.world_combo_split()
    photo_base = tiny_clip.world_zero_shot(model, seen[:24], "photo", per_class=20)
    noisy_base = tiny_clip.world_zero_shot(model, seen[:24], "noisy", per_class=20)
    assert 0.93 <= photo_base <= 1.0, photo_base  # 0.973 when the checkpoint was made
    assert 0.12 <= noisy_base <= 0.32, noisy_base  # 0.219
    checkpoint = torch.load(tiny_clip.TINY_CHECKPOINT, map_location="cpu", weights_only=True)
    assert tiny_clip.TINY_CHECKPOINT.stat().st_size < 20e6
    assert checkpoint["config"] == tiny_clip.TINY_CONFIG


@pytest.fixture(scope="module")
def sensitivity():
    return tiny_clip.world_prompt_sensitivity(tiny_clip.load_tiny_clip(), n_prompts=4, seeds=(1, 2, 3))


def test_downstream_zero_shot_within_world_v3_band(sensitivity):
    """World v3's criterion 1: zero-shot accuracy on the 'shapes' task's test set (the one coop.py
    reports) within 50-85 % on base and on new (real CLIP: about 69 / 74). A new checkpoint or
    renderer that moves either number out of the band has to be re-measured and documented."""
    assert 0.50 <= sensitivity["base"] <= 0.85, sensitivity  # 0.6267 when the split was chosen
    assert 0.50 <= sensitivity["new"] <= 0.85, sensitivity  # 0.7142


def test_untrained_deep_vision_prompts_barely_move_zero_shot(sensitivity):
    """World v3's criterion 4: 4 untrained N(0, 0.02^2) vision prompt tokens in every layer (how
    PromptSRC and IVLP start) change zero-shot accuracy by at most 2 points on base and on new
    (measured: at most 1.67 on base, 0.92 on new)."""
    for seed, acc in sensitivity["prompted"].items():
        for half in ("base", "new"):
            assert abs(acc[half] - sensitivity[half]) <= 0.02 + 1e-9, (seed, half, sensitivity)


def test_prompted_encoder_without_prompts_is_encode_image():
    torch.manual_seed(0)
    model = tiny_clip.build_tiny_clip().eval()
    images = torch.randn(3, 3, shapes.WORLD_RES, shapes.WORLD_RES)
    with torch.no_grad():
        plain = model.encode_image(images)
        prompted = tiny_clip.encode_image_with_random_prompts(model, images, 0, torch.Generator())
        four = tiny_clip.encode_image_with_random_prompts(model, images, 4, torch.Generator().manual_seed(1))
    assert torch.allclose(prompted, plain, atol=1e-5)
    assert not torch.allclose(four, plain, atol=1e-3)  # the prompts do reach the output


def test_tiny_backbone_through_the_loader_matches_direct_load():
    backbone = data.load_backbone("tiny", "shapes", "cpu")
    direct = tiny_clip.load_tiny_clip()
    tokens = backbone.tokenize(["a photo of a red star."])
    assert tokens.shape == (1, tiny_clip.TINY_CONFIG["text_cfg"]["context_length"])
    with torch.no_grad():
        assert torch.allclose(backbone.model.encode_text(tokens), direct.encode_text(tokens))
    assert backbone.image_size == shapes.WORLD_RES == tiny_clip.TINY_CONFIG["vision_cfg"]["image_size"]
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_pretraining_entry_point_runs_and_loss_goes_down(tmp_path):
    out = tmp_path / "tiny.pt"
    subprocess.run([sys.executable, "-m", "world", "pretrain", "--steps", "12",
                    "--batch-size", "64", "--threads", "2", "--log-every", "1", "--check-per-class", "5",
                    "--out", str(out)],
                   check=True, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    meta = torch.load(out, map_location="cpu", weights_only=True)["meta"]
    losses = [h["loss"] for h in meta["loss_history"]]
    assert len(losses) >= 3
    assert sum(losses[-2:]) / 2 < losses[0] - 0.1, losses
    assert out.stat().st_size < 20e6
    assert set(meta["zero_shot"]) == {"photo_base", "photo_new", "photo_heldout", "noisy_base"}
    assert all(0 <= acc <= 1 for acc in meta["zero_shot"].values())


def test_a_checkpoint_made_with_another_config_loads_with_the_config_it_carries(tmp_path):
    config = {**tiny_clip.TINY_CONFIG, "vision_cfg": {**tiny_clip.TINY_CONFIG["vision_cfg"], "width": 64, "layers": 2}}
    torch.manual_seed(0)
    model = tiny_clip.build_tiny_clip(config)
    state = {k: v.half() for k, v in model.state_dict().items()}
    table = state.pop("token_embedding.weight")
    ids = torch.arange(5)
    torch.save({"config": config, "state_dict": state, "token_ids": ids, "token_rows": table[ids]}, tmp_path / "x.pt")
    loaded = tiny_clip.load_tiny_clip(tmp_path / "x.pt")
    assert loaded.visual.conv1.out_channels == 64 and len(loaded.visual.transformer.resblocks) == 2
    assert torch.equal(loaded.visual.conv1.weight, model.visual.conv1.weight.half().float())


# ------------------------------------------------------------------ the domain-shift task (shapes_domains)
@pytest.fixture(scope="module")
def domains_task():
    """shapes_domains trained on lowcontrast: a style whose every image has a narrow pixel range."""
    from world import domains
    return domains, data.load_dataset(data.WORLD_DOMAINS, None, train_domain="lowcontrast")


def _pixel_range(bench, items):
    """Per image, the spread of its pixel values (99th - 1st percentile, 0-255) [N]."""
    x = torch.stack([torch.from_numpy(np.array(bench.open_image(it.source))) for it in items]).float()
    x = x.reshape(len(items), -1)
    return x.quantile(0.99, dim=1) - x.quantile(0.01, dim=1)


def test_shapes_domains_classes_are_the_shapes_and_colour_carries_no_label(domains_task):
    domains, bench = domains_task
    assert bench.classnames == list(shapes.WORLD_SHAPES) and bench.template == "a photo of a {}."
    sizes = domains.DOMAINS_SPLIT_SIZES
    for split, items in [("train", bench.train), ("val", bench.val), ("test", bench.test), *bench.shifts.items()]:
        labels = torch.tensor([it.label for it in items])
        assert all(it.classname == shapes.WORLD_SHAPES[it.label] for it in items)
        assert (torch.bincount(labels, minlength=8) == sizes.get(split, sizes["test"])).all(), split
    # colour independent of the shape: no class has a colour in much more than 1/8 of its images...
    labels = torch.tensor([it.label for it in [*bench.train, *bench.test]])
    colours = torch.cat([bench.colours["train"], bench.colours["test"]])
    counts = torch.zeros(8, 8).index_put_((labels, colours), torch.ones(len(labels)), accumulate=True)
    assert (counts / counts.sum(1, keepdim=True)).max() < 0.25
    # ...and in the pixels: the brightest pixel's colour (the shape's) does not predict the label
    x = torch.stack([torch.from_numpy(np.array(bench.open_image(it.source))) for it in bench.train])
    x = x.float().reshape(len(x), -1, 3)
    fill = x[torch.arange(len(x)), x.max(-1).values.argmax(-1)]  # [N, 3]
    y = torch.tensor([it.label for it in bench.train])
    centroids = torch.stack([fill[y == c].mean(0) for c in range(8)])
    assert (torch.cdist(fill, centroids).argmin(1) == y).float().mean() < 0.3


def test_shapes_domains_trains_and_validates_in_its_style_and_tests_every_other(domains_task):
    domains, bench = domains_task
    assert domains.DOMAINS_TRAIN_STYLE == "outline"  # the default; this benchmark trains on lowcontrast
    others = [s for s in shapes.WORLD_STYLES if s != "lowcontrast"]
    assert list(bench.shifts) == others and bench.mean_of == tuple(others)
    assert (_pixel_range(bench, bench.train) < 115).all() and (_pixel_range(bench, bench.val) < 115).all()
    assert (_pixel_range(bench, bench.test) < 115).all()  # the in-distribution test: the same style
    for style in others:  # every other style's test split is there, and is not low-contrast
        assert _pixel_range(bench, bench.shifts[style][::10]).median() > 115, style
    sources = [it.source for items in (bench.train, bench.val, bench.test, *bench.shifts.values()) for it in items]
    assert len(set(sources)) == len(sources)  # every split its own images


def test_shapes_domains_record_has_in_distribution_each_style_and_their_mean(domains_task, capsys):
    _, bench = domains_task
    backbone = data.Backbone(None, None, "tiny", "shapes", 48, data.CLIP_MEAN, data.CLIP_STD)
    task = data.Task(bench, {}, backbone, "all", bench.classnames)
    splits = data.evaluation_sets(task, "all")
    assert list(splits) == ["all", *bench.shifts] and all(names == bench.classnames for _, names, _ in splits.values())
    accuracy = {"all": 90.0, "photo": 80.0, "noisy": 40.0, "outline": 60.0, "vivid": 50.0}
    rows = {"zero-shot CLIP": {s: a - 10 for s, a in accuracy.items()}, "proreg": dict(accuracy)}
    args = argparse.Namespace(protocol="all", shots=0, seed=1, epochs=10, dataset=data.WORLD_DOMAINS)
    record = data.result_record("proreg", args, task, rows, "proreg", splits, {})
    assert record["all"] == 90.0  # in-distribution: the training style's test split
    assert record["shifts"] == {"photo": 80.0, "noisy": 40.0, "outline": 60.0, "vivid": 50.0, "mean": 57.5}
    assert record["zero_shot"]["mean"] == 47.5 and "mean" in capsys.readouterr().out


def test_shapes_domains_refuses_a_style_it_does_not_have(monkeypatch, tmp_path):
    from world import domains
    monkeypatch.setattr(domains, "_benchmark", lambda style, seed: style)  # no rendering needed
    assert data.load_dataset(data.WORLD_DOMAINS, None) == "outline"
    assert data.load_dataset(data.WORLD_DOMAINS, None, train_domain="vivid") == "vivid"
    with pytest.raises(data.UsageError, match="'sketch' is not a style of shapes_domains: one of photo, noisy, "
                       "outline, vivid, lowcontrast"):
        data.load_dataset(data.WORLD_DOMAINS, None, train_domain="sketch")
    with pytest.raises(data.UsageError, match="--test-domain 'photo': shapes_domains tests on every style"):
        data.load_dataset(data.WORLD_DOMAINS, None, test_domain="photo")
    with pytest.raises(data.UsageError, match="apply to pacs, office_home, shapes_domains only, not shapes_biased"):
        data.load_dataset(data.WORLD_BIASED, None, train_domain="photo")
    proc = subprocess.run([sys.executable, "proreg.py", "--dataset", "shapes_domains", "--train-domain", "sketch",
                           "--output-dir", str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --train-domain 'sketch' is not a style")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
