"""coop.py: the prompted model against CLIP itself (values, fp32, tight tolerances), the exact
truncated text pass, CoCoOp against CoOp, the class-token layouts, the Dassl schedule, and an end-to-end
run on a tiny Caltech101 fixture that --eval-only --resume reproduces (the same run as a script in an
empty folder: test_copy.py)."""
import argparse
import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

import coop

# A random-init CLIP small enough for CPU tests, with OpenAI CLIP's 77-token text context.
TINY_NAME = "coop-test-tiny"
TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
NAMES = ["cat", "hot air balloon", "golden_retriever", "x-ray film", "ox"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY).eval().requires_grad_(False)
    # Random init leaves the positional embedding near 0; make it matter, so a wrong slice shows.
    model.positional_embedding.data.normal_(std=0.5)
    return model


def settings(**kw):
    base = dict(ctx_init="a photo of a", n_ctx=4, csc=False, class_token_position="end", conditional=False)
    return argparse.Namespace(**{**base, **kw})


def prompted(clip, names=NAMES, **kw):
    torch.manual_seed(1)
    return coop.PromptedCLIP(clip, open_clip.tokenize, names, settings(**kw))


def images(n=3):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_word_init_gives_zero_shot_clip_logits(clip):
    zero_shot = coop.ZeroShotCLIP(clip, open_clip.tokenize, NAMES, "a photo of a {}.")
    expected = zero_shot(images())  # CLIP's own encode_text on the same strings
    model = prompted(clip)
    assert model.prompt_learner.ctx.shape == (4, 64)
    for truncate in (True, False):
        model.text_encoder.truncate = truncate
        torch.testing.assert_close(model(images()), expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0.1  # the logits differ between classes: the comparison means something


def test_truncated_text_pass_equals_full_pass_values_and_gradients(clip):
    model = prompted(clip, ctx_init="", n_ctx=16, csc=True)
    prompts, eot = model.prompt_learner()
    assert prompts.shape == (5, 77, 64) and int(eot.max()) + 1 < 40  # really truncated
    out = {}
    for truncate in (True, False):
        model.text_encoder.truncate = truncate
        model.prompt_learner.ctx.grad = None
        features = model.text_encoder(*model.prompt_learner())  # [C, D]
        features.pow(2).sum().backward()
        out[truncate] = features.detach(), model.prompt_learner.ctx.grad.clone()
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-6)
    assert out[True][1].abs().sum() > 0


def test_cocoop_with_zero_meta_net_output_equals_coop(clip):
    cocoop, plain = prompted(clip, conditional=True), prompted(clip)
    torch.testing.assert_close(cocoop.prompt_learner.ctx, plain.prompt_learner.ctx)
    last = cocoop.prompt_learner.meta_net[-1]
    with torch.no_grad():
        assert not torch.allclose(cocoop(images()), plain(images()))  # a live meta-net changes logits
        last.weight.zero_(), last.bias.zero_()
    torch.testing.assert_close(cocoop(images()), plain(images()), rtol=1e-5, atol=1e-5)


def test_cocoop_image_i_gets_its_own_shifted_context(clip, monkeypatch):
    """Batch > 1, in chunks of 2 images: image i's logits are CoOp's with context V + pi(x_i)."""
    monkeypatch.setattr(coop, "PROMPTS_PER_PASS", 2 * len(NAMES))
    cocoop, plain = prompted(clip, conditional=True), prompted(clip)
    x = images(5)
    with torch.no_grad():
        logits = cocoop(x)  # [5, C]
        features = cocoop.encode_image(x)
        shifts = cocoop.prompt_learner.meta_net(features)  # [5, d]
        for i in range(5):
            plain.prompt_learner.ctx.copy_(cocoop.prompt_learner.ctx + shifts[i])
            torch.testing.assert_close(logits[i], plain(x[i:i + 1])[0], rtol=1e-5, atol=1e-5)


