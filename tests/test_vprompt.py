"""vprompt.py: at zero variance it is CoOp (standard) and CoCoOp (conditional), logit for logit; the
KL term is the Gaussian closed form; the prediction is the log of the Monte Carlo-averaged
probability; per-image prompts at any batch size; the shared-prefix text pass equals whole prompts;
seeded sampling (reproducible per seed, across a SIGKILL and --resume, and by --evaluate at any test
batch size). The run machinery itself (data.py section 8) is tested in test_data.py."""
import argparse
import copy
import json
import math
import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

import coop
import data
import vprompt
from conftest import COMMON, NAMES, TINY, TINY_NAME, caltech_fixture, images, kill_after_epochs, tiny_clip
from kernels.shared_prefix import shared_prefix_encode

try:
    import kernels
except ImportError:  # the CUDA-only tests skip without a GPU anyway
    kernels = None

OFF = -1e4  # a log-variance whose standard deviation exp(OFF / 2) is exactly 0 in fp32
CWD = os.path.dirname(os.path.abspath(vprompt.__file__))


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def settings(**kw):
    """The settings PromptedCLIP reads, for vprompt's and coop's (the CoOp it is compared with)."""
    base = dict(ctx_init="a photo of a", n_ctx=4, csc=False, class_token_position="end", conditional=False,
                no_truncate=False, samples=4)
    return argparse.Namespace(**{**base, **kw})


def model_of(clip, names=NAMES, **kw):
    torch.manual_seed(1)
    return vprompt.PromptedCLIP(clip, open_clip.tokenize, names, settings(**kw))


def coop_of(clip, names=NAMES, **kw):
    torch.manual_seed(1)
    return coop.PromptedCLIP(clip, open_clip.tokenize, names, settings(**kw))


def zero_variance(model, mean=None):
    """Posterior N(mean, 0) (mean 0 unless given; "live": the conditional mean network as it is):
    every sample of the residual is the mean."""
    learner = model.prompt_learner
    with torch.no_grad():
        if learner.meta_net is None:
            learner.posterior_logvar.fill_(OFF)
            learner.posterior_mean.copy_(torch.zeros_like(learner.posterior_mean) if mean is None else mean)
        else:
            last = learner.meta_net["logvar"][-1]
            last.weight.zero_(), last.bias.fill_(OFF)
            if mean is None:
                learner.meta_net["mean"][-1].weight.zero_(), learner.meta_net["mean"][-1].bias.zero_()
    return model


def features(n=3, seed=2):
    return F.normalize(torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)), dim=-1)


def frozen_sgd(model, device="cpu"):
    """lr 0: the step computes its loss and gradients but moves nothing."""
    return vprompt.sgd([p for p in model.parameters() if p.requires_grad],
                       argparse.Namespace(lr=0.0, momentum=0.9, weight_decay=0.0), torch.device(device))


# ---------------------------------------------------------------------------- the model against CoOp / CoCoOp
def test_standard_at_zero_variance_and_residual_gives_coops_logits(clip):
    model, plain = zero_variance(model_of(clip)), coop_of(clip)
    torch.testing.assert_close(model.prompt_learner.ctx, plain.prompt_learner.ctx)  # the same words
    logits, kl = model.sample_logits(images())  # [B, L, C]
    assert logits.shape == (3, 4, 5)
    expected = plain(images())  # [B, C]
    assert expected.std() > 0.1  # the classes differ: the comparison means something
    for sample in range(4):
        torch.testing.assert_close(logits[:, sample], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(images()), expected.log_softmax(-1), rtol=1e-5, atol=1e-5)
    # a posterior mean mu at zero variance: CoOp with the context V + mu
    mu = 0.05 * torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    zero_variance(model, mean=mu)
    with torch.no_grad():
        plain.prompt_learner.ctx.add_(mu)
    torch.testing.assert_close(model.sample_logits(images())[0][:, 2], plain(images()), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain(images()), expected, atol=1e-3)  # mu changed the logits


