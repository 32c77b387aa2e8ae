"""Notebook 09's DAS grid on several cores: one runner process per group of causal models.

    python scripts/das_sweep.py --workers 2 --models smollm2-135m \\
        -p CAUSAL_MODELS=1,2,3,4,5,6,7 -p LAYERS=6,10,14,17,22,26 -p GRAPH_ARRANGEMENTS=0 \\
        -p FULL_COMPUTE_DIR=full_compute/das_layers -p GRAPHS_DIR=graphs/das_layers \\
        --runs-dir runs/das_layers

09 trains the rotations of one layer, rank, site and seed stacked in one pass (one process, one
thread: these small models run fastest so); on a machine with several cores, a layer sweep is
split by causal model instead. Each worker is ``python -m lib.runner --notebooks 09`` with its
own share of ``CAUSAL_MODELS`` (contiguous groups, sizes differing by at most one), graphs off,
into its own folder ``.cache/das_sweep/<model>/<hash of the parameters>/w<i>`` (``--work-dir``),
which starts with the target folder's fine-tune result and every run already stored there
(hard links), so a worker trains only what the target lacks; while they run, each one's count
of runs trained so far is printed every 5 minutes (its log holds the rest). When every worker
has finished, their new runs (``das_units``, ``das_rotations``) are copied into the target
folder (with any run a worker trained again because the stored copy it was linked to could not
be read; that copy is set aside, not deleted), and 09 runs there once with all the causal
models: it trains nothing and writes ``das_iia.json``, the figures and the executed copy as a
single run would. A worker's runs are those of a stack of its own causal models, equal to the
single process's within float32 rounding (tested in ``tests/test_das_stacked.py``), not bit for
bit.

Parameters are checked, with the runner's checks, before any process starts. The target folder
must hold 09's fine-tune result (``das_finetune.json``; else it is copied there from
``full_compute/<model>/``), so that the workers do not each fine-tune the model; apart from it
nothing is written into the target folder until every worker has succeeded. A failed worker's
log is printed and its folder kept, so a rerun resumes (finished runs are units).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lib.core import io, paths
from lib.core.atomic import atomic_write
from lib.core.params import ParameterError
from lib.core.parsers import parse_list
from lib.runner import check_run, parse_params, select_notebooks
from workers import groups, start, wait_all

ROOT = paths.REPO_ROOT

#: what 09 keeps per run in its folder: the unit store and the rotations
RUN_FOLDERS = ("das_units", "das_rotations")
FINETUNE = "das_finetune.json"


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="runner processes (cores)")
    parser.add_argument("--models", default="smollm2-135m", help="the language model (one)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="09's parameters, as for python -m lib.runner")
    parser.add_argument("--runs-dir", default=str(paths.RUNS),
                        help="where the final executed copy goes (default runs/)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per cell")
    parser.add_argument("--work-dir", default=str(ROOT / ".cache" / "das_sweep"),
                        help="where the workers' folders go (default .cache/das_sweep)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: at least 1")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: at least 1")
    try:
        args.params = parse_params(args.param)
        for name in ("FULL_COMPUTE_DIR", "GRAPHS_DIR"):
            if name not in args.params:
                raise ParameterError(f"give -p {name}=...: a sweep writes its own folder, not "
                                     "the defaults' (e.g. -p FULL_COMPUTE_DIR=full_compute/"
                                     "das_layers -p GRAPHS_DIR=graphs/das_layers)")
        [args.notebook] = select_notebooks(["09"])
        checked = check_run([args.notebook], [args.models], args.params, Path(args.runs_dir),
                            check_models=True)[args.notebook]
    except ParameterError as err:
        parser.error(str(err))
    args.causal_models = [int(m) for m in parse_list(checked["CAUSAL_MODELS"], str,
                                                     "CAUSAL_MODELS")]
    args.target = paths.resolve_dir(checked["FULL_COMPUTE_DIR"], paths.FULL_COMPUTE) \
        / io.slug(args.models)
    return args


def _finished(src: Path) -> list[Path]:
    """Finished files under ``src``: not a writer's temporary file, not one set aside."""
    return sorted(p for p in src.rglob("*") if p.is_file() and not p.name.endswith(".tmp")
                  and ".set-aside" not in p.name)


