"""Views of the prompt explorer (notebook 04): top-token and token-set-mass charts and the
static rendering of a :class:`lib.studies.explorer.PromptView`.

What is shown (a last-token interchange intervention between minimal domain pairs; Vig et al.
2020, Geiger et al. 2021) is computed by :class:`lib.studies.explorer.Explorer`. :func:`render`
shows a view as static output (tables and plotnine figures), which is what a papermill run
records; :mod:`lib.ui.explorer` wraps it in ipywidgets for interactive use.
"""

from __future__ import annotations

import pandas as pd

from lib.studies.explorer import SIDES, PromptView, show_token


def _side_label(view: PromptView, side: str) -> str:
    a, b = view.domains
    return f"{a} prompt ← {b} act." if side == "b_into_a" else f"{b} prompt ← {a} act."


def plot_top_tokens(view: PromptView):
    """Bar chart of the top-k next tokens: one panel per side (rows) and clean / swapped
    (columns), each with its own tokens."""
    import plotnine as p9

    df = view.top.copy()
    df["panel"] = pd.Categorical(df.side.map(lambda s: _side_label(view, s)),
                                 categories=[_side_label(view, s) for s in SIDES])
    df["label"] = [f"{r:>2}. {show_token(t)}" for r, t in zip(df["rank"], df.token)]
    order = sorted(df.label.unique(), key=lambda s: (-int(s.split(".")[0]), s))
    df["label"] = pd.Categorical(df.label, categories=order)
    return (p9.ggplot(df, p9.aes("label", "prob", fill="condition"))
            + p9.geom_col(show_legend=False)
            + p9.geom_text(p9.aes(label="prob"), format_string="{:.2f}", ha="left", size=7,
                           nudge_y=0.005)
            + p9.coord_flip()
            + p9.facet_wrap("~ panel + condition", ncol=2, scales="free_y")
            + p9.scale_y_continuous(limits=(0, min(1.0, df.prob.max() * 1.25 + 0.02)))
            + p9.labs(x="", y="next-token probability",
                      title=f"{view.pair} #{view.index}: top next tokens, swap at "
                            f"{view.component} L{view.layer}")
            + p9.theme_bw() + p9.theme(figure_size=(9, 6)))


def plot_masses(view: PromptView):
    """Token-set masses without and with the swap, per side."""
    import plotnine as p9

    if view.masses.empty:
        return None
    df = view.masses.copy()
    df["panel"] = pd.Categorical(df.side.map(lambda s: _side_label(view, s)),
                                 categories=[_side_label(view, s) for s in SIDES])
    df["condition"] = pd.Categorical(df.condition, categories=["clean", "swapped"])
    return (p9.ggplot(df, p9.aes("token_set", "mass", fill="condition"))
            + p9.geom_col(position="dodge")
            + p9.facet_wrap("~panel")
            + p9.labs(x="token set", y="probability mass",
                      title=f"{view.pair} #{view.index}: token-set mass, swap at "
                            f"{view.component} L{view.layer}")
            + p9.theme_bw() + p9.theme(figure_size=(8, 3.5)))


def _sets_caption(view: PromptView) -> str:
    assert view.sets is not None  # render asks for it only when the view has token sets
    has_ref = any(c.startswith("reference ") for c in view.sets.columns)
    text = (f"**Token sets of {view.pair}**: top {len(view.sets)} per domain, the sets the "
            "masses are summed over" + ("; `reference`: the sets from the contrast of the two "
                                        "domains' clean next-token distributions" if has_ref
                                        else ""))
    return text + (f". {view.sets_note}" if view.sets_note else ".")


def render(view: PromptView) -> None:
    """Display a view as static output: which half of the split the prompt is in (when the
    token-set file has a split), texts, the top tokens of each domain's set (and the reference
    sets), top-token chart, masses (or why not)."""
    from IPython.display import Markdown, display

    display(Markdown(f"### {view.pair}, prompt {view.index}: swap of `{view.component}` at "
                     f"layer {view.layer} (last token)"))
    if view.split_note:
        display(Markdown(f"**Split:** {view.split_note}."))
    texts = view.texts.copy()
    texts["continuation"] = texts.continuation.map(lambda s: s.replace("\n", "⏎"))
    with pd.option_context("display.max_colwidth", None, "display.width", 250,
                           "display.float_format", "{:.4g}".format):
        display(texts[["side", "base_domain", "condition", "prompt", "continuation"]])
        if view.sets is not None:
            display(Markdown(_sets_caption(view)))
            display(view.sets.fillna(""))
        display(plot_top_tokens(view))
        if view.masses.empty:
            display(Markdown(f"**{view.message or 'No token sets.'}**"))
        else:
            display(view.mass_table())
            display(plot_masses(view))


# --- widgets -----------------------------------------------------------------------------------
