"""promptsrc.py: the deep-prompted encoders against CLIP itself (prompts off = open_clip's encoders;
prompts on change exactly the blocks they should), each loss term against its formula, GPA against
the explicit weighted sum of the per-epoch prompts (also across a SIGKILL and --resume), the fused
kernels against the readable PyTorch path, and an end-to-end run on a tiny Caltech101 fixture that
--evaluate reproduces. The run machinery itself (data.py section 8) is tested in test_data.py."""
import argparse
import copy
import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F

import data
import kernels
import promptsrc
from conftest import NAMES, caltech_fixture, images, kill_after_epochs

ROOT = Path(__file__).resolve().parents[1]
# A random-init CLIP small enough for CPU tests, deep enough to see prompts stop at a depth (4 blocks each).
TINY_NAME = "promptsrc-test-tiny"
TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=4, width=64, patch_size=8, head_width=32),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=4))


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY).eval().requires_grad_(False)
    model.positional_embedding.data.normal_(std=0.5)  # random init leaves it near 0; make a wrong slice show
    return model


def settings(**kw):
    base = dict(ctx_init="a photo of a", n_ctx_text=4, n_ctx_vision=4, prompt_depth_text=3, prompt_depth_vision=3,
                ivlp=False, text_loss_weight=25.0, image_loss_weight=10.0, no_truncate=False)
    return argparse.Namespace(**{**base, **kw})


def prompted(clip, names=NAMES, **kw):
    torch.manual_seed(1)
    return promptsrc.PromptedCLIP(clip, open_clip.tokenize, names, settings(**kw))


# ---------------------------------------------------------------------------- the encoders
def test_with_every_prompt_off_the_encoders_are_open_clips(clip):
    ids = open_clip.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
    text = promptsrc.TextEncoder(clip)(clip.token_embedding(ids), ids.argmax(-1))
    torch.testing.assert_close(text, clip.encode_text(ids), rtol=1e-5, atol=1e-5)
    cut = int(ids.argmax(-1).max()) + 1  # the truncated pass is exact
    torch.testing.assert_close(promptsrc.TextEncoder(clip)(clip.token_embedding(ids[:, :cut]), ids.argmax(-1)),
                               clip.encode_text(ids), rtol=1e-5, atol=1e-5)
    encoder = promptsrc.ImageEncoder(clip.visual)
    for none in (None, torch.zeros(0, 4, 64)):  # no prompts, or prompt depth 0
        torch.testing.assert_close(encoder(images(), none), clip.encode_image(images()), rtol=1e-5, atol=1e-5)
    model = prompted(clip)  # the frozen model is the prompted one with its prompts off
    torch.testing.assert_close(model.encode_image(images(), prompted=False),
                               F.normalize(clip.encode_image(images()), dim=-1), rtol=1e-5, atol=1e-6)
    # text depth 1 (input-level context only) from "a photo of a", image depth 0: zero-shot CLIP's logits
    plain = prompted(clip, prompt_depth_text=1, prompt_depth_vision=0)
    zero_shot = data.ZeroShotCLIP(clip, open_clip.tokenize, NAMES, "a photo of a {}.")
    expected = zero_shot(images())
    torch.testing.assert_close(plain(images()), expected, rtol=1e-5, atol=1e-4)
    assert expected.std() > 0.1 and not torch.allclose(model(images()), expected, atol=1e-2)


def block_io(blocks, run):
    """(inputs, outputs) of each block while `run()` runs."""
    inputs, outputs, handles = [], [], []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone())))
        handles.append(block.register_forward_hook(lambda m, args, out: outputs.append(out.detach().clone())))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


