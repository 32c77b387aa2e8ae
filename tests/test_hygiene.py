"""Committed notebooks are clean (no outputs, one parameters cell, no absolute paths or tokens),
and the library keeps computation and figures apart (no plotting import outside lib/plots/)."""

import ast
import json
import re
from pathlib import Path

import pytest

from lib.core import paths

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


# --- layout: compute modules import no plotting library ------------------------------------

PLOTTING_PACKAGES = ("plotnine", "matplotlib")
LIB = paths.REPO_ROOT / "lib"
# everything but the figures (lib/plots) and the widgets that show them (lib/ui)
COMPUTE_MODULES = sorted(p for p in LIB.rglob("*.py")
                         if (LIB / "plots") not in p.parents and (LIB / "ui") not in p.parents)


def imported_modules(source: str) -> list[str]:
    """Modules named by any import in ``source`` (at any depth, inside functions too);
    ``importlib.import_module("...")`` with a literal name counts too."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__")):
            names.append(node.args[0].value)
    return list(dict.fromkeys(names))


def plotting_imports(source: str) -> list[str]:
    """The imports of ``source`` that are a plotting library or ``lib.plots``."""
    return [n for n in imported_modules(source)
            if n.split(".")[0] in PLOTTING_PACKAGES or n == "lib.plots"
            or n.startswith("lib.plots.")]


def test_there_are_compute_modules_to_check():
    assert LIB / "core" / "hooks.py" in COMPUTE_MODULES
    assert not any("plots" in p.parts or "ui" in p.parts for p in COMPUTE_MODULES)


@pytest.mark.parametrize("path", COMPUTE_MODULES, ids=lambda p: str(p.relative_to(LIB)))
def test_compute_module_imports_no_plotting_library(path):
    found = plotting_imports(path.read_text(encoding="utf-8"))
    assert not found, (f"lib/{path.relative_to(LIB)} imports {found}; figures belong in "
                       "lib/plots/ (one module per study)")


def test_plotting_import_check_can_fail():
    """The check above must catch every form of import, however deep."""
    assert plotting_imports("import numpy\nfrom lib import io\n") == []
    assert plotting_imports("def f():\n    import plotnine as p9\n") == ["plotnine"]
    assert plotting_imports("from matplotlib import pyplot\n")[0] == "matplotlib"
    assert "lib.plots" in plotting_imports("from lib import plots\n")
    assert plotting_imports("from lib.plots.domain import plot_kl_curves\n")
    assert plotting_imports("import importlib\nimportlib.import_module('plotnine')\n")
    # and the plotting modules themselves do import one
    assert plotting_imports((LIB / "plots" / "domain.py").read_text(encoding="utf-8"))


# --- layout: lib/core <- lib/studies <- lib/plots <- lib/ui, modules small -----------------------------

LIB_MODULES = sorted(LIB.rglob("*.py"))
# what each layer may not import: the core knows no study and no figure; a study no figure
FORBIDDEN = {"core": ("lib.studies", "lib.plots", "lib.ui", "lib.runner"),
             "studies": ("lib.plots", "lib.ui", "lib.runner"),
             "plots": ("lib.ui", "lib.runner")}
MAX_MODULE_LINES = 500   # the guide's "under ~500 lines"


def layer_violations(layer: str, source: str) -> list[str]:
    return [n for n in imported_modules(source)
            if any(n == f or n.startswith(f + ".") for f in FORBIDDEN.get(layer, ()))]


@pytest.mark.parametrize("path", LIB_MODULES, ids=lambda p: str(p.relative_to(LIB)))
def test_module_imports_only_downward(path):
    layer = path.relative_to(LIB).parts[0]
    found = layer_violations(layer, path.read_text(encoding="utf-8"))
    assert not found, (f"lib/{path.relative_to(LIB)} imports {found}: each layer imports only "
                       "the ones below it (core <- studies <- plots <- ui)")


def test_layer_check_can_fail():
    assert "lib.studies" in layer_violations("core", "from lib.studies import das\n")
    assert layer_violations("studies", "def f():\n    from lib.plots import das\n")
    assert layer_violations("studies", "from lib.core import io\n") == []
    assert layer_violations("plots", "from lib.studies import das\n") == []
    assert layer_violations("plots", "from lib.ui import explorer\n")


@pytest.mark.parametrize("path", LIB_MODULES, ids=lambda p: str(p.relative_to(LIB)))
def test_module_is_small(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_MODULE_LINES, (f"lib/{path.relative_to(LIB)} has {n} lines (at most "
                                   f"{MAX_MODULE_LINES}): split it into modules with one job each")


# --- thin notebooks: no functions or classes, at most 120 lines of code ------------------------

MAX_NOTEBOOK_CODE_LINES = 120
REPO_NOTEBOOKS = sorted(paths.NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def code_lines(nb: dict) -> int:
    """Lines of code of a notebook's code cells, blank lines and comments not counted."""
    return sum(1 for c in nb["cells"] if c["cell_type"] == "code"
               for line in "".join(c["source"]).splitlines()
               if line.strip() and not line.strip().startswith("#"))


def definitions(source: str) -> list[str]:
    """Names of the functions and classes a cell defines (anything used twice lives in lib)."""
    return [n.name for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


@pytest.mark.parametrize("path", REPO_NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    defined = [d for c in nb["cells"] if c["cell_type"] == "code"
               for d in definitions("".join(c["source"]))]
    assert not defined, f"{path.name} defines {defined}: move them into lib/ with a test"
    n = code_lines(nb)
    assert n <= MAX_NOTEBOOK_CODE_LINES, (f"{path.name} has {n} lines of code (at most "
                                          f"{MAX_NOTEBOOK_CODE_LINES}): move the work into lib/")


def test_thin_check_can_fail():
    assert definitions("x = 1\ndef f():\n    pass\nclass C: ...\n") == ["f", "C"]
    assert definitions("f = lambda x: x\n") == []
    assert code_lines({"cells": [{"cell_type": "code", "source": ["# c\n", "\n", "x = 1\n"]},
                                 {"cell_type": "markdown", "source": ["text"]}]}) == 1
