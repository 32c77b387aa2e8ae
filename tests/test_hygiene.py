"""Committed notebooks are clean: no outputs, one parameters cell, no absolute paths or tokens."""

import json
import re
from pathlib import Path

import pytest

from lib import paths

NOTEBOOKS = sorted(paths.NOTEBOOKS.glob("*.ipynb")) + sorted(
    (Path(__file__).parent / "notebooks").glob("*.ipynb"))
ABSOLUTE = re.compile(r"(/home/|/Users/|/root/|/work/|/tmp/|[A-Za-z]:\\\\)")
TOKEN = re.compile(r"(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
                   r"AKIA[0-9A-Z]{16})")
FORBIDDEN_CODE = re.compile(r"(sys\.path|os\.chdir|!pip|%pip|trust_remote_code\s*=\s*True)")


def test_there_are_notebooks_to_check():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for cell in code:
        assert not cell.get("outputs"), f"{path.name}: a code cell has outputs; clear them"
        assert cell.get("execution_count") is None, f"{path.name}: execution counts left in"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, f"{path.name}: expected exactly one 'parameters' cell, found {len(params)}"
    text = path.read_text(encoding="utf-8")
    assert not ABSOLUTE.search(text), f"{path.name}: absolute path {ABSOLUTE.search(text).group()}"
    assert not TOKEN.search(text), f"{path.name}: token-like string"
    for cell in code:
        source = "".join(cell["source"])
        assert not FORBIDDEN_CODE.search(source), f"{path.name}: {FORBIDDEN_CODE.search(source).group()}"


def test_hygiene_check_catches_a_dirty_notebook(tmp_path):
    """The checks above must be able to fail."""
    nb = json.loads(NOTEBOOKS[0].read_text(encoding="utf-8"))
    nb["cells"][-1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "x"}]
    nb["cells"][-1]["source"] = "open('/home/me/secret hf_abcdefghijklmnopqrstuvwxyz')"
    dirty = tmp_path / "dirty.ipynb"
    dirty.write_text(json.dumps(nb))
    with pytest.raises(AssertionError):
        test_notebook_is_clean(dirty)