def _link_tree(src: Path, dst: Path) -> int:
    """Every file under ``src`` at the same place under ``dst`` (a hard link, else a copy),
    where ``dst`` has none; returns how many."""
    linked = 0
    for f in _finished(src):
        to = dst / f.relative_to(src)
        if to.exists():
            continue
        to.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, to)
        except OSError:
            shutil.copy2(f, to)
        linked += 1
    return linked


def _copy_back(src: Path, dst: Path) -> int:
    """A worker's files under ``src`` into ``dst``, atomically (a temporary name, then a
    rename): those ``dst`` lacks, and those the worker wrote again in place of its link to
    ``dst``'s copy (another file now, other bytes: 09 set the linked one aside as unreadable or
    not current), whose old copy in ``dst`` is set aside (kept, renamed ``.set-aside``), not
    deleted. Returns how many were copied."""
    copied = 0
    for f in _finished(src):
        to = dst / f.relative_to(src)
        if to.exists():
            if os.path.samefile(f, to) or to.read_bytes() == f.read_bytes():
                continue
            io.set_aside(to, f"the sweep's worker could not use it and trained the run again "
                             f"as {f}")
        to.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(to, lambda tmp, f=f: shutil.copy2(f, tmp))
        copied += 1
    return copied


def _unit_names(folder: Path) -> set[str]:
    """The finished runs (unit files) in a folder of 09's results (none if it has no store)."""
    return {p.name for p in _finished(folder / "das_units")}


def runner_command(args, params: dict, runs_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "lib.runner", "--notebooks", "09", "--models", args.models,
           "--runs-dir", str(runs_dir), "--threads", str(args.threads)]
    if args.timeout:
        cmd += ["--timeout", str(args.timeout)]
    for name, value in params.items():
        cmd += ["-p", f"{name}={value}"]
    return cmd


def main(argv=None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    finetune = args.target / FINETUNE
    if not finetune.exists():
        default = paths.FULL_COMPUTE / io.slug(args.models) / FINETUNE
        if not default.exists():
            raise SystemExit(f"{finetune} is missing, and so is {default}: run 09 once for "
                             f"{args.models} (python -m lib.runner --notebooks 09 --models "
                             f"{args.models}) so that the workers do not each fine-tune it")
        finetune.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(default, finetune)
        print(f"copied 09's fine-tune result {default} into {finetune.parent}")
    base = Path(args.work_dir) / io.slug(args.models) / io.params_key(
        {k: str(v) for k, v in args.params.items()})
    shares = groups(args.causal_models, args.workers)
    workers, stored_units = [], {}
    for i, share in enumerate(shares):
        folder = base / f"w{i}"
        out = folder / io.slug(args.models)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(finetune, out / FINETUNE)
        linked = sum(_link_tree(args.target / name, out / name) for name in RUN_FOLDERS
                     if (args.target / name).is_dir())
        params = {**args.params, "CAUSAL_MODELS": ",".join(map(str, share)),
                  "FULL_COMPUTE_DIR": str(folder), "GRAPHS_DIR": str(folder / "graphs"),
                  "GRAPH_ARRANGEMENTS": "0"}
        stored_units[i] = _unit_names(out)
        workers.append(start(i, share, folder, runner_command(args, params, folder / "runs"),
                             ROOT))
        print(f"worker {i}: causal models {share}, {linked} stored files linked in, "
              f"log {workers[-1].log}")
    def report(w) -> str:
        new = _unit_names(w.folder / io.slug(args.models)) - stored_units[w.index]
        return f"{len(new)} run(s) trained"

    if wait_all(workers, "causal models", started, report):
        print("nothing was copied into the target folder; a rerun resumes the finished runs")
        return 1
    copied = sum(_copy_back(w.folder / io.slug(args.models) / name, args.target / name)
                 for w in workers for name in RUN_FOLDERS
                 if (w.folder / io.slug(args.models) / name).is_dir())
    print(f"{copied} new or rewritten run files copied into {args.target}; 09 with every "
          "causal model:")
    rc = subprocess.call(runner_command(args, args.params, Path(args.runs_dir)), cwd=ROOT)
    print(f"done in {time.perf_counter() - started:.0f} s ({len(shares)} workers, "
          f"{args.threads} thread(s) each)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
