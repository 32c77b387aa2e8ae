"""Notebook 09's DAS rotations against their training budget (issue 26, item 2).

    python scripts/das_convergence.py --model smollm2-135m --layer 22 --models 1,7 \\
        --seeds 0,1,2 --max-steps 640

Trains one rotation per causal model and seed (09's defaults: rank 64, shared over every
position, lr 0.01, batches of 64) stacked, from 20 steps doubling up to ``--max-steps``,
continuing between checkpoints, and measures IIA on 09's held-out test counterfactuals at
each budget (:mod:`lib.studies.das.convergence`); the training state is kept after each
budget, so an interrupted run resumes and a larger ``--max-steps`` goes on from it. Writes
``full_compute/<model>/das_convergence.json`` (reused while current: same parameters, same
tuned weights) and ``graphs/<model>/das_convergence.png|pdf``. The tuned model comes from 09's
fine-tune (its cache, ``--cache-dir``; fine-tuned when missing, ~12 minutes on 2 CPU cores).
Prints the time it took.

With ``--workers N`` (one per core) the causal models are split over N processes of this
script (contiguous groups, larger first), each in its own folder
``.cache/das_convergence/<model>/<hash of the grid>/w<i>`` (``--work-dir``) that starts with
09's fine-tune result, so each trains its share (and keeps its training state there: a rerun
of the same command resumes, a larger ``--max-steps`` goes on). When every worker has
succeeded, this process assembles the grid from their results (``--reuse``: nothing is
trained again) into the usual file and figure; a failed worker's log is printed and nothing is
written. Workers' stacks are smaller than one process's, so their rotations equal the single
process's within float32 rounding, not bit for bit.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{what}: give comma-separated integers, got {text!r}") from None


def parse(argv=None) -> argparse.Namespace:
    """The arguments, with every refusal that needs no model made here."""
    from lib.studies.das import arithmetic as ar

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="09's MODEL")
    parser.add_argument("--layer", type=int, default=22, help="block whose output is rotated")
    parser.add_argument("--models", default="1,7", help="causal models, e.g. 1,7 (of 1..7)")
    parser.add_argument("--seeds", default="0,1,2", help="rotation and training-pair seeds")
    parser.add_argument("--start", type=int, default=20, help="first budget (09's 20 steps)")
    parser.add_argument("--max-steps", type=int, required=True,
                        help="largest budget: the grid doubles from --start up to it")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes (one per core): the causal models split over them")
    parser.add_argument("--work-dir", default="",
                        help="the workers' folders (default .cache/das_convergence)")
    parser.add_argument("--cache-dir", default="", help="09's CACHE_DIR (tuned weights)")
    parser.add_argument("--full-compute-dir", default="")
    parser.add_argument("--graphs-dir", default="")
    parser.add_argument("--force", action="store_true", help="recompute a current result")
    parser.add_argument("--reuse", action="append", default=[], metavar="JSON",
                        help="an earlier das_convergence.json whose causal models' runs are "
                        "read, not trained, where its grid and tuned weights are this run's "
                        "(repeatable; the output file, if there, is always consulted)")
    args = parser.parse_args(argv)
    args.model_ids = _ints(args.models, "models")
    args.seed_list = _ints(args.seeds, "seeds")
    unknown = [m for m in args.model_ids if m not in ar.MODEL_IDS]
    if unknown or not args.model_ids or len(set(args.model_ids)) != len(args.model_ids):
        parser.error(f"--models {args.models}: name causal models of {list(ar.MODEL_IDS)}, "
                     "each once")
    if not args.seed_list or min(args.seed_list) < 0 \
            or len(set(args.seed_list)) != len(args.seed_list):
        parser.error(f"--seeds {args.seeds}: name seeds from 0, each once")
    if args.start < 20 or args.start % 20:
        parser.error(f"--start {args.start}: the grid starts at 09's 20 steps or a multiple "
                     "(one block of 09's 1280 training pairs is 20 steps)")
    if args.max_steps < args.start:
        parser.error(f"--max-steps {args.max_steps}: a budget below the first, {args.start} "
                     "steps")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: at least 1")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: at least 1")
    return args


def worker_command(args, share: list[int], folder: Path, reuse: list[str]) -> list[str]:
    """This script on ``share`` of the causal models, writing into ``folder`` (paths made
    absolute: the workers run in the repository's root, this process maybe elsewhere)."""
    cache_dir = str(Path(args.cache_dir).resolve()) if args.cache_dir else ""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--model", args.model,
           "--layer", str(args.layer), "--models", ",".join(map(str, share)),
           "--seeds", ",".join(map(str, args.seed_list)), "--start", str(args.start),
           "--max-steps", str(args.max_steps), "--rank", str(args.rank),
           "--threads", str(args.threads), "--cache-dir", cache_dir,
           "--full-compute-dir", str(folder), "--graphs-dir", str(folder / "graphs")]
    for path in reuse:
        cmd += ["--reuse", str(Path(path).resolve())]
    return cmd + (["--force"] if args.force else [])


