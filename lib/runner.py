"""Run numbered notebooks headless with papermill, per model, in order.

    python -m lib.runner                                  # every notebook, smollm2-135m
    python -m lib.runner --notebooks 00 01 --models smollm2-135m gemma3-270m
    python -m lib.runner --notebooks 05 -p N_PROMPTS=8 -p LAYERS='"0,1"'
    python -m lib.runner --force                          # recompute instead of reusing
    python -m lib.runner --help                           # lists notebooks and parameters

The model goes in as the notebook parameter ``MODEL``; ``-p NAME=VALUE`` sets any other one.
Before anything runs, every value is checked against the declaring notebooks' ``parameters``
cells (:mod:`lib.core.params`): a name that no selected notebook declares, a value of the wrong
type (VALUE is the text itself for a ``str`` parameter, JSON for the others) or out of range,
an unknown model or an unwritable ``--runs-dir`` is a one-line error and exit code 2, before
any kernel starts. A notebook gets only the parameters it declares. Torch in every kernel uses
``--threads`` CPU threads (default 1, the thread count of the committed results: on a shared
CPU one thread is faster than two for these small models).

Every notebook reuses a result that is current (same parameters, inputs and thread count:
:func:`lib.core.io.load_or_compute`); ``--force`` recomputes. Executed copies, with their inline
figures, are kept as ``runs/<model>/<notebook>.ipynb``; one whose content did not change (run
times aside) keeps its bytes, as figures do, so a rerun over current results changes no file.
The run stops at the first failing notebook (an error, a cell past ``--timeout``, a dead
kernel) and prints the notebook, the cell and the error, exit code 1; the failed copy is kept
as ``runs/<model>/<notebook>.failed.ipynb`` and removed by the next successful run of that
notebook. SIGTERM, SIGHUP and Ctrl-C stop the run and shut the kernel down with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from lib.core import io, paths
from lib.core.models import DEFAULT_MODEL, ModelNotFoundError, check_model_name
from lib.core.params import CliText, ParameterError, check_params, read_parameters

DEFAULT_THREADS = 1  # torch CPU threads in every kernel; the committed results use 1


def list_notebooks(folder: Path = paths.NOTEBOOKS) -> list[Path]:
    """Numbered notebooks (``NN_name.ipynb``) in run order."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def select_notebooks(selectors: list[str] | None, folder: Path = paths.NOTEBOOKS) -> list[Path]:
    """Pick notebooks by number prefix (``00``), full stem, or ``all``."""
    available = list_notebooks(folder)
    if not selectors or selectors == ["all"]:
        return available
    chosen: list[Path] = []
    for sel in selectors:
        sel = Path(sel).stem
        match = [p for p in available if p.stem == sel or p.stem.split("_")[0] == sel]
        if not match:
            names = ", ".join(p.stem for p in available) or "(none)"
            raise ParameterError(f"no notebook matches {sel!r}; available: {names}")
        chosen.extend(m for m in match if m not in chosen)
    return sorted(chosen)


def parse_params(pairs: list[str]) -> dict:
    """``["NAME=VALUE", ...]`` -> ``{NAME: CliText(VALUE)}``; each value is converted to its
    declared type by :func:`lib.core.params.check_value` once the notebooks are known."""
    params = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ParameterError(f"parameter {pair!r} must look like NAME=VALUE, e.g. "
                                 "-p N_PROMPTS=8")
        key, value = pair.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise ParameterError(f"parameter name {key!r} (in {pair!r}) is not a name; write "
                                 "NAME=VALUE, e.g. -p N_PROMPTS=8")
        params[key] = CliText(value)
    return params


