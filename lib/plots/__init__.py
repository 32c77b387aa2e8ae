"""Figures: plot functions return plotnine objects; :func:`save_figure` writes PNG and PDF.

Notebooks display the returned figure inline and save it with the one helper, so every figure
of the repository lands under ``graphs/<model>/`` as ``<name>.png`` (for reading) and
``<name>.pdf`` (for papers), written atomically. The plot functions live in one module per
study (:mod:`lib.plots.domain`, :mod:`lib.plots.token_sets`, :mod:`lib.plots.separability`,
:mod:`lib.plots.explorer`, :mod:`lib.plots.interchange`, :mod:`lib.plots.tracing`, ...); the compute modules of ``lib`` import
no plotting library (``tests/test_hygiene.py``).
"""

from __future__ import annotations

import filecmp
import os
import tempfile
import warnings
from pathlib import Path

from lib.core import paths


def save_figure(fig, name: str, model_slug: str | None = None,
                graphs_dir: str | os.PathLike | None = None, width: float = 7,
                height: float = 4.5, dpi: int = 150) -> list[Path]:
    """Save a plotnine ggplot (or matplotlib Figure) as ``<graphs_dir>/<model_slug>/<name>.png``
    and ``.pdf``. Returns the two paths. A file whose new bytes equal the stored ones is left
    untouched (no creation date is written, so a figure of unchanged results is unchanged)."""
    folder = Path(graphs_dir) if graphs_dir else paths.GRAPHS
    if model_slug:
        folder = folder / model_slug
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("png", "pdf"):
        target = folder / f"{name}.{ext}"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=f".{ext}")
        os.close(fd)
        # A fixed creation date keeps PDFs byte-stable between identical runs.
        meta = {"CreationDate": None} if ext == "pdf" else {"Software": None}
        try:
            if hasattr(fig, "save"):  # plotnine
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fig.save(tmp, format=ext, width=width, height=height, dpi=dpi,
                             verbose=False, metadata=meta)
            else:  # matplotlib
                fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches="tight", metadata=meta)
            if target.exists() and filecmp.cmp(tmp, target, shallow=False):
                Path(tmp).unlink()   # same bytes: the file (and git status) stays untouched
            else:   # mkstemp creates 0600: the mode of every other result file
                os.chmod(tmp, paths.file_mode())
                os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        written.append(target)
    return written


def show(fig, name: str, model_slug: str | None = None,
         graphs_dir: str | os.PathLike | None = None, **size) -> list[Path]:
    """Show ``fig`` in the notebook (IPython's ``display``) and save it with
    :func:`save_figure` (``size``: its ``width``, ``height``, ``dpi``); returns the two paths."""
    from IPython.display import display

    display(fig)
    return save_figure(fig, name, model_slug, graphs_dir, **size)
