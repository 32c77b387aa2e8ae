"""Notebook 09's pairwise-IIA graphs (maraPislar's DAS thesis on X+Y+Z=, after Geiger, Wu et al.
2023): for one trained rotation, every ordered pair of arrangements is intervened (base, source)
and the predicted class stored; the edge weights against each causal model's labels, their
cliques and node-resampled intervals are read from that table
(:mod:`lib.studies.das.arithmetic_das` computes them). By default the arrangements are test ones,
held out from fine-tuning and from every rotation's training (:func:`graph_pool`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from lib.core import io
from lib.core.params import ParameterError
from lib.core.schema import Kind, map_of, nonempty, optional
from lib.core.tensorfiles import TensorFileError
from lib.studies.das import arithmetic as ar
from lib.studies.das import arithmetic_das as da

GRAPH_SCHEMA = Kind("das_graph", "09_das_arithmetic", {
    "arrangements": nonempty([int]), "predictions_file": str, "params_key": str,
    "pool": optional(str),
    "graphs": [{"model": int, "layer": int, "rank": int, "site": str, "n": int,
                "mean_weight": float, "fraction": map_of(float), "mean_weight_ci": [float],
                "cliques": [[int]], "clique_sizes": [int],
                "thesis_mean_weight_gpt2_layer7_rank256": float}]})
#: mean edge weight of the thesis' full graphs (GPT-2, layer 7, rank 256), per causal model
THESIS_GRAPH = {1: 0.8490, 2: 0.6787, 3: 0.6771, 4: 0.6235, 5: 0.6872, 6: 0.8415, 7: 0.9758}
#: counterfactuals each of the thesis' rotations was trained on (800 steps of batch 1,280)
THESIS_COUNTERFACTUALS = 800 * 1280


def thesis_label(params: dict) -> str:
    """The thesis column's heading for results made with 09's ``params``: what differs (its
    graphs are in-sample, on GPT-2 at layer 7 of 12) and how many times our counterfactuals
    per rotation (``DAS_N_TRAIN`` x ``DAS_EPOCHS``) it trained on."""
    ours = int(params["DAS_N_TRAIN"]) * int(params.get("DAS_EPOCHS", 1))
    return (f"thesis (in-sample, GPT-2 layer 7 of 12, "
            f"{THESIS_COUNTERFACTUALS / ours:,.0f}x our counterfactuals)")


def graph_check(n: int):
    """The check of a graph's stored predictions (a unit, or a tensor read back): an n x n
    table of predicted classes (0 .. N_CLASSES - 1), -1 on the diagonal only; raises
    ValueError otherwise."""
    def check(pred: Any) -> None:
        t = pred if isinstance(pred, torch.Tensor) else torch.tensor(pred)
        if t.is_floating_point() or tuple(t.shape) != (n, n):
            raise ValueError(f"expected a {n} x {n} table of classes, got {t.dtype} "
                             f"{tuple(t.shape)}")
        t = t.long()
        off = ~torch.eye(n, dtype=torch.bool)
        if not bool((t.diagonal() == -1).all()) or bool((t[off] < 0).any()) \
                or bool((t >= ar.N_CLASSES).any()):
            raise ValueError(f"predicted classes must lie in 0..{ar.N_CLASSES - 1}, with -1 "
                             "on the diagonal only")
    return check


def graph_pool(n_arrangements: int, seed: int, test: Sequence[int] | None = None) -> list[int]:
    """The arrangements of a graph: the first ``n_arrangements`` of a seeded permutation of the
    ``test`` arrangements (held out from fine-tuning and from every rotation's training), or of
    all 1,000 when ``test`` is None (the thesis' in-sample graphs: the same pool as before
    GRAPH_POOL existed). Sorted."""
    if test is None:
        perm = torch.randperm(1000, generator=torch.Generator().manual_seed(seed))
        return sorted(perm[:n_arrangements].tolist()) if n_arrangements < 1000 \
            else list(range(1000))
    if n_arrangements > len(test):
        raise ParameterError(f"GRAPH_ARRANGEMENTS = {n_arrangements} is more than the "
                             f"{len(test)} test arrangements (N_TEST); lower it, or set "
                             "GRAPH_POOL='all' for the thesis' in-sample graphs")
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))
    return sorted(int(test[i]) for i in perm[:n_arrangements].tolist())


def graphs(lm, modules: dict, states, n_arrangements: int, rank: int, site: str,
           graph_layers: list[int], units: io.UnitStore, predictions_path: Path, key: dict,
           seed: int, fresh: Collection[str] = (), test: Sequence[int] | None = None):
    """Pairwise-IIA graphs on ``n_arrangements`` arrangements (:func:`graph_pool`: of the
    ``test`` arrangements, or of all when None) for the rotations of ``rank`` and ``site`` at
    ``graph_layers``: every ordered
    pair's predicted class (one unit per graph, so an interrupted run resumes; all stored in
    ``predictions_path`` with the graph key), the edge weights against each causal model, their
    summary and node-resampled intervals. A stored graph of a run in ``fresh`` (its rotation
    trained in this process) is computed again. Returns ``(payload, provenance)``."""
    pool = graph_pool(n_arrangements, seed, test)
    summaries, predictions = [], {}
    for name, (m, layer, r, s, module) in modules.items():
        if r != rank or s != site or layer not in graph_layers:
            continue
        stored_pred = None if name in fresh else units.get(name, graph_check(len(pool)))
        if stored_pred is None:
            t0 = time.perf_counter()
            pred = da.pair_predictions(lm, layer, module, states[layer], pool, progress=True)
            n_pairs = len(pool) * (len(pool) - 1)
            sec = time.perf_counter() - t0
            print(f"{name}: {n_pairs:,} ordered pairs in {sec:.0f} s "
                  f"({sec / n_pairs * 1e3:.2f} ms per pair)")
            units.put(name, pred.tolist())
        else:
            pred = torch.tensor(stored_pred)
        predictions[name] = pred.to(torch.int8)
        W = da.graph_weights(pred, ar.causal_model(m), pool)
        summary = {**da.graph_summary(W), **da.graph_intervals(W, seed=seed)}
        summaries.append({"model": m, "layer": layer, "rank": r, "site": s,
                          "thesis_mean_weight_gpt2_layer7_rank256": THESIS_GRAPH[m],
                          **{k: v for k, v in summary.items() if k != "cliques"},
                          "cliques": [[pool[v] for v in c] for c in summary["cliques"]]})
    payload = {"arrangements": pool, "graphs": summaries, "params_key": io.params_key(key),
               "predictions_file": Path(predictions_path).name,
               "pool": "all (in-sample)" if test is None else "test (held out)"}
    # every ordered pair's predicted class (rows: base, columns: source, -1 on the diagonal),
    # so the graphs can be read again against any causal model's labels
    io.save_tensors(predictions_path, predictions,
                    {"params_key": io.params_key(key), "arrangements": pool},
                    key=io.params_key(key))
    return payload, io.provenance(lm, key, seed)


def graph_predictions(folder: Path, graph_result: dict) -> dict[str, torch.Tensor]:
    """The stored predictions of ``graph_result`` (a ``das_graph.json``), one n x n table per
    graph (rows: base, columns: source; -1 on the diagonal), read back from the file it names
    in ``folder`` and checked: written with the result's key, for its arrangements, one table
    per graph, each of predicted classes. Else a :class:`lib.core.tensorfiles.TensorFileError`
    naming the file."""
    path = Path(folder) / graph_result["predictions_file"]
    fix = "rerun notebook 09 with FORCE=True to compute the graphs again"
    n = len(graph_result["arrangements"])
    names = [da.run_name(g["model"], g["layer"], g["rank"], g["site"])
             for g in graph_result["graphs"]]
    tensors, config, _ = io.load_tensors(path, "graph predictions",
                                         key=graph_result["params_key"], fix=fix,
                                         shapes={name: (n, n) for name in names})
    if config.get("arrangements") != graph_result["arrangements"]:
        raise TensorFileError(path, "holds predictions on other arrangements than "
                              "das_graph.json's", fix)
    for name, t in tensors.items():
        try:
            graph_check(n)(t)
        except ValueError as err:
            raise TensorFileError(path, f"{name}: {err}", fix) from err
    return tensors
