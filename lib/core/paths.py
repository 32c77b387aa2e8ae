"""Every path the repository uses, derived from this file's location.

Notebooks, papermill runs and pytest all import paths from here, so nothing depends on the
working directory. Output folders can be redirected per run through notebook parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

NOTEBOOKS = REPO_ROOT / "notebooks"
PROMPT_SET = REPO_ROOT / "prompt_set"
TOKEN_SETS = REPO_ROOT / "token_sets"
SCORES = REPO_ROOT / "scores"
FULL_COMPUTE = REPO_ROOT / "full_compute"
GRAPHS = REPO_ROOT / "graphs"
RUNS = REPO_ROOT / "runs"

# Converted model weights (safetensors) live outside git; CAUSAL_MODEL_CACHE overrides.
MODEL_CACHE = Path(os.environ.get("CAUSAL_MODEL_CACHE", REPO_ROOT / ".cache" / "models"))


def resolve_dir(value: str | os.PathLike | None, default: Path) -> Path:
    """Return ``value`` as a Path (relative paths are taken from the repository root), or
    ``default`` when ``value`` is empty. Used for the ``*_DIR`` notebook parameters."""
    if value is None or str(value) == "":
        return default
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


def file_mode() -> int:
    """The mode of a new result file (JSON, tensors, figures): 0644 less this process's umask,
    what ``open()`` would give a plain file meant to be shared (temporary files are created
    0600, so each writer sets this before its rename)."""
    try:   # Linux names the umask without changing it (os.umask can only set it)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o644 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o644 & ~mask


def unused_name(path: Path, suffix: str) -> Path:
    """``<name><suffix>``, or ``<name><suffix>-2``, ``-3`` ... where that is taken: where a
    refused file is set aside without replacing an earlier one."""
    target = path.with_name(path.name + suffix)
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{suffix}-{n}")
    return target
