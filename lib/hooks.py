"""Capture and patch activations at named sites, with hooks that live only inside ``with``.

This is the hook module every notebook builds on (activation patching as in Vig et al. 2020,
Geiger et al. 2021 "Causal Abstractions of Neural Networks", Meng et al. 2022 "Locating and
Editing Factual Associations in GPT"). Sites are named by :mod:`lib.sites`.

* :func:`capture` records activations (any sites, optionally only some positions).
* :func:`patch` applies :class:`Intervention` objects: replace with a given activation, add,
  zero or any function, at chosen positions, heads and batch rows, so that many different
  interventions run in one batched forward pass (one row each).

Both remove their hooks when the block exits, errors included. An intervention that writes NaN
or infinite values raises :class:`NonFiniteError` naming the site and the batch rows (inside
``with allow_nonfinite():`` it does not). Positions are absolute token positions; when a run
continues from a cached prefix (see :mod:`lib.engine`), pass
``offset`` = prefix length so positions still mean the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lib.sites import HEAD_SITES, KNOWN_LAYER_SITES, parse_site

KINDS = ("replace", "add", "zero", "function")


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


@dataclass
class Intervention:
    """One intervention as data: *where* (site, positions, rows, heads) and *what* (kind, value).

    ``value`` (the tensor to write or add) and ``fn`` are not serialised; ``source`` is a short
    free-text label saying where ``value`` came from (e.g. ``"run:source prompt 3"``), kept
    in JSON next to the results. ``value`` broadcasts against the selected slice, whose shape is
    (rows, positions, d_model), or (rows, positions, heads, d_head) for ``head_out``.
    """

    site: str
    positions: tuple[int, ...] | None = None  # absolute token positions; None = all
    kind: str = "replace"                     # replace | add | zero | function
    rows: tuple[int, ...] | None = None       # batch rows it applies to; None = all rows
    heads: tuple[int, ...] | None = None      # head_out, q_in, k_in, v_in; None = all heads
    source: str = ""
    value: torch.Tensor | None = field(default=None, repr=False, compare=False)
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

    @classmethod
    def from_dict(cls, data: dict, value: torch.Tensor | None = None,
                  fn: Callable | None = None) -> "Intervention":
        data = {k: v for k, v in data.items() if k != "fn"}
        return cls(**data, value=value, fn=fn)


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

    def __init__(self, lm):
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


def _positions_index(positions, seq_len: int, offset: int, site: str) -> torch.Tensor | None:
    if positions is None:
        return None
    idx = torch.tensor(positions, dtype=torch.long) - offset
    bad = [p for p, i in zip(positions, idx.tolist()) if not 0 <= i < seq_len]
    if bad:
        raise SiteError(f"positions {bad} are outside this run at {site!r}: it covers positions "
                        f"{offset} to {offset + seq_len - 1}")
    return idx


def _select_index(x: torch.Tensor, iv: Intervention, offset: int):
    batch, seq_len = x.shape[:2]
    rows = torch.arange(batch) if iv.rows is None else torch.tensor(iv.rows, dtype=torch.long)
    if iv.rows is not None and (rows.min() < 0 or rows.max() >= batch):
        raise SiteError(f"rows {list(iv.rows)} are outside the batch of {batch} at {iv.site!r}")
    pos = _positions_index(iv.positions, seq_len, offset, iv.site)
    pos = torch.arange(seq_len) if pos is None else pos
    index = (rows[:, None], pos[None, :])
    if iv.heads is not None:
        n_heads = x.shape[2]
        heads = torch.tensor(iv.heads, dtype=torch.long)
        if heads.min() < 0 or heads.max() >= n_heads:
            raise SiteError(f"heads {list(iv.heads)} out of range (0 to {n_heads - 1})")
        index = (rows[:, None, None], pos[None, :, None], heads[None, None, :])
    return tuple(i.to(x.device) for i in index)


def apply_intervention(x: torch.Tensor, iv: Intervention, offset: int = 0) -> torch.Tensor:
    """Return a copy of activation ``x`` (site shape) with ``iv`` applied. Differentiable."""
    index = _select_index(x, iv, offset)
    selected = x[index]
    what = "(rows, positions, heads, d_head)" if selected.dim() == 4 else "(rows, positions, d)"
    if iv.kind in ("replace", "add"):
        if not isinstance(iv.value, torch.Tensor):
            raise TypeError(f"the {iv.kind!r} value at {iv.site!r} must be a torch.Tensor, got "
                            f"{type(iv.value).__name__}")
        try:
            fits = torch.broadcast_shapes(tuple(iv.value.shape), tuple(selected.shape)) == \
                tuple(selected.shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"the {iv.kind!r} value at {iv.site!r} has shape "
                             f"{tuple(iv.value.shape)}, which does not broadcast to the selected "
                             f"slice {what} = {tuple(selected.shape)}; give a value of that "
                             "shape (or one that broadcasts, e.g. size 1 on the row axis)")
    if iv.kind == "replace":
        new = iv.value.to(device=x.device, dtype=x.dtype).expand_as(selected)
    elif iv.kind == "add":
        new = selected + iv.value.to(device=x.device, dtype=x.dtype)
    elif iv.kind == "zero":
        new = torch.zeros_like(selected)
    else:
        new = iv.fn(selected)
        name = getattr(iv.fn, "__name__", repr(iv.fn))
        if not isinstance(new, torch.Tensor):
            raise TypeError(f"intervention fn {name} returned {type(new).__name__} at "
                            f"{iv.site!r}, not a tensor; it must return the new activation, a "
                            f"tensor of shape {tuple(selected.shape)} {what}")
        if new.shape != selected.shape:
            raise ValueError(f"intervention fn {name} returned shape {tuple(new.shape)}, expected "
                             f"{tuple(selected.shape)} {what} at {iv.site!r}")
    if iv.kind != "zero":
        check_finite(new, iv.site, index[0].flatten().tolist(),
                     f"intervention {iv.kind!r} (source {iv.source or 'unnamed'!r})")
    out = x.clone()
    out[index] = new
    return out


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
        "fn that feeds it, or wrap the run in lib.hooks.allow_nonfinite() to keep them")


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
    sites = list(dict.fromkeys(sites))
    cache = ActivationCache()
    hooks = _Hooks(lm)
    try:
        for site in sites:
            point = _hook_point(lm, site)

            def record(x, site=site):
                idx = _positions_index(positions, x.shape[1], offset, site)
                val = x if idx is None else x[:, idx.to(x.device)]
                if detach:
                    cache[site] = val.detach().clone()
                    return None
                cache[site] = val
                # Feed the recorded tensor back in, so that it is the one the rest of the
                # forward pass uses and gradients reach it (head_out records a reshaped view).
                return val if idx is None else None
            hooks.add(point, record)
        yield cache
    finally:
        hooks.close()


@contextmanager
def patch(lm, interventions: Iterable[Intervention], offset: int = 0):
    """Apply ``interventions`` to every forward pass run inside the block.

    Interventions at the same site are applied in the given order. Use ``rows`` to give each
    batch row its own intervention (a batched sweep). Hooks are removed on exit, errors included.
    """
    interventions = list(interventions)
    by_site: dict[str, list[Intervention]] = {}
    for iv in interventions:
        by_site.setdefault(iv.site, []).append(iv)
    hooks = _Hooks(lm)
    try:
        for site, ivs in by_site.items():
            point = _hook_point(lm, site)

            def apply_all(x, ivs=ivs):
                for iv in ivs:
                    x = apply_intervention(x, iv, offset)
                return x
            hooks.add(point, apply_all)
        yield
    finally:
        hooks.close()


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