def describe_notebooks(folder: Path = paths.NOTEBOOKS) -> str:
    """Each notebook with its parameters (from the ``parameters`` cell), for ``--help``."""
    lines = []
    for nb in list_notebooks(folder):
        lines.append(f"  {nb.stem}")
        try:
            for param in read_parameters(nb).values():
                lines.append(f"      {param.describe()}")
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
    """Record repository-relative input/output paths in the executed copy's metadata (and in
    its printed outputs), so that committed copies do not carry this machine's absolute
    paths; and drop what differs between two runs of the same content (the injected cell's
    random id, memory addresses in reprs, progress-bar widgets with their ids and rates, where
    the kernel's flushes split a stream)."""
    import nbformat

    nb = nbformat.read(str(executed), as_version=4)
    meta = nb.metadata.get("papermill", {})

    def rel(path: Path) -> str:
        try:
            return str(Path(path).resolve().relative_to(paths.REPO_ROOT))
        except ValueError:
            return Path(path).name
    meta["input_path"], meta["output_path"] = rel(source), rel(target)
    # printed paths inside the repository become relative too: the same run in another clone
    # gives the same executed copy
    root = f"{paths.REPO_ROOT.resolve()}/"
    nb.metadata.pop("widgets", None)   # progress-bar widgets: dead without a kernel, and random
    for cell in nb.cells:
        cell["outputs"] = _merged_streams([
            out for out in cell.get("outputs", [])
            if "application/vnd.jupyter.widget-view+json" not in out.get("data", {})])
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            cell["id"] = "injected-parameters"   # papermill draws a random id on every run
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = out["text"].replace(root, "")
            plain = out.get("data", {}).get("text/plain")
            if isinstance(plain, str):   # a figure's repr names its memory address
                out["data"]["text/plain"] = _ADDRESS.sub(">", plain.replace(root, ""))
    nbformat.write(nb, str(executed))


def _merged_streams(outputs: list) -> list:
    """Consecutive outputs of one stream (stdout, stderr) as one: where the kernel split them
    depends on when it flushed, which differs from run to run."""
    merged: list = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (prev is not None and out.get("output_type") == "stream" == prev.get("output_type")
                and out.get("name") == prev.get("name")):
            prev["text"] = prev["text"] + out["text"]
        else:
            merged.append(out)
    return merged


_ADDRESS = re.compile(r" at 0x[0-9a-f]+>")
_RUN_TIMES = ("start_time", "end_time", "duration", "exception")


