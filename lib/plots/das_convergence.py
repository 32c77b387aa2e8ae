"""Figure of DAS convergence (:mod:`lib.studies.das.convergence`; Geiger, Wu et al. 2023):
held-out IIA and the random control against training steps on a log2 axis, a band over seeds,
and the training loss in a second panel, from ``full_compute/<model>/das_convergence.json``.
"""

from __future__ import annotations

import pandas as pd
from plotnine import (aes, facet_wrap, geom_hline, geom_line, geom_point, geom_ribbon, ggplot,
                      labs, scale_x_continuous, theme_bw)


def plot_convergence(result: dict, title: str = "DAS IIA against training budget") -> ggplot:
    """``result``: a ``das_convergence.json``. Left panel: IIA (learned, with the band of
    Student's t 95 % interval over seeds, and the random control) per causal model; right
    panel: the mean training loss of each segment over seeds, beside the uniform guess."""
    rows = []
    for r in result["summary"]:
        for panel, what, key in (("IIA (held-out test pairs)", "learned", "iia"),
                                 ("IIA (held-out test pairs)", "random control", "control_iia"),
                                 ("training loss (nats)", "learned", "loss")):
            s = r[key]
            rows.append({"steps": r["steps"], "model": f"M{r['model']}", "panel": panel,
                         "rotation": what, "mean": s["mean"], "low": s["ci_low"],
                         "high": s["ci_high"]})
    df = pd.DataFrame(rows)
    uniform = pd.DataFrame({"panel": ["training loss (nats)"], "y": [result["uniform_loss"]]})
    budgets = result["budgets"]
    return (ggplot(df, aes("steps", "mean", color="model", linetype="rotation"))
            + geom_ribbon(aes(ymin="low", ymax="high", fill="model"), alpha=0.2, color="none")
            + geom_line() + geom_point(size=1.5)
            + geom_hline(uniform, aes(yintercept="y"), linetype="dotted", color="grey")
            + facet_wrap("~panel", scales="free_y")
            + scale_x_continuous(trans="log2", breaks=budgets, labels=[str(b) for b in budgets],
                                 minor_breaks=[])   # none between doublings; one budget has none
            + labs(x="optimizer steps (batches of 64 fresh pairs; log2 axis)", y="",
                   color="", fill="", linetype="",
                   title=title, caption="band: t 95 % interval over seeds; dotted: uniform "
                                        "guess over 28 classes")
            + theme_bw())
