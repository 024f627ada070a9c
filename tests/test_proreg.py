"""proreg.py: the per-sample loss against its formula (the weight at its limits), the weight at 0 giving
plain fine-tuning, the fused kernel against the readable form, the head starting as zero-shot CLIP, the
teacher's cached logits, gradient accumulation and two DDP processes against one, one whole run (and its
re-evaluation), resume after a SIGKILL, its own settings' refusals; and the world's biased task (the bias
is in the pixels of the training split and not in the off-bias test). The run machinery itself (run
folder, checkpoints, the non-finite-loss stop) is tested once, in test_data.py."""
import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import data
import kernels
import proreg
from conftest import caltech_fixture, kill_after_epochs, make_domain_net

ROOT = Path(__file__).resolve().parents[1]
TINY_NAME = "proreg-test-tiny"  # a random-init CLIP small enough for CPU tests
TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
COMMON = ["--workers", "0", "--device", "cpu", "--loss-impl", "torch"]


def settings(**kw):
    args = proreg.parse_args([])
    for k, v in {"alpha": 2.0, "fixed_alpha": 0.5, "grad_accum": 1, **kw}.items():
        setattr(args, k, v)
    return args


def random_logits(b=12, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g) * 3, torch.randn(b, c, generator=g) * 3,
            torch.randint(0, c, (b,), generator=g))


# ---------------------------------------------------------------------------- the loss
def formula(s, t, y, alpha):
    """ProReg's loss written out per sample in float64, from the official losses.py: xERM."""
    rows = []
    for i in range(len(y)):
        q = [math.exp(v) for v in s[i].tolist()]
        p = [math.exp(v) for v in t[i].tolist()]
        q = [v / sum(q) for v in q]
        p = [v / sum(p) for v in p]
        ce_ft, ce_zs = -math.log(q[y[i]]), -math.log(p[y[i]])
        w = math.exp(-10 * ce_zs) / (math.exp(-ce_ft) + math.exp(-10 * ce_zs) + 1e-5)
        kl = -sum(pj * math.log(qj) for pj, qj in zip(p, q))
        rows.append(((1 - w) * ce_ft, alpha * w * kl, w))
    return rows


def test_per_sample_loss_equals_the_formula_with_the_weight_at_its_limits():
    s, t, y = random_logits()
    t[0] = -20.0
    t[0, y[0]] = 20.0  # the prompt prediction is sure of the true class: w -> 1 / (1 + p_ft)
    t[1, y[1]] = -20.0  # sure it is not: w -> 0, the sample is plain fine-tuning
    ce, kl, w = proreg.proreg_terms(s, t, y)
    expected = formula(s, t, y, alpha=2.0)
    got = [((1 - wi) * ci, 2.0 * wi * ki, wi) for ci, ki, wi in zip(ce.tolist(), kl.tolist(), w.tolist())]
    assert got == [pytest.approx(e, rel=1e-5, abs=1e-6) for e in expected]
    p_ft0 = F.softmax(s[0], -1)[y[0]].item()
    assert w[0].item() == pytest.approx(1 / (1 + p_ft0 + 1e-5), rel=1e-6) and w[0] > 0.5
    assert w[1].item() < 1e-30
    assert 0 < w[2:].min() and w.max() < 1  # strictly between the limits elsewhere
    terms = proreg.objective(s, t, y, settings(method="proreg"), use_kernel=False)
    assert terms["loss"].item() == pytest.approx(sum(a + b for a, b, _ in expected) / len(y), rel=1e-5)
    # the logged terms: mean((1 - w) CE), mean(w KL) (loss = ce + alpha kl) and the mean weight
    assert terms["ce"].item() == pytest.approx(sum(a for a, _, _ in expected) / len(y), rel=1e-5)
    assert 2.0 * terms["kl"].item() == pytest.approx(sum(b for _, b, _ in expected) / len(y), rel=1e-5)
    assert terms["w"].item() == pytest.approx(sum(c for _, _, c in expected) / len(y), rel=1e-5)
    assert torch.equal(terms["loss"], terms["ce"] + 2.0 * terms["kl"])


