"""Tensor files: safetensors written atomically with the key of the parameters that made them,
and read back checked.

What is read back must be what was written, and from the run it is read for. So every file
:func:`save_tensors` writes carries, beside its config and metadata, the ``key`` of the
parameters that made it (:func:`lib.core.io.params_key` of the caller's unit key), and
:func:`load_tensors` refuses, with a :class:`TensorFileError` that names the file, the problem
and the fix:

* a file that cannot be read (truncated, not a safetensors file, no config);
* a tensor holding NaN or an infinity;
* tensors of other names or shapes than the reader expects (``shapes``);
* a file written with other parameters (``key``; :class:`OtherParametersError`).

A reader that recomputes what is missing (a rotation, a cached network, tuned weights) sets a
refused file aside (:func:`set_aside`, with a warning) and recomputes it; the others raise.
:func:`tensors_sha256` is the checksum of named tensors that a cache stores beside a number it
measured, so that the number is reported again only for the very tensors it was measured on.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from lib.core import paths
from lib.core.atomic import atomic_write

HEADER_KEY = "causal_interventions"   # the one safetensors metadata key of save_tensors
#: timings: never stored in a tensor file's header (nor in a result's provenance)
TIMING_KEYS = ("converted_in_s", "elapsed_s", "seconds", "wall_s", "seconds_per_step")
DEFAULT_FIX = "delete it, or rerun with FORCE=True, to compute it again"


class TensorFileError(ValueError):
    """A stored tensor file that cannot be used: unreadable, not finite, of other shapes, or
    (:class:`OtherParametersError`) written with other parameters. The message names the file,
    the problem and the fix."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str = DEFAULT_FIX):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}; {fix}")


class OtherParametersError(TensorFileError):
    """A tensor file written with other parameters than the run that reads it (or with none
    named, by an earlier version)."""


class TensorFileWarning(UserWarning):
    """A stored tensor file was refused and set aside, to be computed again."""


def set_aside(err: TensorFileError, then: str = "computing it again") -> Path:
    """Rename the file ``err`` refused to ``<name>.set-aside`` (``.set-aside-2`` ...), so that
    it is computed again but not lost, with a warning naming it and the problem; returns the
    new path."""
    path = err.path
    target = paths.unused_name(path, ".set-aside")
    os.replace(path, target)
    warnings.warn(f"{path}: {err.problem}; set it aside as {target.name} and {then}",
                  TensorFileWarning, stacklevel=3)
    return target


def save_tensors(path: str | os.PathLike, tensors: dict, config: dict,
                 metadata: dict | None = None, key: str | None = None) -> Path:
    """Tensors as safetensors (never pickles), written atomically; ``config``, ``metadata`` and
    ``key`` (the parameters key of the run that made them) go in the header as one canonical
    JSON string, and timings (:data:`TIMING_KEYS`) are left out, so the same tensors give the
    same bytes. (safetensors keeps its header metadata in a hash map: with two keys, their
    order, and so the file's bytes, changed from run to run.) The temporary file has a unique
    name, so two writers of the same file never collide; the file gets
    :func:`lib.core.paths.file_mode`, as JSON results do."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {k: v for k, v in (metadata or {}).items() if k not in TIMING_KEYS}
    both: dict = {"config": config, "metadata": metadata}
    if key is not None:
        both["key"] = str(key)
    header = {HEADER_KEY: json.dumps(both, sort_keys=True, default=str)}
    return atomic_write(path, lambda tmp: save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=header))


def read_header(path: str | os.PathLike, what: str = "file",
                fix: str = DEFAULT_FIX) -> tuple[dict, dict, str | None]:
    """``(config, metadata, key)`` of a file written by :func:`save_tensors` without reading
    its tensors (``key`` None: written before files carried one; a ``params_key`` in the
    config, as graph predictions always had, counts as the key)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; train and save the {what} first")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        if HEADER_KEY in header:
            both = json.loads(header[HEADER_KEY])
            config, metadata, key = both["config"], both.get("metadata", {}), both.get("key")
        elif "config" in header:  # files of earlier versions keep the two as separate keys
            config = json.loads(header["config"])
            metadata, key = json.loads(header.get("metadata", "{}")), None
        else:
            raise TensorFileError(path, f"has no config in its header: not a {what} saved by "
                                  "this repository", fix)
    except TensorFileError:
        raise
    except Exception as err:   # safetensors' own error type, OSError, bad JSON ...
        raise TensorFileError(path, f"cannot be read as a safetensors file "
                              f"({type(err).__name__}: {str(err)[:120]})", fix) from err
    if key is None and isinstance(config, dict) and isinstance(config.get("params_key"), str):
        key = config["params_key"]
    return config, metadata, key


def load_tensors(path: str | os.PathLike, what: str = "file", *, key: str | None = None,
                 unkeyed_ok: bool = False, shapes: Mapping[str, tuple] | None = None,
                 fix: str = DEFAULT_FIX) -> tuple[dict, dict, dict]:
    """``(tensors, config, metadata)`` of a file written by :func:`save_tensors`, checked: a
    :class:`TensorFileError` naming the file when it cannot be read, when a floating tensor
    holds NaN or an infinity, or (``shapes``: name -> shape) when its tensors are not exactly
    those; an :class:`OtherParametersError` when ``key`` is given and the file carries another
    (or none, unless ``unkeyed_ok``: a cache whose file name already is the key). A missing
    file is a ``FileNotFoundError``."""
    from safetensors import safe_open

    config, metadata, stored = read_header(path, what, fix)
    if key is not None and stored != key and not (stored is None and unkeyed_ok):
        raise OtherParametersError(
            path, f"was written with other parameters (key {stored}, this run's {key})"
            if stored is not None else "names no parameters key (written by an earlier "
            "version), so it cannot be told to belong to this run", fix)
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:
        raise TensorFileError(path, f"cannot be read as a safetensors file "
                              f"({type(err).__name__}: {str(err)[:120]})", fix) from err
    if shapes is not None:
        check_shapes(path, tensors, shapes, what, fix)
    check_finite(path, tensors, what, fix)
    return tensors, config, metadata


def check_shapes(path: str | os.PathLike, tensors: Mapping, shapes: Mapping[str, tuple],
                 what: str = "file", fix: str = DEFAULT_FIX) -> None:
    """Refuse ``tensors`` (read from ``path``) unless they are exactly ``shapes``' names, each
    of its shape."""
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    wrong = {n: (tuple(tensors[n].shape), tuple(shapes[n])) for n in shapes
             if n in tensors and tuple(tensors[n].shape) != tuple(shapes[n])}
    if missing or extra or wrong:
        parts = ([f"lacks {missing[:3]}"] if missing else []) + \
            ([f"holds tensors this {what} has no place for: {extra[:3]}"] if extra else []) + \
            [f"{n} has shape {got}, expected {want}" for n, (got, want) in list(wrong.items())[:3]]
        raise TensorFileError(path, f"not the tensors this {what} needs: " + "; ".join(parts),
                              fix)


def check_finite(path: str | os.PathLike, tensors: Mapping, what: str = "file",
                 fix: str = DEFAULT_FIX) -> None:
    """Refuse ``tensors`` (read from ``path``) when a floating one holds NaN or an infinity."""
    import torch

    bad = [n for n, t in tensors.items()
           if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]
    if bad:
        raise TensorFileError(path, f"holds NaN or infinite values in {sorted(bad)[:3]}, so "
                              f"it is not the {what} that was written", fix)


def tensors_sha256(tensors: Mapping) -> str:
    """sha256 of named tensors (names, dtypes, shapes and bytes, in name order): which tensors
    a stored number was measured on."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
