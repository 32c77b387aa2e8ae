"""Result files: provenance, atomic JSON writes, resumable units.

Every JSON the notebooks write goes through :func:`write_json`, which

* adds a ``provenance`` block (model, its file hash or revision, parameters, seed, library
  versions, git commit, UTC time);
* writes to a temporary file in the same folder and renames it, so an interrupted run never
  leaves a half-written file;
* keeps an existing file untouched when only the time would change, so the same inputs and
  seed give byte-identical files (set ``SOURCE_DATE_EPOCH`` to fix the time of new files too).

:class:`UnitStore` keeps finished units of a long computation (one JSON each, also atomic) so
that a rerun resumes where an interrupted one stopped.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from lib import paths


def _clean(value: Any) -> Any:
    """Make ``value`` JSON-safe: tensors and numpy values become lists/floats; NaN becomes null."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def dumps(payload: Any) -> str:
    """Canonical JSON text (sorted keys, fixed indentation, trailing newline)."""
    return json.dumps(_clean(payload), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def git_commit() -> str | None:
    """The repository's HEAD commit (with ``-dirty`` when there are uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.REPO_ROOT, text=True,
                              capture_output=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=paths.REPO_ROOT, text=True, capture_output=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _utc_now() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch
           else _dt.datetime.now(_dt.timezone.utc))
    return now.replace(microsecond=0).isoformat()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "numpy", "scipy", "pandas", "plotnine", "gguf"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def provenance(lm=None, parameters: dict | None = None, seed: int | None = None) -> dict:
    """Everything needed to say where a result came from."""
    model = None
    if lm is not None:
        model = {"name": lm.name, "source": lm.source, "n_layers": lm.n_layers,
                 "dtype": str(lm.dtype).removeprefix("torch."), "device": lm.device.type}
    return {"model": model, "parameters": _clean(parameters or {}), "seed": seed,
            "versions": library_versions(), "git_commit": git_commit(),
            "created_utc": _utc_now()}


def provenance_without_lm(model: dict, parameters: dict | None = None,
                          seed: int | None = None) -> dict:
    """Provenance for results that involve no language model (e.g. small networks trained in
    the notebook): ``model`` is any JSON-ready description of what was run."""
    prov = provenance(None, parameters, seed)
    prov["model"] = _clean(model)
    return prov


def _without_time(payload: dict) -> dict:
    out = dict(payload)
    if isinstance(out.get("provenance"), dict):
        out["provenance"] = {k: v for k, v in out["provenance"].items()
                             if k not in ("created_utc", "git_commit")}
    return out


def write_json(path: str | os.PathLike, payload: dict, prov: dict | None = None) -> Path:
    """Atomically write ``payload`` (plus ``provenance``) as canonical JSON.

    If ``path`` already holds the same content apart from the time and commit, it is left as is.
    """
    payload = dict(payload)
    if prov is not None:
        payload["provenance"] = prov
    path = Path(path)
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if dumps(_without_time(old)) == dumps(_without_time(payload)):
                return path
        except (json.JSONDecodeError, OSError):
            pass
    return atomic_write_text(path, dumps(payload))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file with an error that names the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the notebook that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def params_key(params: dict) -> str:
    """A short stable hash of parameters (which units of work they belong to)."""
    return hashlib.sha256(dumps(params).encode()).hexdigest()[:16]


class UnitStore:
    """Finished units of one computation, one atomic JSON file each, keyed by name.

    A unit stored under other parameters is treated as missing. ``force=True`` ignores what is
    there (and overwrites it).
    """

    def __init__(self, folder: str | os.PathLike, params: dict, force: bool = False):
        self.folder = Path(folder)
        self.key = params_key(params)
        self.force = force

    def _path(self, name: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return self.folder / f"{safe}.json"

    def get(self, name: str) -> Any | None:
        path = self._path(name)
        if self.force or not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["value"] if data.get("params_key") == self.key else None

    def put(self, name: str, value: Any) -> Any:
        atomic_write_text(self._path(name), dumps({"params_key": self.key, "value": value}))
        return value

    def get_or_compute(self, name: str, compute) -> Any:
        """Return the stored unit, or compute, store and return it."""
        found = self.get(name)
        if found is not None:
            return found
        return self.put(name, _clean(compute()))