def test_the_weight_is_detached():
    s, t, y = random_logits()
    s.requires_grad_(True)
    ce, kl, w = proreg.proreg_terms(s, t, y)
    assert not w.requires_grad
    (((1 - w) * ce).mean() + 2.0 * (w * kl).mean()).backward()
    expected = s.grad.clone()
    s.grad = None
    proreg.objective(s, t, y, settings(method="proreg"), use_kernel=False)["loss"].backward()
    torch.testing.assert_close(s.grad, expected)


def test_with_the_weight_at_zero_proreg_is_plain_fine_tuning(monkeypatch):
    s, t, y = random_logits()
    grads = {}
    for method in ("finetune", "proreg"):
        if method == "proreg":
            monkeypatch.setattr(proreg, "proreg_weight", lambda ce_ft, ce_zs, form: torch.zeros_like(ce_ft))
        x = s.clone().requires_grad_(True)
        loss = proreg.objective(x, t, y, settings(method=method), use_kernel=False)["loss"]
        loss.backward()
        grads[method] = loss.detach(), x.grad
    torch.testing.assert_close(grads["proreg"][0], F.cross_entropy(s, y))
    torch.testing.assert_close(grads["proreg"], grads["finetune"])


def test_fixed_weight_and_xerm_forms():
    s, t, y = random_logits()
    ce, kl, _ = proreg.proreg_terms(s, t, y)
    fixed = proreg.objective(s, t, y, settings(method="fixed", fixed_alpha=0.3), use_kernel=False)
    torch.testing.assert_close(fixed["loss"], 0.7 * ce.mean() + 0.3 * kl.mean())
    assert set(fixed) == {"loss", "ce", "kl"} and torch.equal(fixed["loss"], 0.7 * fixed["ce"] + 0.3 * fixed["kl"])
    plain = proreg.objective(s, t, y, settings(method="finetune"), use_kernel=False)
    assert set(plain) == {"loss", "ce"} and torch.equal(plain["ce"], F.cross_entropy(s, y))
    w = proreg.proreg_weight(ce, F.cross_entropy(t, y, reduction="none"), "xerm")
    torch.testing.assert_close(w, ce / (ce + F.cross_entropy(t, y, reduction="none") + 1e-5))


@pytest.mark.skipif(not kernels.kernel_available("cpu"), reason="needs the Triton interpreter (tests/conftest.py)")
@pytest.mark.parametrize("method", ["proreg", "fixed"])
def test_fused_and_readable_losses_agree_in_value_and_gradient(method):
    s, t, y = random_logits(b=10, c=9, seed=3)
    t[0, y[0]] += 30.0  # one sample where the weight is near its top
    out = {}
    for use_kernel in (False, True):
        x = s.clone().requires_grad_(True)
        terms = proreg.objective(x, t, y, settings(method=method), use_kernel=use_kernel)
        terms["loss"].backward()
        out[use_kernel] = {n: v.detach() for n, v in terms.items()}, x.grad
    assert set(out[True][0]) == set(out[False][0]) == ({"loss", "ce", "kl"} | ({"w"} if method == "proreg" else set()))
    for name, value in out[False][0].items():  # the total and each term (the fused: from its per-sample values)
        torch.testing.assert_close(out[True][0][name], value, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-6)
    assert out[True][1].abs().sum() > 0


# ---------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY).eval().requires_grad_(False)
    model.positional_embedding.data.normal_(std=0.5)  # random init leaves it near 0: make it matter
    return model


NAMES = ["cat", "hot air balloon", "golden_retriever", "x-ray film", "ox"]


def images(n=4, seed=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_the_head_starts_as_zero_shot_clip(clip):
    """Step-0 logits of the student equal CLIP's own zero-shot logits (encode_text, encode_image)."""
    text = F.normalize(clip.encode_text(open_clip.tokenize([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])), dim=-1)
    expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(images()), dim=-1) @ text.t()
    head = proreg.prompt_features(clip, open_clip.tokenize, NAMES, "a photo of a {}.")
    model = proreg.FineTunedCLIP(clip, head)
    with torch.no_grad():
        torch.testing.assert_close(model(images()), expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 0.1  # the classes differ: the comparison means something
    learned = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"class_embeddings", "logit_scale", "visual.conv1.weight"} <= learned
    assert not any(n.startswith("transformer.") for n in learned)  # the text tower is not part of the student
    clip.visual.requires_grad_(False)


