"""Causal tracing over a fact set: ROME's average indirect effects per layer and token.

Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (arXiv 2202.05262), Fig. 3:
each fact of a set is traced at its last subject token and its last token, every layer and
kind (:class:`lib.studies.tracing.CausalTracer`), plus the severed curves; the correct facts'
indirect effects are averaged per (kind, token, layer) with a 95 % interval. Each fact is one
:class:`lib.core.io.UnitStore` unit, so an interrupted run resumes at the next unfinished
fact. Figures: :func:`lib.plots.tracing.plot_average_effects`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from lib.core.io import params_key
from lib.studies.tracing import (DEFAULT_WINDOW, SEVER_KINDS, TRACE_KINDS, CausalTracer,
                                 Restoration, grid_restorations, severed_restorations)

TOKEN_BUCKETS = ("last_subject", "last")


def trace_fact(lm, fact: dict, noise: float, samples: int = 10, seed: int = 1,
               window: int = 10, kinds: Sequence[str] = TRACE_KINDS, severed: bool = True,
               batch_size: int = 32, progress: bool = False) -> dict:
    """Traces of one fact restricted to the last subject token and the last token (all
    layers, each kind), plus the severed curves at the last subject token. A fact whose clean
    greedy top-1 token is not the first token of its answer is only marked incorrect."""
    tracer = CausalTracer(lm, fact["prompt"], fact["subject"], answer=fact["answer"],
                          noise=noise, samples=samples, seed=seed)
    out = {"prompt": fact["prompt"], "subject": fact["subject"], "answer": fact["answer"],
           "answer_id": tracer.answer_id, "top_token": tracer.top_token,
           "correct": tracer.correct, "p_clean": tracer.p_clean,
           "subject_range": list(tracer.subject_range), "n_tokens": tracer.n_tokens}
    if not tracer.correct:
        return out
    n_layers = lm.n_layers
    rows = {"last_subject": tracer.subject_range[1] - 1, "last": tracer.n_tokens - 1}
    layers = list(range(n_layers))
    jobs: list[Restoration] = []
    slices: dict[tuple[str, str], slice] = {}
    for kind in kinds:
        w = DEFAULT_WINDOW[kind] if kind == "hidden" else window
        for bucket, tok in rows.items():
            slices[(kind, bucket)] = slice(len(jobs), len(jobs) + n_layers)
            jobs += grid_restorations(kind, n_layers, [tok], layers, w)
    if severed:
        for sever in SEVER_KINDS:
            slices[(f"hidden_{sever}_severed", "last_subject")] = slice(len(jobs),
                                                                        len(jobs) + n_layers)
            jobs += severed_restorations(rows["last_subject"], n_layers, layers, sever)
    flat = tracer.scores(jobs, batch_size, progress)
    out["p_corrupt"] = tracer.p_corrupt
    out["rows"] = rows
    out["scores"] = {}
    for (kind, bucket), sl in slices.items():
        out["scores"].setdefault(kind, {})[bucket] = flat[sl].tolist()
    return out


def average_effects(results: Sequence[dict]):
    """Average indirect effect per (kind, token bucket, layer) over the correct facts, as a
    long pandas DataFrame with mean, std (ddof=0, as ROME's notebook), n and a 95% interval
    mean +- 1.96 std / sqrt(n). IE = p_restored - p_corrupt of the same fact."""
    import pandas as pd

    records = []
    for res in results:
        if not res.get("correct") or "scores" not in res:
            continue
        for kind, buckets in res["scores"].items():
            for bucket, curve in buckets.items():
                for layer, p in enumerate(curve):
                    records.append({"kind": kind, "token": bucket, "layer": layer,
                                    "ie": p - res["p_corrupt"]})
    if not records:
        raise ValueError("no correct facts to average; check FACTS_FILE and the model")
    df = pd.DataFrame(records)
    agg = df.groupby(["kind", "token", "layer"], sort=False)["ie"].agg(
        mean="mean", std=lambda x: float(np.std(x.to_numpy())), n="count").reset_index()
    half = 1.96 * agg["std"] / np.sqrt(agg["n"])
    agg["lo"], agg["hi"] = agg["mean"] - half, agg["mean"] + half
    # a fixed row order, whatever order the units' dicts came in (fresh or read back from disk)
    kind_order = list(TRACE_KINDS) + [f"hidden_{k}_severed" for k in SEVER_KINDS]
    rank = {k: i for i, k in enumerate(kind_order)}
    bucket = {b: i for i, b in enumerate(TOKEN_BUCKETS)}
    agg = agg.assign(_k=agg["kind"].map(lambda k: (rank.get(k, len(rank)), k)),
                     _t=agg["token"].map(lambda t: (bucket.get(t, len(bucket)), t)))
    agg = agg.sort_values(["_k", "_t", "layer"], kind="stable").drop(columns=["_k", "_t"])
    return agg.reset_index(drop=True)


def summarize_facts(results: Sequence[dict], effects=None) -> dict:
    """ATE = mean(p_clean - p_corrupt), mean p_clean / p_corrupt, counts, and the peak average
    indirect effect per (kind, token bucket) with its layer."""
    correct = [r for r in results if r.get("correct") and "p_corrupt" in r]
    if not correct:
        raise ValueError("no correct facts to summarise")
    effects = average_effects(correct) if effects is None else effects
    p_clean = np.array([r["p_clean"] for r in correct])
    p_corrupt = np.array([r["p_corrupt"] for r in correct])
    peaks: dict[str, dict[str, dict[str, float]]] = {}
    for (kind, bucket), grp in effects.groupby(["kind", "token"], sort=False):
        best = grp.loc[grp["mean"].idxmax()]
        peaks.setdefault(kind, {})[bucket] = {"aie": float(best["mean"]),
                                              "layer": int(best["layer"])}
    return {"n_facts": len(results), "n_correct": len(correct),
            "ate": float(np.mean(p_clean - p_corrupt)), "p_clean_mean": float(p_clean.mean()),
            "p_corrupt_mean": float(p_corrupt.mean()), "peaks": peaks}


# --- the fact set, one resumable unit per fact ---------------------------------------------------

def fact_unit_name(index: int, fact: dict) -> str:
    """Unit name of one fact: its index plus a hash of its text, so an edited fact file never
    reuses a stale unit."""
    return f"fact_{index:03d}_{params_key(fact)[:8]}"


def trace_facts(lm, facts: Sequence[dict], store, noise: float, samples: int = 10,
                seed: int = 1, window: int = 10, kinds: Sequence[str] = TRACE_KINDS,
                severed: bool = True, batch_size: int = 32, progress: bool = True) -> list[dict]:
    """:func:`trace_fact` for every fact, one :class:`lib.core.io.UnitStore` unit each, so an
    interrupted run resumes at the next unfinished fact."""
    items = list(enumerate(facts))
    if progress:
        items = tqdm(items, desc="facts", unit="fact")
    out = []
    for i, fact in items:
        out.append(store.get_or_compute(fact_unit_name(i, fact), lambda fact=fact: trace_fact(
            lm, fact, noise, samples=samples, seed=seed, window=window, kinds=kinds,
            severed=severed, batch_size=batch_size)))
    return out
