"""How notebook 08's layer-0 IIA depends on DAS training settings and on the network's seed.

    python scripts/das_mlp_ceiling.py training        # seed-0 network, other lr / batch sizes
    python scripts/das_mlp_ceiling.py seeds --seeds 0,1,2,3,4 --mlp-epochs 3

``training``: the seed-0 network (from the notebook's cache, or trained), DAS at layer 0 on
1,280,000 counterfactuals for 10 epochs with the learning rate and batch size given (default:
0.01 at 6,400, then 0.001 at 640, i.e. ten times the steps): on that network more or faster
training stops near 0.95. ``seeds``: a network per seed (trained together, each as it would be
alone), DAS on 256,000 counterfactuals (the per-layer sweep's size), both sampling semantics:
the spread across networks that notebook 08's choice of network is about. Every IIA printed is
on validation counterfactuals (seed offset 25), not the notebook's test set. Prints only; the
README quotes the figures.
"""

from __future__ import annotations

import argparse
import time

import torch

from lib.studies import das
from lib.studies.das import mlp_das
from lib.studies.das.causal_model import hierarchical_equality
from lib.studies.das.mlp import interchange_data

MLP = dict(n_train=1048576, n_test=10000, batch_size=1024, lr=0.001, init="torch")


def das_curve(model, net, seed: int, semantics: str, n_train: int, epochs: int, batch: int,
              lr: float):
    def data(n, offset):
        cf = model.counterfactual_dataset(n, seed=seed * 1000 + offset, semantics=semantics)
        return interchange_data(net, 0, cf)

    module = das.RotatedSpaceIntervention(16, [(0, 8), (8, 16)], seed=seed)
    out = das.train_das(module, lambda h: net.forward_from(0, h), data(n_train, 21), epochs,
                        batch, lr, seed, data(12800, 25))
    return [round(row["eval_iia"], 4) for row in out["curve"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("training", "seeds"))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--mlp-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = hierarchical_equality(object_dim=4)
    if args.what == "training":
        net, _ = mlp_das.task_network(model, epochs=3, seed=0, **MLP)
        for lr, batch in ((0.01, 6400), (0.001, 640)):
            curve = das_curve(model, net, 0, "independent", 1280000, 10, batch, lr)
            print(f"seed-0 network, lr {lr}, batch {batch}: validation IIA per epoch {curve}")
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    networks = mlp_das.task_networks(model, seeds, epochs=args.mlp_epochs, cache_dir=None, **MLP)
    print(f"{len(seeds)} networks trained in {time.perf_counter() - started:.0f} s")
    for seed, (net, info) in zip(seeds, networks):
        started = time.perf_counter()
        last = {sem: das_curve(model, net, seed, sem, 256000, 10, 6400, 0.001)[-1]
                for sem in ("independent", "conditioned")}
        print(f"seed {seed}, {args.mlp_epochs} MLP epochs: test accuracy "
              f"{info['test_accuracy']:.4f}, validation IIA {last} "
              f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