def test_text_prompts_replace_positions_1_to_M_in_the_blocks_below_the_depth_only(clip):
    model = prompted(clip, prompt_depth_text=3)  # 4 blocks: block 0 gets ctx, 1 and 2 new sets, 3 none
    learner, blocks = model.prompt_learner, model.text_encoder.resblocks
    assert learner.ctx.shape == (4, 64) and learner.text_prompts.shape == (2, 4, 64)
    inputs, outputs = block_io(blocks, model.class_text_features)
    m = learner.n_ctx
    prompts, _ = learner()
    torch.testing.assert_close(inputs[0], prompts + clip.positional_embedding[:prompts.shape[1]])
    for i in (1, 2):  # positions 1..M are block i's learned set, as it is; all others carry on
        assert torch.equal(inputs[i][:, 1:1 + m], learner.text_prompts[i - 1].detach().expand(len(NAMES), -1, -1))
        assert torch.equal(inputs[i][:, :1], outputs[i - 1][:, :1])
        assert torch.equal(inputs[i][:, 1 + m:], outputs[i - 1][:, 1 + m:])
    assert torch.equal(inputs[3], outputs[2])  # at and past the depth: nothing replaced
    # a block's prompts change nothing before that block
    with torch.no_grad():
        learner.text_prompts[1] += 1.0
    again, out_again = block_io(blocks, model.class_text_features)
    assert torch.equal(out_again[0], outputs[0]) and torch.equal(out_again[1], outputs[1])
    assert not torch.allclose(out_again[2], outputs[2])


def test_image_prompts_are_appended_before_ln_pre_and_replace_the_last_M_tokens_below_the_depth(clip):
    model = prompted(clip, prompt_depth_vision=3)
    learner, visual = model.prompt_learner, clip.visual
    blocks = visual.transformer.resblocks
    assert learner.vision_prompts.shape == (3, 4, 64)
    x = images()
    inputs, outputs = block_io(blocks, lambda: model.encode_image(x))
    plain, _ = block_io(blocks, lambda: model.encode_image(x, prompted=False))
    n_patches, m = visual.positional_embedding.shape[0], 4  # CLS + grid^2 = 17, then M prompts
    assert all(t.shape == (3, n_patches + m, 64) for t in inputs + outputs)
    assert plain[0].shape == (3, n_patches, 64)
    assert torch.equal(inputs[0][:, :n_patches], plain[0])  # ln_pre is per token: the image tokens are CLIP's
    torch.testing.assert_close(inputs[0][:, n_patches:],
                               visual.ln_pre(learner.vision_prompts[0].detach()).expand(3, -1, -1))
    for i in (1, 2):
        assert torch.equal(inputs[i][:, -m:], learner.vision_prompts[i].detach().expand(3, -1, -1))
        assert torch.equal(inputs[i][:, :-m], outputs[i - 1][:, :-m])
    assert torch.equal(inputs[3], outputs[2])
    with torch.no_grad():
        learner.vision_prompts[2] += 1.0
    _, out_again = block_io(blocks, lambda: model.encode_image(x))
    assert torch.equal(out_again[0], outputs[0]) and torch.equal(out_again[1], outputs[1])
    assert not torch.allclose(out_again[2], outputs[2])


def test_learned_parameters_are_the_prompts_only_and_the_paper_count_on_vit_b16():
    cfg = open_clip.get_model_config("ViT-B-16")  # the paper's backbone: count the shapes, no weights needed
    d, w = cfg["text_cfg"]["width"], cfg["vision_cfg"]["width"]
    assert 4 * d + 8 * 4 * d + 9 * 4 * w == 46_080  # METHODS.md 2.1: 4x512 + 8x4x512 + 4x768 + 8x4x768


def test_depth_is_capped_at_the_blocks_of_the_model_and_learned_tensors_are_the_prompts(clip):
    model = prompted(clip, prompt_depth_text=9, prompt_depth_vision=9)
    learned = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert learned == {"prompt_learner.ctx": (4, 64), "prompt_learner.text_prompts": (3, 4, 64),
                       "prompt_learner.vision_prompts": (4, 4, 64)}


