"""The :class:`Engine`: runs each context once, stores what its rows need (prefix key/values,
residual streams, referenced activations), and runs the rows in planned batches through
:mod:`lib.core.hooks`; the self-check for starting mid-stack; the one-call form :func:`run`
(the reference loop is :func:`lib.core.engine.naive.run_naive`); see :mod:`lib.core.engine`.
"""

from __future__ import annotations

import warnings
import weakref
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack

import torch

from lib.core.engine.data import Capture, Context, Ref, Row
from lib.core.engine.passes import (
    _AFTER_ATTENTION,
    _clip,
    _clip_end,
    _full_positions,
    _Group,
    _iv_key,
    _join_hooks,
    _kv_cache,
    _logits_to_keep,
    _positions,
    _read,
    _substitute,
    skip_blocks,
)
from lib.core.engine.planning import Batch, merge_interventions, plan, row_start, site_layer
from lib.core.interventions import Intervention
from lib.core.hooks import StopForward, apply_hooks, apply_ops, record_hooks
from lib.core.sites import parse_site, site_name


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
                raise TypeError(f"contexts must be lib.core.engine.Context, got {type(c).__name__}")
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
        keys, values = group.keys, group.values
        if keys is not None:
            assert values is not None  # _ensure sets keys and values together
            counts = present or [len(slots)] * len(keys)
            if bool((slots == slots[0]).all()):   # one context: a view, nothing copied
                one = int(slots[0])
                data = [(k[one:one + 1, :, :start].expand(n, -1, -1, -1),
                         v[one:one + 1, :, :start].expand(n, -1, -1, -1))
                        for k, v, n in zip(keys, values, counts)]
            else:
                data = [(k[slots[:n], :, :start], v[slots[:n], :, :start])
                        for k, v, n in zip(keys, values, counts)]
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
        assert group.logits is not None  # set by _ensure
        logits = group.logits[slot:slot + 1]
        return (logits if readout in (None, "logits") else readout(logits))[0]

    # -- references ----------------------------------------------------------------------------

    def _resolve(self, rows: Sequence[Row], grad: bool) -> list[Row]:
        """Rows with every :class:`Ref` value replaced by its tensor, in stages."""
        cache: dict[tuple, torch.Tensor] = {}

        def key(ref: Ref) -> tuple:
            return (ref.context, ref.site, tuple(_iv_key(iv) for iv in ref.interventions))

        def refs_in(ivs) -> list[Ref]:
            found: list[Ref] = []
            for iv in ivs:
                if isinstance(iv.value, Ref):
                    found.append(iv.value)
                    found.extend(refs_in(iv.value.interventions))
            return found

        pending: dict[tuple, Ref] = {}
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
                raise TypeError(f"rows must be lib.core.engine.Row, got {type(r).__name__}")
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

    def shared_prefix(self, a: int, b: int) -> int:
        """How many leading tokens contexts ``a`` and ``b`` share: by causal attention their
        clean activations agree at those positions (batched runs may differ in the last bits
        there, so callers that compare the two set them equal). The one place prefix sharing
        between contexts is detected."""
        ids_a, ids_b = self.contexts[a].input_ids[0], self.contexts[b].input_ids[0]
        n = min(len(ids_a), len(ids_b))
        differs = (ids_a[:n] != ids_b[:n]).nonzero()
        return int(differs[0]) if len(differs) else n

    def _reads_an_identical_prefix(self, row: Row) -> bool:
        """Whether every intervention of ``row`` replaces a site with the same site of another
        plain context whose tokens agree with the row's up to the patched positions: by causal
        attention the values are the same, so the row changes nothing (even where two batched
        runs differ in the last bits)."""
        if not row.interventions:
            return False
        for iv in row.interventions:
            ref = iv.value
            if iv.kind != "replace" or not isinstance(ref, Ref) or ref.interventions \
                    or ref.site != iv.site or iv.positions is None \
                    or ref.positions not in (None, iv.positions):
                return False
            if not 0 <= ref.context < len(self.contexts):
                return False  # resolution names the bad context
            if self.ctx_ivs[row.context] or self.ctx_ivs[ref.context]:
                return False
            if self.shared_prefix(row.context, ref.context) <= max(iv.positions):
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
            current: dict[str, torch.Tensor] = {}
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
        inputs: dict[str, object] = {}  # keyword arguments of the model call
        if layer > 0:
            assert group.resid is not None  # set by _ensure
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
                assert present is not None  # computed above whenever entries is non-empty
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
    assert group.logits is not None  # set by probe._ensure
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
