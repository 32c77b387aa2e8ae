"""Notebook 09's tables and lines, read from its results (maraPislar's DAS thesis on X+Y+Z=;
Geiger, Wu et al. 2023): how each prompt format tokenizes, the accuracy as shipped, the DAS
runs, the graphs, and the sanity grid's cells at one layer. No computation and no plotting:
:mod:`lib.studies.das.arithmetic_study` computes the results (and re-exports these names)."""

from __future__ import annotations

import pandas as pd


def tokenization_lines(ft: dict) -> list[str]:
    """One line per prompt format: how the shipped tokenizer splits a prompt, or why the
    format cannot be used."""
    return [f"{fmt}: " + (t["error"] if "error" in t else
                          f"{t['prompt']!r} -> {t['tokens']} (ids {t['ids']}), slots {t['slots']}")
            for fmt, t in ft["tokenization"].items()]


def shipped_table(ft: dict) -> pd.DataFrame:
    return pd.DataFrame([{k: s[k] for k in ("format", "shots", "n", "accuracy")}
                         for s in ft["shipped"]])


def cells_of(das_iia: dict) -> list[dict]:
    """A ``das_iia.json``'s cells over seeds (files written before seeds were counted hold
    none: each run is then a cell of one, :func:`lib.studies.das.seeds.cells`)."""
    from lib.studies.das.seeds import cells

    return das_iia["cells"] if das_iia.get("cells") else cells(das_iia["runs"])


def _interval(x: dict) -> str:
    return f"{x['mean']:.3f}" + (f" [{x['ci_low']:.3f}, {x['ci_high']:.3f}]" if x["n"] > 1
                                 else "")


def cells_table(cells: list[dict]) -> pd.DataFrame:
    """One row per cell (causal model, layer, rank, site), ordered by layer, rank, site and
    mean IIA: the IIA and the control's over the seeds (mean [95 % t interval]), the last
    epoch's training loss, whether the learned interval lies above the control's, and
    whether it lies above the next cell's in this order (intervals apart: the only place a
    ranking is stated)."""
    from lib.studies.das.seeds import above_control, separated

    order = sorted(cells, key=lambda c: (c["layer"], c["rank"], c["site"], -c["iia"]["mean"]))
    rows = []
    for i, c in enumerate(order):
        below = order[i + 1] if i + 1 < len(order) else None
        rows.append({"layer": c["layer"], "rank": c["rank"], "site": c["site"],
                     "model": f"M{c['model']}", "seeds": c["iia"]["n"], "steps": c["steps"],
                     "IIA (95% t interval)": _interval(c["iia"]),
                     "control": _interval(c["control_iia"]),
                     "final loss": round(c["final_loss"]["mean"], 3),
                     "above control": above_control(c),
                     "above next row": below is not None and separated(c, below)
                                       and all(below[k] == c[k] for k in ("layer", "rank", "site"))})
    return pd.DataFrame(rows)


def graphs_table(graphs_result: dict) -> pd.DataFrame:
    """One row per graph: mean edge weight with its node-resampled interval, the weight-1
    fraction, the thesis' number, degrees and clique sizes."""
    from lib.studies.das.arithmetic_graphs import thesis_label

    thesis = thesis_label(graphs_result["provenance"]["parameters"])
    return pd.DataFrame([{**{k: g[k] for k in ("model", "layer", "mean_weight")},
                          "95% interval (nodes resampled)": "{:.3f}–{:.3f}".format(
                              *g["mean_weight_ci"]),
                          "weight-1 fraction": g["fraction"]["1.0"],
                          thesis: g["thesis_mean_weight_gpt2_layer7_rank256"],
                          **{k: g[k] for k in ("mean_weight1_degree", "clique_sizes")},
                          "pool": graphs_result.get("pool", "all (in-sample)")}
                         for g in graphs_result["graphs"]])


def sanity_cells(grid: list[dict], layer: int, rank: int, site: str) -> list[dict]:
    """The sanity grid's cells at one layer, rank and site."""
    return [g for g in grid if g["layer"] == layer and g["rank"] == rank and g["site"] == site]
