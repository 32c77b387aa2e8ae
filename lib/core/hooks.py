"""Capture and patch activations at named sites, with hooks that live only inside ``with``.

This is the hook module every notebook builds on (activation patching as in Vig et al. 2020,
Geiger et al. 2021 "Causal Abstractions of Neural Networks", Meng et al. 2022 "Locating and
Editing Factual Associations in GPT"). Sites are named by :mod:`lib.core.sites`.

* :func:`capture` records activations (any sites, optionally only some positions).
* :func:`patch` applies :class:`~lib.core.interventions.Intervention` objects (the data,
  in :mod:`lib.core.interventions`): replace with a given activation, add,
  zero or any function, at chosen positions, heads and batch rows, so that many different
  interventions run in one batched forward pass (one row each).

Both remove their hooks when the block exits, errors included. An intervention that writes NaN
or infinite values raises :class:`NonFiniteError` naming the site and the batch rows (inside
``with allow_nonfinite():`` it does not). Positions are absolute token positions; when a run
continues from a cached prefix (see :mod:`lib.core.engine`), pass
``offset`` = prefix length so positions still mean the same tokens.

This module is the only code that writes or reads an activation: :func:`apply_ops` writes
(every :class:`Intervention` becomes an :class:`Op`; the engine merges many rows' interventions
into one op per group), :func:`apply_hooks` and :func:`record_hooks` place the hooks, and
:func:`patch` and :func:`capture` are those two with one op per intervention. The engine
decides which rows run, in which batches and from which stored state, and writes through them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lib.core.interventions import Intervention, InterventionError, Op
from lib.core.sites import KNOWN_LAYER_SITES, parse_site


class SiteError(ValueError):
    """A site name, layer, position, row or head that the model does not have."""


class NonFiniteError(FloatingPointError):
    """An intervention wrote NaN or infinite values into the activations."""


_ALLOW_NONFINITE = False


@contextmanager
def allow_nonfinite(allow: bool = True):
    """Inside this block, interventions may write NaN or infinite values (no check)."""
    global _ALLOW_NONFINITE
    before, _ALLOW_NONFINITE = _ALLOW_NONFINITE, allow
    try:
        yield
    finally:
        _ALLOW_NONFINITE = before


class ActivationCache(dict):
    """``{site name: tensor}`` filled by :func:`capture`."""

    def stack(self, sites: Sequence[str]) -> torch.Tensor:
        """Stack several sites along a new leading axis."""
        return torch.stack([self[s] for s in sites])


# --- resolving sites to hook points ---------------------------------------------------------

@dataclass(frozen=True)
class _HookPoint:
    module: torch.nn.Module
    when: str          # "pre" (module input), "post" (module output) or "head_in" (below)
    kind: str          # site kind
    layer: int | None
    # "head_in" (q_in / k_in / v_in): the attention's pre-norm, and which of q, k, v
    norm: torch.nn.Module | None = None
    part: int = 0


def _hook_point(lm, site: str) -> _HookPoint:
    kind, layer = parse_site(site)
    spec, model = lm.spec, lm.model
    if layer is None:
        return _HookPoint(model.get_submodule(spec.embed_path), "post", kind, None)
    if not 0 <= layer < lm.n_layers:
        raise SiteError(f"layer {layer} is out of range for {lm.name}: it has {lm.n_layers} "
                        f"layers, 0 to {lm.n_layers - 1} (site {site!r})")
    block = spec.blocks(model)[layer]
    if kind in ("q_in", "k_in", "v_in"):
        part = ("q_in", "k_in", "v_in").index(kind)
        proj = (spec.q_proj, spec.k_proj, spec.v_proj)[part]
        return _HookPoint(block.get_submodule(proj), "head_in", kind, layer,
                          norm=block.get_submodule(spec.attn_norm), part=part)
    table = {
        "resid_pre": (block, "pre"),
        "resid_post": (block, "post"),
        "attn_in": (block.get_submodule(spec.attn), "pre"),
        "attn_out": (block.get_submodule(spec.attn), "post"),
        "head_out": (block.get_submodule(spec.o_proj), "pre"),
        "mlp_in": (block.get_submodule(spec.mlp), "pre"),
        "mlp_out": (block.get_submodule(spec.mlp), "post"),
        "attn_norm_in": (block.get_submodule(spec.attn_norm), "pre"),
        "mlp_norm_in": (block.get_submodule(spec.mlp_norm), "pre"),
        "attn_add": (block.get_submodule(spec.attn_post_norm or spec.attn), "post"),
        "mlp_add": (block.get_submodule(spec.mlp_post_norm or spec.mlp), "post"),
    }
    assert set(table) | {"q_in", "k_in", "v_in"} == set(KNOWN_LAYER_SITES)
    module, when = table[kind]
    return _HookPoint(module, when, kind, layer)


def _get_input(args, kwargs) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("cannot find the hidden-state input of the hooked module")


def _set_input(args, kwargs, value):
    if args:
        return (value,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


def _get_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _set_output(output, value):
    return (value,) + tuple(output[1:]) if isinstance(output, tuple) else value


class _Hooks:
    """Registers one hook per hook point and removes all of them on close."""

    def __init__(self, lm) -> None:
        self.lm = lm
        self.handles: list[Any] = []

    def add(self, point: _HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]):
        """``fn(activation) -> new activation or None``, activation in site shape."""
        if point.when == "head_in":
            return self._add_head_input(point, fn)
        n_heads, d_head = self.lm.n_heads, self.lm.d_head
        is_heads = point.kind == "head_out"

        def to_site(x):
            return x.view(*x.shape[:-1], n_heads, d_head) if is_heads else x

        def from_site(x):
            return x.reshape(*x.shape[:-2], n_heads * d_head) if is_heads else x

        if point.when == "pre":
            def pre_hook(module, args, kwargs):
                new = fn(to_site(_get_input(args, kwargs)))
                return None if new is None else _set_input(args, kwargs, from_site(new))
            handle = point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:
            def post_hook(module, args, output):
                new = fn(to_site(_get_output(output)))
                return None if new is None else _set_output(output, from_site(new))
            handle = point.module.register_forward_hook(post_hook)
        self.handles.append(handle)

    def _add_head_input(self, point: _HookPoint, fn):
        """q_in / k_in / v_in: the attention's pre-norm input, one copy per (query or key/value)
        head, (batch, pos, heads, d_model). A forward hook on the norm keeps its input; a
        forward hook on the projection hands ``fn`` the per-head copies and, for the (row,
        head) pairs whose input ``fn`` changed, recomputes that head's slice of the projection
        from norm(new input). Unchanged heads keep the model's own output bit for bit."""
        assert point.norm is not None  # _hook_point gives every head_in point its norm
        lm, spec = self.lm, self.lm.spec
        d_head = lm.d_head
        n_slots = lm.n_heads if point.part == 0 else n_kv_heads(lm)
        offset = point.part * lm.n_heads * d_head if spec.fused_qkv else 0
        state: dict[str, torch.Tensor] = {}

        def norm_hook(module, args, kwargs, output):
            state["x"] = _get_input(args, kwargs)
            return None

        def proj_hook(module, args, output):
            x = state.pop("x", None)
            if x is None:
                raise RuntimeError(f"{point.kind} at layer {point.layer}: the attention's "
                                   "norm did not run before its projection")
            xh = x.unsqueeze(2).expand(*x.shape[:2], n_slots, x.shape[-1])
            new = fn(xh)
            if new is None:
                return None
            changed = (new != xh).flatten(3).any(-1).any(1)          # (batch, heads)
            if not bool(changed.any()):
                return None
            out = output.clone()
            for h in torch.nonzero(changed.any(0)).flatten().tolist():
                rows = torch.nonzero(changed[:, h]).flatten()
                normed = point.norm.forward(new[rows, :, h])   # no hooks: not a new input
                cols = slice(offset + h * d_head, offset + (h + 1) * d_head)
                if spec.fused_qkv:   # GPT-2 Conv1D: x @ W + b, W (d_in, d_out)
                    part = normed @ module.weight[:, cols] + module.bias[cols]
                else:
                    bias = None if module.bias is None else module.bias[cols]
                    part = torch.nn.functional.linear(normed, module.weight[cols], bias)
                out[rows, :, cols] = part.to(out.dtype)
            return out
        self.handles.append(point.norm.register_forward_hook(norm_hook, with_kwargs=True))
        self.handles.append(point.module.register_forward_hook(proj_hook))

    def close(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def n_kv_heads(lm) -> int:
    """Key/value heads (fewer than query heads under grouped-query attention)."""
    cfg = lm.model.config
    cfg = getattr(cfg, "text_config", cfg)
    return int(getattr(cfg, "num_key_value_heads", None) or lm.n_heads)


def _position_index(relative, seq_len: int, offset: int, site: str, device
                    ) -> torch.Tensor | None:
    """Positions ``relative`` to a run that starts at ``offset`` as an index tensor (None: all),
    checked against the run's length; errors name the absolute positions."""
    if relative is None:
        return None
    bad = [i + offset for i in relative if not 0 <= i < seq_len]
    if bad:
        raise SiteError(f"positions {bad} are outside this run at {site!r}: it covers positions "
                        f"{offset} to {offset + seq_len - 1}")
    return torch.tensor(relative, dtype=torch.long, device=device)


def op_index(x: torch.Tensor, op: Op, site: str) -> tuple[tuple, tuple]:
    """``(index, shape)``: the advanced index of ``op``'s slice of activation ``x`` and the
    slice's shape (rows, positions, features) or (rows, positions, heads, d_head); rows,
    positions and heads are checked against ``x``."""
    n, seq = x.shape[:2]
    if op.rows is None:
        rows = torch.arange(n, device=x.device)
    else:
        if op.rows and (min(op.rows) < 0 or max(op.rows) >= n):
            raise SiteError(f"rows {list(op.rows)} are outside the batch of {n} at {site!r}")
        rows = torch.tensor(op.rows, dtype=torch.long, device=x.device)
    pos = _position_index(op.positions, seq, op.offset, site, x.device)
    pos = torch.arange(seq, device=x.device) if pos is None else pos
    if op.heads is None:
        return (rows[:, None], pos[None, :]), (len(rows), len(pos), *x.shape[2:])
    heads = torch.tensor(op.heads, dtype=torch.long, device=x.device)
    if heads.min() < 0 or heads.max() >= x.shape[2]:
        raise SiteError(f"heads {list(op.heads)} out of range (0 to {x.shape[2] - 1}) at {site!r}")
    return ((rows[:, None, None], pos[None, :, None], heads[None, None, :]),
            (len(rows), len(pos), len(heads), *x.shape[3:]))


def _slice_axes(shape) -> str:
    return "(rows, positions, heads, d_head)" if len(shape) == 4 else "(rows, positions, features)"


def _op_values(op: Op, shape, x: torch.Tensor, site: str) -> torch.Tensor:
    """The values of a replace / add op as one tensor of the slice's ``shape``."""
    one = len(op.values) == 1
    target = tuple(shape) if one else (1, *shape[1:])
    parts = []
    for v, src in zip(op.values, op.sources or [""] * len(op.values)):
        if not isinstance(v, torch.Tensor):
            raise InterventionError(f"the {op.kind!r} value at {site!r} must be a torch.Tensor, "
                                    f"got {type(v).__name__}")
        try:
            parts.append(torch.broadcast_to(v.to(device=x.device, dtype=x.dtype), target))
        except RuntimeError:
            raise InterventionError(
                f"the {op.kind!r} value at {site!r}{f' (source {src!r})' if src else ''} has "
                f"shape {tuple(v.shape)}, which does not fit the patched slice "
                f"{_slice_axes(shape)} = {target}; give a value of that shape (or one that "
                "broadcasts, e.g. size 1 on the row axis)") from None
    return parts[0] if one else torch.cat(parts)


def apply_ops(x: torch.Tensor, ops: Sequence[Op], site: str, check: bool = True,
              row_names: Sequence[str] | None = None) -> torch.Tensor:
    """A copy of activation ``x`` (site shape) with ``ops`` applied in order: the one place
    where an activation is written. Differentiable (gradients reach ``x``, the values and
    ``fn``'s parameters). ``check``: what is written must be finite (:func:`check_finite`),
    errors naming ``row_names[row]`` (default: the batch rows)."""
    x = x.clone()
    for op in ops:
        index, shape = op_index(x, op, site)
        if op.kind == "zero":
            x[index] = 0
            continue
        if op.kind == "function":
            assert op.fn is not None  # a function op always carries fn (Intervention checks)
            new = op.fn(x[index])
            name = getattr(op.fn, "__name__", repr(op.fn))
            if not isinstance(new, torch.Tensor) or new.shape != torch.Size(shape):
                got = type(new).__name__ if not isinstance(new, torch.Tensor) else \
                    f"shape {tuple(new.shape)}"
                raise InterventionError(
                    f"intervention fn {name} returned {got} at {site!r}; it must return the "
                    f"new activation, a tensor of the slice's shape {tuple(shape)} "
                    f"{_slice_axes(shape)}")
        else:
            new = _op_values(op, shape, x, site)
            if op.kind == "add":
                new = x[index] + new
        if check:
            rows = index[0].flatten().tolist()
            names = [row_names[r] for r in rows] if row_names else rows
            sources = sorted({s for s in op.sources if s})
            check_finite(new, site, names, label=f"a {op.kind!r} intervention"
                         + (f" (source {', '.join(map(repr, sources))})" if sources else ""))
        x[index] = new.to(x.dtype)
    return x


@contextmanager
def apply_hooks(lm, stages: dict[str, list[list[Op]]], check: bool = True,
                row_names: Sequence[str] | None = None):
    """Inside the block, every forward pass applies ``stages[site]`` (a list of stages, each a
    list of :class:`Op`, applied one stage after the other) at each site."""
    hooks = _Hooks(lm)
    try:
        for site, site_stages in stages.items():
            def fn(x, site_stages=site_stages, site=site):
                for ops in site_stages:
                    x = apply_ops(x, ops, site, check, row_names)
                return x
            hooks.add(_hook_point(lm, site), fn)
        yield
    finally:
        hooks.close()


class StopForward(Exception):
    """Raised by :func:`record_hooks` once every site was recorded (``stop_after``): the rest
    of the forward pass is not needed. The caller catches it around the forward call."""


@contextmanager
def record_hooks(lm, sites: Sequence[str], store: dict, positions: Sequence[int] | None = None,
                 offset: int = 0, detach: bool = True, clone: bool = False,
                 stop_after: bool = False):
    """Inside the block, every forward pass records ``sites`` into ``store`` (after any
    interventions there), at ``positions`` (absolute, from ``offset``; None: all). With
    ``detach=False`` the recorded tensor keeps its autograd graph and, when all positions are
    recorded, is the one the rest of the pass uses (so gradients reach it). ``stop_after``:
    raise :class:`StopForward` once the last site is recorded."""
    relative = None if positions is None else [p - offset for p in positions]
    hooks = _Hooks(lm)
    remaining = set(sites)
    try:
        for site in dict.fromkeys(sites):
            def fn(x, site=site):
                idx = _position_index(relative, x.shape[1], offset, site, x.device)
                val = x if idx is None else x[:, idx]
                store[site] = (val.detach().clone() if clone else val.detach()) if detach else val
                remaining.discard(site)
                if stop_after and not remaining:
                    raise StopForward
                return val if (not detach and idx is None) else None
            hooks.add(_hook_point(lm, site), fn)
        yield
    finally:
        hooks.close()


def check_finite(values: torch.Tensor, site: str, rows: Sequence[int] | None = None,
                 label: str = "intervention") -> None:
    """Raise :class:`NonFiniteError` when ``values`` (rows first) hold NaN or an infinite value,
    naming ``site`` and the batch rows (``rows[i]`` is the batch row of ``values[i]``); a no-op
    inside :func:`allow_nonfinite`. Any code that writes activations (the engine's merged
    multi-row operations included) calls this on what it writes."""
    if _ALLOW_NONFINITE:
        return
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
    batch_rows = [rows[i] for i in bad] if rows is not None and len(rows) == len(values) else bad
    shown = batch_rows[:10] + (["..."] if len(batch_rows) > 10 else [])
    n_nan = int(torch.isnan(values).sum())
    raise NonFiniteError(
        f"{label} at {site!r} wrote non-finite values ({n_nan} NaN, "
        f"{int((~finite).sum()) - n_nan} infinite) into batch rows {shown}; check the value or "
        "fn that feeds it, or wrap the run in lib.core.hooks.allow_nonfinite() to keep them")


# --- public context managers ----------------------------------------------------------------

@contextmanager
def capture(lm, sites: Iterable[str], positions: Sequence[int] | None = None, offset: int = 0,
            detach: bool = True):
    """Record the activations at ``sites`` during the forward passes run inside the block.

    Yields an :class:`ActivationCache`; after a forward pass ``cache[site]`` has shape
    (batch, len(positions) or pos, d_model), or (..., n_heads, d_head) for ``head_out``. A
    second forward pass inside the same block overwrites the entries. ``detach=False`` keeps
    the autograd graph (for attribution patching).
    """
    cache = ActivationCache()
    with record_hooks(lm, list(sites), cache, positions, offset, detach=detach, clone=True):
        yield cache


@contextmanager
def patch(lm, interventions: Iterable[Intervention], offset: int = 0):
    """Apply ``interventions`` to every forward pass run inside the block.

    Interventions at the same site are applied in the given order. Use ``rows`` to give each
    batch row its own intervention (a batched sweep). Hooks are removed on exit, errors included.
    """
    stages: dict[str, list[list[Op]]] = {}
    for iv in interventions:
        stages.setdefault(iv.site, []).append([iv.to_op(offset)])
    with apply_hooks(lm, stages):
        yield


def count_hooks(model: torch.nn.Module) -> int:
    """Number of forward (pre-)hooks on any submodule; 0 outside every ``with`` block."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def run_with_cache(lm, input_ids: torch.Tensor, sites: Iterable[str],
                   positions: Sequence[int] | None = None):
    """One forward pass; returns (logits float32 (batch, pos, vocab), ActivationCache)."""
    with capture(lm, sites, positions) as cache:
        logits = lm.model(input_ids=input_ids).logits.float()
    return logits, cache
