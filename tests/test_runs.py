"""data.py's run machinery (section 8), tested once, through coop.py as the method that drives it: the
run folder (new, --overwrite, --resume, --evaluate), the checkpoint (kill and resume bit for bit), the
common flags' refusals, the non-finite-loss stop, and what a killed run leaves behind."""
import argparse
import os
import shutil
import subprocess
import sys
import warnings

import open_clip
import pytest
import torch

import coop
import data
from conftest import (COMMON, ROOT, TINY, TINY_NAME, check_reproduced, check_run, fixture_run,
                      kill_after_epochs)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY_NAME, TINY)


def script(argv, project):
    """`python coop.py ARGV` as a user runs it from their own project: coop.py and data.py copied into
    an otherwise empty folder (the tiny test model registered with open_clip first)."""
    if not project.exists():
        project.mkdir()
        for name in ("coop.py", "data.py"):
            shutil.copy(ROOT / name, project / name)
    code = (f"import open_clip, runpy, sys; open_clip.factory._MODEL_CONFIGS[{TINY_NAME!r}] = {TINY!r}; "
            f"sys.path.insert(0, '.'); sys.argv = ['coop.py', *{list(argv)!r}]; "
            f"runpy.run_path('coop.py', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return [sys.executable, "-c", code], dict(cwd=project, env={**env, "OMP_NUM_THREADS": "1"})


def run_script(argv, project):
    command, where = script(argv, project)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, **where)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def learned(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)["learned"]


# ---------------------------------------------------------------------------- the run folder
def test_a_finished_run_is_never_overwritten_and_evaluate_reproduces_it(tmp_path, tiny):
    run = tmp_path / "runs" / "run1"
    train = fixture_run(tmp_path, "--epochs", "2")
    coop.main(coop.parse_args(train))
    results = check_run(run, "coop")
    saved = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(data.UsageError, match="already holds a checkpoint: pass --overwrite"):
        coop.main(coop.parse_args(train))
    assert (run / "checkpoint.pt").read_bytes() == saved
    coop.main(coop.parse_args(["--evaluate", str(run), "--root", str(tmp_path / "data"), *COMMON]))
    check_reproduced(run, results)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run's log.jsonl is not read as (bad) result lines
        assert [r["base"] for r in data.read_results(tmp_path / "runs")] == [results["base"]]
    coop.main(coop.parse_args(fixture_run(tmp_path, "--epochs", "1", "--warmup-epochs", "0", "--overwrite")))
    assert not (run / "eval.json").exists()  # nothing of the old run stays beside the new results
    assert data.load_checkpoint(run / "checkpoint.pt")["metrics"]["epoch"] == 1


