"""pyvene's side of benchmarks/bench_das_mlp.py; runs in a scratch environment with pyvene.

    /work/scratch/pyvene/bin/python benchmarks/pyvene_das_mlp.py WEIGHTS DATA --epochs 10

Loads the MLP weights (safetensors written by lib.studies.das.mlp.save_mlp) into pyvene's
MLPForClassification, trains pyvene's RotatedSpaceIntervention (one 16 x 16 rotation shared by
two representations at layer 0 ``block_output``, subspace partition [[0, 8], [8, 16]]) on the
counterfactual activations' inputs in DATA, and prints one JSON line: held-out IIA and seconds
per epoch. Examples that do not intervene on a variable use the base itself as that variable's
source, which makes the swap a no-op, so every batch can carry both interventions. Imports
nothing from this repository (it runs in another environment).
"""

import argparse
import json
import time
from importlib.metadata import version

import torch
from safetensors.torch import load_file


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("weights")
    parser.add_argument("data")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=6400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import pyvene as pv
    from pyvene.models.mlp.modelings_mlp import MLPConfig, MLPForClassification

    state = load_file(args.weights)
    n_layers = sum(1 for k in state if k.startswith("blocks.") and k.endswith(".weight"))
    h_dim = state["head.weight"].shape[1]
    config = MLPConfig(h_dim=h_dim, n_layer=n_layers, pdrop=0.0, num_classes=2,
                       activation_function="relu", include_bias=True, squeeze_output=True)
    model = MLPForClassification(config)
    mapped = {f"mlp.h.{i}.ff1.{p}": state[f"blocks.{i}.{p}"] for i in range(n_layers)
              for p in ("weight", "bias")}
    mapped.update({"score.weight": state["head.weight"], "score.bias": state["head.bias"]})
    model.load_state_dict(mapped)
    model.eval()

    data = load_file(args.data)
    reps = [pv.RepresentationConfig(0, "block_output", "pos", 1,
                                    subspace_partition=[[0, h_dim // 2], [h_dim // 2, h_dim]],
                                    intervention_link_key=0) for _ in range(2)]
    cfg = pv.IntervenableConfig(representations=reps,
                                intervention_types=pv.RotatedSpaceIntervention,
                                model_type=type(model))
    intervenable = pv.IntervenableModel(cfg, model, use_fast=True)
    intervenable.set_device("cpu")
    intervenable.disable_model_gradients()
    first = next(iter(intervenable.interventions.values()))
    first = first[0] if isinstance(first, (tuple, list)) else first
    if "init_rotation" in data:  # start from the same rotation as ours (through right_inverse)
        with torch.no_grad():
            first.rotate_layer.weight = data["init_rotation"].float()
    optimizer = torch.optim.Adam(first.rotate_layer.parameters(), lr=args.lr)

    def sources(split, idx):
        base = data[f"{split}_base"][idx]
        masks = data[f"{split}_masks"][idx]
        srcs = [torch.where(masks[:, j:j + 1], data[f"{split}_sources"][j, idx], base)
                for j in range(2)]
        return base, srcs

    def forward(split, idx):
        base, srcs = sources(split, idx)
        b = len(idx)
        _, out = intervenable(
            {"inputs_embeds": base[:, None, :]},
            [{"inputs_embeds": s[:, None, :]} for s in srcs],
            {"sources->base": ([[[0]] * b, [[0]] * b], [[[0]] * b, [[0]] * b])},
            subspaces=[[[0]] * b, [[1]] * b])
        return out[0]

    n = len(data["train_labels"])
    gen = torch.Generator().manual_seed(args.seed)
    seconds = []
    for _ in range(args.epochs):
        started = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, args.batch_size):
            idx = order[start:start + args.batch_size]
            loss = torch.nn.functional.cross_entropy(forward("train", idx),
                                                     data["train_labels"][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - started)
    correct = 0
    with torch.no_grad():
        m = len(data["test_labels"])
        for start in range(0, m, args.batch_size):
            idx = torch.arange(start, min(start + args.batch_size, m))
            correct += int((forward("test", idx).argmax(-1) == data["test_labels"][idx]).sum())
    print(json.dumps({"iia": correct / m, "seconds_per_epoch": seconds,
                      "pyvene_version": version("pyvene")}))


if __name__ == "__main__":
    main()
