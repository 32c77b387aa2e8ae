"""Notebook 07's studies as JSON-ready payloads: nano's capital prompts, the IOI heads, EAP against
exact edge patching.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lib.core.engine import Context, Engine
from lib.core.stats import bootstrap_ci
from lib.core.schema import NUM, Kind, map_of, nonempty
from lib.studies.path_patching.edges import eap, edge_patch, node_edges
from lib.studies.path_patching.nodes import FREEZE_POLICIES, all_heads, parse_node
from lib.studies.path_patching.paths import path_patch
from lib.studies.path_patching.tree import (cumulative_patch, node_order, node_position_patch,
                                            tree_patch)


# --- the kinds of result notebook 07 writes (lib.core.schema), checked on every read ----------------

_PATCH = {"node": str, "position": int, "token": str, "prob": float}
#: ``path_patching_capital.json``: :func:`capital_study` plus the prompts' tokens
CAPITAL_SCHEMA = Kind("path_patching_capital", "07_path_patching", {
    "nodes": nonempty([str]), "records": nonempty([_PATCH]), "cumulative": [_PATCH],
    "engine_stats": map_of(int), "base_tokens": [str], "source_tokens": [str], "tokens": [str]})
_HEAD_PATCH = {"sender": str, "layer": int, "head": int, "policy": str, "receiver": str,
               "delta": float, "ci_low": float, "ci_high": float, "share_negative": float}
#: ``path_patching_ioi.json``: :func:`ioi_head_study` plus the clean metrics over every pair
IOI_SCHEMA = Kind("path_patching_ioi", "07_path_patching", {
    "n_pairs": int, "n_pairs_patched": int, "n_query_pairs": int, "clean_logit_diff": [float],
    "to_logits": nonempty([_HEAD_PATCH]), "strongest": [str], "to_queries": [_HEAD_PATCH],
    "policy_difference": map_of({"max_abs": float, "pearson": NUM}), "accuracy": float,
    "mean_logit_diff": float, "logit_diff": nonempty([float])})
#: ``path_patching_eap.json``: :func:`eap_study`
EAP_SCHEMA = Kind("path_patching_eap", "07_path_patching", {
    "records": nonempty([{"sender": str, "receiver": str, "exact": float, "estimate": float}]),
    "clean_logit_diff": float, "pearson": NUM, "spearman": NUM})


# --- the studies of notebook 07 (JSON-ready payloads) -----------------------------------------------

def _probs(token_ids):
    def readout(logits):
        return logits.float().softmax(-1)[..., token_ids]
    return readout


def capital_study(lm, base_ids, source_ids, tokens: Sequence[str], token_ids: Sequence[int],
                  cumulative_positions: Sequence[int], batch_size: int = 32) -> dict:
    """nano's two experiments: every node x position patch (``records``) and the cumulative
    direct-path patch at ``cumulative_positions`` (``cumulative``), p(token) at the last
    position; one engine for all (distinct lineages computed once)."""
    T = base_ids.shape[1]
    nodes = node_order(lm.n_layers)
    engine = Engine(lm, [Context(base_ids, name="base"), Context(source_ids, name="source")],
                    batch_size=batch_size)
    readout = _probs(list(token_ids))
    cells = [(n, p) for n in nodes for p in range(T)]
    patches = [(lambda path: 0, lambda path: False) if n == "none" else
               node_position_patch(n, p) for n, p in cells]
    # the "none" row and the first cumulative step are the base run by design
    out = tree_patch(lm, [base_ids, source_ids], patches, readout, engine=engine,
                     allow_noop=True)
    records = [{"node": n, "position": p, "token": t, "prob": float(r.readout[j])}
               for (n, p), r in zip(cells, out) for j, t in enumerate(tokens)]
    cum_cells = [(i, p) for p in cumulative_positions for i in range(len(nodes))]
    patches = [cumulative_patch(nodes[1:i + 1], p) for i, p in cum_cells]
    out = tree_patch(lm, [base_ids, source_ids], patches, readout, engine=engine,
                     allow_noop=True)
    cumulative = [{"node": nodes[i], "position": p, "token": t, "prob": float(r.readout[j])}
                  for (i, p), r in zip(cum_cells, out) for j, t in enumerate(tokens)]
    return {"nodes": nodes, "records": records, "cumulative": cumulative,
            "engine_stats": dict(engine.stats)}


def _layer(name: str) -> int:
    """The layer of node ``name`` (a head, its input or a sub-layer: one that has a layer)."""
    layer = parse_node(name).layer
    assert layer is not None, name
    return layer


def ioi_head_study(lm, pairs: Sequence[dict], receivers_of: int = 3,
                   batch_size: int = 32, policies: Sequence[str] = FREEZE_POLICIES,
                   query_pairs: int | None = None) -> dict:
    """Wang et al.'s path patching on IOI pairs (from :func:`lib.studies.ioi.aligned_pairs`): every
    head -> logits under each freeze policy (mean change of the logit difference over pairs,
    with its 95 % bootstrap interval over pairs and the share of pairs where it is negative),
    then every earlier head -> the queries of the ``receivers_of`` heads with the largest
    |change| under the first policy, on the first ``query_pairs`` pairs (None: all; these cost
    one sender -> receiver patch per earlier head, receiver and policy per pair). Patches cover
    positions from the first one where base and source differ (exact: nothing earlier
    differs)."""
    from lib.studies.ioi import logit_diff

    heads = all_heads(lm)
    per_pair: dict[tuple, list[float]] = {}   # each spec's change of the logit difference
    clean = []

    def run_specs(specs_for, pairs=pairs):
        for pair in pairs:
            pos = tuple(range(pair["first_diff"], pair["base_ids"].shape[1]))
            specs = specs_for(pos)
            engine = Engine(lm, [Context(pair["base_ids"]), Context(pair["source_ids"])],
                            batch_size=batch_size)
            ld = lambda logits, p=pair: logit_diff(logits, p["io_id"], p["s_id"])  # noqa: E731
            base_ld = float(ld(engine.clean_readout(0)))
            got = path_patch(lm, pair["base_ids"], pair["source_ids"],
                             [s for _, s in specs], ld, engine=engine)
            for (key, _), v in zip(specs, got.tolist()):
                per_pair.setdefault(key, []).append(v - base_ld)
            yield base_ld

    def summary(key: tuple) -> dict[str, Any]:
        """Mean change over pairs, its 95 % bootstrap interval (pairs resampled) and the
        share of pairs where the change is negative."""
        values = per_pair[key]
        low, high = bootstrap_ci(values, seed=0)
        return {"delta": sum(values) / len(values), "ci_low": low, "ci_high": high,
                "share_negative": sum(v < 0 for v in values) / len(values)}

    clean = list(run_specs(lambda pos: [((h, f, "logits"), dict(senders=[h], freeze=f,
                                                                 positions=pos))
                                        for h in heads for f in policies]))
    to_logits: list[dict[str, Any]] = [  # JSON-ready rows
        {"sender": h, "layer": parse_node(h).layer, "head": parse_node(h).head,
         "policy": f, "receiver": "logits", **summary((h, f, "logits"))}
        for h in heads for f in policies]
    first = [r for r in to_logits if r["policy"] == policies[0]]
    strongest = [r["sender"] for r in sorted(first, key=lambda r: -abs(r["delta"]))
                 if r["layer"] > 0][:receivers_of]
    receivers = [f"{h}.q" for h in strongest]
    query_set = list(pairs)[:query_pairs]
    list(run_specs(lambda pos: [((h, f, r), dict(senders=[h], receivers=[r], freeze=f,
                                                 positions=pos))
                                for r in receivers for h in heads
                                if _layer(h) < _layer(r)
                                for f in policies], query_set))
    to_queries = [{"sender": h, "layer": parse_node(h).layer, "head": parse_node(h).head,
                   "policy": f, "receiver": r, **summary((h, f, r))}
                  for r in receivers for h in heads for f in policies if (h, f, r) in per_pair]
    diffs = {}
    for f in policies[1:]:
        a = torch.tensor([r["delta"] for r in to_logits if r["policy"] == policies[0]])
        b = torch.tensor([r["delta"] for r in to_logits if r["policy"] == f])
        diffs[f"{policies[0]}_vs_{f}"] = {"max_abs": float((a - b).abs().max()),
                                          "pearson": _corr(a, b)}
    return {"n_pairs": len(pairs), "n_query_pairs": len(query_set),
            "clean_logit_diff": clean, "to_logits": to_logits,
            "strongest": strongest, "to_queries": to_queries, "policy_difference": diffs}


def eap_study(lm, pair: dict, layers: Sequence[int] | None = None, batch_size: int = 32) -> dict:
    """Exact edge patching of every node-level edge (one row each) beside edge attribution
    patching (one forward and one backward pass), on one IOI pair; Pearson and Spearman."""
    from lib.studies.ioi import logit_diff

    edges = node_edges(lm, layers)
    ld = lambda logits: logit_diff(logits, pair["io_id"], pair["s_id"])  # noqa: E731
    est, clean = eap(lm, pair["base_ids"], pair["source_ids"], edges, ld)
    exact = edge_patch(lm, pair["base_ids"], pair["source_ids"], [[e] for e in edges], ld,
                       batch_size=batch_size) - clean
    a, b = torch.tensor(est), exact.double().float()
    rank = lambda x: x.argsort().argsort().float()  # noqa: E731
    return {"records": [{"sender": s, "receiver": r, "exact": float(x), "estimate": float(y)}
                        for (s, r), x, y in zip(edges, b.tolist(), a.tolist())],
            "clean_logit_diff": clean,
            "pearson": _corr(a, b), "spearman": _corr(rank(a), rank(b))}


def _corr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation; None when either side is constant."""
    if len(a) < 2 or float(a.std()) == 0.0 or float(b.std()) == 0.0:
        return None
    return float(torch.corrcoef(torch.stack([a.float(), b.float()]))[0, 1])
