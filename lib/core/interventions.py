"""Interventions as data: where an activation is changed and how, with one meaning everywhere.

An :class:`Intervention` says *where* (a site of :mod:`lib.core.sites`, token positions, batch
rows, heads) and *what* (replace with a value, add, zero, or any function), as pyvene's
intervention configs do (Wu et al. 2024, "pyvene: A Library for Understanding and Improving
PyTorch Models via Interventions"). It is written by one applier,
:func:`lib.core.hooks.apply_ops`, after becoming an :class:`Op` (:meth:`Intervention.to_op`);
the planner (:mod:`lib.core.engine`) merges many rows' interventions into one op per group.
Nothing here touches a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from lib.core.sites import HEAD_SITES, parse_site

if TYPE_CHECKING:   # a value may name another run; the engine resolves it before any hook
    from lib.core.engine.data import Ref

KINDS = ("replace", "add", "zero", "function")


@dataclass
class Intervention:
    """One intervention as data: *where* (site, positions, rows, heads) and *what* (kind, value).

    Its one meaning, in :func:`patch` and in :mod:`lib.core.engine` alike:

    * ``positions``: absolute token positions of the input (None: all). A run that continues
      from a cached prefix starts at ``offset`` = the prefix length; the applier subtracts it.
    * ``rows``: the batch rows of the forward pass it applies to (None: all). In the engine a
      row's interventions apply to that row alone, so ``rows`` stays None there (refused
      otherwise).
    * ``value`` (replace, add): broadcasts to the patched slice, whose shape is (rows,
      positions, d_model), or (rows, positions, heads, d_head) for the per-head sites; so it
      may carry a row axis of ``len(rows)``, or size 1 there (the same value for every row).
    * ``fn`` (function): called on that slice, returns the new slice (same shape).

    ``value`` and ``fn`` are not serialised; ``source`` is a short free-text label saying where
    ``value`` came from (e.g. ``"run:source prompt 3"``), kept in JSON next to the results.
    Every intervention is written by :func:`lib.core.hooks.apply_ops` as the :class:`Op` of
    :meth:`to_op`.
    """

    site: str
    positions: tuple[int, ...] | None = None  # absolute token positions; None = all
    kind: str = "replace"                     # replace | add | zero | function
    rows: tuple[int, ...] | None = None       # batch rows it applies to; None = all rows
    heads: tuple[int, ...] | None = None      # head_out, q_in, k_in, v_in; None = all heads
    source: str = ""
    value: torch.Tensor | Ref | None = field(default=None, repr=False, compare=False)
    fn: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False,
                                                              compare=False)

    def __post_init__(self):
        parse_site(self.site)  # raises on an unknown name
        if self.kind not in KINDS:
            raise ValueError(f"unknown intervention kind {self.kind!r}; use one of {KINDS}")
        if self.kind in ("replace", "add") and self.value is None:
            raise ValueError(f"a {self.kind!r} intervention needs a value")
        if self.kind == "function" and self.fn is None:
            raise ValueError("a 'function' intervention needs fn")
        if self.heads is not None and parse_site(self.site)[0] not in HEAD_SITES:
            raise ValueError(f"heads only apply to {', '.join(HEAD_SITES)} sites, not "
                             f"{self.site!r}")
        for name in ("positions", "rows", "heads"):
            val = getattr(self, name)
            if isinstance(val, int):
                val = (val,)
            if val is not None:
                setattr(self, name, tuple(int(v) for v in val))

    def to_dict(self) -> dict:
        """JSON-ready description (no tensors)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("value", "fn")}
        for key in ("positions", "rows", "heads"):
            if out[key] is not None:
                out[key] = list(out[key])
        if self.fn is not None:
            out["fn"] = getattr(self.fn, "__name__", repr(self.fn))
        return out

    def to_op(self, offset: int = 0) -> "Op":
        """This intervention as the :class:`Op` the applier writes, for a run whose first
        position is ``offset``."""
        pos = None if self.positions is None else tuple(p - offset for p in self.positions)
        return Op(self.kind, None if self.rows is None else list(self.rows), pos, self.heads,
                  [self.value] if self.kind in ("replace", "add") else [], self.fn,
                  [self.source], offset)

    def apply(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """A copy of activation ``x`` (site shape) with this intervention applied
        (:func:`lib.core.hooks.apply_ops`). Differentiable."""
        from lib.core.hooks import apply_ops   # the applier imports this module

        return apply_ops(x, [self.to_op(offset)], self.site)

    @classmethod
    def from_dict(cls, data: dict, value: torch.Tensor | None = None,
                  fn: Callable | None = None) -> "Intervention":
        data = {k: v for k, v in data.items() if k != "fn"}
        return cls(**data, value=value, fn=fn)


class InterventionError(TypeError, ValueError):
    """A value or function that cannot be written at its site (not a tensor, a shape that does
    not fit the patched slice, a function that returns something else than the new slice)."""


@dataclass
class Op:
    """One operation on a batch at one site: ``kind`` applied to batch rows ``rows`` (None:
    every row) at ``positions`` (relative to the run's first position; None: all) and
    ``heads``. This is what every intervention becomes before it is written, in
    :func:`lib.core.hooks.patch` (one op per :class:`Intervention`) and in
    :mod:`lib.core.engine` (one op per group of rows that share kind, positions and heads, see
    ``merge_interventions``).

    ``values`` (replace / add): either one value for all the op's rows, which broadcasts to
    the patched slice (rows, positions, features) and so may carry a row axis, or one value
    per row, each broadcasting to one row's slice (1, positions, features). ``offset`` (the
    run's first absolute position) only makes error messages speak in absolute positions."""

    kind: str
    rows: list[int] | None
    positions: tuple[int, ...] | None
    heads: tuple[int, ...] | None
    values: list = field(default_factory=list)
    fn: Callable | None = None
    sources: list[str] = field(default_factory=list)
    offset: int = 0