def test_frozen_text_features_are_the_normalised_mean_of_unnormalised_template_features(clip):
    model = prompted(clip)
    templates = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]
    model.set_frozen_text_features(NAMES, templates)
    expected = []
    for name in NAMES:
        ids = open_clip.tokenize([t.format(name.replace("_", " ")) for t in templates])
        expected.append(F.normalize(clip.encode_text(ids).mean(0), dim=-1))
    torch.testing.assert_close(model.frozen_text_features, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_the_templates_of_textual_diversity():
    t = promptsrc.PROMPTSRC_TEMPLATES  # trainers/imagenet_templates.py of the official code
    assert len(t) == len(set(t)) == 60 and t[0] == "a photo of a {}." and t[-1] == "itap of the {}."
    assert t[1:3] == ["a bad photo of a {}.", "a photo of many {}."] and "a jpeg corrupted photo of the {}." not in t
    world = promptsrc.frozen_templates("shapes")  # the tiny CLIP's own captions, one class-name slot each
    assert "a photo of a {}." in world and len(world) >= 5
    assert all(x.count("{}") == 1 and x.format("red star").count("red star") == 1 for x in world)
    assert promptsrc.frozen_templates("caltech101") is t


# ---------------------------------------------------------------------------- the loss
def random_terms(B=6, C=5, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    text, frozen_text, image, frozen_image = unit(C, D), unit(C, D), unit(B, D), unit(B, D)
    logits = (100 * image @ text.t()).requires_grad_()
    frozen_logits = 100 * frozen_image @ frozen_text.t()
    return logits, torch.randint(0, C, (B,), generator=g), frozen_logits, text, frozen_text, image, frozen_image


@pytest.mark.parametrize("fused", [False, True])
def test_each_loss_term_equals_its_formula_on_random_tensors(monkeypatch, fused):
    monkeypatch.setattr(promptsrc.kernels, "kernel_available", lambda device: fused)
    logits, y, frozen_logits, text, frozen_text, image, frozen_image = random_terms()
    B, C = logits.shape
    dtype = torch.float32  # the kernel's precision
    z_p, z = logits.detach(), frozen_logits
    p, log_p, log_q = z.softmax(1), z.log_softmax(1), z_p.log_softmax(1)
    ce = -log_q[torch.arange(B), y].mean()
    kl = (p * (log_p - log_q)).sum() / (B * C)  # KL(frozen || prompted), summed, divided by B*C
    assert kl > 0 and not math.isclose(kl, (log_q.exp() * (log_q - log_p)).sum() / (B * C), rel_tol=1e-3)
    got, parts = promptsrc.logit_loss(logits.to(dtype), frozen_logits.to(dtype), y)
    assert got.item() == pytest.approx((ce + kl).item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["scl_logits"].item() == pytest.approx(kl.item(), rel=1e-4)
    scl_text = (text - frozen_text).abs().sum() / text.numel()  # 1/(C*d) sum_c |g_p,c - g_c|_1
    scl_image = (image - frozen_image).abs().sum() / image.numel()
    total = promptsrc.promptsrc_loss(logits.to(dtype), y, frozen_logits.to(dtype), text.to(dtype),
                                     frozen_text.to(dtype), image.to(dtype), frozen_image.to(dtype), 25.0, 10.0)
    assert total["loss"].item() == pytest.approx((ce + kl + 25 * scl_text + 10 * scl_image).item(), rel=1e-5)
    assert set(total) == {"loss", "ce", "scl_logits", "scl_text", "scl_image"}  # each term, unweighted
    assert total["scl_text"].item() == pytest.approx(scl_text.item(), rel=1e-5)
    assert total["scl_image"].item() == pytest.approx(scl_image.item(), rel=1e-5)
    combined = total["ce"] + total["scl_logits"] + 25 * total["scl_text"] + 10 * total["scl_image"]
    assert total["loss"].item() == pytest.approx(combined.item(), rel=1e-6)  # the terms make the loss
    only_text = promptsrc.promptsrc_loss(logits.to(dtype), y, frozen_logits.to(dtype), text.to(dtype),
                                         frozen_text.to(dtype), image.to(dtype), frozen_image.to(dtype), 1.0,
                                         0.0)["loss"]
    assert (only_text - got).item() == pytest.approx(scl_text.item(), rel=1e-4)


def test_the_regularisers_pull_the_prompted_features_towards_the_frozen_ones(monkeypatch):
    """Gradient steps on L_SCL alone (no CE) bring the prompted features and logits closer to the frozen."""
    monkeypatch.setattr(promptsrc.kernels, "kernel_available", lambda device: False)
    _, y, frozen_logits, text, frozen_text, image, frozen_image = random_terms(seed=3)
    text, image = text.float().requires_grad_(), image.float().requires_grad_()
    frozen_text, frozen_image, frozen_logits = frozen_text.float(), frozen_image.float(), frozen_logits.float()
    distance = lambda: ((text - frozen_text).abs().sum() + (image - frozen_image).abs().sum()).item()  # noqa: E731
    before = distance()
    for _ in range(100):
        logits = 100 * image @ text.t()
        scl = promptsrc.promptsrc_loss(logits, y, frozen_logits, text, frozen_text, image, frozen_image, 25.0,
                                       10.0)["loss"]
        scl = scl - F.cross_entropy(logits, y)  # the regularisers alone
        text.grad = image.grad = None
        scl.backward()
        with torch.no_grad():
            text -= 0.05 * text.grad
            image -= 0.05 * image.grad
    assert distance() < 0.5 * before


def fixed_batch(model, n=4, seed=5):
    x, y = images(n, seed), torch.arange(n) % len(NAMES)
    with torch.no_grad():
        return x, y, model.encode_image(x, prompted=False)


def step_once(clip, monkeypatch, fused, ivlp=False, frozen=True):
    monkeypatch.setattr(promptsrc.kernels, "kernel_available", lambda device: fused)
    model = prompted(clip, ivlp=ivlp)
    model.set_frozen_text_features(NAMES, ["a photo of a {}.", "a drawing of a {}."])
    learned = [p for p in model.parameters() if p.requires_grad]
    optimizer = promptsrc.sgd(learned, argparse.Namespace(lr=0.0025, momentum=0.9, weight_decay=5e-4),
                              torch.device("cpu"))
    x, y, f = fixed_batch(model)
    terms, correct = promptsrc.train_step(model, optimizer, x, y, *([f] if frozen else []))
    return terms, [p.grad.clone() for p in learned], [p.detach().clone() for p in learned]


def test_fused_and_readable_paths_give_the_same_loss_and_gradients(clip, monkeypatch):
    assert kernels.kernel_available("cpu")  # conftest: the Triton interpreter
    loss_r, grads_r, after_r = step_once(clip, monkeypatch, fused=False)
    loss_k, grads_k, after_k = step_once(clip, monkeypatch, fused=True)
    assert set(loss_k) == set(loss_r) == {"loss", "ce", "scl_logits", "scl_text", "scl_image"}
    for name, value in loss_r.items():  # the total and each term (the fused ones from its per-row values)
        assert loss_k[name].item() == pytest.approx(value.item(), rel=1e-4), name
    # atol at each tensor's scale: an fp32 sum rounds relative to its largest terms, so a small
    # element may differ by a few ulp of the largest (vision prompts' gradients ~1, the context's ~0.2)
    for a, b in zip(grads_r, grads_k):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * a.abs().max().item())
        assert a.abs().sum() > 0  # every prompt tensor learns
    for a, b in zip(after_r, after_k):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())


def test_cached_frozen_image_features_give_the_per_batch_step(clip, monkeypatch):
    cached, grads_c, _ = step_once(clip, monkeypatch, fused=False, frozen=True)
    per_batch, grads_b, _ = step_once(clip, monkeypatch, fused=False, frozen=False)
    assert all(torch.equal(cached[name], per_batch[name]) for name in cached)
    assert all(torch.equal(a, b) for a, b in zip(grads_c, grads_b))


def test_ivlp_is_cross_entropy_alone(clip, monkeypatch):
    terms, _, _ = step_once(clip, monkeypatch, fused=False, ivlp=True)
    model = prompted(clip, ivlp=True)
    x, y, _ = fixed_batch(model)
    assert set(terms) == {"loss", "ce"} and torch.equal(terms["loss"], terms["ce"])
    with torch.no_grad():
        assert terms["loss"].item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)


