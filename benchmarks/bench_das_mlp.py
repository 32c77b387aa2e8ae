"""Benchmark: our DAS (lib.studies.das) against pyvene's on the same trained MLP and the same data.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_das_mlp.py \
        --pyvene-python /work/scratch/pyvene/bin/python          # defaults: the notebook's sizes

pyvene lives in a scratch environment (``python3.11 -m venv /work/scratch/pyvene &&
/work/scratch/pyvene/bin/pip install torch==2.13.0 pyvene``); its side runs as a subprocess
(``benchmarks/pyvene_das_mlp.py``). Both load the hierarchical-equality MLP of notebook 08
(trained or taken from ``.cache/das_mlp/``, safetensors) and the same counterfactual data
(written once as safetensors), train a full 16 x 16 rotation at layer 0 (WX <-> rotated 0-7,
YZ <-> 8-15) with Adam, and report held-out IIA. Prints both IIAs, their difference, seconds
per epoch of both and the ratio, and writes ``benchmarks/results/das_mlp.json``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from lib.studies import das
from lib.studies.das import mlp_das
from lib.core import paths
from lib.studies.das.causal_model import hierarchical_equality
from lib.core.io import atomic_write_text, dumps, read_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyvene-python", default="/work/scratch/pyvene/bin/python")
    parser.add_argument("--semantics", default="independent,conditioned",
                        help="comma-separated; one comparison per sampling semantics")
    parser.add_argument("--n-train", type=int, default=1280000)
    parser.add_argument("--n-test", type=int, default=12800)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=6400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the rotation")
    parser.add_argument("--network-seed", type=int, default=None,
                        help="the MLP's seed; default: the network notebook 08 chose "
                             "(full_compute/das_mlp/equality.json), else --seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path,
                        default=paths.REPO_ROOT / "benchmarks" / "results" / "das_mlp.json")
    args = parser.parse_args(argv)
    if not Path(args.pyvene_python).exists():
        raise SystemExit(f"--pyvene-python {args.pyvene_python} does not exist; create the "
                         f"scratch environment first (see this script's docstring)")
    torch.set_num_threads(args.threads)
    model = hierarchical_equality(4)
    net_seed = args.network_seed
    if net_seed is None:
        chosen = paths.FULL_COMPUTE / "das_mlp" / "equality.json"
        net_seed = read_json(chosen)["mlp"].get("seed", args.seed) if chosen.exists() else args.seed
    # the notebook's network (same key, so the cached file is reused)
    spec = (model, 1048576, 10000, 3, 1024, 1e-3, net_seed)
    net, info = mlp_das.task_network(*spec)
    weights = mlp_das.network_path(*spec)
    result = {"network_seed": net_seed, "mlp_test_accuracy": info["test_accuracy"],
              "n_train": args.n_train, "n_test": args.n_test, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads}
    for semantics in [s.strip() for s in args.semantics.split(",") if s.strip()]:
        result[semantics] = compare(net, weights, model, semantics, args)
    atomic_write_text(args.out, dumps(result))
    print(f"wrote {args.out}")
    return 0


def compare(net, weights, model, semantics: str, args) -> dict:
    """Train both sides on one semantics' counterfactuals; print and return the comparison."""
    train = model.counterfactual_dataset(args.n_train, seed=args.seed * 1000 + 21,
                                         semantics=semantics)
    test = model.counterfactual_dataset(args.n_test, seed=args.seed * 1000 + 22,
                                        semantics=semantics)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "data.safetensors"
        save_file({"train_base": train.base_tensor(),
                   "train_sources": torch.stack(train.source_tensors()),
                   "train_masks": train.masks, "train_labels": train.labels,
                   "test_base": test.base_tensor(),
                   "test_sources": torch.stack(test.source_tensors()),
                   "test_masks": test.masks, "test_labels": test.labels,
                   # the initial rotation das_at_layer starts from: both sides start equal
                   "init_rotation": das.RotatedSpaceIntervention(
                       16, [(0, 8), (8, 16)], seed=args.seed).R.detach().contiguous()},
                  str(data_path))
        _, ours = mlp_das.das_at_layer(net, 0, train, test, args.epochs, args.batch_size,
                                            args.lr, args.seed)
        cmd = [args.pyvene_python, str(Path(__file__).with_name("pyvene_das_mlp.py")),
               str(weights), str(data_path), "--epochs", str(args.epochs), "--batch-size",
               str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"pyvene's side failed (exit {proc.returncode})")
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours_s = ours["seconds_per_epoch"]
    theirs_s = sum(theirs["seconds_per_epoch"]) / len(theirs["seconds_per_epoch"])
    result = {"ours": {"iia": ours["iia"], "seconds_per_epoch": ours_s,
                       "control_iia": ours["control_iia"]},
              "pyvene": {"iia": theirs["iia"], "seconds_per_epoch": theirs_s,
                         "version": theirs.get("pyvene_version")},
              "iia_difference": ours["iia"] - theirs["iia"],
              "speed_ratio_pyvene_over_ours": theirs_s / ours_s}
    print(f"[{semantics}] IIA  ours {ours['iia']:.4f}  pyvene {theirs['iia']:.4f}  difference "
          f"{result['iia_difference']:+.4f}")
    print(f"[{semantics}] s/epoch  ours {ours_s:.2f}  pyvene {theirs_s:.2f}  ratio "
          f"(pyvene / ours) {result['speed_ratio_pyvene_over_ours']:.2f}")
    return result


if __name__ == "__main__":
    sys.exit(main())