def run_workers(args, run, started: float) -> list[str] | None:
    """The grid's causal models split over ``args.workers`` processes (:mod:`workers`), each
    starting from 09's fine-tune result of ``run``; the paths of their results, or None when
    one failed (its log printed)."""
    from lib.core import io, paths
    from workers import groups, start, wait_all

    slug = io.slug(args.model)
    work = Path(args.work_dir).resolve() if args.work_dir else paths.REPO_ROOT / ".cache" / \
        "das_convergence"
    # the folder is named by what the workers' runs and training state depend on, not by the
    # budgets, so that a larger --max-steps goes on from the same workers' state
    base = work / slug / io.params_key({
        "model": args.model, "layer": args.layer, "models": args.model_ids,
        "seeds": args.seed_list, "start": args.start, "rank": args.rank,
        "threads": args.threads, "workers": args.workers, "cache_dir": args.cache_dir})
    target = run.out_dir / "das_convergence.json"
    reuse = list(args.reuse) + ([str(target)] if target.exists() and not args.force else [])
    workers = []
    for i, share in enumerate(groups(args.model_ids, args.workers)):
        folder = base / f"w{i}"
        (folder / slug).mkdir(parents=True, exist_ok=True)
        shutil.copy2(run.out_dir / "das_finetune.json", folder / slug / "das_finetune.json")
        workers.append(start(i, share, folder, worker_command(args, share, folder, reuse),
                             paths.REPO_ROOT))
        print(f"worker {i}: causal models {share}, log {workers[-1].log}")
    if wait_all(workers, "causal models", started):
        print(f"nothing was written to {target}; a rerun resumes each worker at its last budget")
        return None
    return [str(w.folder / slug / "das_convergence.json") for w in workers]


def main(argv=None) -> int:
    args = parse(argv)
    from tqdm import tqdm

    from lib.core import io, paths, schema
    from lib.core.models import load_model
    from lib.core.params import ParameterError, notebook_values, read_parameters
    from lib.plots import save_figure
    from lib.plots.das_convergence import plot_convergence
    from lib.studies.das import arithmetic_study as study
    from lib.studies.das import convergence as cv

    stored = []
    for path in args.reuse:   # named by the user: refused, naming it, before any model loads
        try:
            stored.append(io.read_result(path, cv.CONVERGENCE_SCHEMA))
        except (OSError, ValueError, schema.WrongKindError) as err:
            raise SystemExit(f"--reuse {path}: not a readable das_convergence.json "
                             f"({err})") from None
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    shipped = load_model(args.model)
    if not 0 <= args.layer < shipped.n_layers:
        raise SystemExit(f"--layer {args.layer}: {args.model} has blocks 0 to "
                         f"{shipped.n_layers - 1}")
    if not 1 <= args.rank <= shipped.d_model:
        raise SystemExit(f"--rank {args.rank}: choose 1 to d_model = {shipped.d_model}")
    del shipped
    budgets = cv.doubling_grid(args.start, args.max_steps)
    values = {name: p.default for name, p in read_parameters(study.NOTEBOOK).items()}
    values.update(MODEL=args.model, THREADS=args.threads, CACHE_DIR=args.cache_dir,
                  FULL_COMPUTE_DIR=args.full_compute_dir, GRAPHS_DIR=args.graphs_dir,
                  # not in the fine-tune's key; 09 refuses layers the model lacks
                  LAYERS=str(args.layer), GRAPH_LAYERS=str(args.layer),
                  # one block of training pairs: 09's set before its budget became the plateau
                  DAS_N_TRAIN=cv.BLOCK_PAIRS)
    try:
        run = study.Notebook(notebook_values(study.NOTEBOOK, values))
    except ParameterError as err:
        raise SystemExit(str(err)) from None
    run.finetune()   # 09's das_finetune.json (read when current); the tuned model loads lazily
    key = cv.key_of(run, args.layer, args.model_ids, args.seed_list, budgets, args.rank)
    target = run.out_dir / "das_convergence.json"
    if args.workers > 1 and len(args.model_ids) > 1 and \
            io.read_current(target, key, args.force, cv.CONVERGENCE_SCHEMA) is None:
        results = run_workers(args, run, started)
        if results is None:
            return 1
        # the assembly below reads every causal model from them
        stored += [io.read_result(path, cv.CONVERGENCE_SCHEMA) for path in results]
    bar = tqdm(total=budgets[-1], unit="step", desc="DAS convergence")

    def progress(step: int) -> None:
        bar.update(step - bar.n)

    if target.exists() and not args.force:
        try:
            earlier = io.read_json(target)
            cv.CONVERGENCE_SCHEMA(earlier)
            stored.append(earlier)
        except (OSError, ValueError):
            pass   # load_or_compute sets a damaged file aside and says so
    result = io.load_or_compute(
        target, key, force=args.force, check=cv.CONVERGENCE_SCHEMA,
        compute=lambda: cv.compute(run, args.layer, args.model_ids, args.seed_list, budgets,
                                   args.rank, key, progress, stored))
    bar.close()
    for row in result["summary"]:
        print(f"M{row['model']} {row['steps']:>6} steps: IIA {row['iia']['mean']:.3f} "
              f"[{row['iia']['ci_low']:.3f}, {row['iia']['ci_high']:.3f}], control "
              f"{row['control_iia']['mean']:.3f}, loss {row['loss']['mean']:.3f}")
    for p in result["plateau"]:
        print(f"M{p['model']}: {p['decision']}")
    save_figure(plot_convergence(result, title=f"{args.model}: DAS IIA against training "
                                                f"budget, layer {args.layer}"),
                "das_convergence", run.slug,
                paths.resolve_dir(args.graphs_dir, paths.GRAPHS), width=8, height=4)
    print(f"done in {time.perf_counter() - started:.0f} s ({args.threads} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
