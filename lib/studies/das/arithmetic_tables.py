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


def runs_table(runs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{k: r[k] for k in ("model", "layer", "rank", "site", "iia",
                                             "control_iia")} for r in runs])


def graphs_table(graphs_result: dict) -> pd.DataFrame:
    """One row per graph: mean edge weight with its node-resampled interval, the weight-1
    fraction, the thesis' number, degrees and clique sizes."""
    return pd.DataFrame([{**{k: g[k] for k in ("model", "layer", "mean_weight")},
                          "95% interval (nodes resampled)": "{:.3f}–{:.3f}".format(
                              *g["mean_weight_ci"]),
                          "weight-1 fraction": g["fraction"]["1.0"],
                          "thesis (in-sample, GPT-2 layer 7 of 12, 800x our counterfactuals)":
                              g["thesis_mean_weight_gpt2_layer7_rank256"],
                          **{k: g[k] for k in ("mean_weight1_degree", "clique_sizes")},
                          "pool": graphs_result.get("pool", "all (in-sample)")}
                         for g in graphs_result["graphs"]])


def sanity_cells(grid: list[dict], layer: int, rank: int, site: str) -> list[dict]:
    """The sanity grid's cells at one layer, rank and site."""
    return [g for g in grid if g["layer"] == layer and g["rank"] == rank and g["site"] == site]
