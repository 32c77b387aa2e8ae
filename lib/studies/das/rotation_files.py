"""Trained DAS rotations on disk: safetensors files, read back checked.

The rotations of :mod:`lib.studies.das.rotation` (Geiger et al. 2023's distributed alignment
search; pyvene's ``RotatedSpaceIntervention`` family) are stored as their materialised
rotation matrix (and a boundless module's learned fractions), never as pickles, with the
module's config and the key of the run that trained them in the header
(:func:`lib.core.tensorfiles.save_tensors`). :func:`load_intervention` refuses, naming the
file and the fix, a file that is unreadable, not finite, of other shapes or another
configuration, of another run's key, or whose rotation is not orthonormal.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lib.studies.das.rotation import (BoundlessRotatedSpaceIntervention, DASError, _RotatedBase,
                                      build)

def save_intervention(module: _RotatedBase, path: str | os.PathLike,
                      metadata: dict | None = None, key: str | None = None) -> Path:
    """Save the materialised rotation (and boundless fractions) as safetensors; the module's
    config, ``metadata`` and ``key`` (the parameters key of the run that trained it) go in the
    header. Written atomically."""
    from lib.core.io import save_tensors

    tensors = {"rotation": module.R.detach().float().clone()}
    if isinstance(module, BoundlessRotatedSpaceIntervention):
        tensors["fractions"] = module.fractions.detach().clone()
    return save_tensors(path, tensors, module.config(), metadata, key=key)


#: largest |RᵀR − I| of a rotation read back (a stored one is orthonormal to about 1e-5)
ORTHONORMAL_ATOL = 1e-3


def load_intervention(path: str | os.PathLike, key: str | None = None,
                      expect: dict | None = None,
                      fix: str = "delete it (it is trained again), or rerun with FORCE=True"
                      ) -> tuple[_RotatedBase, dict]:
    """The module saved by :func:`save_intervention`, and its metadata, checked: the file is
    readable, its tensors are finite and of the shapes its config gives, the rotation's columns
    are orthonormal (to :data:`ORTHONORMAL_ATOL`), its config has the entries of ``expect``
    (e.g. ``{"d": 576, "rank": 64}``: what the reader will apply it to) and, when ``key`` is
    given, it was written with that parameters key. Else a
    :class:`lib.core.tensorfiles.TensorFileError` naming the file and ``fix``."""
    from lib.core.tensorfiles import TensorFileError, check_shapes, load_tensors

    tensors, config, metadata = load_tensors(path, "intervention", key=key, fix=fix)
    wrong = {k: (config.get(k), v) for k, v in (expect or {}).items() if config.get(k) != v}
    if wrong:
        raise TensorFileError(path, "a rotation of another configuration: " + ", ".join(
            f"{k} {got!r}, expected {want!r}" for k, (got, want) in wrong.items()), fix)
    try:
        module = build(config)
    except (DASError, TypeError, ValueError) as err:
        raise TensorFileError(path, f"its config {config} builds no intervention ({err})",
                              fix) from err
    shapes = {"rotation": tuple(module.R.shape)}
    if isinstance(module, BoundlessRotatedSpaceIntervention):
        shapes["fractions"] = tuple(module.fractions.shape)
    check_shapes(path, tensors, shapes, "intervention", fix)
    R = tensors["rotation"].double()
    off = float((R.T @ R - torch.eye(R.shape[1], dtype=R.dtype)).abs().max())
    if off > ORTHONORMAL_ATOL:
        raise TensorFileError(path, f"its rotation's columns are not orthonormal (largest "
                              f"|RᵀR − I| {off:.2g}), so it is not a rotation that was saved", fix)
    module.set_rotation(tensors["rotation"])
    if "fractions" in tensors:
        # save_intervention writes fractions for a boundless module only
        assert isinstance(module, BoundlessRotatedSpaceIntervention)
        with torch.no_grad():
            module.fractions.copy_(tensors["fractions"])
    return module, metadata
