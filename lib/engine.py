"""The intervention engine: many interventions, batched forward passes, shared work done once.

Every study in this repository (activation patching / interchange intervention, Vig et al. 2020
and Geiger et al. 2021; causal tracing, Meng et al. 2022; the domain swaps of the seed study;
path patching, Wang et al. 2022; distributed alignment search, Geiger, Wu et al. 2023) is the
same computation: a list of *rows*, each one run of the model on some input with some
interventions, read out at the end. This module runs them all; no other module calls the
model with a key/value cache or batches rows by hand.

Vocabulary
----------
* :class:`Context`: an input (one prompt, token ids ``(1, T)``) plus interventions that hold in
  every row on it (causal tracing's noise on the subject; nothing for a plain base prompt).
* :class:`Row`: a context plus the row's own interventions (:class:`lib.hooks.Intervention`,
  positions absolute; their ``rows`` field is ignored: the engine assigns batch rows).
* A readout: ``"logits"`` (last-position logits, float32, the default), any callable of the
  last-position logits ``(rows, vocab) -> (rows, ...)`` (e.g. two answer probabilities), or
  :class:`Capture` (activations at sites, positions of the caller's choice).
* :class:`Ref`: an intervention's ``value`` may name another run, "the activation at this site
  in context j, itself under these interventions"; references are resolved in stages (a
  reference's own interventions may hold references) and each distinct one is computed once.

What is done once
-----------------
* Each context runs once, clean (under its own interventions), batched with the other contexts
  of the same length: its key/value cache, its residual stream entering every block, the
  activations the rows need, and its clean readout are stored.
* :func:`plan` (a pure function of the rows, tested without a model) groups rows by context
  length, first patched position and first patched layer; a batch continues from the stored
  key/value cache of positions ``[0, p)`` (causal attention: nothing before the first patched
  position ``p`` changes) and, where the architecture allows it, starts at the batch's lowest
  patched layer ``L`` from the stored residual stream, skipping blocks ``0..L-1`` (nothing below
  the lowest patched layer changes). Whether starting mid-stack is exact is checked once per
  model (GPT-2 adds position embeddings to its input, so there it is not, and the engine runs
  from the token ids instead).
* Rows whose interventions change nothing (checked bit for bit on the context's stored
  activations) get the context's clean readout without running.
* The interventions of one site in a batch are merged into one multi-row operation.
* Only the last position goes through the LM head.

``grad=True`` keeps autograd through the interventions (their values and ``fn`` parameters,
e.g. DAS rotations); the stored caches and residual streams are constants. :func:`run_naive`
is the reference loop (one full, unbatched forward per row, references resolved the same naive
way) that every study's rows are checked against.
"""

from __future__ import annotations

import warnings
import weakref
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace

import torch

from lib.hooks import (Intervention, Op, StopForward, apply_hooks, apply_ops,
                       record_hooks)
from lib.sites import HEAD_SITES, parse_site, site_name



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
                                 "rows unset (rows selects batch rows in lib.hooks.patch)")
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
            op.rows.append(r)
            if iv.kind in ("replace", "add"):
                op.values.append(iv.value)
            op.sources.append(iv.source)
    return {site: [list(stage.values()) for stage in stages] for site, stages in out.items()}


@contextmanager
def skip_blocks(lm, n_skip: int):
    """Inside the block, blocks ``0..n_skip-1`` pass the residual stream through unchanged."""
    blocks = lm.spec.blocks(lm.model)
    saved = [blocks[i] for i in range(n_skip)]
    try:
        for i in range(n_skip):
            blocks[i] = _PassThrough()
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


