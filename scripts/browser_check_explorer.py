"""Optional manual check of the explorer (notebook 04) in JupyterLab in a real browser.

Never run by the tests. Needs a Chromium (Debian: ``apt-get install chromium``) and playwright
in any Python, e.g. a scratch venv (``pip install playwright``; its own browser download is
not needed: the system Chromium is used through ``executable_path``). Start JupyterLab from the
repository root with the app exposed to scripts (add ``--allow-root`` when running as root)::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/jupyter lab --no-browser --port 8899 \\
        --ServerApp.token='' --LabApp.expose_app_in_browser=True

then::

    python scripts/browser_check_explorer.py --url http://localhost:8899 --out shots/ \\
        [--token-sets-dir DIR]

It opens ``notebooks/04_prompt_visualization.ipynb`` (with ``--token-sets-dir``, first sets
``TOKEN_SETS_DIR`` in the parameters cell in the browser, unsaved), runs all cells, waits for
the widgets' first view, and saves three screenshots of the widget area: ``1_busy.png`` right
after a component button is clicked (status "computing …", old view greyed out),
``2_done.png`` when the new view is there, ``3_index_error.png`` after typing an index outside
the pair file (the error states the range). It prints the status line at each step and exits
non-zero when a step does not show what it should; look at the PNGs too. The run leaves a
kernel on the server; JupyterLab may autosave outputs into the notebook: check ``git status``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NOTEBOOK = "notebooks/04_prompt_visualization.ipynb"
STATUS = ".causal-explorer-status"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://localhost:8899")
    ap.add_argument("--out", default="explorer_shots", help="folder for the PNG files")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--component", default="attn_out", help="component button to click")
    ap.add_argument("--bad-index", type=int, default=500)
    ap.add_argument("--timeout", type=float, default=300, help="seconds for the first view")
    ap.add_argument("--token-sets-dir", default="",
                    help="TOKEN_SETS_DIR for this run (set in the parameters cell in the browser, "
                         "not saved), e.g. a folder with a token-set file of the split format")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True,
                                    args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 2600})
        page.goto(f"{args.url}/lab/tree/{NOTEBOOK}")
        page.wait_for_function("window.jupyterapp !== undefined", timeout=120_000)
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        page.wait_for_function(
            "() => { const w = window.jupyterapp.shell.currentWidget;"
            " return w && w.sessionContext && w.sessionContext.session &&"
            " w.sessionContext.session.kernel &&"
            " w.sessionContext.session.kernel.status === 'idle'; }", timeout=120_000)
        if args.token_sets_dir:
            page.evaluate(
                "(dir) => { const nb = window.jupyterapp.shell.currentWidget.content;"
                " const cell = nb.widgets.find(c => (c.model.getMetadata('tags') || [])"
                ".includes('parameters'));"
                " const src = cell.model.sharedModel.getSource();"
                " cell.model.sharedModel.setSource(src.replace(/TOKEN_SETS_DIR: str = \"\"/,"
                " 'TOKEN_SETS_DIR: str = ' + JSON.stringify(dir))); }", args.token_sets_dir)
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        status = page.locator(STATUS)
        status.wait_for(timeout=args.timeout * 1000)
        page.wait_for_function(
            f"() => {{ const s = document.querySelector('{STATUS}');"
            " return s && (s.innerText.includes('✔') || s.innerText.includes('✖')); }",
            timeout=args.timeout * 1000)
        print("first view:", status.inner_text())
        no_news = page.locator(".jp-toast-button", has_text="No")   # the news question, if asked
        if no_news.count():
            no_news.first.click()
        box = page.locator(".causal-explorer")
        box.scroll_into_view_if_needed()
        time.sleep(1)

        # (a) busy: click a component button, screenshot at once
        page.locator(".causal-explorer .widget-toggle-button",
                     has_text=args.component).first.click()
        page.wait_for_function(
            f"() => document.querySelector('{STATUS}').innerText.includes('computing')",
            timeout=30_000)
        text = status.inner_text()
        stale = page.locator(".causal-explorer-stale").count()
        box.screenshot(path=str(out / "1_busy.png"))
        print("busy:", text, "| stale outputs:", stale)
        if "computing" not in text or not stale:
            failures.append("busy state not shown")

        # (b) done
        page.wait_for_function(
            f"() => document.querySelector('{STATUS}').innerText.includes('✔')",
            timeout=args.timeout * 1000)
        time.sleep(1.5)   # let the charts' images decode
        text = status.inner_text()
        box.screenshot(path=str(out / "2_done.png"))
        print("done:", text)
        if f"component {args.component}" not in text:
            failures.append("the new view is not for the clicked component")

        # (c) an index outside the pair file
        field = page.locator(".causal-explorer .widget-text input").first
        field.fill(str(args.bad_index))
        field.press("Enter")
        page.wait_for_function(
            f"() => document.querySelector('{STATUS}').innerText.includes('✖')",
            timeout=60_000)
        time.sleep(0.5)
        text = status.inner_text()
        box.screenshot(path=str(out / "3_index_error.png"))
        print("error:", text)
        if "out of range" not in text or "0.." not in text:
            failures.append("the out-of-range index does not state its range")

        page.evaluate("window.jupyterapp.commands.execute('application:close-all')")
        time.sleep(0.5)
        browser.close()
    for f in failures:
        print("FAILED:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
