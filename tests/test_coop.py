"""coop.py: the prompted model against CLIP itself (values, fp32, tight tolerances), the exact
truncated text pass, CoCoOp against CoOp, the class-token layouts, the Dassl schedule, and end-to-end
runs of the script on a tiny Caltech101 fixture that --evaluate reproduces."""
import argparse
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

import coop
import data
from conftest import kill_after_epochs

# A random-init CLIP small enough for CPU tests, with OpenAI CLIP's 77-token text context.
ROOT = Path(__file__).resolve().parents[1]
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


def images(n=3, seed=2):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_word_init_gives_zero_shot_clip_logits(clip):
    zero_shot = coop.ZeroShotCLIP(clip, open_clip.tokenize, NAMES, "a photo of a {}.")
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


def run_coop(*argv, cwd):
    """The script as a user runs it from their own project: coop.py and data.py copied into an
    otherwise empty folder, run there (after registering the tiny test model with open_clip)."""
    project = cwd / "project"
    if not project.exists():
        project.mkdir()
        for name in ("coop.py", "data.py"):
            shutil.copy(ROOT / name, project / name)
    code = (f"import open_clip, runpy, sys; open_clip.factory._MODEL_CONFIGS[{TINY_NAME!r}] = {TINY!r}; "
            f"sys.path.insert(0, '.'); sys.argv = ['coop.py', *{list(argv)!r}]; "
            f"runpy.run_path('coop.py', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=120,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def check_run(run, method, epochs=2):
    """The files of a finished run; returns its results."""
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == method and results["shots"] == 2 and results["epoch"] == epochs
    assert results["hm"] == pytest.approx(2 * results["base"] * results["new"] / (results["base"] + results["new"]))
    assert set(results["zero_shot"]) >= {"base", "new", "hm"} and set(results["test_loss"]) == {"base", "new"}
    assert {p.name for p in run.iterdir()} >= {"args.json", "fewshot.json", "results.json", "checkpoint.pt"}
    assert len(json.loads((run / "fewshot.json").read_text())["items"]) == 2 * 4  # 2 shots x 4 classes
    lines = (run.parent / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["base"] == results["base"]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == {"learned", "args", "epoch", "metrics", "optimizer", "rng", "train"} and ckpt["epoch"] == epochs
    assert 0 <= ckpt["train"]["acc"] <= 100 and ckpt["train"]["loss"] > 0 and results["train"] == ckpt["train"]
    assert ckpt["metrics"]["test_loss"] == results["test_loss"]
    meta = {f"prompt_learner.meta_net.{layer}.{p}" for layer in ("linear1", "linear2") for p in ("weight", "bias")}
    assert set(ckpt["learned"]) == {"prompt_learner.ctx"} | (meta if method == "cocoop" else set())  # nothing frozen
    return results


def check_reproduced(run, results):
    again = json.loads((run / "eval.json").read_text())
    for key in ("base", "new", "hm", "zero_shot", "epoch"):
        assert again[key] == results[key], key
    for split, loss in results["test_loss"].items():  # continuous: a different model would not match
        assert again["test_loss"][split] == pytest.approx(loss, rel=1e-6, abs=1e-7), split
    assert len((run.parent / "results.jsonl").read_text().splitlines()) == 1  # re-evaluation appends nothing


COMMON = ["--workers", "0", "--device", "cpu"]


def fixture_run(tmp_path, *extra, name="run1"):
    caltech_fixture(tmp_path / "data") if not (tmp_path / "data").exists() else None
    return ["--dataset", "caltech101", "--model", TINY_NAME, "--pretrained", "none", "--shots", "2",
            "--root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs" / name), *COMMON, *extra]


def test_cocoop_run_in_process_refuses_overwrite_and_evaluate_reproduces(tmp_path, monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    run = tmp_path / "runs" / "run1"
    train = fixture_run(tmp_path, "--epochs", "2")
    coop.main(coop.parse_args([*train, "--conditional", "--batch-size", "2"]))
    results = check_run(run, "cocoop")
    saved = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds a checkpoint"):  # a finished run is never overwritten
        coop.main(coop.parse_args(train))
    assert (run / "checkpoint.pt").read_bytes() == saved
    coop.main(coop.parse_args(["--evaluate", str(run), "--root", str(tmp_path / "data"), *COMMON]))
    check_reproduced(run, results)


def test_csc_run_end_to_end_has_no_new_class_prompts(tmp_path, monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    record = coop.main(coop.parse_args(fixture_run(tmp_path, "--epochs", "2", "--csc")))
    ckpt = torch.load(tmp_path / "runs" / "run1" / "checkpoint.pt", weights_only=True)
    assert ckpt["learned"]["prompt_learner.ctx"].shape == (2, 4, 64)  # one context per base class
    assert record["new"] is None and record["hm"] is None and 0 <= record["base"] <= 100


def test_overwrite_replaces_the_whole_run(tmp_path, monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    run = tmp_path / "runs" / "run1"
    coop.main(coop.parse_args(fixture_run(tmp_path, "--epochs", "1")))
    coop.main(coop.parse_args(["--evaluate", str(run), "--root", str(tmp_path / "data"), *COMMON]))
    assert (run / "eval.json").exists()
    coop.main(coop.parse_args(fixture_run(tmp_path, "--epochs", "2", "--overwrite")))
    assert not (run / "eval.json").exists()  # nothing of the old run stays beside the new results
    assert json.loads((run / "results.json").read_text())["epoch"] == 2


def learned(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["learned"]


def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a real training process after a few epochs, --resume it, and get bit for bit the
    learned tensors and numbers of a run that was never interrupted (CPU, augmentation on)."""
    epochs = ["--epochs", "40", "--batch-size", "2"]
    whole = tmp_path / "runs" / "whole"
    run_coop(*fixture_run(tmp_path, *epochs, name="whole"), cwd=tmp_path)
    killed = tmp_path / "runs" / "killed"
    project = tmp_path / "project"
    code = (f"import open_clip, runpy, sys; open_clip.factory._MODEL_CONFIGS[{TINY_NAME!r}] = {TINY!r}; "
            f"sys.path.insert(0, '.'); sys.argv = ['coop.py', *{fixture_run(tmp_path, *epochs, name='killed')!r}]; "
            f"runpy.run_path('coop.py', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    stopped_at = kill_after_epochs(proc, killed)  # after 3 finished epochs, without warning
    assert 3 <= stopped_at < 40 and not (killed / "results.json").exists()
    stdout = run_coop("--resume", str(killed), "--root", str(tmp_path / "data"), *COMMON, cwd=tmp_path)
    assert f"resuming after epoch {stopped_at}" in stdout
    for name, tensor in learned(whole).items():
        assert torch.equal(tensor, learned(killed)[name]), name
    a, b = (json.loads((r / "results.json").read_text()) for r in (whole, killed))
    assert (a["base"], a["new"], a["test_loss"]) == (b["base"], b["new"], b["test_loss"])


def children(pid):
    """Process ids whose parent is `pid` (Linux's /proc, as on every machine this runs on)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_loader_workers_do_not_outlive_a_killed_run(tmp_path):
    argv = [*fixture_run(tmp_path, "--epochs", "200", "--batch-size", "2"), "--workers", "2"]  # last wins
    project = tmp_path / "project"
    project.mkdir()
    for name in ("coop.py", "data.py"):
        shutil.copy(ROOT / name, project / name)
    code = (f"import open_clip, runpy, sys; open_clip.factory._MODEL_CONFIGS[{TINY_NAME!r}] = {TINY!r}; "
            f"sys.path.insert(0, '.'); sys.argv = ['coop.py', *{argv!r}]; runpy.run_path('coop.py', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and len(workers) < 2 and proc.poll() is None:  # training, workers running
        workers = children(proc.pid) if (tmp_path / "runs" / "run1" / "checkpoint.pt").exists() else []
        time.sleep(0.05)
    assert len(workers) >= 2, "the run never showed its loader workers"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30  # a worker checks on its parent every 5 s (torch's watchdog)
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.2)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()], "loader workers outlived their parent"


def test_a_run_killed_during_evaluation_is_finished_by_resume(tmp_path, monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    run = tmp_path / "runs" / "run1"
    real = coop.evaluate_run
    monkeypatch.setattr(coop, "evaluate_run", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        coop.main(coop.parse_args(fixture_run(tmp_path, "--epochs", "2")))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2 and not (run / "results.json").exists()
    monkeypatch.setattr(coop, "evaluate_run", real)
    coop.main(coop.parse_args(["--resume", str(run), "--root", str(tmp_path / "data"), *COMMON]))
    check_run(run, "coop")
    with pytest.raises(SystemExit, match="is finished"):
        coop.main(coop.parse_args(["--resume", str(run), "--root", str(tmp_path / "data"), *COMMON]))


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--n-ctx", "0", "--ctx-init", ""], "--n-ctx 0 with an empty --ctx-init"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--shots", "-1"], "--shots must be an integer >= 1, got -1"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
    (["--csc", "--conditional"], "--csc is CoOp's class-specific context"),
    (["--ctx-init", "a photo of " * 20], "does not fit the text context of 24 tokens"),  # the tiny CLIP's
    (["--ctx-init", "", "--n-ctx", "30"], "--n-ctx 30 does not fit the text context of 24 tokens"),
])
def test_a_setting_that_would_give_wrong_numbers_is_refused_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(data.UsageError) as error:
        coop.main(coop.parse_args(["--output-dir", str(tmp_path / "run"), *COMMON, *flags]))
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()


def test_a_class_name_too_long_for_the_text_context_is_named(clip):
    with pytest.raises(data.UsageError, match=r"does not fit the text context of 77 tokens for 1 classes "
                                              r"\(e.g. 'cat cat cat"):
        prompted(clip, names=["ox", "cat " * 80])


def test_the_script_prints_a_usage_error_as_one_line_and_exits_2(tmp_path):
    command = [sys.executable, str(ROOT / "coop.py"), "--epochs", "0", "--output-dir", str(tmp_path / "r")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --epochs must be an integer >= 1, got 0"
    assert not (tmp_path / "r").exists()


def test_resume_or_evaluate_of_a_folder_without_a_readable_checkpoint_says_so(tmp_path):
    with pytest.raises(data.UsageError, match="nothing/checkpoint.pt"):
        coop.main(coop.parse_args(["--resume", str(tmp_path / "nothing"), *COMMON]))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(data.UsageError, match="broken/checkpoint.pt"):
        coop.main(coop.parse_args(["--evaluate", str(tmp_path / "broken"), *COMMON]))


def test_a_run_whose_data_is_missing_stops_clearly_and_writes_nothing(tmp_path):
    args = coop.parse_args(["--dataset", "caltech101", "--root", str(tmp_path / "nodata"),
                            "--output-dir", str(tmp_path / "run")])
    with pytest.raises(FileNotFoundError, match="101_ObjectCategories"):
        coop.main(args)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- the captured step
def sgd(model, device="cpu"):
    learned = [p for p in model.parameters() if p.requires_grad]
    return coop.sgd(learned, argparse.Namespace(lr=0.002, momentum=0.9, weight_decay=5e-4), torch.device(device))


def losses_of(step, model, optimizer, batches):
    return [step(model, optimizer, x, y)[0].item() if step is coop.train_step else step(x, y)[0].item()
            for x, y in batches]


@pytest.mark.parametrize("conditional", [False, True])
def test_warm_up_before_recording_leaves_the_training_trajectory_unchanged(clip, conditional):
    """Recording a CUDA graph runs warm-up steps first; they must leave no trace (learned tensors,
    momentum): the steps after them equal those of a model that never warmed up."""
    batches = [(images(4), torch.tensor([0, 1, 2, 3])) for _ in range(3)]
    plain = prompted(clip, conditional=conditional)
    warmed = prompted(clip, conditional=conditional)
    opt_plain, opt_warmed = sgd(plain), sgd(warmed)
    coop.CapturedStep(coop.train_step, warmed, opt_warmed).warm_up([images(4, seed=9), torch.tensor([4, 3, 2, 1])])
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
    step = coop.CapturedStep(coop.train_step, captured, opt_captured)
    got = [step(x, y)[0].item() for x, y in batches[:3]]
    assert got == pytest.approx(expected, rel=1e-3)
    opt_eager.param_groups[0]["lr"].fill_(0.5), opt_captured.param_groups[0]["lr"].fill_(0.5)  # lr read on device
    expected = losses_of(coop.train_step, eager, opt_eager, batches[3:])
    assert [step(x, y)[0].item() for x, y in batches[3:]] == pytest.approx(expected, rel=1e-3)
    for a, b in zip(eager.prompt_learner.parameters(), captured.prompt_learner.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_a_non_finite_loss_stops_the_run_with_epoch_and_step_and_records_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)
    real, calls = coop.train_step, []

    def diverging(model, optimizer, x, y):
        calls.append(1)
        loss, correct = real(model, optimizer, x, y)
        return (loss * float("nan") if len(calls) == 6 else loss), correct
    monkeypatch.setattr(coop, "train_step", diverging)
    with pytest.raises(SystemExit, match=r"the loss became nan at epoch 3, step 2 .*nothing was recorded"):
        coop.main(coop.parse_args(fixture_run(tmp_path, "--epochs", "4", "--batch-size", "2")))  # 2 steps an epoch
    run = tmp_path / "runs" / "run1"
    assert not (run / "results.json").exists() and not (run.parent / "results.jsonl").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2  # the last good epoch stays
