"""Edge patching (ACDC, Conmy et al. 2023; auto-circuit's one-pass masks): many edge sets patched
exactly, one per row; and edge attribution patching (Syed et al. 2023); see
:mod:`lib.studies.path_patching`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lib.core.engine import Capture, Context, Engine, Row, run_naive
from lib.core.interventions import Intervention
from lib.studies.path_patching.nodes import Node, parse_node
from lib.studies.path_patching.paths import _receiver_site
from lib.core.sites import site_name


# --- 3. edge patching -----------------------------------------------------------------------------

def _sender_site(node: Node, lm) -> str:
    if node.kind == "emb":
        return site_name("resid_pre", 0)
    if node.kind == "a":
        return site_name("attn_add", node.layer)
    if node.kind == "f":
        return site_name("mlp_add", node.layer)
    if node.kind == "head" and node.qkv is None:
        if lm.spec.attn_post_norm is not None:
            raise ValueError(f"sender {node.name!r}: on {lm.spec.family} a norm after the "
                             "attention output mixes the heads, so one head's contribution to "
                             "the residual stream is not additive; use the layer a<l> as the "
                             "sender (or sender -> receiver path patching)")
        return site_name("head_out", node.layer)
    raise ValueError(f"sender {node.name!r}: use emb, a<l>, f<l> or a head a<l>.h<h>")


def _order(node: Node) -> float:
    """Position of a node in the forward order (senders' outputs, receivers' inputs)."""
    if node.kind == "emb":
        return -1
    if node.kind == "logits":
        return 10 ** 9
    assert node.layer is not None  # every node but emb and logits has a layer
    return node.layer + (0.5 if node.kind == "f" else 0.0)


def _head_weight(lm, layer: int, head: int) -> torch.Tensor:
    """(d_head, d_model): head ``head``'s rows of the output projection, z_h @ W."""
    mod = lm.spec.blocks(lm.model)[layer].get_submodule(lm.spec.o_proj)
    dh = lm.d_head
    cols = slice(head * dh, (head + 1) * dh)
    return mod.weight[cols, :] if lm.spec.fused_qkv else mod.weight[:, cols].T


def check_edge(lm, sender: str, receiver: str) -> tuple[Node, Node]:
    s, r = parse_node(sender, lm), parse_node(receiver, lm)
    _sender_site(s, lm)
    _receiver_site(r, lm)
    if _order(s) >= _order(r):
        raise ValueError(f"edge {sender} -> {receiver}: the receiver must read the residual "
                         "stream after the sender writes it")
    return s, r


class _EdgeRow:
    """The function interventions of one edge set: recorders at its senders' output sites
    (this pass's ``current`` value) and adders at its receivers' input sites."""

    def __init__(self, lm, edges, source_out: dict):
        self.lm = lm
        self.live: dict[str, torch.Tensor] = {}
        self.by_receiver: dict[str, list] = {}
        seen = set()
        for sender, receiver in edges:
            s, r = check_edge(lm, sender, receiver)
            site, heads = _receiver_site(r, lm)
            # under grouped-query attention a0.h1 -> a1.h0.k and -> a1.h1.k are one edge
            if (s, site, heads) not in seen:
                seen.add((s, site, heads))
                self.by_receiver.setdefault(site, []).append((s, r))
        self.source_out = source_out

    def _delta(self, s: Node) -> torch.Tensor:
        site = _sender_site(s, self.lm)
        cur, src = self.live[site], self.source_out[site].to(self.live[site].dtype)
        if s.kind == "head":
            assert s.layer is not None and s.head is not None  # set by parse_node for heads
            w = _head_weight(self.lm, s.layer, s.head).to(cur.dtype)
            return (src[:, :, s.head] - cur[:, :, s.head]) @ w
        return src - cur

    def recorder(self, site):
        def record(x):
            self.live[site] = x
            return x
        return record

    def adder(self, site):
        def add(x):
            x = x.clone()
            for s, r in self.by_receiver[site]:
                delta = self._delta(s)
                if r.kind == "head":
                    h = _receiver_site(r, self.lm)[1][0]
                    x[:, :, h] = x[:, :, h] + delta
                else:
                    x = x + delta
            return x
        return add

    def interventions(self) -> list[Intervention]:
        senders = {}
        for pairs in self.by_receiver.values():
            for s, _ in pairs:
                senders[_sender_site(s, self.lm)] = True
        ivs = [Intervention(site, kind="function", fn=self.recorder(site), source="edge sender")
               for site in senders]
        ivs += [Intervention(site, kind="function", fn=self.adder(site), source="edge receiver")
                for site in self.by_receiver]
        return ivs


def edge_sender_sites(lm, edge_sets) -> list[str]:
    sites = {}
    for edges in edge_sets:
        for sender, receiver in edges:
            s, _ = check_edge(lm, sender, receiver)
            sites[_sender_site(s, lm)] = True
    return list(sites)


def edge_rows(lm, edge_sets, source_out: dict, base: int = 0) -> list[Row]:
    return [Row(base, _EdgeRow(lm, edges, source_out).interventions()) for edges in edge_sets]


