"""Sender -> receiver path patching (Wang et al. 2022, the IOI circuit), with an explicit freeze
policy, and the fast exact head -> logits path; see :mod:`lib.studies.path_patching`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lib.core.engine import Capture, Context, Engine, Ref, Row, run_naive
from lib.core.interventions import Intervention
from lib.core.hooks import n_kv_heads
from lib.studies.path_patching.nodes import FREEZE_POLICIES, Node, parse_node
from lib.core.sites import site_name


# --- 2. sender -> receiver path patching ------------------------------------------------------

def _receiver_site(node: Node, lm) -> tuple[str, tuple[int, ...] | None]:
    if node.kind == "logits":
        return site_name("resid_post", lm.n_layers - 1), None
    if node.kind == "a":
        return site_name("attn_norm_in", node.layer), None
    if node.kind == "f":
        return site_name("mlp_norm_in", node.layer), None
    if node.kind == "head" and node.qkv:
        assert node.head is not None  # parse_node sets a head node's head
        head = node.head if node.qkv == "q" else node.head // (lm.n_heads // n_kv_heads(lm))
        return site_name(f"{node.qkv}_in", node.layer), (head,)
    raise ValueError(f"receiver {node.name!r}: use logits, a<l>, f<l> (the sub-layer's input) "
                     "or a head's input a<l>.h<h>.q / .k / .v")


def _sender_groups(snodes: Sequence[Node], n_layers: int
                   ) -> tuple[dict[int, list[int]], set[int], set[int], int]:
    """Senders grouped: heads by layer, layers of whole attention and MLP sub-layers, and the
    lowest sender's layer (-1 for ``emb``); any other node is refused."""
    heads: dict[int, list[int]] = {}
    attn: set[int] = set()
    mlp: set[int] = set()
    low = n_layers
    for s in snodes:
        if s.kind == "head" and s.qkv is None:
            assert s.layer is not None and s.head is not None  # set by parse_node for heads
            heads.setdefault(s.layer, []).append(s.head)
        elif s.kind in ("a", "f"):
            assert s.layer is not None  # set by parse_node for a<l> and f<l>
            (attn if s.kind == "a" else mlp).add(s.layer)
        elif s.kind == "emb":
            low = -1
            continue
        else:
            raise ValueError(f"sender {s.name!r}: use emb, a<l>, f<l> or a head a<l>.h<h>")
        low = min(low, s.layer)
    return heads, attn, mlp, low