def test_pretraining_patch_dropout_is_off_in_fine_tuning():
    """World v2's tiny CLIP carries patch dropout 0.5 in its config (train mode only): the student must see
    every patch in training, as the teacher does, so its train-mode logits equal its eval-mode ones."""
    torch.manual_seed(0)
    cfg = dict(TINY, vision_cfg=dict(TINY["vision_cfg"], patch_dropout=0.5))
    clip = open_clip.model.CLIP(**cfg).eval()
    assert not isinstance(clip.visual.patch_dropout, torch.nn.Identity)
    model = proreg.FineTunedCLIP(clip, torch.randn(5, 32))
    with torch.no_grad():
        evaluated = model.eval()(images())
        torch.testing.assert_close(model.train()(images()), evaluated)


def test_weight_decay_spares_biases_and_norms_and_the_head_gets_100x(clip):
    model = proreg.FineTunedCLIP(clip, torch.randn(5, 32))
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = proreg.adamw(model, settings(lr=1e-5, head_lr_mult=100.0, weight_decay=0.01), torch.device("cpu"))
    seen = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen[names[id(p)]] = (group["base_lr"], group["weight_decay"])
    assert seen["class_embeddings"] == (1e-3, 0.01) and seen["logit_scale"] == (1e-3, 0.01)
    assert seen["visual.conv1.weight"] == (1e-5, 0.01) and seen["visual.proj"] == (1e-5, 0.01)
    assert seen["visual.ln_pre.weight"] == (1e-5, 0.0) and seen["visual.transformer.resblocks.0.ln_1.weight"] == (1e-5, 0.0)
    assert seen["visual.transformer.resblocks.0.attn.in_proj_bias"] == (1e-5, 0.0)
    assert len(seen) == len(names)
    clip.visual.requires_grad_(False)


