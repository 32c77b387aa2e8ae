"""Build a clean notebook (no outputs) from a percent-format script.

    python scripts/nb_from_py.py draft.py notebooks/05_interchange_intervention.ipynb

Cells start with ``# %%`` (code), ``# %% [markdown]`` (markdown; lines lose their leading
``# ``) or ``# %% tags=["parameters"]`` (the papermill parameters cell).
"""

import re
import sys

import nbformat


def build(text: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    for chunk in re.split(r"^# %%", text, flags=re.M)[1:]:
        header, _, body = chunk.partition("\n")
        body = body.strip("\n")
        if "[markdown]" in header:
            lines = [re.sub(r"^# ?", "", line) for line in body.splitlines()]
            nb.cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
        else:
            cell = nbformat.v4.new_code_cell(body)
            if "parameters" in header:
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids keep diffs small
        cell["id"] = f"cell-{i:02d}"
    return nb


if __name__ == "__main__":
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, encoding="utf-8") as fh:
        nbformat.write(build(fh.read()), dst)
    print(f"wrote {dst}")