def test_meta_net_shape_and_input_is_normalised(clip):
    model = prompted(clip, conditional=True)
    meta_net = model.prompt_learner.meta_net  # Linear(D, D/16) - ReLU - Linear(D/16, d)
    assert [tuple(m.weight.shape) for m in meta_net if hasattr(m, "weight")] == [(2, 32), (64, 2)]
    seen = []
    meta_net.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(images())
    torch.testing.assert_close(seen[0].norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("position, text", [("end", "a photo of a {}."), ("middle", "a photo {} of a."),
                                            ("front", "{} a photo of a.")])
def test_class_token_position_orders_the_tokens(clip, position, text):
    learner = prompted(clip, class_token_position=position).prompt_learner
    prompts, eot = learner()
    ids = open_clip.tokenize([text.format(n.replace("_", " ")) for n in NAMES])
    torch.testing.assert_close(prompts, clip.token_embedding(ids), rtol=0, atol=0)
    assert torch.equal(eot, ids.argmax(-1))


def test_class_specific_contexts(clip):
    learner = prompted(clip, ctx_init="", n_ctx=8, csc=True).prompt_learner
    assert learner.ctx.shape == (5, 8, 64)
    prompts, _ = learner()
    assert prompts.shape == (5, 77, 64)
    prompts[2].sum().backward()  # class 2's prompt uses class 2's context only
    assert learner.ctx.grad[2].abs().sum() > 0 and learner.ctx.grad[[0, 1, 3, 4]].abs().sum() == 0
    words = prompted(clip, csc=True).prompt_learner.ctx  # word init: every class starts from the words
    assert words.shape == (5, 4, 64) and torch.equal(words[0], words[4])


def test_dassl_learning_rate_schedule():
    args = argparse.Namespace(lr=0.002, epochs=10, warmup_epochs=1, warmup_lr=1e-5)
    lrs = [coop.learning_rate(e, args) for e in range(10)]
    expected = [1e-5] + [0.001 * (1 + math.cos(math.pi * (e - 1) / 10)) for e in range(1, 10)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[1] == pytest.approx(2e-3) and lrs[2] == pytest.approx(1.951e-3, rel=1e-3)
    assert lrs[-1] == pytest.approx(1.91e-4, rel=1e-2) and min(lrs[1:]) > 0  # never reaches 0


def test_paper_defaults_and_per_dataset_exceptions():
    def resolved(*argv):
        return coop.resolve_settings(coop.parse_args([*argv, "--model", "ViT-B-16", "--pretrained", "none"]))
    a = resolved("--dataset", "caltech101")
    assert (a.epochs, a.batch_size, a.n_ctx, a.ctx_init, a.shots, a.lr, a.pretrained) == (200, 32, 4, "a photo of a", 16, 0.002, None)
    assert resolved("--dataset", "caltech101", "--shots", "1").epochs == 50
    assert resolved("--dataset", "caltech101", "--shots", "4").epochs == 100
    assert resolved("--dataset", "imagenet").epochs == 50
    b = resolved("--dataset", "imagenet", "--conditional")
    assert (b.epochs, b.batch_size) == (10, 1)
    assert resolved("--dataset", "caltech101", "--epochs", "3").epochs == 3
    assert coop.parse_args([]).dataset == "shapes"
    for method in ([], ["--conditional"]):  # every world benchmark takes the world's entry
        entry = coop.DATASET_SETTINGS["shapes"].get("cocoop" if method else "coop", {})
        a, b = resolved("--dataset", "shapes", *method), resolved("--dataset", "shapes_noisy", *method)
        assert (a.epochs, a.batch_size) == (b.epochs, b.batch_size)
        assert all(getattr(b, k) == v for k, v in entry.items())
    with pytest.raises(SystemExit):  # a model without weights named would silently be random
        coop.resolve_settings(coop.parse_args(["--model", "ViT-B-16"]))


# ---------------------------------------------------------------------------- end to end, subprocess
def caltech_fixture(root: Path, n_classes=4, per_class=10):
    """CoOp's Caltech101 layout with random JPEGs (no split file: data.py's seeded auto-split)."""
    gen = torch.Generator().manual_seed(0)
    for c in ["BACKGROUND_Google", "Faces", "accordion", "airplanes", "anchor"][:n_classes + 1]:
        folder = root / "caltech-101" / "101_ObjectCategories" / c
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(40, 44, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"image_{i + 1:04d}.jpg")


def check_run(run, method):
    """The files of a finished run; returns its results."""
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == method and results["shots"] == 2 and results["epoch"] == 2
    assert results["hm"] == pytest.approx(2 * results["base"] * results["new"] / (results["base"] + results["new"]))
    assert set(results["zero_shot"]) >= {"base", "new", "hm"} and set(results["test_loss"]) == {"base", "new"}
    assert {p.name for p in run.iterdir()} >= {"args.json", "fewshot.json", "results.json", "checkpoint.pt"}
    assert len(json.loads((run / "fewshot.json").read_text())["items"]) == 2 * 4  # 2 shots x 4 classes
    lines = (run.parent / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["base"] == results["base"]
    ckpt = torch.load(run / "checkpoint.pt")
    assert set(ckpt) == {"learned", "args", "epoch", "metrics"} and ckpt["epoch"] == 2
    assert ckpt["metrics"]["test_loss"] == results["test_loss"]
    meta = {f"prompt_learner.meta_net.{layer}.{p}" for layer in ("linear1", "linear2") for p in ("weight", "bias")}
    assert set(ckpt["learned"]) == {"prompt_learner.ctx"} | (meta if method == "cocoop" else set())  # nothing frozen
    return results


def check_reproduced(run, results):
    again = json.loads((run / "eval_only.json").read_text())
    for key in ("base", "new", "hm", "zero_shot", "epoch"):
        assert again[key] == results[key], key
    for split, loss in results["test_loss"].items():  # continuous: a different model would not match
        assert again["test_loss"][split] == pytest.approx(loss, rel=1e-6, abs=1e-7), split
    assert len((run.parent / "results.jsonl").read_text().splitlines()) == 1  # re-evaluation appends nothing


def test_cocoop_run_in_process_refuses_overwrite_and_eval_only_reproduces(tmp_path, monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    caltech_fixture(tmp_path / "data")
    run = tmp_path / "runs" / "run1"
    common = ["--root", str(tmp_path / "data"), "--workers", "0", "--device", "cpu"]
    train = ["--dataset", "caltech101", "--model", TINY_NAME, "--pretrained", "none", "--shots", "2",
             "--epochs", "2", "--output-dir", str(run), *common]
    coop.main(coop.parse_args([*train, "--conditional", "--batch-size", "2"]))
    results = check_run(run, "cocoop")
    saved = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds a checkpoint"):  # a finished run is never overwritten
        coop.main(coop.parse_args(train))
    assert (run / "checkpoint.pt").read_bytes() == saved
    coop.main(coop.parse_args(["--eval-only", "--resume", str(run), *common]))
    check_reproduced(run, results)


def test_a_run_whose_data_is_missing_stops_clearly_and_writes_nothing(tmp_path):
    args = coop.parse_args(["--dataset", "caltech101", "--root", str(tmp_path / "nodata"),
                            "--output-dir", str(tmp_path / "run")])
    with pytest.raises(FileNotFoundError, match="101_ObjectCategories"):
        coop.main(args)
    assert not (tmp_path / "run").exists()