# ---------------------------------------------------------------------------- GPA
def test_gpa_weights_are_the_normalised_gaussian_and_agree_with_the_kernels():
    w = promptsrc.gpa_weights(20, 15, 1)
    assert sum(w) == pytest.approx(1.0) and w == kernels.gpa_weights(20, 15, 1)
    assert [round(v, 3) for v in w[12:17]] == [0.054, 0.242, 0.399, 0.242, 0.054]  # METHODS.md 2.2
    assert w.index(max(w)) == 14  # epoch 15


def test_readable_and_fused_gpa_give_the_explicit_weighted_sum():
    torch.manual_seed(0)
    shapes = [(4, 64), (3, 4, 64), (4, 4, 96)]
    per_epoch = [[torch.randn(s) for s in shapes] for _ in range(8)]
    weights = promptsrc.gpa_weights(8, 5, 2)
    expected = kernels.gpa_sum_reference(per_epoch, weights)  # float64, sum_e g_e theta_e
    params = [torch.zeros(s) for s in shapes]
    for gpa in (promptsrc.PromptAverage(params, 8, 5, 2), kernels.GaussianPromptAverage(params, 8, 5, 2)):
        for epoch, thetas in enumerate(per_epoch, 1):
            gpa.update(epoch, thetas)
        out = [torch.empty(s) for s in shapes]
        gpa.copy_to(out)
        for a, b in zip(out, expected):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- settings