def path_patch_row(lm, senders: Sequence[str], receivers: Sequence[str] = ("logits",),
                   freeze: str = "attention", base: int = 0, source: int = 1,
                   positions: Sequence[int] | None = None) -> Row:
    """The engine row of one sender -> receiver path patch (Wang et al. 2022).

    Stage 1 (a reference, resolved by the engine): the base run with the senders' outputs from
    the source run and, at every layer from the lowest sender's up to below the receivers,
    every other attention head frozen at its base-run output (``freeze="attention"``), and
    every MLP too (``"all"``). Stage 2 (the row): the base run with each receiver's input
    replaced by its value in stage 1. For ``logits`` the row is stage 1 itself. ``positions``
    limits every patch and freeze to those positions (positions where base and source agree
    on every earlier token change nothing, so leaving them out is exact).
    """
    if freeze not in FREEZE_POLICIES:
        raise ValueError(f"unknown freeze policy {freeze!r}; use 'attention' (Wang et al. "
                         "2022: heads frozen, MLPs recompute) or 'all' (pyvene's IOI "
                         "tutorial: MLPs frozen too)")
    if not senders:
        raise ValueError("give at least one sender")
    pos = None if positions is None else tuple(positions)
    snodes = [parse_node(s, lm) for s in senders]
    rnodes = [parse_node(r, lm) for r in receivers]
    if any(r.kind == "logits" for r in rnodes) and len(rnodes) > 1:
        raise ValueError("logits as a receiver stands alone")
    heads_by_layer, whole_attn, whole_mlp, low = _sender_groups(snodes, lm.n_layers)
    stage1: list[Intervention] = []
    # ignore[arg-type]: a Ref value, resolved by the engine (Intervention.value says Tensor)
    for s in snodes:
        if s.kind in ("a", "f"):
            kind = "attn_out" if s.kind == "a" else "mlp_out"
            site = site_name(kind, s.layer)
            stage1.append(Intervention(site, positions=pos,
                                       value=Ref(source, site),
                                       source="sender"))
        elif s.kind == "emb":
            site = site_name("resid_pre", 0)
            stage1.append(Intervention(site, positions=pos,
                                       value=Ref(source, site),
                                       source="sender"))
    for layer, hs in heads_by_layer.items():
        site = site_name("head_out", layer)
        stage1.append(Intervention(site, positions=pos, heads=tuple(sorted(hs)),
                                   value=Ref(source, site),
                                   source="sender"))
    # receivers' layers: the receiver reads the residual stream entering its sub-layer
    top_attn = top_mlp = lm.n_layers - 1
    for r in rnodes:
        if r.kind == "logits":
            continue
        assert r.layer is not None  # every receiver but logits has a layer
        if r.kind == "f":
            top_attn, top_mlp = min(top_attn, r.layer), min(top_mlp, r.layer - 1)
        else:
            top_attn, top_mlp = min(top_attn, r.layer - 1), min(top_mlp, r.layer - 1)
        first = min([s.layer for s in snodes if s.layer is not None], default=-1)
        if (r.kind == "f" and r.layer < first) or (r.kind != "f" and r.layer <= first):
            raise ValueError(f"receiver {r.name!r} is not above every sender {list(senders)}")
    for layer in range(max(0, low), top_attn + 1):
        if layer in whole_attn:
            continue
        others = [h for h in range(lm.n_heads) if h not in heads_by_layer.get(layer, [])]
        if len(others) == lm.n_heads:
            site = site_name("attn_out", layer)
            stage1.append(Intervention(site, positions=pos,
                                       value=Ref(base, site),
                                       source="frozen"))
        elif others:
            site = site_name("head_out", layer)
            stage1.append(Intervention(site, positions=pos, heads=tuple(others),
                                       value=Ref(base, site),
                                       source="frozen"))
    if freeze == "all":
        for layer in range(max(0, low), top_mlp + 1):
            if layer not in whole_mlp:
                site = site_name("mlp_out", layer)
                stage1.append(Intervention(site, positions=pos,
                                           value=Ref(base, site),
                                           source="frozen"))
    if rnodes[0].kind == "logits":
        return Row(base, stage1)
    ivs: list[Intervention] = []
    for r in rnodes:
        site, heads = _receiver_site(r, lm)
        ref = Ref(base, site, None, tuple(stage1))
        ivs.append(Intervention(site, positions=pos, heads=heads,
                                value=ref,  # type: ignore[arg-type]
                                source="receiver"))
    return Row(base, ivs)


def path_patch(lm, base_ids, source_ids, specs: Sequence[dict], readout=None, *,
               engine: Engine | None = None, batch_size: int = 32, naive: bool = False,
               local: bool = True):
    """Readouts of many sender -> receiver path patches, batched: each spec is a dict of
    :func:`path_patch_row`'s arguments (``senders``, ``receivers``, ``freeze``, ``positions``).
    Context 0 is the base, 1 the source.

    When every spec sends heads or sub-layers to the logits at every position that can differ
    and the readout is the logits or a function of them, the rows are position-local (every attention output from the lowest
    sender up is fixed, so no position reads another) and ``local=True`` computes them by
    :func:`local_logits`: the last position's stream only, no attention; ``local=False`` runs
    the engine's rows. ``naive=True`` runs the engine's reference loop instead: one unbatched
    forward pass per path, each distinct reference (the base and source values it reads) once."""
    rows = [path_patch_row(lm, **spec) for spec in specs]
    contexts = [Context(base_ids, name="base"), Context(source_ids, name="source")]
    if naive:
        return run_naive(lm, contexts, rows, readout, reuse_references=True)
    engine = engine or Engine(lm, contexts, batch_size=batch_size)
    first = _first_difference(engine.contexts[0].input_ids, engine.contexts[1].input_ids)
    if local and not isinstance(readout, Capture) and specs and \
            all(_is_local(lm, s, first, engine.contexts[0].length) for s in specs):
        logits = local_logits(lm, engine, specs, batch_size=max(batch_size, 256))
        return logits if readout in (None, "logits") else readout(logits)
    return engine.run(rows, readout)


def _first_difference(base_ids: torch.Tensor, source_ids: torch.Tensor) -> int:
    """The first position where the two prompts' tokens differ (their length if none)."""
    b, s = base_ids.reshape(-1).cpu(), source_ids.reshape(-1).cpu()
    if b.shape != s.shape:
        return 0
    differ = (b != s).nonzero()
    return int(differ[0]) if len(differ) else len(b)