class _PassThrough(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _kv_cache(lm, data):
    """A key/value cache holding ``data`` (keys, values per block) as given. The cache's own
    constructor concatenates each block's tensors onto an empty one, a copy of the whole
    prefix per batch; the first forward step concatenates anyway, so here nothing is copied
    (an expanded view of one context's prefix stays a view)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    if len(cache.layers) != len(data):
        return DynamicCache(ddp_cache_data=data, config=lm.model.config)
    for layer, (keys, values) in zip(cache.layers, data):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        if hasattr(layer, "cumulative_length"):   # sliding-window layers count positions
            layer.cumulative_length = keys.shape[-2]
    return cache


# --- the engine -----------------------------------------------------------------------------------

def _logits_to_keep(n_positions: int, device):
    # An index tensor (not the int 1) makes transformers gather a contiguous slice; a strided
    # one makes the head's matmul several times slower on CPU.
    return torch.tensor([n_positions - 1], device=device)


def _full_positions(iv: Intervention, length: int) -> Intervention:
    return iv if iv.positions is not None else replace(iv, positions=tuple(range(length)))


def _restrict(iv: Intervention, keep_position) -> Intervention | None:
    """``iv`` at only the positions where ``keep_position(p)`` holds (its value sliced along
    the positions axis when it has one per position); None when no position is left."""
    keep = [j for j, p in enumerate(iv.positions) if keep_position(p)]
    if not keep:
        return None
    if len(keep) == len(iv.positions):
        return iv
    value = iv.value
    if value is not None:
        pos_dim = -3 if parse_site(iv.site)[0] in HEAD_SITES else -2
        if value.dim() >= -pos_dim and value.shape[pos_dim] == len(iv.positions):
            value = value.index_select(value.dim() + pos_dim,
                                       torch.tensor(keep, device=value.device))
    return replace(iv, positions=tuple(iv.positions[j] for j in keep), value=value)


def _clip(iv: Intervention, start: int, layer: int) -> Intervention | None:
    """A context intervention as seen by a run from position ``start`` and block ``layer``:
    None when it lies wholly before ``start`` or below ``layer`` (it is in the stored state),
    else restricted to positions >= start."""
    if layer > 0 and site_layer(iv.site) < layer:
        return None
    return _restrict(iv, lambda p: p >= start)


# sites of a block that no later position reads inside that block (only the residual stream
# carries them on, to the next block's attention)
_AFTER_ATTENTION = ("head_out", "attn_out", "mlp_in", "mlp_out", "resid_post")


class _Group:
    """Stored clean runs of the contexts of one length (identical contexts share a slot)."""

    def __init__(self, members: list[int], slot: dict[int, int]):
        self.members = members                    # one context index per slot
        self.slot = slot                          # context index -> slot
        self.keys: list[torch.Tensor] | None = None
        self.values: list[torch.Tensor] | None = None
        self.resid: list[torch.Tensor] | None = None   # resid_pre per block, (n_ctx, T, d)
        self.acts: dict[str, torch.Tensor] = {}       # site -> (n_ctx, T, ...)
        self.logits: torch.Tensor | None = None       # (n_ctx, vocab) last position


class Engine:
    """Runs rows on a fixed list of contexts; clean context runs are computed once and kept
    for every :meth:`run` call on this engine."""

    def __init__(self, lm, contexts: Sequence[Context], *, batch_size: int = 32,
                 prefix: bool = True, layer_start: bool = True, skip_noops: bool = True,
                 check_finite: bool = True, progress: bool = False):
        self.lm = lm
        self.contexts = list(contexts)
        if not self.contexts:
            raise ValueError("give at least one Context")
        for c in self.contexts:
            if not isinstance(c, Context):
                raise TypeError(f"contexts must be lib.engine.Context, got {type(c).__name__}")
        self.batch_size, self.prefix, self.skip_noops = batch_size, prefix, skip_noops
        self.check_finite, self.progress = check_finite, progress
        self.ctx_ivs = [tuple(_full_positions(iv, c.length) for iv in c.interventions)
                        for c in self.contexts]
        for c, ivs in zip(self.contexts, self.ctx_ivs):
            for iv in ivs:
                if isinstance(iv.value, Ref):
                    raise ValueError(f"context {c.name!r}: context interventions cannot hold "
                                     "references; put them in the rows")
        # contexts of one length run together; identical ones (same tokens, same intervention
        # objects) are run once and share a slot, so their stored states are bitwise equal
        members: dict[int, list[int]] = defaultdict(list)
        slots: dict[int, dict[int, int]] = defaultdict(dict)
        seen: dict[tuple, tuple[int, int]] = {}
        for i, c in enumerate(self.contexts):
            key = (tuple(c.input_ids[0].tolist()), tuple(id(iv) for iv in c.interventions))
            if key not in seen:
                seen[key] = (c.length, len(members[c.length]))
                members[c.length].append(i)
            slots[c.length][i] = seen[key][1]
        self.groups = {length: _Group(m, slots[length]) for length, m in members.items()}
        self.layer_start = layer_start and layer_start_exact(lm, self)
        self.stats = {"forwards": 0, "rows_run": 0, "rows_noop": 0, "ref_run": 0, "ref_noop": 0,
                      "joined": 0}  # joined: rows that joined a pass above its first block

    # -- clean context runs -------------------------------------------------------------------

    def _group(self, ctx: int) -> _Group:
        return self.groups[self.contexts[ctx].length]

    @torch.no_grad()
    def _ensure(self, group: _Group, sites: Sequence[str] = ()):
        """Run the group's contexts clean (batched) if not yet, or again for missing sites."""
        lm = self.lm
        missing = [s for s in dict.fromkeys(sites) if s not in group.acts]
        if group.logits is not None and not missing:
            return
        want = list(group.acts) + missing
        resid_sites = [site_name("resid_pre", l) for l in range(lm.n_layers)]
        ids = torch.cat([self.contexts[c].input_ids for c in group.members]).to(lm.device)
        per_row = [self.ctx_ivs[c] for c in group.members]
        merged = merge_interventions(per_row)
        store: dict[str, torch.Tensor] = {}
        capture_sites = list(dict.fromkeys(want + resid_sites))
        with apply_hooks(lm, merged, self.check_finite), record_hooks(lm, capture_sites, store):
            out = lm.model(input_ids=ids, use_cache=True,
                           logits_to_keep=_logits_to_keep(ids.shape[1], lm.device))
        self.stats["forwards"] += 1
        group.logits = out.logits[:, -1].float()
        past = out.past_key_values
        length = ids.shape[1]
        layers = getattr(past, "layers", None)
        if layers is not None and all(getattr(l, "keys", None) is not None and
                                      l.keys.shape[-2] == length for l in layers):
            group.keys = [l.keys for l in layers]
            group.values = [l.values for l in layers]
        else:  # a cache that does not keep every position (e.g. a sliding window): recompute
            group.keys = group.values = None
        group.resid = [store[s] for s in resid_sites]
        group.acts = {s: store[s] for s in want}

    def _prefix(self, group: _Group, slots: torch.Tensor, start: int,
                present: Sequence[int] | None = None):
        """A fresh key/value cache of positions [0, start) for batch rows on context ``slots``;
        ``present[l]``: how many of the rows (the first ones) block l sees (rows joining
        later are not in the pass yet; needs the stored cache)."""
        lm = self.lm
        if group.keys is not None:
            counts = present or [len(slots)] * len(group.keys)
            if bool((slots == slots[0]).all()):   # one context: a view, nothing copied
                one = int(slots[0])
                data = [(k[one:one + 1, :, :start].expand(n, -1, -1, -1),
                         v[one:one + 1, :, :start].expand(n, -1, -1, -1))
                        for k, v, n in zip(group.keys, group.values, counts)]
            else:
                data = [(k[slots[:n], :, :start], v[slots[:n], :, :start])
                        for k, v, n in zip(group.keys, group.values, counts)]
            return _kv_cache(lm, data)
        ids = torch.cat([self.contexts[group.members[int(s)]].input_ids for s in slots])
        merged = merge_interventions([[iv for iv in (_clip_end(iv, start) for iv in
                                                     self.ctx_ivs[group.members[int(s)]])
                                       if iv is not None] for s in slots])
        with apply_hooks(lm, merged, self.check_finite):
            out = lm.model(input_ids=ids[:, :start].to(lm.device), use_cache=True,
                           logits_to_keep=_logits_to_keep(start, lm.device))
        self.stats["forwards"] += 1
        return out.past_key_values

    def clean_readout(self, ctx: int, readout=None):
        """The clean readout of context ``ctx`` (under its own interventions)."""
        group = self._group(ctx)
        sites = readout.sites if isinstance(readout, Capture) else ()
        self._ensure(group, sites)
        slot = group.slot[ctx]
        if isinstance(readout, Capture):
            return {s: _positions(group.acts[s][slot:slot + 1], readout.positions)[0]
                    for s in readout.sites}
        logits = group.logits[slot:slot + 1]
        return (logits if readout in (None, "logits") else readout(logits))[0]

    # -- references ----------------------------------------------------------------------------

    def _resolve(self, rows: Sequence[Row], grad: bool) -> list[Row]:
        """Rows with every :class:`Ref` value replaced by its tensor, in stages."""
        cache: dict[tuple, torch.Tensor] = {}

        def key(ref: Ref) -> tuple:
            return (ref.context, ref.site, tuple(_iv_key(iv) for iv in ref.interventions))

        def refs_in(ivs) -> list[Ref]:
            found = []
            for iv in ivs:
                if isinstance(iv.value, Ref):
                    found.append(iv.value)
                    found.extend(refs_in(iv.value.interventions))
            return found

        pending = {}
        for row in rows:
            for ref in refs_in(row.interventions):
                pending.setdefault(key(ref), ref)
        while pending:
            ready = {k: r for k, r in pending.items()
                     if all(key(x) in cache for x in refs_in(r.interventions))}
            if not ready:
                raise ValueError("references form a cycle; a Ref's interventions cannot "
                                 "depend on the Ref itself")
            plain = {k: r for k, r in ready.items() if not r.interventions}
            need: dict[int, set] = defaultdict(set)  # one clean run per group for all sites
            for r in plain.values():
                self._check_ctx(r.context)
                need[self.contexts[r.context].length].add(r.site)
            for length, sites in need.items():
                self._ensure(self.groups[length], sorted(sites))
            for k, r in plain.items():
                group = self._group(r.context)
                slot = group.slot[r.context]
                cache[k] = group.acts[r.site][slot:slot + 1]
            others = [(k, r) for k, r in ready.items() if r.interventions]
            # one capture row per distinct reference, grouped by site so each batch reads one
            by_site: dict[str, list] = defaultdict(list)
            for k, r in others:
                by_site[r.site].append((k, r))
            for site, items in by_site.items():
                sub_rows = [Row(r.context, [_substitute(iv, cache, key) for iv in
                                            r.interventions]) for _, r in items]
                got = self._run_resolved(sub_rows, Capture((site,)), grad=False, kind="ref")
                for (k, _), value in zip(items, got[site]):
                    cache[k] = value[None]
            for k in ready:
                pending.pop(k)
        return [Row(row.context, [_substitute(iv, cache, key) for iv in row.interventions])
                for row in rows]

    def _check_ctx(self, ctx: int):
        if not 0 <= ctx < len(self.contexts):
            raise IndexError(f"context {ctx} does not exist; there are {len(self.contexts)} "
                             f"contexts (0 to {len(self.contexts) - 1})")

    # -- running rows ------------------------------------------------------------------------------

    def run(self, rows: Sequence[Row], readout=None, *, grad: bool = False,
            batch_size: int | None = None, progress: bool | None = None):
        """Readouts of ``rows`` in order: a tensor (n_rows, ...) for ``"logits"`` (default) or
        a callable, ``{site: (n_rows, positions, ...)}`` for :class:`Capture`. ``batch_size``
        and ``progress`` override the engine's for this call only."""
        rows = list(rows)
        for r in rows:
            if not isinstance(r, Row):
                raise TypeError(f"rows must be lib.engine.Row, got {type(r).__name__}")
            self._check_ctx(r.context)
        same = [self._reads_an_identical_prefix(r) for r in rows]
        rows = self._resolve(rows, grad)
        return self._run_resolved(rows, readout, grad, noop_hint=same, batch_size=batch_size,
                                  progress=progress)

    def _unread(self, ivs: Sequence[Intervention], length: int) -> bool:
        """Whether the last position's output cannot depend on these interventions: all of
        them sit in the last block after its attention (nothing reads them but their own
        position) at positions before the last."""
        last_layer = self.lm.n_layers - 1
        return bool(ivs) and all(
            parse_site(iv.site) in {(k, last_layer) for k in _AFTER_ATTENTION}
            and iv.positions is not None and max(iv.positions) < length - 1 for iv in ivs)

    def _reads_an_identical_prefix(self, row: Row) -> bool:
        """Whether every intervention of ``row`` replaces a site with the same site of another
        plain context whose tokens agree with the row's up to the patched positions: by causal
        attention the values are the same, so the row changes nothing (even where two batched
        runs differ in the last bits)."""
        if not row.interventions:
            return False
        ids = self.contexts[row.context].input_ids[0]
        for iv in row.interventions:
            ref = iv.value
            if iv.kind != "replace" or not isinstance(ref, Ref) or ref.interventions \
                    or ref.site != iv.site or iv.positions is None \
                    or ref.positions not in (None, iv.positions):
                return False
            if not 0 <= ref.context < len(self.contexts):
                return False  # resolution names the bad context
            other = self.contexts[ref.context]
            if self.ctx_ivs[row.context] or self.ctx_ivs[ref.context]:
                return False
            last = max(iv.positions)
            if other.length <= last or not torch.equal(ids[:last + 1],
                                                       other.input_ids[0, :last + 1]):
                return False
        return True

    def _row_ivs(self, row: Row) -> list[Intervention]:
        length = self.contexts[row.context].length
        return [_full_positions(iv, length) for iv in row.interventions]

    def _noop_flags(self, rows: list[Row], ivs: list[list[Intervention]],
                    grad: bool, known: Sequence[bool] | None = None) -> list[bool]:
        """Whether each row changes nothing, checked bit for bit on the stored activations;
        rows ``known`` to be no-ops already are not checked again."""
        if not self.skip_noops or grad:
            return [False] * len(rows)
        known = known or [False] * len(rows)
        flags = []
        need = defaultdict(set)
        for row, row_ivs, done in zip(rows, ivs, known):
            if not done and row_ivs and all(iv.kind != "function" for iv in row_ivs):
                for iv in row_ivs:
                    need[self.contexts[row.context].length].add(iv.site)
        for length, sites in need.items():
            self._ensure(self.groups[length], sorted(sites))
        for row, row_ivs, done in zip(rows, ivs, known):
            if done:
                flags.append(True)
                continue
            if not row_ivs:
                flags.append(True)
                continue
            if any(iv.kind == "function" for iv in row_ivs):
                flags.append(False)
                continue
            group = self._group(row.context)
            slot = group.slot[row.context]
            current = {}
            for iv in row_ivs:
                x = current.get(iv.site, group.acts[iv.site][slot:slot + 1])
                current[iv.site] = apply_ops(x, [iv.to_op()], iv.site, check=False)
            flags.append(all(torch.equal(v, group.acts[s][slot:slot + 1])
                             for s, v in current.items()))
        return flags

    def _run_resolved(self, rows: list[Row], readout, grad: bool, kind: str = "rows",
                      noop_hint: Sequence[bool] | None = None, batch_size: int | None = None,
                      progress: bool | None = None):
        lm = self.lm
        n = len(rows)
        ivs = [self._row_ivs(r) for r in rows]
        lengths = [self.contexts[r.context].length for r in rows]
        starts = [row_start(v, length) for v, length in zip(ivs, lengths)]
        if isinstance(readout, Capture):
            # a captured site must be reached: start no higher than its layer (positions
            # before the first patched one are the context's own and come from its store)
            low = min(max(0, site_layer(s)) for s in readout.sites)
            starts = [(p, min(l, low)) for p, l in starts]
        hints = list(noop_hint or [False] * n)
        noop = self._noop_flags(rows, ivs, grad, hints)
        if self.skip_noops and not grad:
            noop = [a or b or (not isinstance(readout, Capture) and self._unread(v, length))
                    for a, b, v, length in zip(noop, hints, ivs, lengths)]
        for length in set(lengths):
            self._ensure(self.groups[length],
                         readout.sites if isinstance(readout, Capture) else ())
        size = self.batch_size if batch_size is None else batch_size
        batches, skipped = plan(starts, lengths, size, noop, self.prefix, self.layer_start,
                                lm.n_layers)
        results: list = [None] * n
        clean: dict[int, object] = {}  # one clean readout per context, shared by its no-op rows
        for i in skipped:
            c = rows[i].context
            if c not in clean:
                clean[c] = self.clean_readout(c, readout)
            results[i] = clean[c]
        self.stats[f"{kind}_noop"] += len(skipped)
        it = batches
        if (self.progress if progress is None else progress) and len(batches) > 1:
            from tqdm.auto import tqdm
            it = tqdm(batches, desc="interventions", unit="batch", leave=False)
        for batch in it:
            out = self._run_batch(batch, rows, ivs, readout, grad)
            for j, i in enumerate(batch.rows):
                results[i] = out[j] if not isinstance(out, dict) else {s: v[j] for s, v in
                                                                         out.items()}
            self.stats[f"{kind}_run"] += len(batch.rows)
        if isinstance(readout, Capture):
            return {s: torch.stack([r[s] for r in results]) if results else torch.empty(0)
                    for s in readout.sites}
        return torch.stack(results) if results else torch.empty(0)

    def _run_batch(self, batch: Batch, rows, ivs, readout, grad: bool):
        lm = self.lm
        group = self.groups[batch.length]
        p, layer = batch.start_pos, batch.start_layer
        ctxs = [rows[i].context for i in batch.rows]
        slots = torch.tensor([group.slot[c] for c in ctxs], device=lm.device)
        # rows join at their own block (stored residual stream, stored key/value prefix)
        entries = batch.entries if batch.entries and group.keys is not None else ()
        present = ([sum(e <= max(l, layer) for e in entries) for l in range(lm.n_layers)]
                   if entries else None)
        self.stats["joined"] += sum(e > layer for e in entries)
        per_row = []
        for k, (i, c) in enumerate(zip(batch.rows, ctxs)):
            own = entries[k] if entries else layer
            kept = [x for x in (_clip(iv, p, own) for iv in self.ctx_ivs[c]) if x is not None]
            per_row.append(kept + list(ivs[i]))
        merged = merge_interventions(per_row, offset=p)
        names = [f"row {i}" for i in batch.rows]
        inputs = {}
        if layer > 0:
            inputs["inputs_embeds"] = group.resid[layer][slots, p:]
        else:
            ids = torch.cat([self.contexts[c].input_ids for c in ctxs]).to(lm.device)
            inputs["input_ids"] = ids[:, p:]
        if p > 0:
            inputs["past_key_values"] = self._prefix(group, slots, p, present)
            inputs["use_cache"] = True
        else:
            inputs["use_cache"] = False
        store: dict[str, torch.Tensor] = {}
        capture = isinstance(readout, Capture)
        with ExitStack() as stack:
            if not grad:
                stack.enter_context(torch.no_grad())
            if entries:  # registered first: rows join before any hook of their block runs
                stack.enter_context(_join_hooks(lm, group, slots, p, entries, present))
            stack.enter_context(apply_hooks(lm, merged, self.check_finite, names))
            if capture:
                stack.enter_context(record_hooks(lm, readout.sites, store, detach=not grad,
                                                   stop_after=not grad))
            stack.enter_context(skip_blocks(lm, layer))
            try:
                out = lm.model(**inputs, logits_to_keep=_logits_to_keep(
                    batch.length - p, lm.device))
            except StopForward:
                out = None
        self.stats["forwards"] += 1
        if capture:
            result = {}
            for s in readout.sites:
                got = store[s]
                if p > 0:  # positions before p are the context's own
                    self._ensure(group, [s])
                    before = group.acts[s][slots, :p]
                    got = torch.cat([before.to(got.dtype), got], dim=1)
                result[s] = _positions(got, readout.positions)
            return result
        return _read(out.logits[:, -1], readout)


@contextmanager
def _join_hooks(lm, group: _Group, slots: torch.Tensor, start_pos: int,
                entries: Sequence[int], present: Sequence[int]):
    """Rows of a batch join the pass at their own block: before block ``entries[0]`` the pass
    keeps only the rows that start there; before each later block it appends the rows that
    start at it, with their stored residual stream entering that block. Every block until all
    rows are in gets the batch's per-row inputs (attention mask, position embeddings) cut to
    the rows present (``present[l]``, the first ones)."""
    blocks = lm.spec.blocks(lm.model)
    total = len(entries)
    joining = set(entries)

    def cut(x, n):
        if isinstance(x, torch.Tensor):
            return x[:n] if x.dim() >= 2 and x.shape[0] == total else x
        if isinstance(x, tuple):
            return tuple(cut(v, n) for v in x)
        if isinstance(x, list):
            return [cut(v, n) for v in x]
        if isinstance(x, dict):
            return {k: cut(v, n) for k, v in x.items()}
        return x

    handles = []

    def make(layer, first):
        n = present[layer]

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            have = hidden.shape[0]
            if first:
                hidden = hidden[:n]
            elif layer in joining:
                hidden = torch.cat(
                    [hidden, group.resid[layer][slots[have:n], start_pos:].to(hidden.dtype)])
            args = (hidden, *(cut(a, n) for a in args[1:])) if args else args
            kwargs = {k: (hidden if k == "hidden_states" and not args else cut(v, n))
                      for k, v in kwargs.items()}
            return args, kwargs
        return hook

    try:
        for layer in range(entries[0], entries[-1] + 1):
            handles.append(blocks[layer].register_forward_pre_hook(
                make(layer, layer == entries[0]), with_kwargs=True, prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _read(logits: torch.Tensor, readout) -> torch.Tensor:
    """A logits readout of last-position logits (rows, vocab): half precision widened to
    float32, then ``readout`` applied unless it is the default."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits if readout in (None, "logits") else readout(logits)


def _positions(x: torch.Tensor, positions):
    return x if positions is None else x[:, list(positions)]


def _clip_end(iv: Intervention, stop: int) -> Intervention | None:
    """A context intervention restricted to positions < stop (for a prefix run)."""
    return _restrict(iv, lambda p: p < stop)


def _iv_key(iv: Intervention) -> tuple:
    value = iv.value
    vkey = ("ref", value.context, value.site, value.positions,
            tuple(_iv_key(x) for x in value.interventions)) if isinstance(value, Ref) \
        else id(value)
    return (iv.site, iv.positions, iv.kind, iv.heads, vkey, id(iv.fn))


def _substitute(iv: Intervention, cache: dict, key) -> Intervention:
    """``iv`` with a resolved reference value cut to its positions (and heads)."""
    ref = iv.value
    if not isinstance(ref, Ref):
        return iv
    return replace(iv, value=_ref_slice(cache[key(ref)], ref, iv),
                   source=iv.source or f"ref:context {ref.context} {ref.site}")


def _ref_slice(full: torch.Tensor, ref: Ref, iv: Intervention) -> torch.Tensor:
    """The part of a referenced activation ``full`` (1, positions, ...) that ``iv`` writes:
    the reference's positions (by default the intervention's own) and, between head sites,
    the intervention's heads."""
    positions = ref.positions if ref.positions is not None else iv.positions
    value = full if positions is None else full[:, list(positions)]
    if iv.heads is not None and parse_site(ref.site)[0] in HEAD_SITES and \
            parse_site(iv.site)[0] in HEAD_SITES:
        value = value[:, :, list(iv.heads)]
    return value


# --- blocks above a layer, on a residual stream the caller gives ------------------------------

@dataclass
class StreamPrefix:
    """Keys and values of positions ``[0, length)`` in the blocks above ``layer``, one entry
    per prompt it was computed for (:func:`run_stream` with ``keep_prefix=True``); later
    positions of those prompts continue from it."""

    layer: int
    length: int
    keys: list[torch.Tensor]     # blocks layer+1..: (prompts, kv heads, length, head dim)
    values: list[torch.Tensor]

    def cache(self, lm, rows: torch.Tensor):
        """A fresh key/value cache for batch rows continuing prompts ``rows``. The blocks at
        or below ``layer`` are passed through and never read theirs: they get a zero-sized
        placeholder of the right length, so the model counts the positions correctly."""
        n_skip = self.layer + 1
        hold = torch.zeros(1, 1, self.length, 1, dtype=self.keys[0].dtype if self.keys
                           else lm.dtype, device=lm.device).expand(len(rows), -1, -1, -1)
        data = [(hold, hold)] * n_skip + [(k[rows], v[rows])
                                          for k, v in zip(self.keys, self.values)]
        return _kv_cache(lm, data)


def prefix_limit(lm) -> int | None:
    """The longest prefix whose keys and values a key/value cache keeps whole: sliding-window
    layers keep the last ``window - 1`` positions; None where no layer slides."""
    config = lm.model.config.get_text_config()
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or ()
    return window - 1 if window and any("sliding" in t for t in types) else None


def run_stream(lm, layer: int, h: torch.Tensor, prefix: StreamPrefix | None = None,
               rows: torch.Tensor | None = None, keep_prefix: bool = False):
    """Last-position output (float32) of blocks ``layer+1..`` and the head, run on ``h``
    ``(n, t, d)``: the residual stream after block ``layer`` at positions ``[s, s + t)``,
    where ``s`` is ``prefix.length`` (0 without a prefix). With a prefix, row i continues
    prompt ``rows[i]`` of it (default: row i continues prompt i). Differentiable in ``h``.

    ``keep_prefix=True`` also returns the :class:`StreamPrefix` of these positions (at most
    :func:`prefix_limit` of them: a cache that keeps every position). Used where
    many runs share their first positions (the pairwise-IIA graphs of
    :mod:`lib.das_arithmetic`): the shared part runs once. Exact where
    :func:`layer_start_exact` holds (callers check)."""
    from transformers import DynamicCache

    start = prefix.length if prefix is not None else 0
    limit = prefix_limit(lm)
    if keep_prefix and limit is not None and start + h.shape[1] > limit:   # before any work
        raise ValueError(f"a prefix of {start + h.shape[1]} positions is longer than the "
                         f"key/value cache keeps whole ({limit}: a sliding window); keep a "
                         "shorter one")
    inputs = {"inputs_embeds": h, "use_cache": prefix is not None or keep_prefix}
    if prefix is not None:
        if prefix.layer != layer:
            raise ValueError(f"prefix was computed above layer {prefix.layer}, not {layer}")
        rows = torch.arange(len(h)) if rows is None else rows
        inputs["past_key_values"] = prefix.cache(lm, rows.to(lm.device))
    elif keep_prefix:
        inputs["past_key_values"] = DynamicCache(config=lm.model.config)
    with skip_blocks(lm, layer + 1):
        out = lm.model(**inputs, logits_to_keep=_logits_to_keep(h.shape[1], h.device))
    logits = out.logits[:, -1].float()
    if not keep_prefix:
        return logits
    layers = out.past_key_values.layers[layer + 1:]
    if any(l.keys.shape[-2] != start + h.shape[1] for l in layers):   # a cache of another kind
        raise ValueError(f"the key/value cache kept {[l.keys.shape[-2] for l in layers]} "
                         f"positions, not all {start + h.shape[1]}; run without keep_prefix")
    return logits, StreamPrefix(layer, start + h.shape[1], [l.keys for l in layers],
                                [l.values for l in layers])


# --- the self-check for starting mid-stack ----------------------------------------------------

# keyed by the model object itself: an id() can be reused by another model once one is freed
_LAYER_START_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_start_exact(lm, engine: Engine | None = None) -> bool:
    """Whether running blocks ``L..`` from the stored residual stream entering block L gives
    the plain forward pass's logits (checked once per model on a short probe prompt)."""
    key = lm.model
    if key in _LAYER_START_OK:
        return _LAYER_START_OK[key]
    if lm.n_layers < 2:
        _LAYER_START_OK[key] = False
        return False
    probe_ids = torch.arange(5, dtype=torch.long)[None] + 10
    if engine is not None:
        probe_ids = engine.contexts[0].input_ids
    probe_ids = probe_ids.to(lm.device)
    # layer_start=False: the probe itself does not ask for this check
    probe = Engine(lm, [Context(probe_ids)], batch_size=1, skip_noops=False, layer_start=False)
    length = probe_ids.shape[1]
    group = probe.groups[length]
    probe._ensure(group)
    batch = Batch(length, length // 2, lm.n_layers // 2, (0,))
    got = probe._run_batch(batch, [Row(0)], [[]], None, grad=False)[0]
    clean = group.logits[0]
    err = float((got - clean).abs().max())
    scale = max(1.0, float(clean.abs().max()))
    ok = err <= (1e-4 if lm.dtype == torch.float32 else 5e-2) * scale
    if not ok:
        warnings.warn(f"{lm.name}: starting mid-stack from the stored residual stream is not "
                      f"exact for this architecture (logits differ by {err:.3g}); the engine "
                      "runs every block from the token ids instead", stacklevel=2)
    _LAYER_START_OK[key] = ok
    return ok


# --- one-call forms ---------------------------------------------------------------------------------

def run(lm, contexts: Sequence[Context], rows: Sequence[Row], readout=None, *,
        batch_size: int = 32, prefix: bool = True, layer_start: bool = True,
        skip_noops: bool = True, grad: bool = False, check_finite: bool = True,
        progress: bool = False):
    """Run ``rows`` on ``contexts`` with the batched engine; see :class:`Engine`."""
    engine = Engine(lm, contexts, batch_size=batch_size, prefix=prefix,
                    layer_start=layer_start, skip_noops=skip_noops, check_finite=check_finite,
                    progress=progress)
    return engine.run(rows, readout, grad=grad)


def run_naive(lm, contexts: Sequence[Context], rows: Sequence[Row], readout=None, *,
              grad: bool = False, check_finite: bool = True, reuse_references: bool = False):
    """The reference loop: for each row one full, unbatched forward pass of its context's
    input with the context's and the row's interventions; each reference is one more full
    forward pass (recursively). ``reuse_references=True`` runs each distinct reference once
    and reuses it (what a hand-written loop would do: the benchmarks' baseline). Same output
    format as :func:`run`."""
    contexts = list(contexts)
    memo: dict[tuple, torch.Tensor] = {}

    def forward(ctx: int, ivs: Sequence[Intervention], rd, with_grad: bool):
        c = contexts[ctx]
        resolved = [_naive_value(iv) for iv in ivs]
        all_ivs = [_full_positions(iv, c.length) for iv in list(c.interventions) + resolved]
        merged = merge_interventions([all_ivs])
        store: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            if not with_grad:
                stack.enter_context(torch.no_grad())
            stack.enter_context(apply_hooks(lm, merged, check_finite))
            if isinstance(rd, Capture):
                stack.enter_context(record_hooks(lm, rd.sites, store, detach=not with_grad))
            logits = lm.model(input_ids=c.input_ids.to(lm.device)).logits[:, -1]
        if isinstance(rd, Capture):
            return {s: _positions(store[s], rd.positions)[0] for s in rd.sites}
        return _read(logits, rd)[0]

    def _naive_value(iv: Intervention) -> Intervention:
        ref = iv.value
        if not isinstance(ref, Ref):
            return iv
        key = (ref.context, ref.site, tuple(_iv_key(x) for x in ref.interventions))
        full = memo.get(key) if reuse_references else None
        if full is None:
            full = forward(ref.context, ref.interventions, Capture((ref.site,)), False)[ref.site]
            if reuse_references:
                memo[key] = full
        return replace(iv, value=_ref_slice(full[None], ref, iv))

    if reuse_references:   # every plain reference of a context from one forward pass
        plain: dict[int, set] = defaultdict(set)
        for r in rows:
            for iv in r.interventions:
                if isinstance(iv.value, Ref) and not iv.value.interventions:
                    plain[iv.value.context].add(iv.value.site)
        for ctx, sites in plain.items():
            got = forward(ctx, (), Capture(tuple(sorted(sites))), False)
            memo.update({(ctx, site, ()): value for site, value in got.items()})
    results = [forward(r.context, r.interventions, readout, grad) for r in rows]
    if isinstance(readout, Capture):
        return {s: torch.stack([r[s] for r in results]) if results else torch.empty(0)
                for s in readout.sites}
    return torch.stack(results) if results else torch.empty(0)