def edge_patch(lm, base_ids, source_ids, edge_sets, readout=None, *,
               engine: Engine | None = None, batch_size: int = 32, naive: bool = False):
    """Readouts of the base run with each edge set patched (one row per set, batched): every
    edge ``(sender, receiver)`` carries the sender's source-run output instead of its output in
    this pass. The source run's sender outputs are read once."""
    contexts = [Context(base_ids, name="base"), Context(source_ids, name="source")]
    engine = engine or Engine(lm, contexts, batch_size=batch_size)
    edge_sets = [list(e) for e in edge_sets]
    sites = edge_sender_sites(lm, edge_sets)
    source_out = {}
    if sites:
        got = engine.clean_readout(1, Capture(tuple(sites)))
        source_out = {s: v[None] for s, v in got.items()}
    rows = edge_rows(lm, edge_sets, source_out)
    if naive:
        return run_naive(lm, contexts, rows, readout)
    return engine.run(rows, readout)


def node_edges(lm, layers: Sequence[int] | None = None) -> list[tuple[str, str]]:
    """Every edge between whole nodes (emb, a<l>, f<l> -> a<l>, f<l>, logits) of ``layers``."""
    layers = list(range(lm.n_layers)) if layers is None else list(layers)
    senders = ["emb"] + [f"{k}{l}" for l in layers for k in "af"]
    receivers = [f"{k}{l}" for l in layers for k in "af"] + ["logits"]
    return [(s, r) for s in senders for r in receivers
            if _order(parse_node(s)) < _order(parse_node(r))]


# --- edge attribution patching ---------------------------------------------------------------------

def eap(lm, base_ids, source_ids, edges, metric: Callable[[torch.Tensor], torch.Tensor],
        ig_steps: int = 0, *, engine: Engine | None = None):
    """Edge attribution patching (Syed et al. 2023): for each edge ``(s, r)`` the estimate
    ``(source_out(s) - base_out(s)) . d metric / d input(r)`` at the base run, from one forward
    and one backward pass on the base (plus the source's stored run). Returns ``(scores,
    clean)``; receivers are whole nodes or logits (a head's q/k/v inputs have no gradient
    site here).

    ``ig_steps = m > 0``: EAP-IG (Hanna et al. 2024, "Have Faith in Faithfulness"), the
    gradient averaged over ``m`` runs whose embeddings (the residual stream entering block 0)
    are ``source + (k/m) (base - source)``, k = 1..m, the other inputs those of the base, as in
    the paper's default (interpolation at the embeddings, not at each sender); m = 1 is EAP.
    The m runs are rows of one batched forward and backward pass. ``engine``: one already
    holding the base (context 0) and source (context 1) runs, so their clean runs are shared
    with other studies of the same pair."""
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 0:
        raise ValueError(f"ig_steps must be an integer >= 0 (0: plain EAP), got {ig_steps!r}")
    pairs = [check_edge(lm, s, r) for s, r in edges]
    if any(r.kind == "head" for _, r in pairs):
        raise ValueError("eap: receivers must be a<l>, f<l> or logits")
    engine = engine or Engine(lm, [Context(base_ids, name="base"),
                                   Context(source_ids, name="source")])
    ssites = list(dict.fromkeys(_sender_site(s, lm) for s, _ in pairs))
    rsites = list(dict.fromkeys(_receiver_site(r, lm)[0] for _, r in pairs))
    emb = site_name("resid_pre", 0)
    src = engine.clean_readout(1, Capture(tuple(dict.fromkeys(ssites + [emb]))))
    bas = engine.clean_readout(0, Capture(tuple(ssites)))
    steps = [None] if ig_steps == 0 else [k / ig_steps for k in range(1, ig_steps + 1)]
    leaves: list[dict[str, torch.Tensor]] = [{} for _ in steps]

    def probe(site, k):
        def fn(x):
            leaves[k][site] = torch.zeros_like(x, requires_grad=True)
            return x + leaves[k][site]
        return fn

    def interpolate(alpha):
        source_emb = src[emb][None]
        return lambda x: source_emb.to(x.dtype) + alpha * (x - source_emb.to(x.dtype))

    rows = []
    for k, alpha in enumerate(steps):
        ivs = [] if alpha is None else [Intervention(emb, kind="function", fn=interpolate(alpha),
                                                     source="EAP-IG interpolation")]
        rows.append(Row(0, ivs + [Intervention(s, kind="function", fn=probe(s, k))
                                  for s in rsites]))
    logits = engine.run(rows, grad=True)
    values = metric(logits)
    wanted = [leaves[k][s] for k in range(len(steps)) for s in rsites]
    grads = torch.autograd.grad(values.sum(), wanted)
    grad = {s: sum(grads[k * len(rsites) + j][0] for k in range(len(steps))) / len(steps)
            for j, s in enumerate(rsites)}
    scores = []
    with torch.no_grad():
        for s, r in pairs:
            site = _sender_site(s, lm)
            delta = src[site] - bas[site]
            if s.kind == "head":
                assert s.layer is not None and s.head is not None  # set by parse_node
                delta = delta[:, s.head] @ _head_weight(lm, s.layer, s.head)
            scores.append(float((delta * grad[_receiver_site(r, lm)[0]]).sum()))
    # plain EAP's row is the base run itself (its probes add zeros); IG's last row is it only
    # up to the interpolation's rounding, so the clean value is read from the clean run
    clean = (float(values.reshape(-1)[-1].detach()) if ig_steps == 0
             else float(metric(engine.clean_readout(0))))
    return scores, clean