def resolved(*argv):
    return promptsrc.resolve_settings(promptsrc.parse_args([*argv, "--model", "ViT-B-16", "--pretrained", "none"]))


def test_paper_settings_per_protocol_and_dataset():
    a = resolved("--dataset", "caltech101")
    assert (a.epochs, a.batch_size, a.lr, a.shots, a.ctx_init, a.n_ctx_vision) == (20, 4, 0.0025, 16, "a photo of a", 4)
    assert (a.prompt_depth_text, a.prompt_depth_vision, a.gpa_mean, a.gpa_std) == (9, 9, 15, 1)
    assert (a.text_loss_weight, a.image_loss_weight, a.momentum, a.weight_decay, a.warmup_lr) == (25, 10, 0.9, 5e-4, 1e-5)
    b = resolved("--dataset", "caltech101", "--protocol", "all")
    assert (b.epochs, b.gpa_mean, b.gpa_std, b.prompt_depth_text) == (50, 30, 30, 9)
    assert (resolved("--dataset", "dtd", "--protocol", "all").gpa_mean, resolved("--dataset", "dtd").gpa_mean) == (45, 15)
    c = resolved("--dataset", "imagenet", "--protocol", "cross")
    assert (c.epochs, c.prompt_depth_text, c.prompt_depth_vision, c.gpa_mean, c.gpa_std) == (20, 3, 3, 6, 10)
    assert c.eval_datasets.split(",")[0] == "caltech101"
    assert resolved("--dataset", "caltech101", "--gpa-mean", "3", "--epochs", "5").gpa_mean == 3
    assert promptsrc.parse_args([]).dataset == "shapes"


# ---------------------------------------------------------------------------- end to end
COMMON = ["--workers", "0", "--device", "cpu"]


def fixture_run(tmp_path, *extra, name="run1"):
    if not (tmp_path / "data").exists():
        caltech_fixture(tmp_path / "data")
    return ["--dataset", "caltech101", "--model", TINY_NAME, "--pretrained", "none", "--shots", "2",
            "--root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs" / name), *COMMON, *extra]


def recorder(monkeypatch, log):
    """Record the prompts each GPA update folds in, {epoch: [tensors]}, in either GPA implementation."""
    for cls in (promptsrc.PromptAverage, kernels.GaussianPromptAverage):
        def update(self, epoch, params, original=cls.update):
            log[epoch] = [p.detach().clone() for p in params]
            return original(self, epoch, params)
        monkeypatch.setattr(cls, "update", update)


