"""The engine's data model: contexts, rows, references to other runs, captures; see
:mod:`lib.core.engine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lib.core.interventions import Intervention
from lib.core.sites import parse_site


# --- data ------------------------------------------------------------------------------------

@dataclass(eq=False)
class Context:
    """An input plus the interventions that hold in every row on it."""

    input_ids: torch.Tensor
    interventions: Sequence[Intervention] = ()
    name: str = ""

    def __post_init__(self):
        ids = torch.as_tensor(self.input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(f"context {self.name!r}: input_ids must be one non-empty prompt, "
                             f"shape (1, T) or (T,), got {tuple(ids.shape)}")
        self.input_ids = ids
        self.interventions = tuple(self.interventions)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass(eq=False)
class Row:
    """One run: a context (its index) plus the row's own interventions."""

    context: int = 0
    interventions: Sequence[Intervention] = ()

    def __post_init__(self):
        self.interventions = tuple(self.interventions)


@dataclass(frozen=True, eq=False)
class Ref:
    """A value read from another run: ``site`` at ``positions`` (absolute; None = the
    positions of the intervention that uses it) in context ``context``, under that context's
    interventions plus ``interventions``."""

    context: int
    site: str
    positions: tuple[int, ...] | None = None
    interventions: tuple[Intervention, ...] = ()

    def __post_init__(self):
        parse_site(self.site)
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        object.__setattr__(self, "interventions", tuple(self.interventions))


@dataclass(frozen=True)
class Capture:
    """Readout: the activations at ``sites`` (after the row's interventions there) at
    ``positions`` (absolute; None = every position)."""

    sites: tuple[str, ...]
    positions: tuple[int, ...] | None = None

    def __post_init__(self):
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        for s in sites:
            parse_site(s)
        object.__setattr__(self, "sites", tuple(dict.fromkeys(sites)))
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
