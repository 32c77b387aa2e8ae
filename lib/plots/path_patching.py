"""Figures of path patching (notebook 07): nano-causal-interventions' node x position heatmap
and cumulative direct-path bars, the lineage tree of one tree patch (networkx layout drawn with
matplotlib; no graphviz), Wang et al.'s layer x head heatmaps, and edge attribution patching
beside exact edge patching. Plot functions take JSON-ready records and return a figure; the
notebook shows it and saves it with :func:`lib.plots.save_figure`.
"""

from __future__ import annotations

from collections.abc import Hashable


def label_positions(capital: dict) -> list[str]:
    """``"<p>: <base token>|<source token>"`` for each position of 07's capital prompts (the
    source token only where it differs), also written into every record as
    ``position_label``; returns the labels in position order."""
    labels = [f"{p}: {b.strip()}" + ("" if b == s else f"|{s.strip()}")
              for p, (b, s) in enumerate(zip(capital["base_tokens"], capital["source_tokens"]))]
    for r in capital["records"] + capital["cumulative"]:
        r["position_label"] = labels[r["position"]]
    return labels


def sweep_heatmap(records: list[dict], nodes: list[str], positions: list[str], title: str = ""):
    """Node (rows, top layer first) x position heatmap of p(token), one facet per token."""
    import pandas as pd
    from plotnine import (aes, element_text, facet_wrap, geom_tile, ggplot, labs,
                          scale_fill_gradient, theme, theme_bw)

    df = pd.DataFrame(records)
    df["node"] = pd.Categorical(df["node"], categories=list(reversed(nodes)), ordered=True)
    df["position_label"] = pd.Categorical(df["position_label"], categories=positions,
                                          ordered=True)
    return (ggplot(df, aes("position_label", "node", fill="prob")) + geom_tile()
            + facet_wrap("~token") + scale_fill_gradient(low="white", high="purple")
            + labs(x="position", y="node", fill="p", title=title) + theme_bw()
            + theme(axis_text_x=element_text(rotation=45, ha="right"),
                    axis_text_y=element_text(size=5)))


def cumulative_bars(records: list[dict], nodes: list[str], title: str = ""):
    """Bars of p(token) per cumulative node (everything from the top down to it patched
    along direct paths), one facet per position, colour the token."""
    import pandas as pd
    from plotnine import (aes, element_text, facet_wrap, geom_col, ggplot, labs,
                          position_dodge, theme, theme_bw)

    df = pd.DataFrame(records)
    df["node"] = pd.Categorical(df["node"], categories=nodes, ordered=True)
    return (ggplot(df, aes("node", "prob", fill="token"))
            + geom_col(position=position_dodge()) + facet_wrap("~position_label", ncol=1)
            + labs(x="lowest node patched (from the top down)", y="p", title=title)
            + theme_bw() + theme(axis_text_x=element_text(rotation=90, size=5)))


