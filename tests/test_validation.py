"""No bad input runs silently: each class of user mistake raises data.UsageError (one message that
names the value or file and says what to do), and leaves nothing behind. One test per mistake."""
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
from test_data import TEST_MODEL as MODEL, small_config  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def jpeg(path, size=(8, 8)):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, "JPEG")
    return path


def tree(folder) -> dict:
    """Every file and folder under `folder` with its bytes (None for a folder): 'nothing was written'."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def make_dtd(root, per_class=5):
    for texture in ("banded", "dotted"):
        for i in range(per_class):
            jpeg(Path(root) / "dtd" / "images" / texture / f"{texture}_{i:04d}.jpg")
    return Path(root) / "dtd"


# ------------------------------------------------------------------------------------------------
# datasets: split files, folders, images, names, downloads
# ------------------------------------------------------------------------------------------------

def test_malformed_split_json_names_file_position_and_source(tmp_path):
    ds = make_dtd(tmp_path)
    split = ds / "split_zhou_DescribableTextures.json"
    split.write_text('{"train": [["banded/banded_0000.jpg", 0, "banded"]], "val": [')  # a cut-off download
    before = tree(tmp_path)
    with pytest.raises(data.UsageError) as err:
        data.load_dataset("dtd", tmp_path)
    message = str(err.value)
    assert str(split) in message and "not valid JSON" in message and "line 1, column" in message
    assert "CoOp's split file" in message and data.COOP_DATASETS_MD in message
    assert tree(tmp_path) == before
    # valid JSON of the wrong shape: also named, not a KeyError deep in the reader
    split.write_text(json.dumps({"train": [], "val": []}))
    with pytest.raises(data.UsageError, match=r"(?s)split_zhou_DescribableTextures.json is JSON but not a split "
                                              r"file.*'test'.*CoOp's split file"):
        data.load_dataset("dtd", tmp_path)
    split.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(data.UsageError, match="split_zhou_DescribableTextures.json is not a text file"):
        data.load_dataset("dtd", tmp_path)


def test_split_json_with_conflicting_labels_is_named(tmp_path):
    ds = make_dtd(tmp_path)
    rows = [["banded/banded_0000.jpg", 0, "banded"], ["dotted/dotted_0000.jpg", 0, "dotted"]]  # label 0 twice
    (ds / "split_zhou_DescribableTextures.json").write_text(json.dumps({"train": rows, "val": [], "test": []}))
    with pytest.raises(data.UsageError, match=r"dtd: label 0 has two names: 'banded', 'dotted' \(e.g. .*dotted_0000"):
        data.load_dataset("dtd", tmp_path)


def test_missing_dataset_folder_is_a_usage_error_with_the_layout(tmp_path):
    before = tree(tmp_path)
    with pytest.raises(data.UsageError) as err:
        data.load_dataset("dtd", tmp_path)
    assert isinstance(err.value, data.MissingFileError) and isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert str(tmp_path / "dtd" / "images") in message and "Expected layout" in message
    assert "--download" in message  # torchvision can fetch DTD
    assert tree(tmp_path) == before


def test_unknown_dataset_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(data.UsageError, match=r"unknown dataset 'dtdd'.*caltech101.*\bdtd\b.*imagenet_r.*shapes"):
        data.load_dataset("dtdd", tmp_path)


def test_corrupt_image_names_the_file_also_from_a_loader_worker(tmp_path):
    good, bad = jpeg(tmp_path / "good.jpg"), tmp_path / "cut.jpg"
    bad.write_bytes(good.read_bytes()[:40])  # a truncated download
    with pytest.raises(data.UsageError, match=f"cannot read image {bad}.*download it again"):
        data.open_rgb(bad)
    items = [data.Item(str(good), 0, "a"), data.Item(str(bad), 0, "a")]
    bench = data.Benchmark("t", ["a"], items, [], items, "{}", open_image=data.open_rgb)
    backbone = data.Backbone(None, None, "none", None, 8, data.CLIP_MEAN, data.CLIP_STD)
    # in a worker process the error comes back re-made from its traceback text: the message stays one
    # line that a method file can print
    with pytest.raises(data.UsageError) as err:
        list(data.make_loader(items, bench, backbone, train=False, batch_size=1, workers=1))
    assert str(err.value).startswith(f"cannot read image {bad}:") and "Traceback" not in str(err.value)


def test_failed_download_removes_what_it_made(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline_eurosat(root, download):  # a partial archive, then the network goes away
        Path(root).mkdir(parents=True)
        (Path(root) / "EuroSAT.zip.part").write_bytes(b"half")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "EuroSAT", offline_eurosat)
    (tmp_path / "dtd").mkdir()  # a dataset already there stays
    before = tree(tmp_path)
    for root in (tmp_path, tmp_path / "new_root"):  # the dataset folder, and the root too, were made here
        with pytest.raises(data.MissingFileError) as err:
            data.load_dataset("eurosat", root, download=True)
        message = str(err.value)
        assert message.startswith("eurosat: the download failed (torchvision.datasets.EuroSAT: URLError")
        assert "name resolution" in message and "nothing was kept" in message
        assert "github.com/phelber/eurosat" in message and "Expected layout" in message and "2750/" in message
        assert "--download" not in message  # it was passed: the advice is the manual layout
        assert tree(tmp_path) == before
    assert not (tmp_path / "new_root").exists()


def test_fewshot_bad_shots_and_damaged_cache(tmp_path):
    items = [data.Item(f"{i}.jpg", i % 2, f"c{i % 2}") for i in range(8)]
    with pytest.raises(data.UsageError, match="shots must be an integer >= 1, got 0"):
        data.fewshot(items, 0, seed=1)
    cache = tmp_path / "fewshot.json"
    cache.write_text('{"shots": 2, "seed": 1, "items": [')  # cut off
    with pytest.raises(data.UsageError, match=f"few-shot cache {cache} is damaged.*delete it"):
        data.fewshot(items, 2, seed=1, cache=cache)
    assert cache.read_text() == '{"shots": 2, "seed": 1, "items": ['  # not silently redrawn over


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("check, message", [
    (lambda: data.check_int("--epochs", 0, 1), "--epochs must be an integer >= 1, got 0"),
    (lambda: data.check_int("--batch-size", 2.5, 1), "--batch-size must be an integer >= 1, got 2.5"),
    (lambda: data.check_int("--shots", True, 1), "--shots must be an integer >= 1, got True"),
    (lambda: data.check_float("--lr", float("nan"), above=0), "--lr must be a finite number > 0, got nan"),
    (lambda: data.check_float("--lr", float("inf"), above=0), "--lr must be a finite number > 0, got inf"),
    (lambda: data.check_float("--lr", 0.0, above=0), "--lr must be a finite number > 0, got 0.0"),
    (lambda: data.check_float("--lr", "0.1", above=0), "--lr must be a finite number > 0, got '0.1'"),
    (lambda: data.check_float("--momentum", 1.0, minimum=0, below=1),
     "--momentum must be a finite number >= 0 and < 1, got 1.0"),
    (lambda: data.check_float("--weight-decay", -1e-4, minimum=0), "--weight-decay must be a finite number >= 0, got -0.0001"),
    (lambda: data.require(False, "--n-ctx must be >= 1 when --ctx-init is empty"), "--n-ctx must be >= 1 when"),
])
def test_setting_checks_name_the_setting_and_value(check, message):
    with pytest.raises(data.UsageError) as err:
        check()
    assert str(err.value).startswith(message)


def test_setting_checks_pass_good_values():
    import numpy as np
    data.check_int("--epochs", 1, 1)
    data.check_int("--shots", np.int64(16), 1)  # numbers from NumPy are numbers
    data.check_int("--warmup-epochs", 0, 0)
    data.check_float("--lr", 2e-3, above=0)
    data.check_float("--momentum", 0.9, minimum=0, below=1)
    data.check_float("--weight-decay", 0, minimum=0)
    data.require(True, "never raised")


# ------------------------------------------------------------------------------------------------
# checkpoints: reading and writing
# ------------------------------------------------------------------------------------------------

def test_load_checkpoint_reads_what_atomic_save_wrote(tmp_path):
    checkpoint = {"learned": {"ctx": torch.randn(4, 8)}, "args": {"lr": 0.002, "ctx_init": None}, "epoch": 3}
    data.atomic_save(checkpoint, tmp_path / "run" / "checkpoint.pt")
    loaded = data.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert torch.equal(loaded["learned"]["ctx"], checkpoint["learned"]["ctx"]) and loaded["args"] == checkpoint["args"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "foreign pickle"])
def test_load_checkpoint_names_a_damaged_file(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    data.atomic_save({"learned": {"ctx": torch.randn(64, 64)}}, path)
    whole = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("version https://git-lfs.github.com/spec/v1\n")  # a Git LFS pointer
    else:
        import pickle
        path.write_bytes(pickle.dumps(tmp_path))  # not tensors and plain values: weights_only refuses
    with pytest.raises(data.UsageError) as err:
        data.load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"cannot read checkpoint {path} (") and "truncated" in message
    assert len(message) < 500 and "\n" not in message


def test_load_checkpoint_missing_file_or_folder(tmp_path):
    with pytest.raises(data.MissingFileError, match=f"checkpoint {tmp_path / 'nope.pt'} not found. Pass"):
        data.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(data.MissingFileError, match=r"not found \(it is a folder\)"):
        data.load_checkpoint(tmp_path)


def test_atomic_save_on_a_full_disk_keeps_the_old_file(tmp_path):
    # A real failed write: the file-size limit (RLIMIT_FSIZE) makes write() fail with EFBIG as a
    # full disk fails with ENOSPC; torch.save hides it inside a RuntimeError.
    path = tmp_path / "checkpoint.pt"
    data.atomic_save({"learned": {"ctx": torch.ones(4)}}, path)
    before = tree(tmp_path)
    code = textwrap.dedent(f"""
        import resource, signal, sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        import data
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            data.atomic_save({{"learned": {{"ctx": torch.ones(100_000)}}}}, {str(path)!r})
        except data.WriteError as err:
            assert isinstance(err, OSError) and isinstance(err, data.UsageError)
            print(err)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"cannot write {path}: File too large. Nothing was written"), proc.stdout
    assert tree(tmp_path) == before  # old checkpoint intact, no temp file


