"""Notebook 08's four results, each one function of the notebook's parameters: the hand-built
network, the hierarchical-equality study (network selection, layer-0 runs, per-layer sweep),
the ABAB tasks and the wrong-causal-model grid (Geiger, Wu et al. 2023; maraPislar's thesis
experiments). The notebook calls each through :func:`lib.core.io.load_or_compute`, so a current
result is read and nothing is trained. The building blocks live in :mod:`lib.studies.das.mlp_das`.

Every sampler is seeded from ``seed * 1000 + offset``; training and test sets take different
offsets, so every IIA is measured on counterfactuals disjoint from those it was trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lib.studies import das
from lib.studies.das import mlp_das
from lib.studies.das.causal_model import (CausalModel, CounterfactualDataset, encode, hierarchical_equality,
                              pair_equality_model)
from lib.studies.das.mlp import accuracy, hand_built_equality_mlp, interchange_data


def counterfactuals(model: CausalModel, n: int, semantics: str, seed: int,
                    offset: int) -> CounterfactualDataset:
    """Seeded counterfactuals; each use takes its own ``offset`` (held-out sets differ)."""
    return model.counterfactual_dataset(n, seed=seed * 1000 + offset, semantics=semantics)


def hand_built(n_factual: int, n_cf: int, semantics: list[str], seed: int) -> dict:
    """Section 1: the hand-built equality network, its factual accuracy and the vanilla
    half-swap IIA (1.00 by construction) per sampling semantics."""
    model2 = hierarchical_equality(object_dim=2)
    net = hand_built_equality_mlp()
    x, y = model2.factual_dataset(n_factual, seed=seed * 1000 + 11)
    vanilla = das.RotatedSpaceIntervention(8, [(0, 4), (4, 8)])
    vanilla.set_rotation(torch.eye(8))
    hand = {"factual_accuracy": accuracy(net, encode(x, model2.inputs), y),
            "factual_label_counts": torch.bincount(y, minlength=2).tolist(), "iia": {}}
    for sem in semantics:
        data = interchange_data(net, 0, counterfactuals(model2, n_cf, sem, seed, 12))
        hand["iia"][sem] = das.iia(vanilla, lambda h: net.forward_from(0, h), data)
    return hand


def equality(semantics: list[str], layers: list[int], mlp_args: dict, das_args: dict,
             n_networks: int, select_n_train: int, das_n_train: int, das_n_test: int,
             sweep_n_train: int, seed: int, rotations_dir: Path) -> dict:
    """Section 2: ``n_networks`` equality networks trained alike; DAS at layer 0 on each picks
    the one it aligns best on validation counterfactuals; on that one, the layer-0 runs at the
    full budget per semantics (rotations saved) and the per-layer sweep."""
    model4 = hierarchical_equality(object_dim=4)
    seeds = list(range(seed, seed + n_networks))
    networks = mlp_das.task_networks(model4, seeds,
                                     **{k: v for k, v in mlp_args.items() if k != "seed"})
    chosen, candidates = seed, []
    if n_networks > 1:
        chosen, candidates = mlp_das.select_network(
            [(s, net) for s, (net, _) in zip(seeds, networks)], 0,
            counterfactuals(model4, select_n_train, semantics[0], seed, 24),
            counterfactuals(model4, das_n_test, semantics[0], seed, 25), **das_args,
            progress=True)
        for row, (_, info) in zip(candidates, networks):
            row["mlp_test_accuracy"] = info["test_accuracy"]
    net, net_info = networks[seeds.index(chosen)]
    result = {"mlp": {"seed": chosen, **{k: v for k, v in net_info.items() if k != "cached"}},
              "selection": {"layer": 0, "semantics": semantics[0], "n_train": select_n_train,
                            "n_validation": das_n_test, "chosen_seed": chosen,
                            "candidates": candidates},
              "main": {}, "per_layer": {}}
    print(f"network seed {chosen} of {n_networks}: MLP test accuracy "
          f"{net_info['test_accuracy']:.4f}")
    test_sets = {sem: counterfactuals(model4, das_n_test, sem, seed, 22) for sem in semantics}
    for sem in semantics:
        module, res = mlp_das.das_at_layer(
            net, 0, counterfactuals(model4, das_n_train, sem, seed, 21), test_sets[sem],
            **das_args)
        print(f"[{sem}] layer 0: IIA {res['iia']:.4f}, random control {res['control_iia']:.4f}, "
              f"{res.pop('seconds_per_epoch'):.2f} s per epoch")
        result["main"][sem] = res
        das.save_intervention(module, Path(rotations_dir) / f"equality_layer0_{sem}.safetensors",
                              {"task": model4.name, "layer": 0, "semantics": sem})
        sweep_train = counterfactuals(model4, sweep_n_train, sem, seed, 23)
        result["per_layer"][sem] = []
        for layer in layers:
            module, res = mlp_das.das_at_layer(net, layer, sweep_train, test_sets[sem], **das_args)
            res.pop("seconds_per_epoch")
            print(f"[{sem}] sweep layer {layer}: IIA {res['iia']:.4f}, control "
                  f"{res['control_iia']:.4f}")
            result["per_layer"][sem].append(res)
    return result


def abab(semantics: str, layers: list[int], mlp_args: dict, das_args: dict, das_n_test: int,
         sweep_n_train: int, seed: int) -> dict:
    """Section 3: the thesis' ABAB tasks (``equal`` and ``and`` variants), DAS per layer."""
    result = {}
    for variant in ("equal", "and"):
        model = pair_equality_model("ABAB", variant, object_dim=4)
        net, net_info = mlp_das.task_network(model, **mlp_args)
        test = counterfactuals(model, das_n_test, semantics, seed, 32)
        train = counterfactuals(model, sweep_n_train, semantics, seed, 31)
        runs = []
        for layer in layers:
            _, res = mlp_das.das_at_layer(net, layer, train, test, **das_args)
            res.pop("seconds_per_epoch")
            runs.append(res)
        result[variant] = {"task": model.name, "semantics": semantics,
                           "mlp": {k: v for k, v in net_info.items() if k != "cached"},
                           "per_layer": runs}
        print(f"{model.name}: MLP accuracy {net_info['test_accuracy']:.4f}; IIA per layer "
              + ", ".join(f"{r['layer']}: {r['iia']:.4f} (control {r['control_iia']:.4f})"
                          for r in runs))
    return result


