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
_AGREEMENT = {"pearson": NUM, "spearman": NUM, "pearson_without_outlier": NUM,
              "spearman_without_outlier": NUM,
              "outlier": {"sender": str, "receiver": str, "exact": float, "estimate": float}}
#: ``path_patching_eap.json``: :func:`eap_study`
EAP_SCHEMA = Kind("path_patching_eap", "07_path_patching", {
    "records": nonempty([{"sender": str, "receiver": str, "exact": float, "estimate": float,
                          "estimate_ig": float, "eap_all": float, "eap_ig_all": float}]),
    "clean_logit_diff": float, "pearson": NUM, "spearman": NUM, "n_pairs": int,
    "exact_pairs": int, "ig_steps": int, "agreement": {"eap": _AGREEMENT, "eap_ig": _AGREEMENT},
    "seconds": map_of(float), "method": str})


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
    strongest = [r["sender"] for r in strongest_heads(to_logits, receivers_of, policies[0],
                                                      min_layer=1)]
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


def agreement(estimate: torch.Tensor, exact: torch.Tensor, edges: Sequence) -> dict:
    """Pearson and Spearman correlation of an estimate with the exact effects, with and without
    the largest outlier (the edge with the largest |estimate - exact|)."""
    rank = lambda x: x.argsort().argsort().float()  # noqa: E731
    worst = int((estimate - exact).abs().argmax())
    keep = torch.arange(len(exact)) != worst
    return {"pearson": _corr(estimate, exact), "spearman": _corr(rank(estimate), rank(exact)),
            "pearson_without_outlier": _corr(estimate[keep], exact[keep]),
            "spearman_without_outlier": _corr(rank(estimate[keep]), rank(exact[keep])),
            "outlier": {"sender": edges[worst][0], "receiver": edges[worst][1],
                        "exact": float(exact[worst]), "estimate": float(estimate[worst])}}


def strongest_heads(to_logits: Sequence[dict], n: int, policy: str = FREEZE_POLICIES[0],
                    min_layer: int = 0) -> list[dict]:
    """The ``n`` head -> logits rows of ``policy`` with the largest |mean change| (ties in
    row order), from layer ``min_layer`` up (a head of layer 0 has no earlier head to send to
    its query)."""
    rows = [r for r in to_logits if r["policy"] == policy and r["layer"] >= min_layer]
    return sorted(rows, key=lambda r: -abs(r["delta"]))[:n]


def eap_study(lm, pairs: Sequence[dict], layers: Sequence[int] | None = None,
              ig_steps: int = 5, exact_pairs: int = 8, batch_size: int = 32,
              progress: bool = True) -> dict:
    """Every node-level edge scored three ways on IOI pairs: edge attribution patching (EAP,
    one forward and one backward pass per pair) and EAP-IG (``ig_steps`` interpolation steps
    at the embeddings) on every pair, and exact edge patching (one forward per edge and pair,
    batched) on the first ``exact_pairs`` pairs. Each record holds the edge's mean change of the
    logit difference: exact and both estimates over the exact pairs (like for like), and both
    estimates over all pairs (``eap_all``, ``eap_ig_all``: the rankings of the circuit
    study). ``agreement``: correlations with the exact effects over the exact pairs."""
    import time

    from tqdm.auto import tqdm

    from lib.studies.ioi import logit_diff

    if not pairs:
        raise ValueError("eap_study: no IOI pairs")
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"EAP_IG_STEPS must be an integer >= 1, got {ig_steps!r}")
    if not 1 <= exact_pairs:
        raise ValueError(f"N_EXACT_PAIRS must be >= 1, got {exact_pairs!r}")
    edges = node_edges(lm, layers)
    n_exact = min(exact_pairs, len(pairs))
    scores: dict[str, list[list[float]]] = {"eap": [], "eap_ig": [], "exact": []}
    seconds = {"eap": 0.0, "eap_ig": 0.0, "exact": 0.0}
    clean = []
    for i, pair in enumerate(tqdm(pairs, desc="EAP, EAP-IG, exact edges", disable=not progress)):
        ld = lambda logits, p=pair: logit_diff(logits, p["io_id"], p["s_id"])  # noqa: E731
        # one engine per pair: the clean base and source runs are read once for all three
        engine = Engine(lm, [Context(pair["base_ids"], name="base"),
                             Context(pair["source_ids"], name="source")], batch_size=batch_size)
        for method, steps in (("eap", 0), ("eap_ig", ig_steps)):
            started = time.perf_counter()
            est, value = eap(lm, pair["base_ids"], pair["source_ids"], edges, ld,
                             ig_steps=steps, engine=engine)
            seconds[method] += time.perf_counter() - started
            scores[method].append(est)
        clean.append(value)
        if i < n_exact:
            started = time.perf_counter()
            got = edge_patch(lm, pair["base_ids"], pair["source_ids"], [[e] for e in edges], ld,
                             engine=engine) - value
            seconds["exact"] += time.perf_counter() - started
            scores["exact"].append(got.double().tolist())
    table = {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}
    exact = table["exact"].mean(0)
    on_exact = {k: table[k][:n_exact].mean(0) for k in ("eap", "eap_ig")}
    on_all = {k: table[k].mean(0) for k in ("eap", "eap_ig")}
    fit = {k: agreement(on_exact[k], exact, edges) for k in ("eap", "eap_ig")}
    records = [{"sender": s, "receiver": r, "exact": float(exact[j]),
                "estimate": float(on_exact["eap"][j]), "estimate_ig": float(on_exact["eap_ig"][j]),
                "eap_all": float(on_all["eap"][j]), "eap_ig_all": float(on_all["eap_ig"][j])}
               for j, (s, r) in enumerate(edges)]
    return {"records": records, "clean_logit_diff": sum(clean) / len(clean),
            "pearson": fit["eap"]["pearson"], "spearman": fit["eap"]["spearman"],
            "n_pairs": len(pairs), "exact_pairs": n_exact, "ig_steps": ig_steps,
            "agreement": fit, "seconds": seconds,
            "method": "mean change of logit(IO) - logit(S) when the edge carries the corrupt "
                      "(ABC) run's sender output; exact: one forward per edge and pair on the "
                      f"first {n_exact} pairs; EAP and EAP-IG ({ig_steps} steps at the "
                      "embeddings) on every pair; correlations over the exact pairs"}


def _corr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson correlation; None when either side is constant."""
    if len(a) < 2 or float(a.std()) == 0.0 or float(b.std()) == 0.0:
        return None
    return float(torch.corrcoef(torch.stack([a.float(), b.float()]))[0, 1])
