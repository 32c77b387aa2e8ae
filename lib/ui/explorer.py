"""The prompt explorer's ipywidgets controller (notebook 04): :func:`build_widgets` wraps
:func:`lib.plots.explorer.render` in controls (:class:`ExplorerUI`) when
:func:`widget_frontend` finds a front end.

The widgets' states (:attr:`ExplorerUI.state`): ``computing`` from the moment a control
changes (the status line says which view is being computed, the old view is greyed out and
marked stale, the controls are disabled) until the new view replaces it (``done``), or until
the computation fails (``error``: the message, e.g. the valid prompt range, in the status line
and in place of the view). A view takes seconds on a 135M model on a CPU; the ipykernel sends
widget updates from its I/O thread, so the busy state reaches the browser while the kernel
computes.
"""

from __future__ import annotations

import html
import os
import time
from pathlib import Path

from lib.plots.explorer import render
from lib.studies.explorer import EXPLORER_COMPONENTS, Explorer, split_of, split_text

_HEADLESS_PARENTS = ("papermill", "nbconvert", "nbclient", "jupyter-execute", "lib.runner",
                     "pytest")


def widget_frontend(interactive: bool = True) -> tuple[bool, str]:
    """(whether to build widgets, why). Best effort: widgets need an IPython kernel, ipywidgets
    and a front end; a kernel started by papermill, nbconvert, nbclient, ``lib.runner`` or pytest
    (seen in the parent process's command line or pytest's environment variables) or
    ``CAUSAL_HEADLESS=1`` has none."""
    if not interactive:
        return False, "INTERACTIVE is False"
    if os.environ.get("CAUSAL_HEADLESS") == "1":
        return False, "CAUSAL_HEADLESS=1"
    if os.environ.get("PYTEST_CURRENT_TEST") or os.environ.get("PYTEST_XDIST_WORKER"):
        # a kernel started under pytest inherits its environment; its parent may be an
        # xdist worker, whose command line does not say pytest
        return False, "headless run (pytest): no widget front end"
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False, "ipywidgets is not installed"
    shell = get_ipython()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False, "not running in a Jupyter kernel"
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ")
        cmdline = raw.decode(errors="replace")
    except OSError:
        cmdline = ""
    for name in _HEADLESS_PARENTS:
        if name in cmdline:
            return False, f"headless run ({name}): no widget front end"
    return True, "Jupyter front end"


STALE_CLASS = "causal-explorer-stale"
_STYLE = ("<style>"
          f".{STALE_CLASS} {{opacity: 0.3; filter: grayscale(1); pointer-events: none;}}"
          ".causal-explorer-spinner {display: inline-block; width: 0.8em; height: 0.8em; "
          "margin-right: 0.4em; vertical-align: -0.05em; border: 2px solid #e69500; "
          "border-right-color: transparent; border-radius: 50%; "
          "animation: causal-explorer-spin 0.8s linear infinite;}"
          "@keyframes causal-explorer-spin {to {transform: rotate(360deg);}}"
          "</style>")
STATES = ("idle", "computing", "done", "error")


def _message(err: BaseException) -> str:
    """An exception's message (a KeyError's without the quotes that ``str`` adds)."""
    if len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err)