def test_conditional_at_zero_variance_gives_cocoops_logits(clip):
    """Residual 0: CoCoOp with a zero meta-net output; residual mu(x): CoCoOp whose meta-net is mu."""
    model, cocoop = model_of(clip, conditional=True), coop_of(clip, conditional=True)
    zero_variance(model)
    with torch.no_grad():
        cocoop.prompt_learner.meta_net[-1].weight.zero_(), cocoop.prompt_learner.meta_net[-1].bias.zero_()
        for sample in range(4):
            torch.testing.assert_close(model.sample_logits(images())[0][:, sample], cocoop(images()),
                                       rtol=1e-5, atol=1e-5)
    model = zero_variance(model_of(clip, conditional=True, samples=2), mean="live")
    cocoop.prompt_learner.meta_net = model.prompt_learner.meta_net["mean"]  # pi(x) = mu(x)
    with torch.no_grad():
        logits = model.sample_logits(images(5))[0]
        expected = cocoop(images(5))
        torch.testing.assert_close(logits[:, 0], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[:, 1], expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(expected, coop_of(clip)(images(5)), atol=1e-3)  # mu(x) is not 0 here


def test_posterior_shapes_and_the_amortised_networks(clip):
    learner = model_of(clip).prompt_learner
    assert learner.posterior_mean.shape == learner.posterior_logvar.shape == (1, 64)
    assert torch.count_nonzero(learner.posterior_mean) == 0  # the official init: mu = 0, logvar ~ U[0, 1)
    assert 0 <= learner.posterior_logvar.min() and learner.posterior_logvar.max() < 1
    learner = model_of(clip, conditional=True).prompt_learner  # D = 32 -> 16 -> 16 -> d = 64, twice
    for head in ("mean", "logvar"):
        assert [tuple(m.weight.shape) for m in learner.meta_net[head] if hasattr(m, "weight")] == \
            [(16, 32), (16, 16), (64, 16)]
    assert not hasattr(learner, "posterior_mean")


# ---------------------------------------------------------------------------- objective and sampling
def test_kl_is_the_gaussian_closed_form_averaged_over_dimensions():
    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen)
    posterior = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros(3, 64), torch.ones(3, 64))
    expected = torch.distributions.kl_divergence(posterior, prior).mean(-1)  # the official code's formula
    torch.testing.assert_close(vprompt.kl_to_prior(mean, logvar), expected, rtol=1e-5, atol=1e-6)
    assert vprompt.kl_to_prior(torch.ones(1, 8), torch.zeros(1, 8)).item() == pytest.approx(0.5)  # mu^2 / 2
    assert vprompt.kl_to_prior(torch.zeros(1, 8), torch.zeros(1, 8)).item() == 0  # q = prior
    assert vprompt.kl_to_prior(torch.zeros(1, 4), torch.tensor([[math.log(4)] * 4])).item() == \
        pytest.approx(0.5 * (4 - 1 - math.log(4)))


def test_prediction_is_the_log_of_the_averaged_probability(clip):
    model = model_of(clip, samples=5)
    torch.manual_seed(0)
    logits, _ = model.sample_logits(images())
    assert not torch.allclose(logits[:, 0], logits[:, 1], atol=1e-3)  # the samples differ
    torch.manual_seed(0)
    log_p = model(images())
    expected = logits.softmax(-1).mean(1).log()  # log (1/L sum_l p_l)
    torch.testing.assert_close(log_p, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_p.logsumexp(-1), torch.zeros(3), rtol=0, atol=1e-5)  # a distribution
    assert not torch.allclose(log_p, logits.log_softmax(-1).mean(1), atol=1e-3)  # not the mean of the logs


def test_averaging_identical_samples_equals_one_sample(clip):
    mu = 0.05 * torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    many, one = zero_variance(model_of(clip, samples=7), mu), zero_variance(model_of(clip, samples=1), mu)
    torch.testing.assert_close(many(images()), one(images()), rtol=1e-5, atol=1e-6)
    many, one = model_of(clip, samples=6, conditional=True), model_of(clip, samples=1, conditional=True)
    zero_variance(many, mean="live"), zero_variance(one, mean="live")
    torch.testing.assert_close(many(images()), one(images()), rtol=1e-5, atol=1e-6)


