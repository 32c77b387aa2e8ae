"""Notebook 09's DAS runs over initialisations: which seeds a cell trains, and each cell's
IIA over its seeds with a Student's t interval.

One DAS run (Geiger, Wu, Potts, Icard and Goodman 2023) is one random start of a rotation, one
order of examples and one draw of training counterfactuals; three runs of the same cell (causal
model, layer, rank, site) at 20 steps spread by 0.2 in IIA (M7, layer 22: 0.481 / 0.666 / 0.698,
issue 26), so a cell's number is its mean over ``DAS_SEEDS`` runs with the interval beside it,
and the random-subspace control gets the same treatment (each run's own control, seed + 1).
:func:`cells` writes ``das_iia.json``'s ``cells``; :func:`separated` says where two cells'
intervals do not overlap, the only place a ranking is stated.
"""

from __future__ import annotations

from collections.abc import Sequence

from lib.core.stats import mean_t_interval

#: what makes a cell: the runs that differ only in their seed
CELL = ("model", "layer", "rank", "site")


def seed_list(first: int, count: int) -> list[int]:
    """The seeds of a cell's runs: ``first, first + 1, ..., first + count - 1`` (09's ``SEED``
    and ``DAS_SEEDS``); the run of seed ``first`` is the run 09 trained before seeds were
    counted (same name, same counterfactuals)."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"DAS_SEEDS must be a positive int of runs per cell, got {count!r}")
    return list(range(first, first + count))


def cells(runs: Sequence[dict], confidence: float = 0.95) -> list[dict]:
    """One row per cell (:data:`CELL`, in the order of the runs' first appearance): its seeds,
    the IIA and the control's IIA over them (mean, std, n, Student's t interval,
    :func:`lib.core.stats.mean_t_interval`) and the last epoch's mean training loss; a run
    without a ``seed`` (written before seeds were counted) is a cell of one run."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in CELL), []).append(r)
    out = []
    for cell, mine in groups.items():
        out.append({**dict(zip(CELL, cell)), "seeds": [r.get("seed") for r in mine],
                    "iia": mean_t_interval([r["iia"] for r in mine], confidence),
                    "control_iia": mean_t_interval([r["control_iia"] for r in mine],
                                                   confidence),
                    "final_loss": mean_t_interval([r["curve"][-1]["loss"] for r in mine],
                                                  confidence),
                    "steps": mine[0]["steps"]})
    return out


def separated(a: dict, b: dict, key: str = "iia") -> bool:
    """Whether two cells' intervals of ``key`` do not overlap (one lies wholly above the
    other); a cell of one run has no interval and separates from nothing."""
    x, y = a[key], b[key]
    if x["n"] < 2 or y["n"] < 2:
        return False
    return x["ci_low"] > y["ci_high"] or y["ci_low"] > x["ci_high"]


def above_control(cell: dict) -> bool:
    """Whether a cell's learned IIA lies above its random control's, intervals apart."""
    return separated(cell, {**cell, "iia": cell["control_iia"]}) \
        and cell["iia"]["mean"] > cell["control_iia"]["mean"]
