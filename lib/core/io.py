"""Result files: provenance, atomic JSON writes, resumable units.

Every JSON the notebooks write goes through :func:`write_json`, which

* adds a ``provenance`` block (model, its file hash or revision, parameters, seed, library
  versions, device, dtype, torch's thread count, git commit, UTC time; no timings);
* runs the payload's own schema check (``check=``) and refuses to write what fails it;
* writes to a temporary file in the same folder and renames it, so an interrupted run never
  leaves a half-written file (temporary files left by a killed run are removed by the next
  successful write of the same file);
* keeps an existing file untouched when only the time would change, so the same inputs and
  seed give byte-identical files (set ``SOURCE_DATE_EPOCH`` to fix the time of new files too).

:func:`read_current` is the one "is the stored result current" check, and :func:`check_results`
runs its file checks on all of a notebook's results before its model loads. Each kind of result
declares its shape (:class:`lib.core.schema.Kind`, beside the code that writes it), checked on
every read: a stored file that cannot be read or does not have its kind's shape is named, set
aside (renamed to ``<name>.set-aside``, as refused tensor files are) and treated as missing,
so it is recomputed; a valid result of *another* kind (another notebook's file where this one
writes) is refused before any work (:class:`lib.core.schema.WrongKindError`), and nothing is
moved or overwritten.
:class:`UnitStore` keeps finished units of a long computation (one JSON each, also atomic) so
that a rerun resumes where an interrupted one stopped. :func:`slug` is the one
file-system name of a model.
Tensor files (safetensors with the key of the parameters that made them, read back checked)
are :mod:`lib.core.tensorfiles`; :func:`save_tensors` and :func:`load_tensors` are importable
from here too, and a unit its reader's check refuses is set aside.
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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib.core import paths, schema
from lib.core.atomic import atomic_write
# tensor files live in their own module; their names stay importable from here
from lib.core.tensorfiles import (HEADER_KEY, TIMING_KEYS, OtherParametersError,  # noqa: F401
                                  TensorFileError, load_tensors, save_tensors, tensors_sha256)

WrongKindError = schema.WrongKindError
require_keys = schema.require_keys   # the generic key check, for results without a kind


class ResultFileWarning(UserWarning):
    """A stored result or unit file could not be read and was set aside."""


def slug(name: str) -> str:
    """File-system-safe name of a model (or any name) for output folders: slashes become
    ``__`` and leading dots are dropped, so it never leaves its folder (``"owner/name"`` ->
    ``"owner__name"``)."""
    text = str(name).strip().strip("/").replace("\\", "/").replace("/", "__")
    text = text.lstrip(".")
    if not text:
        raise ValueError(f"model name {name!r} gives an empty folder name; give a model name "
                         "such as smollm2-135m")
    return text


def inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, refusing a ``name`` that would leave ``folder``."""
    folder = Path(folder)
    target = folder / name
    if ".." in Path(name).parts or Path(name).is_absolute() or \
            not target.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"output name {name!r} would leave {folder}; use a plain name (letters, "
                         "digits, '.', '_', '-')")
    return target


