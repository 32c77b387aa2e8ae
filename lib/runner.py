"""Run numbered notebooks headless with papermill, per model, in order.

    python -m lib.runner                                  # every notebook, smollm2-135m
    python -m lib.runner --notebooks 00 01 --models smollm2-135m gemma3-270m
    python -m lib.runner --notebooks 05 -p N_PROMPTS=8 -p LAYERS='"0,1"'
    python -m lib.runner --help                           # lists notebooks and parameters

The model goes in as the notebook parameter ``MODEL``; ``-p NAME=VALUE`` sets any other one
(VALUE is read as JSON when it parses, else as a string). Executed copies, with their inline
figures, are kept as ``runs/<model>/<notebook>.ipynb``. The run stops at the first failing
notebook and prints the notebook, the cell and the error; the failed copy is kept as
``runs/<model>/<notebook>.failed.ipynb``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lib import paths
from lib.models import DEFAULT_MODEL


def list_notebooks(folder: Path = paths.NOTEBOOKS) -> list[Path]:
    """Numbered notebooks (``NN_name.ipynb``) in run order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def select_notebooks(selectors: list[str] | None, folder: Path = paths.NOTEBOOKS) -> list[Path]:
    """Pick notebooks by number prefix (``00``), full stem, or ``all``."""
    available = list_notebooks(folder)
    if not selectors or selectors == ["all"]:
        return available
    chosen = []
    for sel in selectors:
        sel = Path(sel).stem
        match = [p for p in available if p.stem == sel or p.stem.split("_")[0] == sel]
        if not match:
            names = ", ".join(p.stem for p in available) or "(none)"
            raise SystemExit(f"no notebook matches {sel!r}; available: {names}")
        chosen.extend(m for m in match if m not in chosen)
    return sorted(chosen)


def parse_params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"parameter {pair!r} must look like NAME=VALUE")
        key, value = pair.split("=", 1)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def describe_notebooks(folder: Path = paths.NOTEBOOKS) -> str:
    """Each notebook with its parameters (from the ``parameters`` cell), for ``--help``."""
    import papermill as pm

    lines = []
    for nb in list_notebooks(folder):
        lines.append(f"  {nb.stem}")
        try:
            for name, info in pm.inspect_notebook(str(nb)).items():
                help_text = f"  # {info['help']}" if info.get("help") else ""
                lines.append(f"      {name}: {info['inferred_type_name']} = {info['default']}"
                             f"{help_text}")
        except Exception as err:  # a broken notebook should not break --help
            lines.append(f"      (cannot read parameters: {err})")
    return "\n".join(lines) if lines else "  (no notebooks found)"


class NotebookFailed(RuntimeError):
    pass


def takes_model(notebook: Path) -> bool:
    """Whether the notebook's ``parameters`` cell has ``MODEL``. One that does not (a notebook
    without a language model, like 08_das_mlp) runs once, whatever ``models`` says, and its
    executed copy goes to ``runs/<name without the number>/``."""
    import papermill as pm

    return "MODEL" in pm.inspect_notebook(str(notebook))


def _relative_papermill_paths(executed: Path, source: Path, target: Path) -> None:
    """Record repository-relative input/output paths in the executed copy's metadata, so that
    committed copies do not carry this machine's absolute paths."""
    import nbformat

    nb = nbformat.read(str(executed), as_version=4)
    meta = nb.metadata.get("papermill", {})

    def rel(path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(paths.REPO_ROOT))
        except ValueError:
            return Path(path).name
    meta["input_path"], meta["output_path"] = rel(source), rel(target)
    nbformat.write(nb, str(executed))


def run_notebooks(notebooks: list[Path], models: list[str], params: dict | None = None,
                  runs_dir: Path = paths.RUNS, timeout: int | None = None,
                  kernel_name: str = "python3", progress: bool = True) -> list[Path]:
    """Execute ``notebooks`` for each model in order; returns the executed copies.

    Raises :class:`NotebookFailed` with the notebook, cell and error at the first failure.
    """
    import papermill as pm
    from tqdm.auto import tqdm

    done = []
    with_model = {nb: takes_model(nb) for nb in notebooks}
    jobs = [(m, nb) for m in models for nb in notebooks if with_model[nb]]
    jobs += [(None, nb) for nb in notebooks if not with_model[nb]]
    bar = tqdm(jobs, desc="notebooks", unit="nb", disable=not progress)
    for model, nb in bar:
        slug = (model.strip("/").replace("/", "__") if model is not None
                else nb.stem.split("_", 1)[-1])
        out_dir = Path(runs_dir) / slug
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / nb.name
        tmp = out_dir / f".{nb.stem}.running.ipynb"
        bar.set_postfix_str(f"{slug}: {nb.stem}")
        run_params = {**({"MODEL": model} if model is not None else {}), **(params or {})}
        try:
            pm.execute_notebook(str(nb), str(tmp), parameters=run_params, kernel_name=kernel_name,
                                execution_timeout=timeout, progress_bar=False,
                                cwd=str(paths.REPO_ROOT))
        except pm.PapermillExecutionError as err:
            failed = out_dir / f"{nb.stem}.failed.ipynb"
            os.replace(tmp, failed)
            source = "\n".join("      " + line for line in err.source.splitlines()[:15])
            raise NotebookFailed(
                f"{nb.name} failed for model {model!r} in cell {err.cell_index} "
                f"(execution {err.exec_count}):\n{source}\n  {err.ename}: {err.evalue}\n"
                f"  executed copy with the traceback: {failed}") from None
        _relative_papermill_paths(tmp, nb, target)
        os.replace(tmp, target)
        done.append(target)
    return done


def main(argv: list[str] | None = None) -> int:
    folder_default = paths.NOTEBOOKS
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--notebook-dir", type=Path, default=folder_default)
    known, _ = pre.parse_known_args(argv)
    parser = argparse.ArgumentParser(
        prog="python -m lib.runner",
        description="Run numbered notebooks through papermill, per model, in order.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="notebooks and their parameters:\n" + describe_notebooks(known.notebook_dir)
        if ("-h" in (argv or sys.argv[1:]) or "--help" in (argv or sys.argv[1:])) else None)
    parser.add_argument("--notebooks", nargs="*", default=["all"],
                        help="numbers (00 01 ...), names, or 'all' (default)")
    parser.add_argument("--models", nargs="*", default=[DEFAULT_MODEL],
                        help=f"model names (default {DEFAULT_MODEL})")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="notebook parameter (JSON value, or a plain string)")
    parser.add_argument("--runs-dir", type=Path, default=paths.RUNS,
                        help="where executed copies go (default runs/)")
    parser.add_argument("--notebook-dir", type=Path, default=folder_default,
                        help="folder of numbered notebooks (default notebooks/)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per cell")
    args = parser.parse_args(argv)
    notebooks = select_notebooks(args.notebooks, args.notebook_dir)
    if not notebooks:
        print(f"no numbered notebooks in {args.notebook_dir}", file=sys.stderr)
        return 2
    try:
        done = run_notebooks(notebooks, args.models, parse_params(args.param), args.runs_dir,
                             args.timeout)
    except NotebookFailed as err:
        print(f"\nFAILED: {err}", file=sys.stderr)
        return 1
    for path in done:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