class ExplorerUI:
    """The explorer's controls, status line and output, and the state machine between them.

    Controls: pair (dropdown), prompt index (a text box that accepts any integer, so an index
    outside the pair file is reported with its range rather than clamped, and a slider over
    0..n-1 of the chosen pair kept in step with it), layer (slider), component (buttons). A
    change of any control calls :meth:`refresh`:

    1. ``state = "computing"``: the status line says "computing view for pair …, prompt …,
       layer …, component …", the output is marked stale (CSS class :data:`STALE_CLASS`: greyed
       out) and the controls are disabled;
    2. the choice is checked and the view computed (:meth:`lib.studies.explorer.Explorer.view`, cached);
    3. ``state = "done"``: the new view replaces the old one, the status says how long it took;
       or ``state = "error"``: the status and the output show the error (nothing is swallowed);
       the output is un-greyed and the controls enabled either way.

    ``render_view`` (default :func:`render`) draws a view into the output; tests pass a cheaper
    one. Everything is plain ipywidgets objects, so tests can set control values and read
    :attr:`state`, ``status.value`` and ``out._dom_classes`` without a browser.
    """

    def __init__(self, explorer: Explorer, pair: str, index: int, layer: int, component: str,
                 render_view=None):
        import ipywidgets as w

        self.explorer = explorer
        self.render_view = render_view or render
        self.state = "idle"
        self.last_error: BaseException | None = None
        self.pair_w = w.Dropdown(options=sorted(explorer.pairs), value=pair, description="pair")
        n = len(explorer.prompt_range(pair))
        self.index_w = w.IntText(value=int(index), description="prompt",
                                 layout=w.Layout(width="180px"))
        self.range_w = w.HTML()
        self.index_slider = w.IntSlider(value=min(max(int(index), 0), n - 1), min=0,
                                        max=n - 1, description="", readout=False,
                                        continuous_update=False)
        self.layer_w = w.IntSlider(value=layer, min=0, max=explorer.lm.n_layers - 1,
                                   description="layer", continuous_update=False)
        self.comp_w = w.ToggleButtons(options=list(EXPLORER_COMPONENTS), value=component,
                                      description="component")
        self.status = w.HTML()
        self.prompt_w = w.HTML()
        self.out = w.Output()
        self.controls = (self.pair_w, self.index_w, self.index_slider, self.layer_w,
                         self.comp_w)
        self._syncing = False
        self._update_range()
        self.pair_w.observe(self._on_pair, names="value")
        self.index_w.observe(self._on_index, names="value")
        self.index_slider.observe(self._on_slider, names="value")
        self.layer_w.observe(self.refresh, names="value")
        self.comp_w.observe(self.refresh, names="value")
        self.box = w.VBox([w.HTML(_STYLE),
                           w.HBox([self.pair_w, self.index_w, self.range_w, self.index_slider]),
                           self.layer_w, self.comp_w, self.status, self.prompt_w, self.out])
        self.box.add_class("causal-explorer")            # for scripts/browser_check_explorer.py
        self.status.add_class("causal-explorer-status")

    # --- controls -----------------------------------------------------------------------

    def choice(self) -> tuple[str, int, int, str]:
        """(pair, prompt index, layer, component) as the controls stand."""
        return self.pair_w.value, self.index_w.value, self.layer_w.value, self.comp_w.value

    def _update_range(self) -> None:
        """Range label and slider bounds for the chosen pair. The slider may not hold an
        out-of-range index, but the text box keeps it (and the view reports it)."""
        n = len(self.explorer.prompt_range(self.pair_w.value))
        self.range_w.value = f"of 0..{n - 1}"
        self._syncing = True
        try:
            self.index_slider.max = n - 1
            if 0 <= self.index_w.value < n:
                self.index_slider.value = self.index_w.value
        finally:
            self._syncing = False

    def _on_pair(self, change) -> None:
        self._update_range()
        self.refresh()

    def _on_index(self, change) -> None:
        if 0 <= change["new"] <= self.index_slider.max:
            self._syncing = True
            try:
                self.index_slider.value = change["new"]
            finally:
                self._syncing = False
        self.refresh()

    def _on_slider(self, change) -> None:
        if not self._syncing:
            self.index_w.value = change["new"]   # refreshes through _on_index

    # --- state machine ------------------------------------------------------------------

    @staticmethod
    def describe(pair: str, index: int, layer: int, component: str) -> str:
        return f"pair {pair}, prompt {index}, layer {layer}, component {component}"

    def _set_status(self, text: str, colour: str) -> None:
        self.status.value = (f'<div style="padding:4px 8px;border-left:4px solid {colour};'
                             f'background:#f6f6f6;font-size:110%">{text}</div>')

    def _begin(self, what: str) -> None:
        self.state = "computing"
        self._set_status('<span class="causal-explorer-spinner"></span><b>computing</b> '
                         f"view for {html.escape(what)} … (the view below is "
                         "out of date)", "#e69500")
        self.out.add_class(STALE_CLASS)
        for c in self.controls:
            c.disabled = True

    def _end(self) -> None:
        self.out.remove_class(STALE_CLASS)
        for c in self.controls:
            c.disabled = False

    def refresh(self, *_) -> None:
        """Recompute and show the view for the controls' current values (see the class)."""
        from IPython.display import HTML, display

        pair, index, layer, component = self.choice()
        what = self.describe(pair, index, layer, component)
        self._begin(what)
        started = time.perf_counter()
        try:
            self.explorer.check(pair, index, layer, component, index_name="prompt index")
            ps = self.explorer.pairs[pair]
            split = split_text(split_of(self.explorer.token_sets, pair, index), pair, index)
            self.prompt_w.value = (
                f"<b>{html.escape(ps.domains[0])}</b>: {html.escape(ps.a[index])}<br>"
                f"<b>{html.escape(ps.domains[1])}</b>: {html.escape(ps.b[index])}"
                + (f"<br><i>{html.escape(split)}</i>" if split else ""))
            view = self.explorer.view(pair, index, layer, component)
            with self.out:
                self.out.clear_output(wait=True)
                self.render_view(view)
        except Exception as err:   # shown in the UI, and kept in last_error
            self.state, self.last_error = "error", err
            msg = html.escape(f"{type(err).__name__}: {_message(err)}")
            self._set_status(f"✖ <b>error</b> for {html.escape(what)}: {msg}", "#c00000")
            self.prompt_w.value = ""
            self.out.clear_output()
            with self.out:
                display(HTML(f'<pre style="color:#c00000;white-space:pre-wrap">{msg}</pre>'))
        else:
            self.state, self.last_error = "done", None
            self._set_status(f"✔ view for {html.escape(what)} "
                             f"({time.perf_counter() - started:.1f} s)", "#2a7f2a")
        finally:
            self._end()


def build_widgets(explorer: Explorer, pair: str, index: int, layer: int, component: str,
                  show: bool = True) -> ExplorerUI:
    """An :class:`ExplorerUI` for these starting values, displayed (``show``) and refreshed
    once; returns it (``.box`` is the widget tree)."""
    ui = ExplorerUI(explorer, pair, index, layer, component)
    if show:
        from IPython.display import display

        display(ui.box)
    ui.refresh()
    return ui
