"""The marked shared block (the prompt-aware text encoder) is identical in every method file that
carries it, so that each file can be read, and copied, on its own (the captured step and evaluate,
once shared blocks, now live once in kernels/captured.py and data.py). Fails when a block drifts in
one file or when a present method file loses a block's markers."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD_FILES = ["coop.py", "promptsrc.py", "vprompt.py", "proreg.py"]
BLOCKS = ["text encoder"]
# A file whose method needs a different form of a block carries its own, outside the markers: promptsrc.py's
# text encoder injects deep prompts between the blocks, which coop's shared one has no place for.
NOT_CARRIED = {"promptsrc.py": {"text encoder"}}
START = "# ==== shared block: {} (identical in every method file) ===="
END = "# ==== end shared block ===="


def blocks(path: Path) -> dict:
    """{block name: its text between the markers}; a block opened twice or never closed is an error."""
    text, found = path.read_text(), {}
    for match in re.finditer(r"^# ==== shared block: (.+?) \(identical in every method file\) ====$", text, re.M):
        end = text.find("\n" + END, match.end())
        assert end != -1, f"{path.name}: block {match.group(1)!r} has no end marker"
        assert match.group(1) not in found, f"{path.name}: block {match.group(1)!r} appears twice"
        assert "# ==== shared block:" not in text[match.end():end], f"{path.name}: block {match.group(1)!r} has no end marker"
        found[match.group(1)] = text[match.end():end]
    return found


PRESENT = [ROOT / name for name in METHOD_FILES if (ROOT / name).exists()]


def test_coop_is_present():
    assert ROOT / "coop.py" in PRESENT


@pytest.mark.parametrize("path", PRESENT, ids=lambda p: p.name)
def test_each_method_file_has_every_block(path):
    found = blocks(path)
    for name in BLOCKS:
        if name in NOT_CARRIED.get(path.name, ()):
            assert name not in found, f"{path.name} carries the block {name!r}: remove it from NOT_CARRIED"
            continue
        assert name in found, f"{path.name} lacks the marked block {START.format(name)!r}"
        assert found[name].strip(), f"{path.name}: block {name!r} is empty"


def differences(paths) -> list:
    """(block, file) pairs whose text differs from the first file's."""
    found = {path.name: blocks(path) for path in paths}
    first = found[paths[0].name]
    return [(name, file) for name in BLOCKS for file, b in found.items()
            if name not in NOT_CARRIED.get(file, ()) and b.get(name) != first.get(name)]


def test_blocks_are_identical_across_method_files():
    assert differences(PRESENT) == []


def test_a_drifted_or_unmarked_copy_is_caught(tmp_path):
    """The check itself: a one-character edit in a copy's block, or a lost marker, is reported."""
    text = (ROOT / "coop.py").read_text()
    body = blocks(ROOT / "coop.py")["text encoder"]
    drifted, unmarked = tmp_path / "drifted.py", tmp_path / "unmarked.py"
    drifted.write_text(text.replace(body, body.replace("ln_final(x)", "ln_final(x + 0)"), 1))
    unmarked.write_text(text.replace(END, "# end", 1))
    assert differences([ROOT / "coop.py", drifted]) == [("text encoder", "drifted.py")]
    with pytest.raises(AssertionError, match="no end marker"):
        blocks(unmarked)
