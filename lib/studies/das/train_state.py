"""A stack of DAS rotations' training state on disk, so that training resumes or goes on.

Distributed alignment search (Geiger, Wu, Potts, Icard and Goodman 2023) trains each rotation
with Adam; stopping and going on gives the rotations that training straight through gives
only if Adam's moments come back with the rotations. :func:`save_state` writes, for every
member of a :class:`lib.studies.das.stacked.Stack`, its trainable tensors and Adam's ``step``,
``exp_avg`` and ``exp_avg_sq`` as safetensors (never pickles), with the step count, the
members and the caller's record (what it measured so far) in the header and the key of the
training's parameters; :func:`load_state` checks a file (key, members, tensor names, shapes,
finite values) and only then copies it into a freshly built stack and optimizer of the same
members. Used by :mod:`lib.studies.das.convergence` to resume an interrupted grid and to
extend a grid to larger budgets without training the smaller ones again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from lib.core import tensorfiles as tf

#: Adam's per-parameter state (torch.optim.Adam without amsgrad)
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")
WHAT = "DAS training state"


def _names(stack) -> list[tuple[str, torch.Tensor]]:
    """``("<member>.<tensor>", parameter)`` for every trainable tensor of every member."""
    return [(f"{j}.{i}", p) for j, group in enumerate(stack.parameters())
            for i, p in enumerate(group)]


def expected_shapes(stack) -> dict[str, tuple]:
    """The tensors a state file of ``stack`` holds, with their shapes."""
    out: dict[str, tuple] = {}
    for name, p in _names(stack):
        out[name] = tuple(p.shape)
        out.update({f"{name}.{k}": () if k == "step" else tuple(p.shape) for k in ADAM_STATE})
    return out


def save_state(path: str | os.PathLike, stack, opt: torch.optim.Optimizer, step: int,
               members: Sequence, record: dict, key: str) -> Path:
    """Write ``stack``'s rotations and ``opt``'s Adam state after ``step`` optimizer steps,
    atomically, with ``members`` (JSON-able, e.g. ``(causal model, seed)`` pairs) and
    ``record`` in the header, keyed by ``key``. Refused before any step (no Adam state)."""
    tensors = {}
    for name, p in _names(stack):
        state = opt.state.get(p)
        if not state or any(k not in state for k in ADAM_STATE):
            raise ValueError(f"member tensor {name} has no Adam state: save after a step")
        tensors[name] = p.detach()
        tensors.update({f"{name}.{k}": state[k] for k in ADAM_STATE})
    config = {"step": int(step), "members": [list(m) for m in members], "record": record}
    return tf.save_tensors(path, tensors, config, key=key)


def load_state(path: str | os.PathLike, stack, opt: torch.optim.Optimizer, members: Sequence,
               key: str) -> tuple[int, dict]:
    """Put the state at ``path`` into ``stack`` and ``opt`` (built for ``members``, not yet
    stepped); returns ``(step, record)``. A file of another key, other members or other
    tensors, or not finite, raises :class:`lib.core.tensorfiles.TensorFileError` before
    anything is copied."""
    fix = "delete it to train from step 0"
    tensors, config, _ = tf.load_tensors(path, WHAT, key=key, shapes=expected_shapes(stack),
                                         fix=fix)
    if config.get("members") != [list(m) for m in members]:
        raise tf.TensorFileError(Path(path), f"holds the members {config.get('members')}, "
                                 f"not this training's {[list(m) for m in members]}", fix)
    with torch.no_grad():
        for name, p in _names(stack):
            p.copy_(tensors[name])
            opt.state[p] = {k: tensors[f"{name}.{k}"].to(p.device, copy=True)
                            for k in ADAM_STATE}
    return int(config["step"]), config["record"]
