"""coop.py: the prompted model against CLIP itself (values, fp32, tight tolerances), the exact
truncated text pass, CoCoOp against CoOp, the class-token layouts, the Dassl schedule, the captured
step, and end-to-end runs of the script on a tiny Caltech101 fixture (the run machinery itself, driven
through coop.py, is tested in test_runs.py)."""
import argparse
import copy
import math
import subprocess
import sys

import open_clip
import pytest
import torch

import coop
import data
import kernels
from conftest import COMMON, NAMES, ROOT, TINY, TINY_NAME, check_reproduced, check_run, fixture_run, images

@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY).eval().requires_grad_(False)
    # Random init leaves the positional embedding near 0; make it matter, so a wrong slice shows.
    model.positional_embedding.data.normal_(std=0.5)
    return model


def settings(**kw):
    base = dict(ctx_init="a photo of a", n_ctx=4, csc=False, class_token_position="end", conditional=False,
                no_truncate=False)
    return argparse.Namespace(**{**base, **kw})


def prompted(clip, names=NAMES, **kw):
    torch.manual_seed(1)
    return coop.PromptedCLIP(clip, open_clip.tokenize, names, settings(**kw))


def test_word_init_gives_zero_shot_clip_logits(clip):
    zero_shot = data.ZeroShotCLIP(clip, open_clip.tokenize, NAMES, "a photo of a {}.")
    expected = zero_shot(images())  # CLIP's own encode_text on the same strings
    model = prompted(clip)
    assert model.prompt_learner.ctx.shape == (4, 64)
    for truncate in (True, False):
        model.prompt_learner.truncate = truncate
        model.prompt_learner.set_classes(NAMES)
        torch.testing.assert_close(model(images()), expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0.1  # the logits differ between classes: the comparison means something


def test_truncated_text_pass_equals_full_pass_values_and_gradients(clip):
    model = prompted(clip, ctx_init="", n_ctx=16, csc=True)
    prompts, eot = model.prompt_learner()
    assert prompts.shape == (5, int(eot.max()) + 1, 64) and int(eot.max()) + 1 < 40  # really truncated
    out = {}
    for truncate in (True, False):
        model.prompt_learner.truncate = truncate
        model.prompt_learner.set_classes(NAMES)
        assert model.prompt_learner()[0].shape[1] == (int(eot.max()) + 1 if truncate else 77)
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
    ids = open_clip.tokenize([text.format(n.replace("_", " ")) for n in NAMES])[:, :prompts.shape[1]]
    torch.testing.assert_close(prompts, clip.token_embedding(ids), rtol=0, atol=0)
    assert torch.equal(eot, ids.argmax(-1))


def test_class_specific_contexts(clip):
    learner = prompted(clip, ctx_init="", n_ctx=8, csc=True).prompt_learner
    assert learner.ctx.shape == (5, 8, 64)
    prompts, eot = learner()
    assert prompts.shape == (5, int(eot.max()) + 1, 64)
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
    with pytest.raises(data.UsageError, match="--model needs --pretrained"):  # else silently random
        coop.resolve_settings(coop.parse_args(["--model", "ViT-B-16"]))


# ---------------------------------------------------------------------------- end to end
def test_cocoop_run_end_to_end_and_evaluate_reproduces(tmp_path, monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    run = tmp_path / "runs" / "run1"
    coop.main(coop.parse_args([*fixture_run(tmp_path, "--epochs", "2"), "--conditional", "--batch-size", "2"]))
    results = check_run(run, "cocoop")
    coop.main(coop.parse_args(["--evaluate", str(run), "--root", str(tmp_path / "data"), *COMMON]))
    check_reproduced(run, results)


def test_csc_run_end_to_end_has_no_new_class_prompts(tmp_path, monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    record = coop.main(coop.parse_args(fixture_run(tmp_path, "--epochs", "2", "--csc")))
    ckpt = torch.load(tmp_path / "runs" / "run1" / "checkpoint.pt", weights_only=True)
    assert ckpt["learned"]["prompt_learner.ctx"].shape == (2, 4, 64)  # one context per base class
    assert record["new"] is None and record["hm"] is None and 0 <= record["base"] <= 100


@pytest.mark.parametrize("flags, message", [
    (["--n-ctx", "0", "--ctx-init", ""], "--n-ctx 0 with an empty --ctx-init"),
    (["--csc", "--conditional"], "--csc is CoOp's class-specific context"),
    (["--ctx-init", "a photo of " * 30], "does not fit the text context of 77 tokens"),
    (["--ctx-init", "", "--n-ctx", "75"], "--n-ctx 75 does not fit the text context of 77 tokens"),
    (["--momentum", "nan"], "--momentum must be a finite number >= 0, got nan"),
])
def test_coop_settings_that_would_give_wrong_numbers_are_refused_before_anything_is_written(
        tmp_path, monkeypatch, flags, message):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    with pytest.raises(data.UsageError) as error:
        coop.main(coop.parse_args([*fixture_run(tmp_path), *flags]))
    assert message in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_a_class_name_too_long_for_the_text_context_is_named(clip):
    with pytest.raises(data.UsageError, match=r"does not fit the text context of 77 tokens for 1 classes "
                                              r"\(e.g. 'cat cat cat"):
        prompted(clip, names=["ox", "cat " * 80])


def test_the_script_prints_a_usage_error_as_one_line_and_exits_2(tmp_path):
    command = [sys.executable, str(ROOT / "coop.py"), "--epochs", "0", "--output-dir", str(tmp_path / "r")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --epochs must be an integer >= 1, got 0"
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- the captured step
def sgd(model, device="cpu"):
    learned = [p for p in model.parameters() if p.requires_grad]
    return coop.sgd(learned, argparse.Namespace(lr=0.002, momentum=0.9, weight_decay=5e-4), torch.device(device))


def losses_of(step, model, optimizer, batches):
    return [(step(model, optimizer, x, y) if step is coop.train_step else step(x, y))[0]["loss"].item()
            for x, y in batches]


@pytest.mark.parametrize("conditional", [False, True])
def test_warm_up_before_recording_leaves_the_training_trajectory_unchanged(clip, conditional):
    """Recording a CUDA graph runs warm-up steps first; they must leave no trace (learned tensors,
    momentum): the steps after them equal those of a model that never warmed up."""
    batches = [(images(4), torch.tensor([0, 1, 2, 3])) for _ in range(3)]
    plain = prompted(clip, conditional=conditional)
    warmed = prompted(clip, conditional=conditional)
    opt_plain, opt_warmed = sgd(plain), sgd(warmed)
    kernels.CapturedStep(coop.train_step, warmed, opt_warmed).warm_up([images(4, seed=9), torch.tensor([4, 3, 2, 1])])
    assert all(torch.count_nonzero(s["momentum_buffer"]) == 0 for s in opt_warmed.state.values())
    expected = losses_of(coop.train_step, plain, opt_plain, batches)
    assert losses_of(coop.train_step, warmed, opt_warmed, batches) == expected
    for a, b in zip(plain.parameters(), warmed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("conditional", [False, True])
def test_captured_step_gives_the_eager_losses_on_cuda(clip, conditional):
    gpu_clip = copy.deepcopy(clip).cuda()
    batches = [(images(4, seed=i).cuda(), torch.tensor([0, 1, 2, 3]).cuda()) for i in range(6)]
    eager, captured = prompted(gpu_clip, conditional=conditional), prompted(gpu_clip, conditional=conditional)
    opt_eager, opt_captured = sgd(eager, "cuda"), sgd(captured, "cuda")
    expected = losses_of(coop.train_step, eager, opt_eager, batches[:3])
    step = kernels.CapturedStep(coop.train_step, captured, opt_captured)
    outs = [step(x, y)[0] for x, y in batches[:3]]  # each replay's own copy of the graph's outputs
    assert [o["loss"].item() for o in outs] == pytest.approx(expected, rel=1e-3)
    assert all(torch.equal(o["ce"], o["loss"]) for o in outs)
    opt_eager.param_groups[0]["lr"].fill_(0.5), opt_captured.param_groups[0]["lr"].fill_(0.5)  # lr read on device
    expected = losses_of(coop.train_step, eager, opt_eager, batches[3:])
    assert [step(x, y)[0]["loss"].item() for x, y in batches[3:]] == pytest.approx(expected, rel=1e-3)
    for a, b in zip(eager.prompt_learner.parameters(), captured.prompt_learner.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