def test_schedule_warms_up_then_decays_linearly_to_zero():
    lrs = [data.warmup_linear(s, 100, 0.1) for s in range(101)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == 1.0
    assert lrs[55] == pytest.approx(0.5) and lrs[100] == 0.0


def test_global_batches_split_evenly_over_processes():
    one = data.epoch_batches(22, 8, seed=1, epoch=3)
    two = [data.epoch_batches(22, 8, seed=1, epoch=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(one) == 2 and all(len(b) == 8 for b in one)  # the last incomplete batch is dropped
    assert [a + b for a, b in zip(*two)] == one
    assert data.epoch_batches(22, 8, seed=1, epoch=4) != one  # a new order every epoch


# ---------------------------------------------------------------------------- runs on a fixture
def fixture_run(tmp_path, *extra, name="run1"):
    if not (tmp_path / "data").exists():
        caltech_fixture(tmp_path / "data")
    return ["--dataset", "caltech101", "--model", TINY_NAME, "--pretrained", "none", "--root", str(tmp_path / "data"),
            "--output-dir", str(tmp_path / "runs" / name), "--batch-size", "4", *COMMON, *extra]


def learned(run):
    return torch.load(Path(run) / "checkpoint.pt", weights_only=True)["learned"]


def project(tmp_path):
    """proreg.py and data.py copied into an empty folder (as a user runs them), with a launcher that
    registers the test model with open_clip first."""
    folder = tmp_path / "project"
    if not folder.exists():
        folder.mkdir()
        for name in ("proreg.py", "data.py"):
            shutil.copy(ROOT / name, folder / name)
        (folder / "launch.py").write_text(
            f"import open_clip, runpy, sys\nopen_clip.factory._MODEL_CONFIGS[{TINY_NAME!r}] = {TINY!r}\n"
            "sys.path.insert(0, '.')\nsys.argv = ['proreg.py', *sys.argv[1:]]\n"
            "runpy.run_path('proreg.py', run_name='__main__')\n")
    return folder


def launch(tmp_path, *argv, processes=0, wait=True):
    """Run the script in a subprocess; processes=N starts N ranks as torchrun would (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT in the environment; torchrun's own agent takes minutes to start on some
    sandboxed machines, so the ranks are started directly)."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")},
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "launch.py", *argv]
    if not wait:
        return subprocess.Popen(command, cwd=project(tmp_path), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
    if not processes:
        proc = subprocess.run(command, cwd=project(tmp_path), capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout
    port = str(29500 + os.getpid() % 1000)
    ranks = [subprocess.Popen(command, cwd=project(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(processes),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(processes)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    for rank, (stdout, stderr) in zip(ranks, outputs):
        assert rank.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return outputs[0][0]


@pytest.mark.slow
def test_run_records_every_row_and_evaluate_reproduces_it(tmp_path, monkeypatch):
    """In process: a fine-tuning run on random JPEGs (RandAugment, the frozen-copy teacher) records the
    fine-tuned, zero-shot and ensemble rows, its processes, peak memory and last epoch's fit; then
    --evaluate RUN_DIR (frozen features and model rebuilt from the saved run) gives the same numbers."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    run = tmp_path / "runs" / "run1"
    record = proreg.main(proreg.parse_args(fixture_run(tmp_path, "--epochs", "2")))
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == "proreg" and results["epoch"] == 2 and results["all"] == record["all"]
    assert set(results["zero_shot"]) == set(results["ensemble"]) == {"all", "hm"}
    assert results["peak_memory_mb"] > 0 and results["processes"] == 1
    assert set(results["train"]) == {"loss", "terms", "acc", "s"} and math.isfinite(results["train"]["loss"])
    assert set(results["train"]["terms"]) == {"ce", "kl", "w"}
    log = data.read_log(run)  # every epoch's loss terms: the loss is ce + alpha kl (to the rounding)
    assert [e["epoch"] for e in log] == [1, 2] and log[-1]["loss"] == results["train"]["loss"]
    for e in log:
        assert all(math.isfinite(v) for v in e["terms"].values()) and 0 < e["terms"]["w"] < 1
        assert e["loss"] == pytest.approx(e["terms"]["ce"] + 2.0 * e["terms"]["kl"], abs=2e-4)
    # model selection: validated every half epoch (2 steps an epoch: after steps 1 and 2), the best tested
    assert results["selected"]["by"] == "validation" and results["selected"]["epoch"] in (0.5, 1.0, 1.5, 2.0)
    assert set(torch.load(run / "best.pt", weights_only=True)) == set(learned(run))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(ckpt["learned"]) >= {"class_embeddings", "logit_scale", "visual.conv1.weight"}
    again = proreg.main(proreg.parse_args(["--evaluate", str(run), "--root", str(tmp_path / "data"), *COMMON]))
    assert json.loads((run / "eval.json").read_text())["all"] == again["all"]
    for key in ("all", "zero_shot", "ensemble"):
        assert again[key] == results[key], key
    assert again["test_loss"]["all"] == pytest.approx(results["test_loss"]["all"], rel=1e-6)
    assert len((run.parent / "results.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_zeroshot_is_the_zero_shot_row_and_base2new_scores_new_classes_with_prompt_features(tmp_path,
                                                                                          monkeypatch):
    """--method zeroshot trains nothing (no training set, epoch 0): its prompt-initialised head over the
    untouched encoder gives zero-shot CLIP's accuracy, on the base classes it has a head for and on the
    new ones, scored with their own prompt features and its logit scale."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    monkeypatch.setattr(proreg, "TrainingSet", None)  # built only for training
    record = proreg.main(proreg.parse_args(fixture_run(tmp_path, "--protocol", "base2new",
                                                       "--method", "zeroshot")))
    assert record["classes"] == {"base": 2, "new": 2} and record["epoch"] == 0 and record["train"] is None
    assert record["selected"] == {"by": "last epoch"}
    assert [record[k] for k in ("base", "new", "hm")] == [record["zero_shot"][k] for k in ("base", "new", "hm")]
    assert learned(tmp_path / "runs" / "run1")["class_embeddings"].shape == (2, 32)  # a head for base only


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a real training process after a few epochs, --resume it, and get bit for bit the learned
    tensors and numbers of a run that was never interrupted (CPU, RandAugment on)."""
    epochs = ["--epochs", "10"]  # the kill lands after epoch 3, long before the end
    whole, killed = tmp_path / "runs" / "whole", tmp_path / "runs" / "killed"
    launch(tmp_path, *fixture_run(tmp_path, *epochs, name="whole"))
    proc = launch(tmp_path, *fixture_run(tmp_path, *epochs, name="killed"), wait=False)
    stopped_at = kill_after_epochs(proc, killed)  # after 3 finished epochs, without warning
    assert 3 <= stopped_at < 10 and not (killed / "results.json").exists()
    stdout = launch(tmp_path, "--resume", str(killed), "--root", str(tmp_path / "data"), *COMMON)
    assert f"resuming after epoch {stopped_at}" in stdout
    for name, tensor in learned(whole).items():
        assert torch.equal(tensor, learned(killed)[name]), name
    a, b = (json.loads((r / "results.json").read_text()) for r in (whole, killed))
    assert (a["all"], a["test_loss"], a["ensemble"]) == (b["all"], b["test_loss"], b["ensemble"])
    untimed = [[{k: v for k, v in e.items() if k != "s"} for e in data.read_log(r)] for r in (whole, killed)]
    assert untimed[0] == untimed[1] and all(set(e["terms"]) == {"ce", "kl", "w"} for e in untimed[0])


def key_bias(name):
    """The key part of attention's in_proj_bias: it adds the same number to every logit of a softmax row,
    so its gradient is 0 in exact arithmetic and Adam turns the rounding noise into full-size steps."""
    return name.endswith("attn.in_proj_bias")


def assert_same_learning(a, b, start, what, atol=1e-6):
    for key, tensor in a.items():
        if key_bias(key):
            d = tensor.shape[0] // 3
            tensor, other = torch.cat([tensor[:d], tensor[2 * d:]]), torch.cat([b[key][:d], b[key][2 * d:]])
        else:
            other = b[key]
        torch.testing.assert_close(other, tensor, rtol=1e-4, atol=atol, msg=f"{what}: {key}")
    moved = [k for k in a if not torch.allclose(a[k], start[k], atol=1e-4)]
    assert "visual.conv1.weight" in moved and "class_embeddings" in moved  # the weights did move


@pytest.mark.slow
def test_ddp_accumulation_and_checkpointing_learn_what_one_process_learns(tmp_path, monkeypatch):
    """2 CPU processes (gloo, as torchrun starts them), global batch 4 = 2 x 2, one process in 2
    accumulation steps, and one with activation checkpointing, against one process with batch 4: the
    same weights after 5 steps, to rounding."""
    lr = ["--epochs", "1", "--lr", "1e-3"]
    launch(tmp_path, *fixture_run(tmp_path, *lr, name="ddp"), processes=2)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    proreg.main(proreg.parse_args(fixture_run(tmp_path, *lr, name="one")))
    proreg.main(proreg.parse_args(fixture_run(tmp_path, *lr, "--grad-accum", "2", name="accum")))
    proreg.main(proreg.parse_args(fixture_run(tmp_path, *lr, "--checkpointing", name="checkpointing")))
    torch.manual_seed(1)  # main seeds torch with --seed before building the random-init backbone
    clip = data.load_backbone(TINY_NAME, None).model
    names = ["face", "accordion", "airplane", "anchor"]
    start = {"class_embeddings": proreg.prompt_features(clip, open_clip.tokenize, names, data.CUSTOM_TEMPLATES["caltech101"]),
             **{f"visual.{k}": v for k, v in clip.visual.state_dict().items()}, "logit_scale": clip.logit_scale}
    one, ddp, accum, checkpointing = (learned(tmp_path / "runs" / n) for n in ("one", "ddp", "accum", "checkpointing"))
    assert set(one) == set(ddp) == set(accum) == set(checkpointing)
    assert_same_learning(accum, ddp, start, "ddp")  # 2 processes x 2 = 1 process in 2 steps of 2
    assert_same_learning(one, checkpointing, start, "checkpointing")  # recomputed activations
    # A batch of 4 against two halves of 2: the gradients agree to float rounding, but Adam divides
    # each by its own sqrt(v) + eps, so an element whose gradient is near zero (a sum that cancels)
    # moves by up to a few % of lr on either path (transformers' AdamW: eps before the bias
    # correction, about 3e-7 at step 1). 5 steps at lr 1e-3: differences up to ~1e-5 (measured).
    assert_same_learning(one, accum, start, "accum", atol=5e-5)
    assert json.loads((tmp_path / "runs" / "ddp" / "results.json").read_text())["processes"] == 2


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--alpha", "-1"], "--alpha must be a finite number >= 0, got -1.0"),
    (["--warmup", "1"], "--warmup must be a finite number"),
    (["--batch-size", "6", "--grad-accum", "4"], "--batch-size 6 does not split into 1 processes x --grad-accum 4"),
    (["--weight", "xerm", "--loss-impl", "kernel"], "--loss-impl kernel computes the official weight only"),
])
def test_a_setting_that_would_give_wrong_numbers_is_refused_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(data.UsageError) as error:
        proreg.main(proreg.parse_args(["--output-dir", str(tmp_path / "run"), *COMMON, *flags]))
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()


def test_the_script_prints_a_usage_error_as_one_line_and_exits_2(tmp_path):
    command = [sys.executable, str(ROOT / "proreg.py"), "--alpha", "inf", "--output-dir", str(tmp_path / "r")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --alpha must be a finite number >= 0, got inf"
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- the world's biased task
@pytest.fixture(scope="module")
def biased():
    from world import biased as module
    return module, data.load_dataset("shapes_biased", ".")


def test_the_biased_task_is_biased_where_it_claims_and_nowhere_else(biased):
    module, bench = biased
    n_classes = len(bench.classnames)
    on_cue = {split: (bench.cues[split] == torch.tensor([it.label for it in items])).float().mean().item()
              for split, items in [("train", bench.train), ("test", bench.test), ("offbias", bench.shifts["offbias"])]}
    assert on_cue["train"] == pytest.approx(module.BIAS_ON_CUE, abs=0.03)
    assert on_cue["test"] == pytest.approx(module.BIAS_ON_CUE, abs=0.03)
    assert on_cue["offbias"] == pytest.approx(1 / n_classes, abs=0.04)
    assert set(bench.shifts) == {"offbias", *(s for s in module.WORLD_STYLES if s != module.BIAS_STYLE)}


def test_the_cue_is_in_the_pixels(biased):
    """A nearest-centroid classifier on the colour of each image's brightest pixel (the shape's fill: the
    world's backgrounds are dull and dark) learns the label from the training split, and is near chance
    on the off-bias test: the bias is in the images, not only in the bookkeeping."""
    _, bench = biased

    def fill_colour(items):
        x = torch.stack([torch.from_numpy(np.array(bench.open_image(it.source))) for it in items])
        x = x.float().reshape(len(items), -1, 3) / 255  # [N, H*W, 3]
        brightest = x.max(-1).values.argmax(-1)  # [N]
        return x[torch.arange(len(items)), brightest], torch.tensor([it.label for it in items])

    x, y = fill_colour(bench.train)
    centroids = torch.stack([x[y == c].mean(0) for c in range(len(bench.classnames))])
    accuracy = lambda f, labels: (torch.cdist(f, centroids).argmin(1) == labels).float().mean().item()  # noqa: E731
    assert accuracy(x, y) > 0.8
    assert accuracy(*fill_colour(bench.shifts["offbias"])) < 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["proreg", "fixed", "finetune"])
def test_captured_step_gives_the_eager_losses_on_cuda(clip, method):
    """The AdamW step replayed as a CUDA graph (fused loss, lr read on the device) gives the eager step's
    losses and weights, also after the schedule changes the lr."""
    args = settings(method=method, lr=1e-4, head_lr_mult=100.0, weight_decay=0.01)
    models = []
    for _ in range(2):
        model = proreg.FineTunedCLIP(copy.deepcopy(clip).cuda(), torch.randn(5, 32, generator=torch.Generator()
                                                                               .manual_seed(3)).cuda())
        models.append((model, proreg.adamw(model, args, torch.device("cuda"))))
    batches = [(images(4, seed=i).cuda(), torch.tensor([0, 1, 2, 3]).cuda(),
                torch.randn(4, 5, generator=torch.Generator().manual_seed(10 + i)).cuda() * 3) for i in range(6)]
    (eager, opt_eager), (captured, opt_captured) = models
    step_fn = lambda m, o, *b: proreg.train_step(m, o, *b, args=args, use_kernel=True)  # noqa: E731
    step = kernels.CapturedStep(step_fn, captured, opt_captured)
    for factor, part in ((1.0, batches[:3]), (0.25, batches[3:])):
        data.set_lr(opt_eager, factor), data.set_lr(opt_captured, factor)
        expected = [step_fn(eager, opt_eager, *b)[0] for b in part]
        got = [step(*b)[0] for b in part]  # each replay's terms, copied out of the graph
        for name in expected[0]:
            assert [g[name].item() for g in got] == pytest.approx([e[name].item() for e in expected], rel=1e-3,
                                                                  abs=1e-6), name
    for a, b in zip(eager.parameters(), captured.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("where, method", [("world", "proreg"), ("caltech", "proreg"), ("caltech", "finetune")])
def test_training_batches_carry_the_zero_shot_teachers_logits(tmp_path, monkeypatch, where, method):
    """The world (no augmentation): the teacher's logits are computed once and each batch carries its rows.
    Real data (RandAugment): a frozen copy of the encoder scores each augmented batch, only for the
    objectives that read it; plain fine-tuning gets zeros and no second encoder."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    backbone = data.load_backbone(TINY_NAME, None)
    if where == "world":
        benchmark = data.load_dataset("shapes_biased", None)
    else:
        caltech_fixture(tmp_path)
        benchmark = data.load_dataset("caltech101", tmp_path)
    assert benchmark.augment == (where == "caltech")
    items = benchmark.train[:12]
    zs_text = proreg.prompt_features(backbone.model, backbone.tokenize, benchmark.classnames, "a photo of a {}.")
    args = settings(method=method, batch_size=4, test_batch_size=4, workers=0, seed=1)
    train_set = proreg.TrainingSet(items, benchmark, backbone, zs_text, args, torch.device("cpu"))
    assert (train_set.teacher is None) == (where == "world" or method == "finetune")
    zero_shot = data.FixedHead(F.normalize(zs_text, dim=-1), backbone.model.logit_scale)
    batches = list(train_set.batches(epoch=0, rank=0, world_size=1))
    assert len(batches) == 3
    for x, y, zs_logits in batches:
        assert zs_logits.shape == (4, len(benchmark.classnames))
        if method == "finetune":
            assert not zs_logits.any()
        else:
            with torch.no_grad():
                expected = zero_shot(F.normalize(backbone.model.encode_image(x).float(), dim=-1))
            torch.testing.assert_close(zs_logits, expected, rtol=1e-5, atol=1e-5)
            assert zs_logits.std() > 0


# ---------------------------------------------------------------------------- settings and the other baselines
def resolved(*flags):
    return proreg.resolve_settings(proreg.parse_args([*flags, "--device", "cpu"]))


def test_settings_follow_the_official_configs_per_benchmark_and_method():
    dn = resolved("--dataset", "domain_net")
    assert (dn.model, dn.pretrained, dn.alpha, dn.lr, dn.head_lr_mult, dn.batch_size, dn.epochs) == \
        ("ViT-B-32", "openai", 2.0, 1e-5, 100.0, 256, 10)
    lt = resolved("--dataset", "imagenet_lt")
    assert (lt.lr, lt.head_lr_mult) == (1e-4, 10.0)
    probe = resolved("--dataset", "pacs", "--method", "linear_probe")
    assert (probe.lr, probe.head_lr_mult, probe.model) == (2e-3, 1.0, "ViT-B-32")
    world = resolved()
    assert (world.model, world.pretrained, world.batch_size, world.select) == ("tiny", "shapes", 32, "val")
    own = resolved("--dataset", "caltech101", "--model", "ViT-B-16", "--pretrained", "laion2b_s34b_b88k", "--lr", "3e-5")
    assert (own.model, own.pretrained, own.lr) == ("ViT-B-16", "laion2b_s34b_b88k", 3e-5)
    with pytest.raises(data.UsageError, match="--model needs --pretrained"):
        resolved("--dataset", "caltech101", "--model", "ViT-B-16")
    with pytest.raises(data.UsageError, match="promptless has a head for the training classes only"):
        resolved("--method", "promptless", "--protocol", "base2new")


def test_promptless_head_is_the_official_mlp_and_linear_probe_trains_the_head_alone(clip):
    torch.manual_seed(0)
    model = proreg.PromptlessCLIP(clip, 5)
    d = clip.visual.output_dim
    assert [type(m).__name__ for m in model.head] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert model.head[0].weight.shape == (2 * d, d) and model.head[3].weight.shape == (5, 2 * d)
    assert model.head[0].weight.std().item() == pytest.approx(0.02, rel=0.1) and not model.head[3].bias.any()
    with torch.no_grad():
        raw = clip.visual(images())
        torch.testing.assert_close(model(images()), model.head(raw))  # unnormalised features, no scale
    optimizer = proreg.adamw(model, settings(lr=1e-5, head_lr_mult=100.0, weight_decay=0.01), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: (g["base_lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert decay["head.0.weight"] == decay["head.1.weight"] == (1e-3, 0.01)  # the official names decay LN weight
    assert decay["head.0.bias"] == decay["head.1.bias"] == (1e-3, 0.0)
    probe = proreg.FineTunedCLIP(clip, torch.randn(5, 32), train_encoder=False)
    clip.visual.requires_grad_(False)
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"class_embeddings"}
    clip.visual.requires_grad_(False)


@pytest.mark.parametrize("train_encoder", [True, False])
def test_no_model_trains_on_patch_dropped_features(train_encoder):
    """The world's tiny CLIP drops half its patches in train mode (pretraining's patch dropout): the student,
    fine-tuned or a linear probe on the frozen encoder, sees every patch, as at test time."""
    clip = data.load_backbone("tiny", "shapes", torch.device("cpu")).model
    assert clip.visual.patch_dropout.prob == 0.5
    model = proreg.FineTunedCLIP(clip, torch.randn(8, clip.visual.output_dim), train_encoder).train()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        train_mode = model.encode(x)
        torch.testing.assert_close(model.eval().encode(x), train_mode)
    assert all(p.requires_grad == train_encoder for p in model.visual.parameters())


@pytest.mark.parametrize("method, learns", [("promptless", "head.3.weight"), ("linear_probe", "class_embeddings")])
def test_the_other_baselines_run_and_record(tmp_path, monkeypatch, method, learns):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    record = proreg.main(proreg.parse_args(fixture_run(tmp_path, "--method", method, "--epochs", "1")))
    assert record["method"] == method and 0 <= record["all"] <= 100 and record["selected"]["by"] == "validation"
    saved = learned(tmp_path / "runs" / "run1")
    assert learns in saved and ("visual.conv1.weight" in saved) == (method == "promptless")


def test_domain_net_runs_its_protocol_end_to_end(tmp_path, monkeypatch):
    """On DomainNet's release layout: trained on sketch, the best of the half-epoch validations on sketch's test
    list tested on it (all) and on clipart, painting, real, with their mean, for every row."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    make_domain_net(tmp_path / "data")
    record = proreg.main(proreg.parse_args(["--dataset", "domain_net", "--model", TINY_NAME, "--pretrained", "none",
                                            "--root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"),
                                            "--batch-size", "2", "--epochs", "2", *COMMON]))
    assert record["classes"] == {"all": 3, "clipart": 3, "painting": 3, "real": 3}
    assert list(record["shifts"]) == ["clipart", "painting", "real", "mean"]
    for row in (record["shifts"], record["zero_shot"], record["ensemble"]):
        assert row["mean"] == pytest.approx(sum(row[d] for d in ("clipart", "painting", "real")) / 3)
    assert record["selected"]["by"] == "validation" and 0 < record["selected"]["epoch"] <= 2
    assert record["args"]["model"] == TINY_NAME and record["protocol"] == "all"
