"""Views of the prompt explorer (notebook 04): top-token and token-set-mass charts, the static
rendering of a :class:`lib.explorer.PromptView`, and the ipywidgets wrapper around it.

What is shown (a last-token interchange intervention between minimal domain pairs; Vig et al.
2020, Geiger et al. 2021) is computed by :class:`lib.explorer.Explorer`. :func:`render` shows a
view as static output (tables and plotnine figures), which is what a papermill run records;
:func:`build_widgets` wraps it in ipywidgets for interactive use, when :func:`widget_frontend`
finds a front end.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from lib.explorer import EXPLORER_COMPONENTS, SIDES, Explorer, PromptView, show_token


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


def render(view: PromptView) -> None:
    """Display a view as static output: texts, top-token chart, masses (or why not)."""
    from IPython.display import Markdown, display

    display(Markdown(f"### {view.pair}, prompt {view.index}: swap of `{view.component}` at "
                     f"layer {view.layer} (last token)"))
    texts = view.texts.copy()
    texts["continuation"] = texts.continuation.map(lambda s: s.replace("\n", "⏎"))
    with pd.option_context("display.max_colwidth", None, "display.width", 250,
                           "display.float_format", "{:.4g}".format):
        display(texts[["side", "base_domain", "condition", "prompt", "continuation"]])
        display(plot_top_tokens(view))
        if view.masses.empty:
            display(Markdown(f"**{view.message or 'No token sets.'}**"))
        else:
            display(view.mass_table())
            display(plot_masses(view))


# --- widgets -----------------------------------------------------------------------------------

_HEADLESS_PARENTS = ("papermill", "nbconvert", "nbclient", "jupyter-execute", "lib.runner",
                     "pytest")


def widget_frontend(interactive: bool = True) -> tuple[bool, str]:
    """(whether to build widgets, why). Best effort: widgets need an IPython kernel, ipywidgets
    and a front end; a kernel started by papermill, nbconvert, nbclient, ``lib.runner`` or pytest
    (seen in the parent process's command line) or ``CAUSAL_HEADLESS=1`` has none."""
    if not interactive:
        return False, "INTERACTIVE is False"
    if os.environ.get("CAUSAL_HEADLESS") == "1":
        return False, "CAUSAL_HEADLESS=1"
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False, "ipywidgets is not installed"
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False, "not running in a Jupyter kernel"
    try:
        cmdline = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ")
        cmdline = cmdline.decode(errors="replace")
    except OSError:
        cmdline = ""
    for name in _HEADLESS_PARENTS:
        if name in cmdline:
            return False, f"headless run ({name}): no widget front end"
    return True, "Jupyter front end"


def build_widgets(explorer: Explorer, pair: str, index: int, layer: int, component: str):
    """Dropdowns and sliders (pair, prompt index, layer, component) that re-render the view."""
    import ipywidgets as w
    from IPython.display import display

    pair_w = w.Dropdown(options=sorted(explorer.pairs), value=pair, description="pair")
    index_w = w.BoundedIntText(value=index, min=0, max=len(explorer.pairs[pair]) - 1,
                               description="prompt")
    layer_w = w.IntSlider(value=layer, min=0, max=explorer.lm.n_layers - 1, description="layer",
                          continuous_update=False)
    comp_w = w.ToggleButtons(options=list(EXPLORER_COMPONENTS), value=component,
                             description="component")
    prompt_w = w.HTML()
    out = w.Output()

    def on_pair(change):
        index_w.max = len(explorer.pairs[change["new"]]) - 1
        index_w.value = min(index_w.value, index_w.max)

    def refresh(*_):
        ps = explorer.pairs[pair_w.value]
        prompt_w.value = (f"<b>{ps.domains[0]}</b>: {ps.a[index_w.value]}<br>"
                          f"<b>{ps.domains[1]}</b>: {ps.b[index_w.value]}")
        with out:
            out.clear_output(wait=True)
            render(explorer.view(pair_w.value, index_w.value, layer_w.value, comp_w.value))

    pair_w.observe(on_pair, names="value")
    for widget in (pair_w, index_w, layer_w, comp_w):
        widget.observe(refresh, names="value")
    box = w.VBox([w.HBox([pair_w, index_w]), layer_w, comp_w, prompt_w, out])
    display(box)
    refresh()
    return box