def check_gpa(run, per_epoch):
    """The run's final prompts are sum_e g_e theta_e over the prompts each epoch ended with."""
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    args = ckpt["args"]
    weights = promptsrc.gpa_weights(args["epochs"], args["gpa_mean"], args["gpa_std"])
    assert sorted(per_epoch) == list(range(1, args["epochs"] + 1))
    expected = kernels.gpa_sum_reference([per_epoch[e] for e in sorted(per_epoch)], weights)
    for tensor, want in zip(ckpt["learned"].values(), expected):
        torch.testing.assert_close(tensor.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert not torch.equal(list(ckpt["learned"].values())[0], per_epoch[args["epochs"]][0])  # not the last epoch's
    return ckpt


def test_run_in_process_gpa_is_the_weighted_sum_and_evaluate_reproduces(tmp_path, monkeypatch):
    """Fused path (the interpreter): a 4-epoch run whose GPA spreads over the epochs, then --evaluate."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    log = {}
    recorder(monkeypatch, log)
    run = tmp_path / "runs" / "run1"
    record = promptsrc.main(promptsrc.parse_args(fixture_run(tmp_path, "--epochs", "4", "--batch-size", "2",
                                                             "--gpa-mean", "3", "--gpa-std", "1")))
    ckpt = check_gpa(run, log)
    assert set(ckpt) == {"learned", "args", "epoch", "metrics", "optimizer", "rng", "train", "extra"}
    assert ckpt["extra"]["weight_seen"] == pytest.approx(1.0) and record["train"] == ckpt["train"]
    assert record["method"] == "promptsrc" and ckpt["metrics"]["test_loss"] == record["test_loss"]
    assert record["hm"] == pytest.approx(data.harmonic_mean(record["base"], record["new"]))
    assert set(record["zero_shot"]) >= {"base", "new", "hm"} and record["classes"] == {"base": 2, "new": 2}
    epochs = data.read_log(run)  # every epoch's loss terms (fused: from the kernel's per-row values)
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4] and epochs[-1]["terms"] == record["train"]["terms"]
    for e in epochs:  # unweighted; the loss is CE + SCL-logits + 25 SCL-text + 10 SCL-image (to the rounding)
        t = e["terms"]
        assert set(t) == {"ce", "scl_logits", "scl_text", "scl_image"} and all(v > 0 for v in t.values())
        assert e["loss"] == pytest.approx(t["ce"] + t["scl_logits"] + 25 * t["scl_text"] + 10 * t["scl_image"],
                                          abs=3e-4)
    promptsrc.main(promptsrc.parse_args(["--evaluate", str(run), "--root", str(tmp_path / "data"), *COMMON]))
    again = json.loads((run / "eval.json").read_text())
    for key in ("base", "new", "hm", "zero_shot", "epoch"):
        assert again[key] == record[key], key
    for split, loss in record["test_loss"].items():  # continuous: another model would not match
        assert again["test_loss"][split] == pytest.approx(loss, rel=1e-6, abs=1e-7), split


def test_cached_frozen_image_features_are_computed_once_per_training_image(tmp_path, monkeypatch):
    """Without augmentation (as on the world) the training batches carry the frozen image features,
    computed once and equal to the frozen encoder's; IVLP's batches carry none."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    caltech_fixture(tmp_path / "data")
    benchmark = data.load_dataset("caltech101", tmp_path / "data")
    benchmark.augment = False
    backbone = data.load_backbone(TINY_NAME, None)
    items = data.fewshot(benchmark.train, 2, 1)
    args = argparse.Namespace(dataset="caltech101", ivlp=False, batch_size=3, test_batch_size=5, seed=1, workers=0)
    task = SimpleNamespace(benchmark=benchmark, backbone=backbone)
    model = prompted(backbone.model, names=benchmark.classnames)
    real_encode, frozen_calls = promptsrc.PromptedCLIP.encode_image, []

    def encode_image(self, x, prompted=True):
        assert not prompted
        frozen_calls.append(len(x))
        return real_encode(self, x, prompted)
    monkeypatch.setattr(promptsrc.PromptedCLIP, "encode_image", encode_image)
    frozen = functools.partial(model.encode_image, prompted=False)
    batches = list(data.training_batches(task, items, args, torch.device("cpu"), frozen))
    assert frozen_calls == [5, 3]  # the 2 x 4 training images, once, in test batches
    images_, labels, frozen = (torch.cat(t) for t in zip(*batches))
    assert len(batches) == 2 and len(labels) == 6  # batches of 3, the last incomplete one dropped
    with torch.no_grad():
        torch.testing.assert_close(frozen, real_encode(model, images_, prompted=False))
    ivlp = data.training_batches(task, items, args, torch.device("cpu"))  # IVLP: no frozen features
    assert all(len(batch) == 2 for batch in ivlp) and frozen_calls == [5, 3]


def test_ivlp_run_keeps_no_gpa_and_ends_with_the_last_epochs_prompts(tmp_path, monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    log = {}
    recorder(monkeypatch, log)
    record = promptsrc.main(promptsrc.parse_args(fixture_run(tmp_path, "--epochs", "2", "--ivlp", name="ivlp")))
    ckpt = torch.load(tmp_path / "runs" / "ivlp" / "checkpoint.pt", weights_only=True)
    assert record["method"] == "ivlp" and ckpt["extra"] is None and log == {}


def project_with(tmp_path, names=("promptsrc.py", "data.py")):
    """promptsrc.py and data.py copied into an otherwise empty folder (no kernels/: the readable path)."""
    project = tmp_path / "project"
    if not project.exists():
        project.mkdir()
        for name in names:
            shutil.copy(ROOT / name, project / name)
    return project


def script(argv, prompts_dir):
    """python -c code that runs promptsrc.main(ARGV) with the tiny test CLIP registered, saving the prompts
    of each GPA update to prompts_dir/epoch<e>.pt (how the test sees each epoch's prompts)."""
    return (f"import open_clip, pathlib, sys, torch; sys.path.insert(0, '.'); import promptsrc\n"
            f"open_clip.factory._MODEL_CONFIGS[{TINY_NAME!r}] = {TINY!r}\n"
            f"out = pathlib.Path({str(prompts_dir)!r}); out.mkdir(parents=True, exist_ok=True)\n"
            f"original = promptsrc.PromptAverage.update\n"
            f"def update(self, epoch, params):\n"
            f"    torch.save([p.detach().clone() for p in params], out / f'epoch{{epoch}}.pt')\n"
            f"    return original(self, epoch, params)\n"
            f"promptsrc.PromptAverage.update = update\n"
            f"promptsrc.main(promptsrc.parse_args({list(argv)!r}))\n")


def env():
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}


def saved_prompts(folder):
    return {int(p.stem[5:]): torch.load(p, weights_only=True) for p in Path(folder).glob("epoch*.pt")}


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result_gpa_included(tmp_path):
    """SIGKILL a real training process (promptsrc.py and data.py alone in a folder: the readable path)
    after a few epochs, --resume it, and get bit for bit the prompts and numbers of a run never
    interrupted; in both, the final prompts are the weighted sum of the prompts each epoch ended with."""
    project = project_with(tmp_path)
    epochs = ["--epochs", "30", "--batch-size", "2", "--gpa-mean", "20", "--gpa-std", "6"]
    runs = {name: fixture_run(tmp_path, *epochs, name=name) for name in ("whole", "killed")}
    subprocess.run([sys.executable, "-c", script(runs["whole"], tmp_path / "prompts" / "whole")], cwd=project,
                   env=env(), check=True, capture_output=True, timeout=900)
    killed = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([sys.executable, "-c", script(runs["killed"], tmp_path / "prompts" / "killed")],
                            cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    stopped_at = kill_after_epochs(proc, killed)  # after 3 finished epochs, without warning
    assert 3 <= stopped_at < 30 and not (killed / "results.json").exists()
    resume = script(["--resume", str(killed), "--root", str(tmp_path / "data"), *COMMON], tmp_path / "prompts" / "killed")
    proc = subprocess.run([sys.executable, "-c", resume], cwd=project, env=env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming after epoch {stopped_at}" in proc.stdout
    whole_prompts, killed_prompts = saved_prompts(tmp_path / "prompts" / "whole"), saved_prompts(tmp_path / "prompts" / "killed")
    for epoch, tensors in whole_prompts.items():  # every epoch's prompts, before and after the kill
        assert all(torch.equal(a, b) for a, b in zip(tensors, killed_prompts[epoch])), epoch
    a, b = check_gpa(tmp_path / "runs" / "whole", whole_prompts), check_gpa(killed, killed_prompts)
    for name, tensor in a["learned"].items():
        assert torch.equal(tensor, b["learned"][name]), name
    assert a["extra"]["weight_seen"] == b["extra"]["weight_seen"]
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (tmp_path / "runs" / "whole", killed))
    assert (ra["base"], ra["new"], ra["test_loss"]) == (rb["base"], rb["new"], rb["test_loss"])
    untimed = [[{k: v for k, v in e.items() if k != "s"} for e in data.read_log(r)]
               for r in (tmp_path / "runs" / "whole", killed)]
    assert untimed[0] == untimed[1] and all(len(e["terms"]) == 4 for e in untimed[0])


def test_resume_restores_the_fused_gpa_state(tmp_path, monkeypatch):
    """In process on the fused path (kernels.GaussianPromptAverage): a run stopped after epoch 2 of 3
    and resumed ends as a whole run, its GPA state included."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    flags = ["--epochs", "3", "--batch-size", "2", "--gpa-mean", "2", "--gpa-std", "1"]
    promptsrc.main(promptsrc.parse_args(fixture_run(tmp_path, *flags, name="whole")))
    real = data.save_checkpoint

    def stop_after_two(path, args, epoch, *rest):
        real(path, args, epoch, *rest)
        if epoch == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(data, "save_checkpoint", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        promptsrc.main(promptsrc.parse_args(fixture_run(tmp_path, *flags, name="stopped")))
    monkeypatch.setattr(data, "save_checkpoint", real)
    stopped = tmp_path / "runs" / "stopped"
    assert 0 < torch.load(stopped / "checkpoint.pt", weights_only=True)["extra"]["weight_seen"] < 1
    promptsrc.main(promptsrc.parse_args(["--resume", str(stopped), "--root", str(tmp_path / "data"), *COMMON]))
    a, b = (torch.load(tmp_path / "runs" / n / "checkpoint.pt", weights_only=True) for n in ("whole", "stopped"))
    for name, tensor in a["learned"].items():
        assert torch.equal(tensor, b["learned"][name]), name
    assert a["extra"]["weight_seen"] == b["extra"]["weight_seen"]


@pytest.mark.parametrize("flags, message", [
    (["--gpa-std", "0"], "--gpa-std must be a finite number > 0, got 0.0"),
    (["--gpa-mean", "900", "--gpa-std", "0.1"], "gives every epoch 1..20 zero weight"),
    (["--prompt-depth-text", "0"], "--prompt-depth-text must be an integer >= 1, got 0"),
    (["--prompt-depth-vision", "-1"], "--prompt-depth-vision must be an integer >= 0, got -1"),
    (["--n-ctx-vision", "0"], "--n-ctx-vision must be an integer >= 1, got 0"),
    (["--text-loss-weight", "-1"], "--text-loss-weight must be a finite number >= 0, got -1.0"),
    (["--ctx-init", "", "--n-ctx-text", "0"], "--n-ctx-text 0 with an empty --ctx-init"),
])
def test_a_setting_that_would_give_wrong_numbers_is_refused_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(data.UsageError) as error:
        promptsrc.main(promptsrc.parse_args(["--output-dir", str(tmp_path / "run"), *COMMON, *flags]))
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()


def test_a_context_too_long_for_the_text_context_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    with pytest.raises(data.UsageError, match="does not fit the text context of 77 tokens"):
        promptsrc.main(promptsrc.parse_args(fixture_run(tmp_path, "--ctx-init", "a photo of " * 30)))
    assert not (tmp_path / "runs").exists()


def test_an_image_tower_that_is_not_a_vit_is_refused():
    resnet = open_clip.model.CLIP(embed_dim=32, vision_cfg=dict(image_size=64, layers=(1, 1, 1, 1), width=8),
                                  text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=1))
    with pytest.raises(data.UsageError, match="ModifiedResNet: PromptSRC prompts a ViT"):
        promptsrc.PromptedCLIP(resnet, open_clip.tokenize, NAMES, settings())


def test_the_script_prints_a_usage_error_as_one_line_and_exits_2(tmp_path):
    command = [sys.executable, str(ROOT / "promptsrc.py"), "--gpa-std", "-1", "--output-dir", str(tmp_path / "r")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --gpa-std must be a finite number > 0, got -1.0"
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("cached", [True, False])
def test_captured_step_gives_the_eager_losses_on_cuda(clip, cached):
    """The step replayed as a CUDA graph (kernels.CapturedStep, fused loss kernel inside) gives the
    eager step's losses and prompts, with the frozen image features cached or computed per batch."""
    gpu_clip = copy.deepcopy(clip).cuda()
    models = []
    for _ in range(2):
        model = prompted(gpu_clip).cuda()
        model.set_frozen_text_features(NAMES, ["a photo of a {}.", "a drawing of a {}."])
        learned = [p for p in model.parameters() if p.requires_grad]
        models.append((model, promptsrc.sgd(learned, argparse.Namespace(lr=0.0025, momentum=0.9, weight_decay=5e-4),
                                            torch.device("cuda"))))
    batches = []
    for i in range(4):
        x, y = images(4, seed=i).cuda(), torch.tensor([0, 1, 2, 3]).cuda()
        with torch.no_grad():
            batches.append((x, y, models[0][0].encode_image(x, prompted=False)) if cached else (x, y))
    (eager, opt_eager), (captured, opt_captured) = models
    expected = [promptsrc.train_step(eager, opt_eager, *b)[0] for b in batches]
    step = kernels.CapturedStep(promptsrc.train_step, captured, opt_captured)
    got = [step(*b)[0] for b in batches]  # each replay's terms, copied out of the graph
    for name in ("loss", "ce", "scl_logits", "scl_text", "scl_image"):
        assert [g[name].item() for g in got] == pytest.approx([e[name].item() for e in expected], rel=1e-3,
                                                              abs=1e-6), name
    for a, b in zip(eager.prompt_learner.parameters(), captured.prompt_learner.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