def _is_local(lm, spec: dict, first: int = 0, length: int | None = None) -> bool:
    """Whether ``spec`` is a sender -> logits patch at every position that can differ:
    ``positions`` None, or covering every position from ``first`` (where base and source
    first differ: nothing before it can change) to the end."""
    receivers = list(spec.get("receivers", ("logits",)))
    positions = spec.get("positions")
    if positions is not None and (length is None or
                                  not set(range(first, length)) <= set(positions)):
        return False
    nodes = [parse_node(s, lm) for s in spec["senders"]]
    return receivers == ["logits"] and all(
        n.kind in ("a", "f") or (n.kind == "head" and n.qkv is None) for n in nodes)


def local_logits(lm, engine: Engine, specs: Sequence[dict], batch_size: int = 256
                 ) -> torch.Tensor:
    """Last-position logits (n_specs, vocab) of sender -> logits path patches, exactly, from
    the last position alone.

    From the lowest sender's layer up, every attention output is fixed: the base run's, or at
    a sender's layer the base heads with the senders' heads from the source (a sender ``a{l}``:
    the source's whole output). Nothing then carries information between positions, so the
    last position's stream is its base value entering the lowest sender's block plus those
    attention outputs, with each MLP recomputed on it (``freeze="attention"``), frozen at the
    base (``"all"``) or from the source (a sender ``f{l}``); then the final norm and the
    unembedding. Cost: one clean capture of each run, then per row an MLP per layer on one
    token. Equal to the engine's rows within float error (``tests/test_path_patching.py``).

    Why this is not engine rows: it runs no forward pass at all (one position, attention
    replaced by stored outputs); the engine's rows are its reference."""
    spec_arch, model = lm.spec, lm.model
    blocks = spec_arch.blocks(model)
    n_layers = lm.n_layers
    last = engine.contexts[0].length - 1
    kinds = ("resid_pre", "head_out", "attn_add", "mlp_add")
    sites = [site_name(k, l) for l in range(n_layers) for k in kinds]
    readout = Capture(tuple(sites), positions=(last,))
    base, source = (engine.clean_readout(c, readout) for c in (0, 1))
    plans = []
    for spec in specs:
        freeze = spec.get("freeze", "attention")
        if freeze not in FREEZE_POLICIES:
            raise ValueError(f"unknown freeze policy {freeze!r}; use one of {FREEZE_POLICIES}")
        heads, attn, mlp, low = _sender_groups([parse_node(n, lm) for n in spec["senders"]],
                                               n_layers)
        plans.append((low, freeze, heads, attn, mlp))

    def post(norm_path, x, layer):
        return x if norm_path is None else blocks[layer].get_submodule(norm_path)(x)

    out = []
    with torch.no_grad():
        for start in range(0, len(plans), batch_size):
            chunk = plans[start:start + batch_size]
            low = min(p[0] for p in chunk)
            x = base[site_name("resid_pre", low)][0].expand(len(chunk), -1).clone()
            for layer in range(low, n_layers):
                block = blocks[layer]
                active = [i for i, p in enumerate(chunk) if p[0] <= layer]
                if layer > low:   # rows starting here: their base stream entering the block
                    for i, p in enumerate(chunk):
                        if p[0] == layer:
                            x[i] = base[site_name("resid_pre", layer)][0]
                add = base[site_name("attn_add", layer)][0].expand(len(chunk), -1).clone()
                for i in active:
                    _, _, heads, attn, _ = chunk[i]
                    if layer in attn:
                        add[i] = source[site_name("attn_add", layer)][0]
                    elif layer in heads:
                        z = base[site_name("head_out", layer)][0].clone()
                        hs = heads[layer]
                        z[hs] = source[site_name("head_out", layer)][0][hs]
                        o = block.get_submodule(spec_arch.o_proj)(z.reshape(1, -1))
                        add[i] = post(spec_arch.attn_post_norm, o, layer)[0]
                rows = torch.tensor(active, dtype=torch.long)
                x[rows] = x[rows] + add[rows]
                recompute = [i for i in active if chunk[i][1] == "attention"
                             and layer not in chunk[i][4]]
                frozen = [i for i in active if i not in recompute]
                new = x.clone()
                if recompute:
                    r = torch.tensor(recompute, dtype=torch.long)
                    h = block.get_submodule(spec_arch.mlp_norm)(x[r][:, None])
                    m = post(spec_arch.mlp_post_norm, block.get_submodule(spec_arch.mlp)(h),
                             layer)
                    new[r] = x[r] + m[:, 0]
                for i in frozen:
                    run = source if layer in chunk[i][4] else base
                    new[i] = x[i] + run[site_name("mlp_add", layer)][0]
                x = new
            h = model.get_submodule(spec_arch.final_norm_path)(x[:, None])
            logits = model.get_output_embeddings()(h)[:, 0]
            cap = getattr(model.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            out.append(logits.float())
    return torch.cat(out)
