"""Figures of notebook 01's token sets: how well each score and filing agrees with the
intervention-free reference set (Jaccard overlap), and how frequent the kept tokens are.

The numbers come from notebook 01's ``token_sets/<model>.json``
(:mod:`lib.studies.domain_swap.tokens`): the tokens a domain's last-token activation promotes
when swapped into the other domain's prompt (interchange interventions, Geiger et al. 2021). Every function returns a plotnine ``ggplot``
and never shows or saves it.
"""

from __future__ import annotations

import pandas as pd
from plotnine import (aes, element_text, facet_wrap, geom_col, geom_point, geom_text, ggplot,
                      labs, position_dodge, scale_y_log10, theme, theme_bw)

from lib.plots.domain import NoResultsError

def agreement_frame(token_sets: dict) -> pd.DataFrame:
    """One row per (pair, domain, score, assignment): the Jaccard overlap of that score and
    filing's set with the intervention-free reference set (``agreement`` of notebook 01)."""
    rows = []
    for pair, by_score in (token_sets.get("agreement") or {}).items():
        for score, by_assignment in by_score.items():
            for assignment, js in by_assignment.items():
                for domain, j in js.items():
                    rows.append({"pair": pair, "domain": domain, "score": score,
                                 "assignment": assignment, "jaccard": j})
    if not rows:
        raise NoResultsError(f"token sets of {token_sets.get('model')!r} hold no reference "
                             "agreement; rerun 01_reverse_intervention")
    return pd.DataFrame(rows)


def plot_reference_agreement(token_sets: dict):
    """Jaccard overlap with the reference sets, per pair (x), score and filing (colour), one
    panel per score kind; the mean over the pair's two domains is the bar, each domain a point."""
    df = agreement_frame(token_sets)
    per_domain = df[df["domain"] != "mean"].copy()
    mean = df[df["domain"] == "mean"].copy()
    chosen = (token_sets.get("score", {}).get("name"), token_sets.get("assignment", {}).get("name"))
    mean["label"] = ["default" if (s, a) == chosen else "" for s, a in
                     zip(mean["score"], mean["assignment"])]
    dodge = position_dodge(width=0.8)
    return (ggplot(mean, aes("pair", "jaccard", fill="assignment"))
            + geom_col(position=dodge, width=0.75, alpha=0.8)
            + geom_point(aes(group="assignment"), data=per_domain, position=dodge, size=1.5)
            + geom_text(aes(label="label", group="assignment"), position=dodge, va="bottom",
                        size=7)
            + facet_wrap("~ score")
            + labs(x="", y="Jaccard overlap with the reference set", fill="filing",
                   title=f"{token_sets.get('model')}: token sets vs the clean-distribution "
                         "contrast (bar: mean, points: domains)")
            + theme_bw() + theme(axis_text_x=element_text(rotation=30, ha="right"),
                                 legend_position="bottom"))


def token_frequency_frame(token_sets: dict) -> pd.DataFrame:
    """One row per kept token of every score's sets (``source`` filing, the ``alternatives`` of
    notebook 01) and of the reference: pair, domain, set, rank, token, clean_p."""
    rows = []
    for pair, by_score in (token_sets.get("alternatives") or {}).items():
        sets = {**{f"score {s}": v for s, v in by_score.items()},
                "reference": token_sets.get("reference", {}).get(pair, {})}
        for name, by_domain in sets.items():
            for domain, entries in by_domain.items():
                for rank, e in enumerate(entries, 1):
                    rows.append({"pair": pair, "domain": domain, "set": name, "rank": rank,
                                 "token": e["token"], "clean_p": e.get("clean_p")})
    df = pd.DataFrame(rows)
    if df.empty or df["clean_p"].isna().all():
        raise NoResultsError(f"token sets of {token_sets.get('model')!r} carry no clean "
                             "probabilities; rerun 01_reverse_intervention")
    return df


def plot_token_frequency(token_sets: dict, floor: float = 1e-12):
    """How frequent the kept tokens are: each token's mean clean next-token probability (log
    scale), per set kind (x) and pair (panels). An absolute score (``dprob``) keeps tokens that
    are likely anyway (' the', '\\n'); a relative one (``dlogp``) and the reference do not."""
    df = token_frequency_frame(token_sets).dropna(subset=["clean_p"])
    df["clean_p"] = df["clean_p"].clip(lower=floor)
    med = df.groupby(["pair", "set"])["clean_p"].median().reset_index()
    return (ggplot(df, aes("set", "clean_p", color="domain"))
            + geom_point(position=position_dodge(width=0.6), alpha=0.5, size=1.2)
            + geom_point(aes("set", "clean_p"), data=med, inherit_aes=False, shape="_", size=12)
            + facet_wrap("~ pair", ncol=4) + scale_y_log10()
            + labs(x="", y="mean clean next-token probability (log)", color="domain",
                   title=f"{token_sets.get('model')}: frequency of the kept tokens (bar: median)")
            + theme_bw() + theme(axis_text_x=element_text(rotation=30, ha="right"),
                                 legend_position="bottom"))