def test_atomic_save_of_an_unpicklable_object_is_a_bug_not_a_disk_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    data.atomic_write_text("old", path)
    with pytest.raises(Exception) as err:
        data.atomic_save({"fn": lambda: 0}, path)
    assert not isinstance(err.value, data.UsageError)  # keeps its traceback
    assert os.listdir(tmp_path) == ["checkpoint.pt"] and path.read_text() == "old"


# ------------------------------------------------------------------------------------------------
# backbones: tags and local weights files
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model(small_config):  # test_data's small CLIP config, registered with open_clip
    return MODEL


def test_pretrained_may_be_a_local_weights_file(small_model, tmp_path):
    import open_clip
    torch.manual_seed(0)
    trained = open_clip.create_model(small_model)  # random weights stand in for trained ones
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    backbone = data.load_backbone(small_model, str(tmp_path / "weights.pt"))
    assert backbone.pretrained == str(tmp_path / "weights.pt")
    loaded = backbone.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in  # and not what a fresh random init would give
               zip(data.load_backbone(small_model, None).model.state_dict().values(), trained.state_dict().values()))
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_bad_pretrained_values_are_named(small_model, tmp_path):
    with pytest.raises(data.UsageError, match=r"unknown pretrained tag 'opneai' for 'ViT-B-16', and no file of that "
                                              r"name exists. Valid tags: openai, .*local weights file also works"):
        data.load_backbone("ViT-B-16", "opneai")
    cut = tmp_path / "cut.pt"
    torch.save(open_clip_state(small_model), cut)
    cut.write_bytes(cut.read_bytes()[:1000])
    with pytest.raises(data.UsageError, match=f"cannot load weights file {cut} into '{small_model}'"):
        data.load_backbone(small_model, str(cut))
    other = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3)}, other)  # weights of another model
    with pytest.raises(data.UsageError, match=f"cannot load weights file {other} into .*check --model"):
        data.load_backbone(small_model, str(other))