def draw_lineage(labels: dict, edges: list, title: str = ""):
    """The lineage tree (from :func:`lib.studies.path_patching.lineage_edges`) as a top-down tree:
    root at the top, input leaves at the bottom, identical sub-lineages merged."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import networkx as nx

    g = nx.DiGraph()
    g.add_nodes_from(labels)
    g.add_edges_from(edges)
    depth: dict[Hashable, int] = {}
    for n in nx.topological_sort(g):
        preds = list(g.predecessors(n))
        depth[n] = 0 if not preds else max(depth[p] for p in preds) + 1
    for n in g.nodes:
        g.nodes[n]["layer"] = depth[n]
    pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal", scale=1.0)
    pos = {n: (x, -y) for n, (x, y) in pos.items()}
    width = max(6.0, 1.6 * max(list(depth.values()).count(d) for d in set(depth.values())))
    fig, ax = plt.subplots(figsize=(width, 0.9 * (max(depth.values()) + 2)))
    leaf = [n for n in g.nodes if labels[n].startswith("input")]
    colours = ["#f4c7a1" if n in leaf else "#d7e3f4" for n in g.nodes]
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=8, edge_color="#555555")
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colours, node_size=900, node_shape="s")
    nx.draw_networkx_labels(g, pos, labels=labels, ax=ax, font_size=6)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    plt.close(fig)
    return fig


def head_heatmap(records: list[dict], value: str = "delta", facet: str = "policy",
                 title: str = ""):
    """Layer (rows) x head heatmap of ``value``, faceted by ``facet`` (diverging colours);
    ``facet="receiver"`` gives one panel per receiver and freeze policy."""
    import pandas as pd
    from plotnine import (aes, facet_wrap, geom_tile, ggplot, labs, scale_fill_gradient2,
                          theme_bw)

    df = pd.DataFrame(records)
    if facet == "receiver":
        df["receiver"] = df["receiver"] + " | " + df["policy"]
    df["layer"] = pd.Categorical(df["layer"], categories=sorted(set(df["layer"]), reverse=True),
                                 ordered=True)
    df["head"] = pd.Categorical(df["head"], categories=sorted(set(df["head"])), ordered=True)
    return (ggplot(df, aes("head", "layer", fill=value)) + geom_tile() + facet_wrap(f"~{facet}")
            + scale_fill_gradient2(low="#2166ac", mid="white", high="#b2182b", midpoint=0)
            + labs(x="head", y="layer", fill="Δ logit diff", title=title) + theme_bw())


def eap_scatter(records: list[dict], title: str = ""):
    """EAP's and EAP-IG's estimates vs the exact edge effect, one point per edge, one panel per
    estimate (records of :func:`lib.studies.path_patching.eap_study`)."""
    import pandas as pd
    from plotnine import aes, facet_wrap, geom_abline, geom_point, ggplot, labs, theme_bw

    df = pd.DataFrame(records)
    columns = {"estimate": "EAP", "estimate_ig": "EAP-IG"}
    long = df.melt(id_vars=["sender", "receiver", "exact"],
                   value_vars=[c for c in columns if c in df], var_name="method",
                   value_name="value")
    long["method"] = long["method"].map(columns)
    return (ggplot(long, aes("exact", "value")) + geom_point(alpha=0.5, size=1)
            + geom_abline(slope=1, intercept=0, linetype="dashed") + facet_wrap("~method")
            + labs(x="exact edge patch: Δ logit diff", y="estimate", title=title)
            + theme_bw())


def roles_figure(heads: list[dict], title: str = ""):
    """The evidence of each head's role (records of
    :func:`lib.studies.path_patching.head_roles`): mean attention from the end to IO, S1 and
    S2, and direct logit attribution on logit(IO) and logit(S), with 95 % intervals over
    prompts; one panel per measure, heads labelled with their role."""
    import pandas as pd
    from plotnine import (aes, coord_flip, facet_wrap, geom_col, geom_errorbar, ggplot, labs,
                          position_dodge, theme_bw)

    rows = []
    for h in heads:
        label = f"{h['head']} ({h['role']})"
        for group, keys in (("attention from the end", ("io", "s1", "s2")),
                            ("direct logit attribution", ("io", "s"))):
            part = h["attention"] if group.startswith("attention") else h["dla"]
            for k in keys:
                rows.append({"head": label, "panel": group, "to": k.upper(),
                             "mean": part[k]["mean"], "low": part[k]["ci_low"],
                             "high": part[k]["ci_high"]})
    df = pd.DataFrame(rows)
    df["head"] = pd.Categorical(df["head"], categories=list(dict.fromkeys(reversed(df["head"]))),
                                ordered=True)
    dodge = position_dodge(width=0.8)
    return (ggplot(df, aes("head", "mean", fill="to")) + geom_col(position=dodge, width=0.8)
            + geom_errorbar(aes(ymin="low", ymax="high"), position=dodge, width=0.3)
            + coord_flip() + facet_wrap("~panel", scales="free_x")
            + labs(x="", y="mean over prompts (95 % interval)", fill="name", title=title)
            + theme_bw())


def roles_table(heads: list[dict]):
    """One row per head: its path-patching effect, attention to IO/S1/S2, DLA on IO and S,
    copy scores and role (a DataFrame for display)."""
    import pandas as pd

    return pd.DataFrame([{
        "head": h["head"], "Δ logit diff (path)": h["path_delta"],
        "attn IO": h["attention"]["io"]["mean"], "attn S1": h["attention"]["s1"]["mean"],
        "attn S2": h["attention"]["s2"]["mean"], "DLA IO": h["dla"]["io"]["mean"],
        "DLA S": h["dla"]["s"]["mean"], "copy": h["copy_score"],
        "negative copy": h["negative_copy_score"], "role": h["role"]} for h in heads]).round(3)


def agreement_table(result: dict):
    """EAP and EAP-IG against exact edge patching (:func:`lib.studies.path_patching.eap_study`):
    correlations with and without the largest outlier, and that outlier (a DataFrame)."""
    import pandas as pd

    rows = []
    for method, label in (("eap", "EAP"), ("eap_ig", f"EAP-IG ({result['ig_steps']} steps)")):
        a = result["agreement"][method]
        out = a["outlier"]
        rows.append({"estimate": label, "pearson": a["pearson"], "spearman": a["spearman"],
                     "pearson w/o outlier": a["pearson_without_outlier"],
                     "spearman w/o outlier": a["spearman_without_outlier"],
                     "outlier": f"{out['sender']} -> {out['receiver']}",
                     "outlier exact": out["exact"], "outlier estimate": out["estimate"],
                     "pairs (exact / all)": f"{result['exact_pairs']} / {result['n_pairs']}"})
    return pd.DataFrame(rows).round(3)


def ioi_summary(result: dict, model: str) -> str:
    """Notebook 07's IOI headline: clean accuracy, mean logit difference, the strongest heads
    and how much the freeze policies differ."""
    return (f"{model}: clean accuracy {result['accuracy']:.3f} over {result['n_pairs']} pairs, "
            f"mean logit difference {result['mean_logit_diff']:.3f}\n"
            f"strongest heads (attention policy): {result['strongest']}\n"
            f"freeze policies: {result['policy_difference']}")
