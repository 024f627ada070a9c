"""Test-wide settings, applied before any test module is imported.

TRITON_INTERPRET must be set before a @triton.jit function is decorated, so it is set here, first,
whenever no GPU is present (CI and the development machines have none)."""
import os

try:
    import torch
    _has_gpu = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard requirement
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

import json
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, Phase, settings

# CI profile: derandomised (same examples every run), no deadline (the interpreter is slow), and no
# shrink phase, so that a failure reports in seconds rather than minutes.
settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def kill_after_epochs(proc, run_dir, epochs=3, wait_s=900):
    """SIGKILL a running method script once its checkpoint records `epochs` finished epochs (or after
    wait_s, a generous bound for a loaded machine, not a timed assertion); returns the epoch it
    stopped at, as the checkpoint on disk says."""
    checkpoint = Path(run_dir) / "checkpoint.pt"
    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:
            if torch.load(checkpoint, weights_only=True)["epoch"] >= epochs:
                break
        except Exception:  # not written yet, or being replaced
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return torch.load(checkpoint, weights_only=True)["epoch"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a whole run in a subprocess (kill and resume, DDP); "
                                       "skip them locally with -m 'not slow', CI runs everything")


# ---------------------------------------------------------------------------- shared fixtures
NAMES = ["cat", "hot air balloon", "golden_retriever", "x-ray film", "ox"]  # class names with spaces, _ and -


def images(n=3, seed=2, size=32):
    """A batch of random images [n, 3, size, size], the same for the same seed."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def caltech_fixture(root: Path, n_classes=4, per_class=10):
    """CoOp's Caltech101 layout with random JPEGs (no split file: data.py's seeded auto-split)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in ["BACKGROUND_Google", "Faces", "accordion", "airplanes", "anchor"][:n_classes + 1]:
        folder = root / "caltech-101" / "101_ObjectCategories" / c
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(40, 44, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"image_{i + 1:04d}.jpg")


# ---------------------------------------------------------------------------- coop.py runs on the fixture
# A random-init CLIP small enough for CPU tests, with OpenAI CLIP's 77-token text context.
TINY_NAME = "coop-test-tiny"
TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
COMMON = ["--workers", "0", "--device", "cpu"]


def fixture_run(tmp_path, *extra, name="run1"):
    """coop.py's arguments for a run on a tiny Caltech101 fixture with the tiny test CLIP."""
    if not (tmp_path / "data").exists():
        caltech_fixture(tmp_path / "data")
    return ["--dataset", "caltech101", "--model", TINY_NAME, "--pretrained", "none", "--shots", "2",
            "--root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs" / name), *COMMON, *extra]


def check_run(run, method, epochs=2):
    """The files of a finished run; returns its results."""
    results = json.loads((run / "results.json").read_text())
    assert results["method"] == method and results["shots"] == 2 and results["epoch"] == epochs
    assert results["hm"] == pytest.approx(2 * results["base"] * results["new"] / (results["base"] + results["new"]))
    assert set(results["zero_shot"]) >= {"base", "new", "hm"} and set(results["test_loss"]) == {"base", "new"}
    assert {p.name for p in run.iterdir()} >= {"args.json", "fewshot.json", "results.json", "checkpoint.pt",
                                               "log.jsonl"}
    import data

    log = data.read_log(run)
    assert [e["epoch"] for e in log] == list(range(1, epochs + 1))
    for e in log:  # CoOp's (CoCoOp's) loss is its CE, logged as its one term
        assert set(e["terms"]) == {"ce"} and e["terms"]["ce"] == pytest.approx(e["loss"], abs=1e-4)
    assert len(json.loads((run / "fewshot.json").read_text())["items"]) == 2 * 4  # 2 shots x 4 classes
    lines = (run.parent / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["base"] == results["base"]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == {"learned", "args", "epoch", "metrics", "optimizer", "rng", "train", "extra"}
    assert ckpt["epoch"] == epochs and ckpt["extra"] is None
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




def tiny_clip():
    """The tiny CLIP, seeded; its positional embedding made to matter, so that a wrong slice shows."""
    import open_clip
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY).eval().requires_grad_(False)
    model.positional_embedding.data.normal_(std=0.5)
    return model


# ---------------------------------------------------------------------------- ProReg's benchmarks (data.py 5b)
def image(path):
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (40, 90, 200)).save(path)
    return path


def write_list(path, lines):
    Path(path).write_text("".join(f"{line}\n" for line in lines))


DN_CLASSES = ["aircraft_carrier", "The_Eiffel_Tower", "zebra"]  # the release's sorted order: label = index


def make_domain_net(root):
    """domain_net/<domain>/<class>/<domain>_<class index>_<n>.jpg and <domain>_{train,test}.txt
    ('sketch/aircraft_carrier/sketch_001_000001.jpg 0'): 2 train and 1 test image per class and domain."""
    ds = Path(root) / "domain_net"
    for domain in ("sketch", "clipart", "painting", "real"):
        for split, numbers in (("train", (1, 2)), ("test", (3,))):
            lines = []
            for label, c in enumerate(DN_CLASSES):
                for n in numbers:
                    rel = f"{domain}/{c}/{domain}_{label + 1:03d}_{n:06d}.jpg"
                    image(ds / rel)
                    lines.append(f"{rel} {label}")
            write_list(ds / f"{domain}_{split}.txt", lines)
    return ds