def wrong_model(semantics: str, mlp_args: dict, das_args: dict, das_n_test: int,
                sweep_n_train: int, seed: int) -> dict:
    """Section 4: DAS at layer 0 trained on one pairing's network (AABB, ABAB, ABBA) and
    tested on each pairing's counterfactuals, beside a random rotation of the same rank."""
    models = {p: pair_equality_model(p, "equal", object_dim=4) for p in ("AABB", "ABAB", "ABBA")}
    tests = {p: counterfactuals(m, das_n_test, semantics, seed, 42) for p, m in models.items()}
    grid, diag = [], {}
    for p, m in models.items():
        net, net_info = mlp_das.task_network(m, **mlp_args)
        module, res = mlp_das.das_at_layer(
            net, 0, counterfactuals(m, sweep_n_train, semantics, seed, 41), tests[p], **das_args)
        res.pop("seconds_per_epoch")
        control = das.random_control(module, seed=seed + 1)
        for q in models:
            grid.append({"train_model": p, "test_model": q,
                         "iia": mlp_das.iia_on(net, 0, module, tests[q]),
                         "control_iia": mlp_das.iia_on(net, 0, control, tests[q])})
        diag[p] = {"mlp_test_accuracy": net_info["test_accuracy"], "iia": res["iia"]}
    return {"semantics": semantics, "layer": 0, "grid": grid, "networks": diag}