def test_a_run_killed_during_evaluation_is_finished_by_resume(tmp_path, tiny, monkeypatch):
    run = tmp_path / "runs" / "run1"
    real = coop.evaluate_run
    monkeypatch.setattr(coop, "evaluate_run", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        coop.main(coop.parse_args(fixture_run(tmp_path, "--epochs", "2")))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert not (run / "results.json").exists()
    monkeypatch.setattr(coop, "evaluate_run", real)
    coop.main(coop.parse_args(["--resume", str(run), "--root", str(tmp_path / "data"), *COMMON]))
    check_run(run, "coop")
    with pytest.raises(data.UsageError, match="is finished"):
        coop.main(coop.parse_args(["--resume", str(run), "--root", str(tmp_path / "data"), *COMMON]))


def test_a_run_stopped_mid_training_cannot_be_evaluated(tmp_path, tiny, monkeypatch):
    run, real = tmp_path / "runs" / "run1", data.save_checkpoint

    def killed_after_epoch_1(path, args, epoch, *rest):
        real(path, args, epoch, *rest)
        if epoch == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(data, "save_checkpoint", killed_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        coop.main(coop.parse_args(fixture_run(tmp_path, "--epochs", "2")))
    with pytest.raises(data.UsageError, match="stopped after epoch 1 of 2: finish it with --resume"):
        coop.main(coop.parse_args(["--evaluate", str(run), *COMMON]))
    assert sorted(p.name for p in run.iterdir()) == ["args.json", "checkpoint.pt", "classes.json", "fewshot.json",
                                                     "log.jsonl"]


def test_a_resumed_run_keeps_its_saved_settings_and_takes_only_local_ones(tmp_path, tiny):
    run = tmp_path / "runs" / "run1"
    coop.main(coop.parse_args(fixture_run(tmp_path, "--epochs", "1", "--warmup-epochs", "0")))
    (run / "results.json").unlink()  # as if killed during evaluation
    argv = ["--resume", str(run), "--lr", "5", "--epochs", "9", "--test-batch-size", "3", *COMMON]
    args, saved, out, device = data.start_run(coop.parse_args(argv), "coop", coop.resolve_settings,
                                              coop.check_settings)
    assert (args.lr, args.epochs, args.test_batch_size, out, device.type) == (0.002, 1, 3, run, "cpu")
    assert saved["epoch"] == 1 and args.seed == 1


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a real training process after a few epochs, --resume it, and get bit for bit the
    learned tensors and numbers of a run that was never interrupted (CPU, augmentation on)."""
    epochs = ["--epochs", "12", "--batch-size", "2"]
    project, whole, killed = tmp_path / "project", tmp_path / "runs" / "whole", tmp_path / "runs" / "killed"
    run_script(fixture_run(tmp_path, *epochs, name="whole"), project)
    command, where = script(fixture_run(tmp_path, *epochs, name="killed"), project)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **where)
    stopped_at = kill_after_epochs(proc, killed)  # after 3 finished epochs, without warning
    assert 3 <= stopped_at < 12 and not (killed / "results.json").exists()
    stdout = run_script(["--resume", str(killed), "--root", str(tmp_path / "data"), *COMMON], project)
    assert f"resuming after epoch {stopped_at}" in stdout
    for name, tensor in learned(whole).items():
        assert torch.equal(tensor, learned(killed)[name]), name
    a, b = (data.load_checkpoint(r / "checkpoint.pt")["metrics"] for r in (whole, killed))
    assert (a["base"], a["new"], a["test_loss"]) == (b["base"], b["new"], b["test_loss"])
    untimed = lambda log: [{k: v for k, v in e.items() if k != "s"} for e in log]  # noqa: E731
    log = data.read_log(whole)  # every epoch once, in order, the resumed run's equal but for the time
    assert [e["epoch"] for e in log] == list(range(1, 13)) and untimed(log) == untimed(data.read_log(killed))
    assert all(set(e["terms"]) == {"ce"} for e in log)  # the loss terms are in that equality
    assert log[-1]["loss"] == a["train"]["loss"] and all(e["s"] > 0 for e in log)


# ---------------------------------------------------------------------------- checkpoints
def test_the_log_keeps_one_line_per_epoch_when_an_epoch_is_repeated(tmp_path):
    for epoch in (1, 2, 3, 2, 3):  # killed after epoch 3's log line, before its checkpoint: resumed at 2
        data.append_log(tmp_path / "log.jsonl", {"epoch": epoch, "loss": float(epoch)})
    assert data.read_log(tmp_path) == [{"epoch": e, "loss": float(e)} for e in (1, 2, 3)]
    assert data.read_log(tmp_path / "nothing") == []


def test_restore_checkpoint_puts_back_tensors_optimiser_and_every_random_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1, dtype=torch.float64), momentum=0.9)
    generator = torch.Generator().manual_seed(5)

    def steps(n):
        out = []
        for _ in range(n):
            x = torch.randn(4, 3, generator=generator) + torch.randn(4, 3)  # both generators drawn
            loss = model(x).square().mean() + float(data.np.random.rand()) + data.random.random()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            out.append(loss.item())
        return out

    steps(3)
    args = argparse.Namespace(epochs=2, lr=0.1)
    data.save_checkpoint(tmp_path / "c.pt", args, 1, model, optimizer, generator, {"loss": 1.0}, {"mine": [1]})
    expected = steps(3)
    saved = data.load_checkpoint(tmp_path / "c.pt")
    lr = optimizer.param_groups[0]["lr"]
    data.seed_everything(99), generator.manual_seed(99)  # scramble every state
    with torch.no_grad():
        model.weight.zero_()
    assert data.restore_checkpoint(saved, model, optimizer, generator) == 1
    assert optimizer.param_groups[0]["lr"] is lr  # the tensor a captured step reads stays the same object
    assert steps(3) == expected
    assert saved["extra"] == {"mine": [1]} and saved["train"] == {"loss": 1.0}
    assert data.restore_checkpoint(None, model, optimizer, generator) == 0


# ---------------------------------------------------------------------------- refusals
GPU = torch.cuda.is_available()


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--shots", "-1"], "--shots must be an integer >= 1, got -1"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--seed", str(2 ** 32)], "--seed must be at most 4294967295"),
    (["--workers", "-2"], "--workers must be an integer >= 0, got -2"),
    (["--warmup-epochs", "4", "--epochs", "4"], "--warmup-epochs 4 is not shorter than --epochs 4"),
    (["--device", "gpu7"], "--device 'gpu7' is not a torch device"),
    (["--device", "cuda:0"] if not GPU else ["--device", "cuda:99"], "CUDA device(s)"),
    (["--protocol", "cross", "--dataset", "caltech101"], "--protocol cross names no default targets"),
])
def test_a_setting_that_would_give_wrong_numbers_is_refused_before_anything_is_written(tmp_path, flags, message):
    with pytest.raises(data.UsageError) as error:
        coop.main(coop.parse_args(["--output-dir", str(tmp_path / "run"), *COMMON, *flags]))
    assert message in str(error.value)
    assert not (tmp_path / "run").exists()


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


def test_a_non_finite_loss_stops_the_run_with_epoch_and_step_and_records_nothing(tmp_path, tiny, monkeypatch):
    real, calls = coop.train_step, []

    def diverging(model, optimizer, x, y):
        calls.append(1)
        terms, correct = real(model, optimizer, x, y)
        return ({**terms, "loss": terms["loss"] * float("nan")} if len(calls) == 6 else terms), correct
    monkeypatch.setattr(coop, "train_step", diverging)
    with pytest.raises(data.UsageError, match=r"the loss became nan at epoch 3, step 2 .*nothing was recorded"):
        coop.main(coop.parse_args(fixture_run(tmp_path, "--epochs", "4", "--batch-size", "2")))  # 2 steps an epoch
    run = tmp_path / "runs" / "run1"
    assert not (run / "results.json").exists() and not (run.parent / "results.jsonl").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2  # the last good epoch stays
