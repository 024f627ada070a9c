"""Copying works: the files a user copies into an empty folder run there on their own (STYLE.md).
coop.py + data.py alone run on real data with no world/ beside them; with world/ copied too, the
default command runs the offline world with the shipped tiny CLIP."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, TINY_NAME, caltech_fixture, check_reproduced, check_run

ROOT = Path(__file__).resolve().parents[1]


def copy_project(folder: Path, names) -> Path:
    """`names` (files or folders of the repository) copied into a new, otherwise empty `folder`."""
    folder.mkdir()
    for name in names:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, folder / name)
    return folder


def run_coop(project: Path, *argv, register_tiny_test_model=False) -> str:
    """`python coop.py ARGV` as a user runs it in `project`; with register_tiny_test_model, after
    registering the random-init test CLIP with open_clip (a user's own config would be a JSON file)."""
    if register_tiny_test_model:
        code = (f"import open_clip, runpy, sys; open_clip.factory._MODEL_CONFIGS[{TINY_NAME!r}] = {TINY!r}; "
                f"sys.path.insert(0, '.'); sys.argv = ['coop.py', *{list(argv)!r}]; "
                f"runpy.run_path('coop.py', run_name='__main__')")
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, "coop.py", *argv]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the folder itself
    proc = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_coop_and_data_alone_run_on_real_data_then_evaluate_reproduces(tmp_path):
    project = copy_project(tmp_path / "project", ["coop.py", "data.py"])
    caltech_fixture(tmp_path / "data")
    run = tmp_path / "runs" / "run1"
    common = ["--root", str(tmp_path / "data"), "--workers", "0", "--device", "cpu"]
    stdout = run_coop(project, "--dataset", "caltech101", "--model", TINY_NAME, "--pretrained", "none",
                      "--shots", "2", "--epochs", "2", "--output-dir", str(run), *common, register_tiny_test_model=True)
    assert "zero-shot CLIP" in stdout and "CoOp" in stdout
    results = check_run(run, "coop")
    assert 0 <= results["base"] <= 100 and 0 <= results["new"] <= 100
    run_coop(project, "--evaluate", str(run), *common, register_tiny_test_model=True)
    check_reproduced(run, results)
    assert sorted(p.name for p in project.iterdir() if p.name != "__pycache__") == ["coop.py", "data.py"]


def test_coop_data_and_world_run_the_default_offline_world(tmp_path):
    project = copy_project(tmp_path / "project", ["coop.py", "data.py", "world"])
    stdout = run_coop(project, "--epochs", "2", "--shots", "2", "--workers", "0", "--device", "cpu",
                      "--output-dir", "runs/run1")
    assert "CoOp" in stdout
    results = json.loads((project / "runs" / "run1" / "results.json").read_text())
    assert (results["dataset"], results["backbone"], results["pretrained"]) == ("shapes", "tiny", "shapes")
    assert 0 <= results["base"] <= 100 and 0 <= results["new"] <= 100
    assert set(results["shifts"]) == {"photo", "noisy", "vivid", "lowcontrast"}
    # the shipped checkpoint, loaded from the copied world/: the README's zero-shot numbers (62.67, 71.42)
    assert results["zero_shot"]["base"] == pytest.approx(62.67, abs=1.0)
    assert results["zero_shot"]["new"] == pytest.approx(71.42, abs=1.0)