def open_clip_state(model):
    import open_clip
    return open_clip.create_model(model).state_dict()


def test_weights_that_cannot_be_downloaded_say_what_to_do(monkeypatch):
    import open_clip

    def offline(cfg, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(data.UsageError, match=r"cannot get the weights RN50/openai \(OSError: We couldn't connect.*"
                                              r"~/.cache/huggingface.*path of the weights file"):
        data.load_backbone("RN50", "openai")


# ------------------------------------------------------------------------------------------------
# the results table
# ------------------------------------------------------------------------------------------------

def record(seed, base, new, **args):
    settings = dict(dataset="dtd", shots=16, epochs=200, lr=0.002, n_ctx=4, seed=seed, workers=4,
                    output_dir=f"runs/coop-s{seed}", results_file=None, device="cpu", no_truncate=False)
    return dict(method="coop", dataset="dtd", backbone="ViT-B-16", pretrained="openai", shots=16, seed=seed, protocol="base2new",
                base=base, new=new, args={**settings, **args})


def test_table_groups_by_every_setting_that_changes_numbers(tmp_path, capsys):
    runs = [record(1, 80, 60), record(2, 82, 62, workers=1, device="cuda", output_dir="elsewhere"),
            record(2, 84, 64),  # the same seed again: a second run, averaged and counted
            record(1, 70, 50, lr=0.01), record(1, 75, 55, n_ctx=16)]
    for r in runs:
        data.append_result(tmp_path / "runs" / "results.jsonl", r)
    data.main(["table", str(tmp_path / "runs")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| method | dataset | backbone | shots | settings | runs | base | new | HM |"
    assert "| coop | dtd | ViT-B-16/openai | 16 | lr=0.002 n_ctx=4 | 3 | 82.00 ± 2.00 | 62.00 ± 2.00 | 70.61 |" in lines
    assert "| coop | dtd | ViT-B-16/openai | 16 | lr=0.01 n_ctx=4 | 1 | 70.00 ± 0.00 | 50.00 ± 0.00 | 58.33 |" in lines
    assert "| coop | dtd | ViT-B-16/openai | 16 | lr=0.002 n_ctx=16 | 1 | 75.00 ± 0.00 | 55.00 ± 0.00 | 63.46 |" in lines
    assert len(lines) == 5


def test_table_protocol_key_and_unlike_averages(tmp_path):
    runs = [{**record(1, 80, 60), "protocol": "base2new"}, {**record(1, 90, 0), "protocol": "all-classes"},
            {**record(1, 70, 50), "dataset": "eurosat", "protocol": "base2new"}]
    lines = data.results_table(runs).splitlines()
    assert "| coop | dtd | ViT-B-16/openai | 16 | protocol=base2new | 1 | 80.00 ± 0.00 | 60.00 ± 0.00 | 68.57 |" in lines
    assert "| coop | dtd | ViT-B-16/openai | 16 | protocol=all-classes | 1 | 90.00 ± 0.00 | 0.00 ± 0.00 | 0.00 |" in lines
    # the average pools only rows with the same settings: dtd and eurosat under base2new
    assert any(l.startswith("| coop | average (2) | ViT-B-16/openai | 16 | protocol=base2new |") for l in lines)
    assert not any("average" in l and "all-classes" in l for l in lines)


def test_table_default_folder_is_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:  # nothing yet: a one-line error naming the folder
        data.main(["table"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no results (*.jsonl) under runs (no such folder).") and "runs/results.jsonl" in err
    # where coop.py's default --results-file (<output-dir>/../results.jsonl) puts it
    data.append_result(tmp_path / "runs" / "results.jsonl", record(1, 80, 60))
    (tmp_path / "runs" / "notes.jsonl").write_text('{"step": 1}\n[1, 2]\n')  # JSON lines, not results
    with pytest.warns(UserWarning, match=r"notes.jsonl:1: not a result record \(no method, dataset"):
        data.main(["table"])
    assert "| coop | dtd | ViT-B-16/openai | 16 | 1 | 80.00 ± 0.00 |" in capsys.readouterr().out


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    old = os.umask(0o027)
    try:
        data.atomic_write_text("x", tmp_path / "a.txt")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640  # 0o666 & ~umask, not mkstemp's 0o600
