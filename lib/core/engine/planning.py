"""Planning, a pure function of the rows: where each row starts, batches by context length, first
patched position and layer (with the cost model that cuts them), and the merge of many rows'
interventions into one :class:`lib.core.interventions.Op` per group; see :mod:`lib.core.engine`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from lib.core.interventions import Intervention, Op
from lib.core.sites import parse_site


# --- planning (pure) ----------------------------------------------------------------------------

def site_layer(site: str) -> int:
    """Layer of a site; ``embed`` is -1 (below block 0)."""
    layer = parse_site(site)[1]
    return -1 if layer is None else layer


def row_start(interventions: Sequence[Intervention], seq_len: int) -> tuple[int, int]:
    """(first patched position, first patched layer) of a row's interventions. A row with none
    starts at the last position and at layer 10**9 (above every block). ``embed`` is layer -1;
    every site of layer l lives in block l or on its input, so a run may start at block l."""
    pos, layer = seq_len - 1, 10 ** 9
    for iv in interventions:
        pos = min(pos, 0 if iv.positions is None else min(iv.positions))
        layer = min(layer, site_layer(iv.site))
    return pos, layer


@dataclass(frozen=True)
class Batch:
    """One forward pass: ``rows`` (indices into the row list), all on contexts of length
    ``length``, run from position ``start_pos`` and block ``start_layer`` (0: from the token ids).

    ``entries`` (empty: every row at ``start_layer``): each row's own first block, ascending.
    A row joins the pass at its block, from the stored residual stream, so no row runs the
    blocks below its first patched layer (they would only recompute its clean states)."""

    length: int
    start_pos: int
    start_layer: int
    rows: tuple[int, ...]
    entries: tuple[int, ...] = ()


def plan(starts: Sequence[tuple[int, int]], lengths: Sequence[int], batch_size: int = 32,
         noop: Sequence[bool] | None = None, prefix: bool = True,
         layer_start: bool = True, n_layers: int | None = None
         ) -> tuple[list[Batch], list[int]]:
    """Batches for rows with first patched ``starts[i] = (position, layer)`` on contexts of
    length ``lengths[i]``; returns ``(batches, no-op rows)``. Pure: no model, no tensors.

    Rows are grouped by context length and first patched position (exactly; a batch shares one
    key/value prefix length) and, within a group, ordered by first patched layer and cut into
    batches of at most ``batch_size``; each batch starts at the lowest layer of its rows, and
    (with ``layer_start``) each row joins it at its own first patched layer (``entries``).
    Every row that is not a no-op lands in exactly one batch. ``n_layers`` caps the start layer
    (a row with no intervention starts at the last block).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(starts) != len(lengths):
        raise ValueError(f"{len(starts)} row starts for {len(lengths)} context lengths")
    noop = [False] * len(starts) if noop is None else list(noop)
    skipped = [i for i, flag in enumerate(noop) if flag]
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, ((pos, _layer), length) in enumerate(zip(starts, lengths)):
        if noop[i]:
            continue
        pos = min(pos, length - 1) if prefix else 0
        groups[(length, pos)].append(i)
    batches = []
    for (length, pos), idx in sorted(groups.items()):
        idx.sort(key=lambda i: (starts[i][1], i))
        first = [max(0, starts[i][1]) if layer_start else 0 for i in idx]
        if n_layers is not None:
            first = [min(f, n_layers - 1) for f in first]
        for lo, hi in _cuts(first, length - pos, batch_size, n_layers):
            entries = tuple(first[lo:hi]) if layer_start and first[hi - 1] > first[lo] else ()
            batches.append(Batch(length, pos, first[lo], tuple(idx[lo:hi]), entries))
    return batches, skipped


# Cost model of one batched pass, in units of one row-token through one block. Measured on the
# CPU with smollm2-135m (1 thread): a block costs ~0.13 ms per row-token (compute) and ~2 ms
# per pass however few rows it holds (its weights are read once); a pass has ~19 ms of fixed
# overhead (embedding, masks, LM head set-up).
LAYER_COST = 16
BATCH_COST = 150


def _cuts(first: Sequence[int], tokens: int, batch_size: int, n_layers: int | None
          ) -> list[tuple[int, int]]:
    """Where to cut rows sorted by start layer into batches of at most ``batch_size``.

    Without ``n_layers``: consecutive chunks of ``batch_size``. With it: the cuts that minimise
    the estimated time by dynamic programming: a batch costs ``LAYER_COST`` for every block it
    runs (from its lowest start layer), ``BATCH_COST`` once, and ``tokens`` for every block each
    row runs from its own start layer (rows join at their layer, see :class:`Batch`)."""
    n = len(first)
    if n_layers is None:
        return [(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]
    row_blocks = [0]                        # prefix sums of the blocks each row runs
    for f in first:
        row_blocks.append(row_blocks[-1] + n_layers - f)
    best = [0.0] + [float("inf")] * n
    back = [0] * (n + 1)
    for hi in range(1, n + 1):
        for lo in range(max(0, hi - batch_size), hi):
            cost = (best[lo] + tokens * (row_blocks[hi] - row_blocks[lo])
                    + LAYER_COST * (n_layers - first[lo]) + BATCH_COST)
            if cost < best[hi]:
                best[hi], back[hi] = cost, lo
    cuts, hi = [], n
    while hi > 0:
        cuts.append((back[hi], hi))
        hi = back[hi]
    return cuts[::-1]


def merge_interventions(per_row: Sequence[Sequence[Intervention]], offset: int = 0
                        ) -> dict[str, list[list[Op]]]:
    """``{site: stages}``: each stage a list of :class:`Op`. The k-th intervention a row
    has at a site goes into stage k (so one row's interventions at a site apply in order);
    within a stage, rows with the same kind, positions, heads (and ``fn``) share one op."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r, ivs in enumerate(per_row):
        count: dict[str, int] = defaultdict(int)
        for iv in ivs:
            if iv.rows is not None:
                raise ValueError(f"an engine row's intervention at {iv.site!r} has rows={iv.rows}: "
                                 "each row's interventions apply to that row alone, so leave "
                                 "rows unset (rows selects batch rows in lib.core.hooks.patch)")
            k = count[iv.site]
            count[iv.site] += 1
            stages = out[iv.site]
            while len(stages) <= k:
                stages.append({})
            pos = None if iv.positions is None else tuple(p - offset for p in iv.positions)
            key = (iv.kind, pos, iv.heads, id(iv.fn) if iv.kind == "function" else None)
            op = stages[k].get(key)
            if op is None:
                op = stages[k][key] = Op(iv.kind, [], pos, iv.heads, fn=iv.fn, offset=offset)
            assert op.rows is not None  # every op here is built with a list of rows
            op.rows.append(r)
            if iv.kind in ("replace", "add"):
                op.values.append(iv.value)
            op.sources.append(iv.source)
    return {site: [list(stage.values()) for stage in stages] for site, stages in out.items()}
