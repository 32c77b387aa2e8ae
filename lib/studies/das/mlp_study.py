"""Notebook 08's four results, each one function of the notebook's parameters: the hand-built
network, the hierarchical-equality study (network selection, layer-0 runs, per-layer sweep),
the ABAB tasks and the wrong-causal-model grid (Geiger, Wu et al. 2023; maraPislar's thesis
experiments). :class:`Notebook` reads each through :func:`lib.core.io.load_or_compute`, so a
current result is read and nothing is trained. The building blocks live in
:mod:`lib.studies.das.mlp_das`.

Every sampler is seeded from ``seed * 1000 + offset``; training and test sets take different
offsets, so every IIA is measured on counterfactuals disjoint from those it was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from lib.core import paths
from lib.core.memory import check_fits
from lib.core.io import load_or_compute, params_key, provenance_without_lm
from lib.core.schema import NUM, Kind, map_of, nonempty
from lib.core.params import parse_layers, parse_list
from lib.studies import das
from lib.studies.das import mlp_das
from lib.studies.das.causal_model import (CausalModel, CounterfactualDataset, encode,
                                          hierarchical_equality, pair_equality_model)
from lib.studies.das.mlp import accuracy, hand_built_equality_mlp, interchange_data

NOTEBOOK = paths.NOTEBOOKS / "08_das_mlp.ipynb"
SLUG = "das_mlp"
# each result's key: the parameters its numbers depend on
HAND_KEY = ("N_FACTUAL_HAND", "N_CF_HAND", "SEED")
NETWORKS_KEY = ("MLP_N_TRAIN", "MLP_N_TEST", "MLP_EPOCHS", "MLP_BATCH", "MLP_LR", "MLP_INIT",
                "DAS_N_TRAIN", "DAS_N_TEST", "DAS_EPOCHS", "DAS_BATCH", "DAS_LR",
                "SWEEP_N_TRAIN", "LAYERS", "SEMANTICS", "SEED")
EQUALITY_KEY = NETWORKS_KEY + ("N_NETWORKS", "SELECT_N_TRAIN")
# what pyvene's DAS tutorial reports at layer 0, drawn beside the network selection
PYVENE_REFERENCES = {"pyvene, conditioned (0.97)": 0.97, "pyvene, independent (0.99)": 0.99}

# --- the kinds of result notebook 08 writes (lib.core.schema), checked on every read ----------
_MLP = {"n_train": int, "n_test": int, "test_accuracy": float, "test_label_counts": [int],
        "curve": [{"epoch": int, "loss": NUM, "eval_accuracy": float}]}
_DAS_RUN = {"layer": int, "semantics": str, "iia": float, "control_iia": float, "n_train": int,
            "n_test": int, "orthogonality_error": float, "trainable_parameters": int,
            "subspaces": [[int]],
            "curve": [{"epoch": int, "loss": NUM, "train_accuracy": float, "eval_iia": float}]}
_SHAPES: dict[str, dict] = {
    "hand_built": {"factual_accuracy": float, "factual_label_counts": [int],
                   "iia": map_of(float)},
    "equality": {"mlp": {**_MLP, "seed": int}, "main": map_of(_DAS_RUN),
                 "per_layer": map_of([_DAS_RUN]),
                 "selection": {"layer": int, "semantics": str, "n_train": int,
                               "n_validation": int, "chosen_seed": int,
                               "candidates": [{"seed": int, "validation_iia": float,
                                               "control_iia": float,
                                               "mlp_test_accuracy": float}]}},
    "abab": {v: {"task": str, "semantics": str, "mlp": _MLP, "per_layer": nonempty([_DAS_RUN])}
             for v in ("equal", "and")},
    "wrong_model": {"semantics": str, "layer": int,
                    "grid": nonempty([{"train_model": str, "test_model": str, "iia": float,
                                       "control_iia": float}]),
                    "networks": map_of({"mlp_test_accuracy": float, "iia": float})},
}
#: one kind per result file (``full_compute/das_mlp/<name>.json``), by name
SCHEMAS = {name: Kind(f"das_mlp_{name}", "08_das_mlp", {**shape, "params_key": str})
           for name, shape in _SHAPES.items()}


class Notebook:
    """Notebook 08 from its parameter values (:func:`lib.core.params.notebook_values`): the
    parsed layers and semantics, the folders, each result's key, and one method per result that
    reads it when current and else computes and writes it. Sets torch's threads and seed as
    the parameters say."""

    def __init__(self, values: dict[str, Any]):
        v = self.values = values
        self.layers = parse_layers(v["LAYERS"], 3)            # the MLPs have 3 blocks
        self.semantics = parse_list(v["SEMANTICS"])
        parsed = {**v, "LAYERS": self.layers, "SEMANTICS": self.semantics}
        self.keys = {name: {k: parsed[k] for k in key} for name, key in
                     (("hand", HAND_KEY), ("networks", NETWORKS_KEY), ("equality", EQUALITY_KEY))}
        self.out_dir = paths.resolve_dir(v["FULL_COMPUTE_DIR"], paths.FULL_COMPUTE) / SLUG
        self.graphs_dir = paths.resolve_dir(v["GRAPHS_DIR"], paths.GRAPHS)
        self.mlp_args = dict(n_train=v["MLP_N_TRAIN"], n_test=v["MLP_N_TEST"],
                             epochs=v["MLP_EPOCHS"], batch_size=v["MLP_BATCH"], lr=v["MLP_LR"],
                             seed=v["SEED"], init=v["MLP_INIT"], force=v["FORCE"],
                             cache_dir=paths.resolve_dir(v["CACHE_DIR"], mlp_das.CACHE))
        self.das_args = dict(epochs=v["DAS_EPOCHS"], batch_size=v["DAS_BATCH"], lr=v["DAS_LR"],
                             seed=v["SEED"])
        # each data set is built and dropped in turn: one at a time must fit
        for name, per in (("N_FACTUAL_HAND", mlp_das.EXAMPLE_BYTES),
                          ("MLP_N_TRAIN", mlp_das.EXAMPLE_BYTES),
                          ("MLP_N_TEST", mlp_das.EXAMPLE_BYTES), ("N_CF_HAND", mlp_das.CF_BYTES),
                          ("SELECT_N_TRAIN", mlp_das.CF_BYTES), ("DAS_N_TRAIN", mlp_das.CF_BYTES),
                          ("DAS_N_TEST", mlp_das.CF_BYTES), ("SWEEP_N_TRAIN", mlp_das.CF_BYTES)):
            check_fits(name, v[name], per, what="its examples or counterfactuals, with the "
                       "network's activations")
        if v["THREADS"]:   # 0 keeps the current count, as in every notebook
            torch.set_num_threads(v["THREADS"])
        torch.manual_seed(v["SEED"])
        self.description = {"name": SLUG, "kind": "MLPs of the DAS tutorial, built or trained "
                            "here", "device": "cpu", "dtype": "float32",
                            "torch_threads": torch.get_num_threads()}

    def _result(self, name: str, key: str, compute: Callable[[], dict]) -> dict:
        parameters = self.keys[key]
        return load_or_compute(
            self.out_dir / f"{name}.json", parameters, force=self.values["FORCE"],
            check=SCHEMAS[name], compute=lambda: ({**compute(), "params_key": params_key(parameters)},
                             provenance_without_lm(self.description, parameters,
                                                   self.values["SEED"])))

    def hand_built(self) -> dict:
        v = self.values
        return self._result("hand_built", "hand", lambda: hand_built(
            v["N_FACTUAL_HAND"], v["N_CF_HAND"], self.semantics, v["SEED"]))

    def equality(self) -> dict:
        v = self.values
        return self._result("equality", "equality", lambda: equality(
            self.semantics, self.layers, self.mlp_args, self.das_args, v["N_NETWORKS"],
            v["SELECT_N_TRAIN"], v["DAS_N_TRAIN"], v["DAS_N_TEST"], v["SWEEP_N_TRAIN"],
            v["SEED"], self.out_dir / "rotations", params_key(self.keys["equality"])))

    def abab(self) -> dict | None:
        """``None`` when the ABAB parameter is off."""
        v = self.values
        return self._result("abab", "networks", lambda: abab(
            self.semantics[0], self.layers, self.mlp_args, self.das_args, v["DAS_N_TEST"],
            v["SWEEP_N_TRAIN"], v["SEED"])) if v["ABAB"] else None

    def wrong_model(self) -> dict | None:
        """``None`` when the WRONG_MODEL parameter is off."""
        v = self.values
        return self._result("wrong_model", "networks", lambda: wrong_model(
            self.semantics[0], self.mlp_args, self.das_args, v["DAS_N_TEST"],
            v["SWEEP_N_TRAIN"], v["SEED"])) if v["WRONG_MODEL"] else None


def main_table(equality_result: dict) -> pd.DataFrame:
    """The layer-0 runs of the equality study, one row per semantics."""
    return pd.DataFrame([{"semantics": s, "IIA": r["iia"], "random control": r["control_iia"],
                          "n_train": r["n_train"], "n_test": r["n_test"],
                          "‖RᵀR − I‖": r["orthogonality_error"]}
                         for s, r in equality_result["main"].items()])


def abab_table(abab_result: dict) -> pd.DataFrame:
    """The ABAB tasks, one row per variant: the network's accuracy, IIA and control per layer."""
    return pd.DataFrame([{"task": v["task"], "MLP test accuracy": v["mlp"]["test_accuracy"],
                          **{f"IIA layer {r['layer']}": r["iia"] for r in v["per_layer"]},
                          **{f"control layer {r['layer']}": r["control_iia"]
                             for r in v["per_layer"]}}
                         for k, v in abab_result.items() if k in ("equal", "and")])


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
    iia: dict[str, float] = {}
    for sem in semantics:
        data = interchange_data(net, 0, counterfactuals(model2, n_cf, sem, seed, 12))
        iia[sem] = das.iia(vanilla, lambda h: net.forward_from(0, h), data)
    return {"factual_accuracy": accuracy(net, encode(x, model2.inputs), y),
            "factual_label_counts": torch.bincount(y, minlength=2).tolist(), "iia": iia}


def equality(semantics: list[str], layers: list[int], mlp_args: dict, das_args: dict,
             n_networks: int, select_n_train: int, das_n_train: int, das_n_test: int,
             sweep_n_train: int, seed: int, rotations_dir: Path,
             rotations_key: str | None = None) -> dict:
    """Section 2: ``n_networks`` equality networks trained alike; DAS at layer 0 on each picks
    the one it aligns best on validation counterfactuals; on that one, the layer-0 runs at the
    full budget per semantics (rotations saved with ``rotations_key``, the result's key) and
    the per-layer sweep."""
    model4 = hierarchical_equality(object_dim=4)
    seeds = list(range(seed, seed + n_networks))
    networks = mlp_das.task_networks(model4, seeds,
                                     **{k: v for k, v in mlp_args.items() if k != "seed"})
    chosen, candidates = seed, list[dict]()
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
                              {"task": model4.name, "layer": 0, "semantics": sem},
                              key=rotations_key)
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