def executed_content(path: Path) -> str:
    """An executed notebook as canonical JSON without what changes on every run of the same
    content: papermill's start/end times and durations, and each cell's execution timestamps.
    Two runs that computed and displayed the same things give the same text."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    meta = nb.get("metadata", {}).get("papermill", {})
    for key in _RUN_TIMES:
        meta.pop(key, None)
    for cell in nb.get("cells", []):
        cell.get("metadata", {}).pop("execution", None)
        for key in _RUN_TIMES:
            cell.get("metadata", {}).get("papermill", {}).pop(key, None)
    return json.dumps(nb, sort_keys=True)


def keep_if_unchanged(executed: Path, target: Path) -> bool:
    """Move ``executed`` onto ``target`` unless ``target`` already holds the same content
    (:func:`executed_content`); then ``executed`` is removed and ``target`` keeps its bytes, so
    rerunning a notebook over current results leaves the committed copy untouched. Returns
    whether ``target`` was rewritten."""
    try:
        same = target.exists() and executed_content(executed) == executed_content(target)
    except (ValueError, OSError):   # an unreadable old copy is simply replaced
        same = False
    if same:
        executed.unlink()
        return False
    os.replace(executed, target)
    return True


def check_runs_dir(runs_dir: Path) -> None:
    """Refuse a ``--runs-dir`` that cannot be created or written, before anything runs."""
    runs_dir = Path(runs_dir)
    try:
        io.check_writable(runs_dir)
    except OSError as err:
        cause = err.__cause__ if isinstance(err.__cause__, OSError) else err
        raise ParameterError(f"--runs-dir {runs_dir} is not writable "
                             f"({cause.strerror or cause}); choose a folder you can write to, "
                             "e.g. --runs-dir /tmp/runs") from None


def check_run(notebooks: list[Path], models: list[str], params: dict | None,
              runs_dir: Path, check_models: bool = True, force: bool = False) -> dict[Path, dict]:
    """Everything that can be checked before a kernel starts; returns each notebook's own
    checked parameters. Raises :class:`lib.core.params.ParameterError` (or
    :class:`lib.core.models.ModelNotFoundError`) naming the problem and the fix."""
    if not models:
        raise ParameterError("no model given; use e.g. --models smollm2-135m")
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None and not epoch.strip().isdigit():   # every kernel would fail to start
        raise ParameterError(f"SOURCE_DATE_EPOCH={epoch!r} is not a whole number of seconds "
                             "since 1970; set it to one (e.g. 1700000000) or unset it")
    for model in models:
        if not isinstance(model, str) or not model.strip():
            raise ParameterError(f"model name {model!r} is empty; use e.g. --models smollm2-135m")
        if check_models:
            check_model_name(model)
    params = dict(params or {})
    if "MODEL" in params:
        raise ParameterError("set the model with --models, not -p MODEL=...")
    if force and "FORCE" in params:
        raise ParameterError("give either --force or -p FORCE=..., not both")
    per_notebook = check_params(notebooks, params)
    if force:   # every notebook that can reuse a stored result recomputes it
        for nb, declared in per_notebook.items():
            if "FORCE" in read_parameters(nb):
                declared["FORCE"] = True
    check_runs_dir(runs_dir)
    return per_notebook


def _clean_strays(out_dir: Path, nb: Path) -> None:
    """After a successful run: remove the failed copy and running copies of earlier runs."""
    (out_dir / f"{nb.stem}.failed.ipynb").unlink(missing_ok=True)
    for stray in out_dir.glob(f".{nb.stem}.running*.ipynb"):
        stray.unlink(missing_ok=True)


class _Stopped(BaseException):
    """Raised in the main thread by SIGTERM / SIGHUP, so that the kernel is shut down."""


def _raise_stopped(signum, frame):
    raise _Stopped(signal.Signals(signum).name)


def run_notebooks(notebooks: list[Path], models: list[str], params: dict | None = None,
                  runs_dir: Path = paths.RUNS, timeout: int | None = None,
                  kernel_name: str = "python3", progress: bool = True,
                  check_models: bool = False, threads: int | None = None,
                  force: bool = False) -> list[Path]:
    """Execute ``notebooks`` for each model in order; returns the executed copies.

    Parameters are checked first (:func:`check_run`); each notebook gets the ones it declares.
    ``threads`` sets torch's CPU threads in the kernels (None: the environment's default).
    ``force`` sets ``FORCE=True`` in every notebook that declares it (recompute everything).
    Raises :class:`NotebookFailed` with the notebook, cell and error at the first failure.
    """
    per_notebook = check_run(notebooks, models, params, Path(runs_dir), check_models, force)
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(int(threads))
    try:
        return _run_all(notebooks, models, per_notebook, Path(runs_dir), timeout, kernel_name,
                        progress)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_all(notebooks, models, per_notebook, runs_dir, timeout, kernel_name, progress):
    import papermill as pm
    from tqdm.auto import tqdm

    done = []
    with_model = {nb: takes_model(nb) for nb in notebooks}
    jobs = [(m, nb) for m in models for nb in notebooks if with_model[nb]]
    jobs += [(None, nb) for nb in notebooks if not with_model[nb]]
    bar = tqdm(jobs, desc="notebooks", unit="nb", disable=not progress)
    for model, nb in bar:
        slug = io.slug(model) if model is not None else nb.stem.split("_", 1)[-1]
        out_dir = Path(runs_dir) / slug
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / nb.name
        tmp = out_dir / f".{nb.stem}.running.ipynb"
        failed = out_dir / f"{nb.stem}.failed.ipynb"
        bar.set_postfix_str(f"{slug}: {nb.stem}")
        run_params = {**({"MODEL": model} if model is not None else {}),
                      **per_notebook[Path(nb)]}
        try:
            pm.execute_notebook(str(nb), str(tmp), parameters=run_params, kernel_name=kernel_name,
                                execution_timeout=timeout, progress_bar=False,
                                cwd=str(paths.REPO_ROOT))
        except pm.PapermillExecutionError as err:
            if tmp.exists():
                os.replace(tmp, failed)
            source = "\n".join("      " + line for line in err.source.splitlines()[:15])
            raise NotebookFailed(
                f"{nb.name} failed for model {model!r} in cell {err.cell_index} "
                f"(execution {err.exec_count}):\n{source}\n  {err.ename}: {err.evalue}\n"
                f"  executed copy with the traceback: {failed}") from None
        except BaseException as err:
            if tmp.exists():
                os.replace(tmp, failed)
            if isinstance(err, TimeoutError):  # nbclient's CellTimeoutError
                raise NotebookFailed(
                    f"{nb.name} for model {model!r}: a cell ran longer than --timeout {timeout} s "
                    f"and was stopped; raise --timeout or use smaller parameters. Executed copy: "
                    f"{failed}") from None
            if isinstance(err, (KeyboardInterrupt, _Stopped)):
                raise
            raise NotebookFailed(f"{nb.name} for model {model!r} did not finish: "
                                 f"{type(err).__name__}: {str(err)[:300]}. Executed copy: "
                                 f"{failed}") from None
        _relative_papermill_paths(tmp, nb, target)
        keep_if_unchanged(tmp, target)
        _clean_strays(out_dir, nb)
        done.append(target)
    return done


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    folder_default = paths.NOTEBOOKS
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--notebook-dir", type=Path, default=folder_default)
    known, _ = pre.parse_known_args(argv)
    parser = argparse.ArgumentParser(
        prog="python -m lib.runner",
        description="Run numbered notebooks through papermill, per model, in order.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="notebooks and their parameters ([...] is the allowed range):\n"
        + describe_notebooks(known.notebook_dir)
        if ("-h" in (argv or sys.argv[1:]) or "--help" in (argv or sys.argv[1:])) else None)
    parser.add_argument("--notebooks", nargs="*", default=["all"],
                        help="numbers (00 01 ...), names, or 'all' (default)")
    parser.add_argument("--models", nargs="*", default=[DEFAULT_MODEL],
                        help=f"model names (default {DEFAULT_MODEL})")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="notebook parameter: the text itself for str parameters, JSON for "
                             "int, float, bool and list ones")
    parser.add_argument("--runs-dir", type=Path, default=paths.RUNS,
                        help="where executed copies go (default runs/)")
    parser.add_argument("--notebook-dir", type=Path, default=folder_default,
                        help="folder of numbered notebooks (default notebooks/)")
    parser.add_argument("--timeout", type=_positive_int, default=None,
                        help="seconds per cell")
    parser.add_argument("--force", action="store_true",
                        help="recompute every result (FORCE=True in each notebook that has it); "
                             "without it, current results are reused")
    parser.add_argument("--threads", type=_positive_int, default=DEFAULT_THREADS,
                        help=f"torch CPU threads in each kernel (default {DEFAULT_THREADS}; "
                             "results move at the last digits with it, see the README)")
    args = parser.parse_args(argv)
    try:
        notebooks = select_notebooks(args.notebooks, args.notebook_dir)
        if not notebooks:
            print(f"error: no numbered notebooks in {args.notebook_dir}", file=sys.stderr)
            return 2
        params = parse_params(args.param)
        check_run(notebooks, args.models, params, args.runs_dir, force=args.force)
    except (ParameterError, ModelNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
    started_ns = time.time_ns()
    try:
        done = run_notebooks(notebooks, args.models, params, args.runs_dir, args.timeout,
                             threads=args.threads, force=args.force)
    except NotebookFailed as err:
        print(f"\nFAILED: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stopped) as err:
        print(f"\nSTOPPED ({type(err).__name__} {err}): the kernel was shut down; rerun to "
              "resume (finished units and results are kept)", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for path in done:
        # keep_if_unchanged leaves a copy with the same content untouched, mtime included
        if path.stat().st_mtime_ns >= started_ns:
            print(f"wrote {path}")
        else:
            print(f"unchanged {path} (same content as the copy already there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