def set_aside(path: str | os.PathLike, why: str) -> Path:
    """Rename a result file that cannot be read, is of an old shape or fails its schema to
    ``<name>.set-aside`` (``.set-aside-2`` ...; kept, not deleted, named as
    :func:`lib.core.tensorfiles.set_aside` names a refused tensor file), with a warning naming
    it; returns the new path."""
    path = Path(path)
    target = paths.unused_name(path, ".set-aside")
    os.replace(path, target)
    warnings.warn(f"{path} could not be read ({why}); set it aside as {target.name} and "
                  "recomputing it", ResultFileWarning, stacklevel=3)
    return target


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
    """Write ``text`` to ``path`` via a temporary file and a rename (:mod:`lib.core.atomic`)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return atomic_write(path, write)


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
    """Everything needed to say where a result came from, and nothing that varies from run to
    run besides ``created_utc`` and ``git_commit`` (no timings): model, its source (file hash
    or revision), parameters, seed, library versions, device, dtype, torch's CPU thread count
    (results move with it at the last digits; see the README), git commit, UTC time."""
    import torch

    model = None
    if lm is not None:
        source = {k: v for k, v in dict(lm.source).items() if k not in TIMING_KEYS}
        model = {"name": lm.name, "source": source, "n_layers": lm.n_layers,
                 "dtype": str(lm.dtype).removeprefix("torch."), "device": lm.device.type}
    return {"model": model, "parameters": _clean(parameters or {}), "seed": seed,
            "device": None if lm is None else lm.device.type,
            "dtype": None if lm is None else str(lm.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
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


def same_apart_from_time(a: dict, b: dict) -> bool:
    """Whether two result payloads are the same but for ``provenance.created_utc`` and
    ``provenance.git_commit`` (when and from which commit they were written)."""
    return dumps(_without_time(a)) == dumps(_without_time(b))


def write_json(path: str | os.PathLike, payload: dict, prov: dict | None = None,
               check: Callable[[dict], Any] | None = None) -> Path:
    """Atomically write ``payload`` (plus ``provenance``) as canonical JSON.

    ``check`` is the payload's own schema check (raising on a bad payload; a
    :class:`lib.core.schema.Kind` also names its kind in ``provenance.kind``); it runs on the
    payload exactly as it will be read back, and a payload that fails it is not written (the
    file already there is left untouched). If ``path`` already holds the same content apart
    from the time and commit, it is left as is.
    """
    payload = dict(payload)
    if prov is not None:
        # a result names its kind, so that a reader never mistakes it for another one
        payload["provenance"] = {**prov, "kind": check.name} if isinstance(check, schema.Kind) \
            else prov
    path = Path(path)
    text = dumps(payload)
    if check is not None:
        try:
            check(json.loads(text))
        except Exception as err:
            raise ValueError(f"not writing {path}: the result fails its schema check ({err}); "
                             "nothing was overwritten") from err
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if same_apart_from_time(old, payload):
                return path
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            pass
    return atomic_write_text(path, text)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file with an error that names the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the notebook that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun the notebook that writes it "
                         "with FORCE=True, or move the file away") from err


def read_current(path: str | os.PathLike, parameters: dict, force: bool = False,
                 check: Callable[[dict], Any] | None = None) -> dict | None:
    """The one "is the stored result current" check: the JSON at ``path`` when it exists,
    passes ``check`` (its :class:`lib.core.schema.Kind`, or any schema check) and was written
    with the same value of every key of ``parameters`` (compared with its
    ``provenance.parameters``, canonically) at this process's torch thread count (results move
    with it at the last digits); else None.

    A file that is not valid JSON or fails ``check`` is set aside (:func:`set_aside`, with a
    warning naming it) so that it is recomputed. A valid result of another kind raises
    :class:`lib.core.schema.WrongKindError` and nothing is moved, with ``force`` too, which
    otherwise always gives None (the file is overwritten once the result is computed).
    """
    path = Path(path)
    data = _readable(path, check, force)
    if data is None or force:
        return None
    import torch

    prov = data.get("provenance") or {}
    stored = prov.get("parameters")
    if not isinstance(stored, dict) or prov.get("torch_threads") != torch.get_num_threads():
        return None
    wanted = json.loads(dumps(parameters))
    stored = json.loads(dumps(stored))
    if any(k not in stored or stored[k] != v for k, v in wanted.items()):
        return None
    return data


def _readable(path: Path, check: Callable[[dict], Any] | None, force: bool) -> dict | None:
    """The result at ``path`` when it exists, parses and passes ``check``, else None; an
    unreadable or malformed file is set aside (not with ``force``, which overwrites it), and a
    valid result of another kind raises :class:`lib.core.schema.WrongKindError`."""
    if not path.exists() or (force and not isinstance(check, schema.Kind)):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    except (ValueError, UnicodeDecodeError) as err:
        if not force:
            set_aside(path, str(err)[:200])
        return None
    why = _problem(path, data, check)   # raises for a result of another kind
    if why and not force:
        set_aside(path, why[:300])
    return None if why else data


def check_results(files: dict, force: bool = False) -> None:
    """Check every stored result a notebook will read or write (``files``: path -> its
    :class:`lib.core.schema.Kind`) before anything expensive, a model load above all: a valid
    result of another kind raises :class:`lib.core.schema.WrongKindError` (nothing moved), and
    an unreadable or malformed one is set aside with a warning now, as :func:`read_current`
    would set it aside later (with ``force`` it is left to be overwritten). Missing files are
    fine. Call it with every result file of the notebook before its ``load_model``."""
    for path, kind in files.items():
        _readable(Path(path), kind, force)


def _problem(path: Path, data: dict, check: Callable[[dict], Any] | None) -> str:
    """Why ``data`` (read from ``path``) fails ``check`` ("" when it passes);
    :class:`lib.core.schema.WrongKindError` when it is a result of another kind."""
    if isinstance(check, schema.Kind):
        found, why = schema.verdict(data, check)
        if found == "other":
            raise schema.refusal(_shown(path), check, why)
        return why
    try:
        if check is not None:
            check(data)
    except (ValueError, KeyError, TypeError) as err:
        return str(err) or type(err).__name__
    return ""


def read_result(path: str | os.PathLike, kind: schema.Kind) -> dict:
    """A result of another notebook (``kind``'s writer), read to be used: an error naming the
    file and the fix when it is missing, unreadable, of another kind or malformed. Nothing is
    set aside: this step does not write it."""
    data = read_json(path)
    why = _problem(Path(path), data, kind) if isinstance(data, dict) else "not a JSON object"
    if why:
        raise schema.SchemaError(f"{path}: {why}; rerun {kind.writer} with FORCE=True, or "
                                 "move the file away")
    return data


def inputs_current(data: dict, inputs: dict | None) -> bool:
    """Whether a stored result was computed from the same input files: ``inputs`` maps each
    input's name to a digest of what was read from it (:func:`digest`), compared with the
    stored ``provenance.inputs``. No ``inputs`` asked: always current."""
    if not inputs:
        return True
    stored = (data.get("provenance") or {}).get("inputs")
    return isinstance(stored, dict) and all(stored.get(k) == v for k, v in inputs.items())


def digest(value: Any) -> str:
    """A stable sha256 (hex) of any JSON-ready value: what a result's input file held."""
    return hashlib.sha256(dumps(value).encode()).hexdigest()


def load_or_compute(path: str | os.PathLike, parameters: dict,
                    compute: Callable[[], tuple[dict, dict]], *, force: bool = False,
                    check: Callable[[dict], Any] | None = None, inputs: dict | None = None,
                    quiet: bool = False) -> dict:
    """The one "is this result current, else compute and write" step of every notebook.

    The result at ``path`` is reused (read, checked, returned) when :func:`read_current` finds
    it current for ``parameters`` and, when ``inputs`` is given, it was computed from the same
    input files (:func:`inputs_current`). Otherwise ``compute()`` runs and returns
    ``(payload, provenance)``: loading a model, units and every other cost belongs inside it,
    so a current result costs one file read. The payload is written atomically with its
    provenance (plus ``inputs``), checked by ``check``, and returned as read back from disk,
    so a computed and a reused result are the same JSON values. ``force`` always computes.
    A valid result of another kind at ``path`` raises :class:`lib.core.schema.WrongKindError`
    before ``compute`` runs (with ``force`` too), and the file is left as it is.
    """
    path = Path(path)
    found = read_current(path, parameters, force=force, check=check)
    if found is not None and inputs_current(found, inputs):
        if not quiet:
            print(f"{_shown(path)} is current (same parameters and inputs); FORCE=True "
                  "recomputes it")
        return found
    check_writable(path.parent)   # before the computation, which a failed write would lose
    payload, prov = compute()
    if inputs:
        prov = {**prov, "inputs": dict(inputs)}
    write_json(path, payload, prov, check=check)
    if not quiet:
        print(f"wrote {_shown(path)}")
    return read_json(path)


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove it takes a file (read-only, full, a dangling
    symlink or a file in the way all fail here, naming it, before any work)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OSError(f"the output folder {_shown(folder)} cannot take a result file "
                      f"({err.strerror or err}); choose a writable folder (the notebook's "
                      "*_DIR parameter) or free space there") from err
    return folder


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (no machine paths printed)."""
    try:
        return str(path.resolve().relative_to(paths.REPO_ROOT))
    except ValueError:
        return str(path)


def params_key(params: dict) -> str:
    """A short stable hash of parameters (which units of work they belong to): the first 16
    characters of their :func:`digest`."""
    return digest(params)[:16]


def _no_constant(name: str):
    """``json.loads``' hook for NaN and Infinity, which this repository never writes (they
    are stored as null): a file holding one was not written here."""
    raise ValueError(f"holds {name}, which no unit is written with")


class UnitStore:
    """Finished units of one computation, one atomic JSON file each, keyed by name.

    A unit stored under other parameters is treated as missing. ``force=True`` ignores what is
    there (and overwrites it).
    """

    def __init__(self, folder: str | os.PathLike, params: dict, force: bool = False):
        import torch

        self.folder = Path(folder)
        # units computed at another thread count differ in the last digits: not reused
        self.key = params_key({**params, "torch_threads": torch.get_num_threads()})
        self.force = force

    def _path(self, name: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return self.folder / f"{safe}.json"

    def get(self, name: str, check: Callable[[Any], Any] | None = None) -> Any | None:
        """The stored unit, or None when it is missing, of other parameters or forced. A unit
        file that cannot be read (truncated, not a unit, a NaN or infinity written into it:
        units store those as null) or whose value fails ``check`` (the reader's own check of
        its shape and range, raising ValueError) is set aside with a warning naming it, and
        counts as missing."""
        path = self._path(name)
        if self.force or not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
            if not isinstance(data, dict) or "params_key" not in data or "value" not in data:
                raise ValueError("not a unit file (needs 'params_key' and 'value')")
            if data.get("params_key") != self.key:
                return None
            if check is not None:
                check(data["value"])
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
            set_aside(path, str(err)[:200])
            return None
        return data["value"]

    def put(self, name: str, value: Any) -> Any:
        atomic_write_text(self._path(name), dumps({"params_key": self.key, "value": value}))
        return value

    def get_or_compute(self, name: str, compute, check: Callable[[Any], Any] | None = None) -> Any:
        """Return the stored unit (:meth:`get`, with ``check``), or compute, store and return
        it."""
        found = self.get(name, check)
        if found is not None:
            return found
        return self.put(name, _clean(compute()))
