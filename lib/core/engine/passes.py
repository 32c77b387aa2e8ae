"""What a batched pass needs besides the applier: skipping the blocks below a row's first layer,
key/value caches filled from stored prefixes, rows joining a pass at their own block, readouts
and resolved references; see :mod:`lib.core.engine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch

from lib.core.engine.data import Ref
from lib.core.engine.planning import site_layer
from lib.core.interventions import Intervention
from lib.core.sites import HEAD_SITES, parse_site


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


def _logits_to_keep(n_positions: int, device):
    # An index tensor (not the int 1) makes transformers gather a contiguous slice; a strided
    # one makes the head's matmul several times slower on CPU.
    return torch.tensor([n_positions - 1], device=device)


def _full_positions(iv: Intervention, length: int) -> Intervention:
    return iv if iv.positions is not None else replace(iv, positions=tuple(range(length)))


def _restrict(iv: Intervention, keep_position) -> Intervention | None:
    """``iv`` at only the positions where ``keep_position(p)`` holds (its value sliced along
    the positions axis when it has one per position); None when no position is left."""
    positions = iv.positions
    assert positions is not None  # the engine gives every intervention its positions first
    keep = [j for j, p in enumerate(positions) if keep_position(p)]
    if not keep:
        return None
    if len(keep) == len(positions):
        return iv
    value = iv.value
    if value is not None:
        assert isinstance(value, torch.Tensor), "references are resolved before any pass"
        pos_dim = -3 if parse_site(iv.site)[0] in HEAD_SITES else -2
        if value.dim() >= -pos_dim and value.shape[pos_dim] == len(positions):
            value = value.index_select(value.dim() + pos_dim,
                                       torch.tensor(keep, device=value.device))
    return replace(iv, positions=tuple(positions[j] for j in keep), value=value)


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