def test_training_loss_is_the_negative_elbo_and_reaches_the_posterior(clip):
    for conditional in (False, True):
        model = model_of(clip, conditional=conditional)
        optimizer = frozen_sgd(model)
        x, y = features(), torch.tensor([0, 3, 4])
        torch.manual_seed(5)
        log_p, kl = model.predictive(x)
        expected = -log_p[torch.arange(3), y].mean() + 0.001 * kl
        torch.manual_seed(5)  # the same draws
        terms, correct = vprompt.train_step(model, optimizer, x, y)
        assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
        assert set(terms) == {"loss", "ce", "kl"} and terms["kl"].item() == pytest.approx(kl.item())
        assert terms["ce"].item() == pytest.approx(-log_p[torch.arange(3), y].mean().item(), rel=1e-6)
        assert torch.equal(terms["loss"], terms["ce"] + vprompt.KL_WEIGHT * terms["kl"])
        assert correct.item() == (log_p.argmax(-1) == y).sum().item()
        learned = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None and g.abs().sum() > 0 for g in learned.values()), learned.keys()  # reparameterised
        if not conditional:
            mean, logvar = model.prompt_learner.posterior(None)
            assert kl.item() == pytest.approx(vprompt.kl_to_prior(mean, logvar).item())


def test_conditional_batch_equals_one_image_at_a_time_with_per_image_prompts(clip, monkeypatch):
    """B images in one call (in passes of 2 images) give each image's batch-1 numbers, with the same
    draws; image i's sample l is CoOp with the context V + r_il."""
    monkeypatch.setattr(vprompt, "PROMPTS_PER_PASS", 2 * 3 * len(NAMES))  # 2 images of L = 3 samples a pass
    model = model_of(clip, samples=3, conditional=True).eval()
    drawn, real = [], model.residuals
    monkeypatch.setattr(model, "residuals", lambda *a: drawn.append(real(*a)) or drawn[-1])
    x = features(5)
    with torch.no_grad():
        model.sampler.manual_seed(7)
        batch, kl = model.sample_logits(x)  # [5, 3, C]
        residuals = torch.cat(drawn)  # [5, 3, d]
        assert [len(r) for r in drawn] == [2, 2, 1] and residuals.std() > 0.1
        model.sampler.manual_seed(7)
        singles = [model.sample_logits(x[i:i + 1]) for i in range(5)]
        torch.testing.assert_close(batch, torch.cat([s[0] for s in singles]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kl, torch.cat([s[1] for s in singles]), rtol=1e-6, atol=1e-7)
        model.sampler.manual_seed(7)
        log_p = model(x)
        model.sampler.manual_seed(7)
        torch.testing.assert_close(log_p, torch.cat([model(x[i:i + 1]) for i in range(5)]), rtol=1e-5, atol=1e-5)
        plain = coop_of(clip)
        context = plain.prompt_learner.ctx.clone()
        for i in range(5):
            for sample in range(3):
                plain.prompt_learner.ctx.copy_(context + residuals[i, sample])
                torch.testing.assert_close(batch[i, sample], plain(x[i:i + 1])[0], rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_per_seed(clip):
    for conditional in (False, True):
        model = model_of(clip, conditional=conditional)
        draws = {}
        for seed in (0, 0, 1):  # training: torch's generator
            torch.manual_seed(seed)
            draws.setdefault(seed, []).append(model.sample_logits(features())[0])
        assert torch.equal(draws[0][0], draws[0][1]) and not torch.allclose(draws[0][0], draws[1][0])
        model.eval()  # evaluation: the model's own generator, whatever torch's generator holds
        with torch.no_grad():
            model.sampler.manual_seed(3), torch.manual_seed(10)
            first = model(features(), model.class_text_features())
            model.sampler.manual_seed(3), torch.manual_seed(11)
            assert torch.equal(model(features(), model.class_text_features()), first)
            model.sampler.manual_seed(4)
            assert not torch.allclose(model(features(), model.class_text_features()), first)


def test_shared_prefix_text_pass_equals_the_whole_prompts_through_open_clips_blocks(clip, monkeypatch):
    """The C prompts of a draw share [SOS][V + r]; computing those positions once per draw gives the
    features of the whole prompts through TextEncoder (open_clip's blocks; the readable path without
    kernels/), for class names of different token lengths, in value and in gradient."""
    names = ["ox", "hot air balloon", "x-ray film of a golden retriever", "cat"]
    model = model_of(clip, names=names, samples=3)
    residuals = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    shared, tails, eot = model.prompt_learner(residuals.flatten(0, 1))
    assert shared.shape == (6, 5, 64) and len(set(eot.tolist())) == 3  # SOS + 4 context tokens; 3 EOT positions
    whole = torch.cat([shared[:, None].expand(-1, 4, -1, -1), tails.expand(6, -1, -1, -1)], dim=2)  # [6, C, len, d]
    expected = vprompt.TextEncoder(clip)(whole.flatten(0, 1), eot.repeat(6))  # [6 * C, D]
    got = shared_prefix_encode(model.text_encoder, shared, tails, eot)  # [6, C, D]
    torch.testing.assert_close(got.flatten(0, 1), expected, rtol=1e-5, atol=1e-5)
    grad_expected, = torch.autograd.grad(expected.square().sum(), residuals, retain_graph=True)
    grad_got, = torch.autograd.grad(got.square().sum(), residuals)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-4, atol=1e-5)
    full = model.text_features(residuals)  # [2, 3, C, D], normalised: the shared-prefix pass (kernels/)
    torch.testing.assert_close(full, F.normalize(expected, dim=-1).view(2, 3, 4, -1), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(vprompt, "kernels", None)  # a copy of vprompt.py without kernels/: the whole prompts
    torch.testing.assert_close(model.text_features(residuals), full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- settings
def test_paper_settings_per_dataset():
    def resolved(*argv):
        return vprompt.resolve_settings(vprompt.parse_args([*argv, "--model", "ViT-B-16", "--pretrained", "none"]))
    a = resolved("--dataset", "caltech101")
    assert (a.samples, a.epochs, a.batch_size, a.ctx_init, a.shots, a.lr, a.conditional) == \
        (20, 20, 1, "a photo of a", 16, 0.002, False)
    assert (resolved("--dataset", "dtd").samples, resolved("--dataset", "dtd").epochs) == (40, 10)
    assert (resolved("--dataset", "ucf101").samples, resolved("--dataset", "eurosat").epochs) == (5, 60)
    b = resolved("--dataset", "imagenet", "--protocol", "cross", "--conditional")
    assert (b.samples, b.epochs, b.batch_size) == (10, 10, 1)
    assert resolved("--dataset", "caltech101", "--samples", "3").samples == 3
    world = {**vprompt.PAPER, **vprompt.DATASET_SETTINGS["shapes"]}
    assert all(getattr(resolved("--dataset", "shapes_noisy"), k) == v for k, v in world.items())


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(argv, wait=True):
    """vprompt.py as a user runs it (the tiny test CLIP registered with open_clip first)."""
    code = (f"import open_clip, runpy, sys; open_clip.factory._MODEL_CONFIGS[{TINY_NAME!r}] = {TINY!r}; "
            f"sys.argv = ['vprompt.py', *{list(argv)!r}]; runpy.run_path('vprompt.py', run_name='__main__')")
    command = [sys.executable, "-c", code]
    if not wait:
        return subprocess.Popen(command, cwd=CWD, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    proc = subprocess.run(command, cwd=CWD, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_script_refuses_a_sample_count_of_zero_in_one_line_with_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "vprompt.py", "--samples", "0", "--output-dir", str(tmp_path / "run"),
                           *COMMON], cwd=CWD, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["error: --samples must be an integer >= 1, got 0"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- end to end on the fixture
def fixture_run(tmp_path, *extra, name="run1"):
    if not (tmp_path / "data").exists():
        caltech_fixture(tmp_path / "data")
    return ["--dataset", "caltech101", "--model", TINY_NAME, "--pretrained", "none", "--shots", "2",
            "--samples", "3", "--root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs" / name),
            *COMMON, *extra]


def learned(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["learned"]


@pytest.mark.slow
def test_a_run_then_evaluate_at_another_test_batch_size_reproduces(tmp_path, monkeypatch):
    """A whole run (standard: one set of L draws per test split), then --evaluate with test batches
    of 3 instead of 100: each split's draws start from the seed, so no number moves."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    record = vprompt.main(vprompt.parse_args(fixture_run(tmp_path, "--epochs", "2", "--batch-size", "2")))
    run = tmp_path / "runs" / "run1"
    assert record["method"] == "vprompt" and record["args"]["samples"] == 3
    assert 0 <= record["base"] <= 100 and 0 <= record["new"] <= 100
    log = data.read_log(run)  # every epoch's loss terms: the loss is ce + 0.001 kl (to the rounding)
    assert [e["epoch"] for e in log] == [1, 2] and log[-1]["terms"] == record["train"]["terms"]
    for e in log:
        assert set(e["terms"]) == {"ce", "kl"} and all(math.isfinite(v) for v in e["terms"].values())
        assert e["loss"] == pytest.approx(e["terms"]["ce"] + 0.001 * e["terms"]["kl"], abs=2e-4)
    assert set(learned(run)) == {"prompt_learner.ctx", "prompt_learner.posterior_mean",
                                 "prompt_learner.posterior_logvar"}  # nothing frozen is saved
    vprompt.main(vprompt.parse_args(["--evaluate", str(run), "--root", str(tmp_path / "data"), *COMMON,
                                     "--test-batch-size", "3"]))
    again = json.loads((run / "eval.json").read_text())
    assert (again["base"], again["new"]) == (record["base"], record["new"])
    for split, loss in record["test_loss"].items():  # continuous: other draws would not match
        assert again["test_loss"][split] == pytest.approx(loss, rel=1e-6, abs=1e-7), split


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a real training process (conditional: per-image draws every step), --resume it, and
    get bit for bit the learned tensors and the numbers of a run that was never interrupted."""
    train = ["--conditional", "--epochs", "30", "--batch-size", "2"]
    whole, killed = tmp_path / "runs" / "whole", tmp_path / "runs" / "killed"
    run_script(fixture_run(tmp_path, *train, name="whole"))
    proc = run_script(fixture_run(tmp_path, *train, name="killed"), wait=False)
    stopped_at = kill_after_epochs(proc, killed)  # after 3 finished epochs, without warning
    assert 3 <= stopped_at < 30 and not (killed / "results.json").exists()
    stdout = run_script(["--resume", str(killed), "--root", str(tmp_path / "data"), *COMMON]).stdout
    assert f"resuming after epoch {stopped_at}" in stdout
    for name, tensor in learned(whole).items():
        assert torch.equal(tensor, learned(killed)[name]), name
    a, b = (json.loads((r / "results.json").read_text()) for r in (whole, killed))
    assert (a["base"], a["new"], a["test_loss"]) == (b["base"], b["new"], b["test_loss"])
    untimed = [[{k: v for k, v in e.items() if k != "s"} for e in data.read_log(r)] for r in (whole, killed)]
    assert untimed[0] == untimed[1] and all(set(e["terms"]) == {"ce", "kl"} for e in untimed[0])


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("conditional", [False, True])
def test_captured_step_gives_the_eager_losses_and_fresh_draws_on_cuda(clip, conditional):
    """At zero variance (every draw is the mean) the step replayed as a CUDA graph gives the eager
    step's losses and parameters; with variance, each replay draws new residuals (lr 0: the same
    batch, other losses)."""
    gpu_clip = copy.deepcopy(clip).cuda()
    paper = argparse.Namespace(lr=0.002, momentum=0.9, weight_decay=5e-4)
    batches = [(images(4, seed=i).cuda(), torch.tensor([0, 1, 2, 3]).cuda()) for i in range(4)]
    eager, captured = (zero_variance(model_of(gpu_clip, conditional=conditional)).cuda() for _ in range(2))
    opt_eager, opt_captured = (vprompt.sgd([p for p in m.parameters() if p.requires_grad], paper,
                                           torch.device("cuda")) for m in (eager, captured))
    expected = [vprompt.train_step(eager, opt_eager, x, y)[0]["loss"].item() for x, y in batches]
    step = kernels.CapturedStep(vprompt.train_step, captured, opt_captured)
    assert [step(x, y)[0]["loss"].item() for x, y in batches] == pytest.approx(expected, rel=1e-3)
    for a, b in zip(eager.prompt_learner.parameters(), captured.prompt_learner.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * max(1.0, a.abs().max().item()))
    noisy = model_of(gpu_clip, conditional=conditional).cuda()
    step = kernels.CapturedStep(vprompt.train_step, noisy, frozen_sgd(noisy, "cuda"))
    outs = [step(*batches[0])[0] for _ in range(3)]  # kept: each replay's terms are its own copies
    losses = [o["loss"].item() for o in outs]
    assert all(math.isfinite(v) for v in losses) and len(set(losses)) == 3
    assert len({o["kl"].item() for o in outs}) == 1  # the KL is analytic: lr 0 and the same batch
    for o in outs:
        torch.testing.assert_close(o["loss"], o["ce"] + vprompt.KL_WEIGHT * o["kl"])
