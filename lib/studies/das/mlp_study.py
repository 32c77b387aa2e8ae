"""Notebook 08's four results, each one function of the notebook's parameters: the hand-built
network, the hierarchical-equality study (network selection, layer-0 runs, per-layer sweep),
the ABAB tasks and the wrong-causal-model grid over several networks per task, scored by
balanced IIA (:mod:`lib.studies.das.mlp_grid`; Geiger, Wu et al. 2023; maraPislar's thesis
experiments). :class:`Notebook` reads each through :func:`lib.core.io.load_or_compute`, so a
current result is read and nothing is trained. The building blocks live in
:mod:`lib.studies.das.mlp_das`; each result's kind (:data:`SCHEMAS`) is declared here.

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
from lib.core.schema import NUM, Kind, map_of, maybe, nonempty
from lib.core.parsers import parse_layers, parse_list
from lib.studies import das
from lib.studies.das import mlp_das, mlp_grid
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
GRID_KEY = ("MLP_N_TRAIN", "MLP_N_TEST", "MLP_EPOCHS", "MLP_BATCH", "MLP_LR", "MLP_INIT",
            "DAS_N_TEST", "DAS_EPOCHS", "DAS_BATCH", "DAS_LR", "SEMANTICS", "SEED",
            "GRID_NETWORKS", "GRID_N_TRAIN")
# what pyvene's DAS tutorial reports at layer 0, each for the one network its run trained
PYVENE_IIA = {"independent": 0.99, "conditioned": 0.97}
PYVENE_REFERENCES = {f"pyvene, {s}, one network ({v})": v for s, v in
                     sorted(PYVENE_IIA.items(), key=lambda kv: kv[1])}

# --- the kinds of result notebook 08 writes (lib.core.schema), checked on every read ----------
_MLP = {"n_train": int, "n_test": int, "test_accuracy": float, "test_label_counts": [int],
        "curve": [{"epoch": int, "loss": NUM, "eval_accuracy": float}]}
_DAS_RUN = {"layer": int, "semantics": str, "iia": float, "control_iia": float, "n_train": int,
            "n_test": int, "orthogonality_error": float, "trainable_parameters": int,
            "subspaces": [[int]],
            "curve": [{"epoch": int, "loss": NUM, "train_accuracy": float, "eval_iia": float}]}
# a quantity over networks (lib.core.stats.summarize_median) and one network's grid cell
_SPREAD = {k: float for k in ("median", "q1", "q3", "min", "max", "ci_low", "ci_high")} | {"n": int}
_GRID_NETWORK = {"seed": int, "iia": float, "balanced_iia": float, "class_iia": [maybe(float)],
                 "label_true_share": float, "prediction_true_share": float,
                 "factual_true_share": float, "control_iia": float,
                 "control_balanced_iia": float}
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
    "wrong_model": {"semantics": str, "layer": int, "n_networks": int, "seeds": nonempty([int]),
                    "n_train": int, "n_test": int, "shared_patterns": nonempty([str]),
                    "cells": nonempty([{"train_model": str, "test_model": str, "inputs": str,
                                        "label_true_share": float,
                                        **{name: _SPREAD for name in mlp_grid.SUMMARISED},
                                        "per_network": nonempty([_GRID_NETWORK])}]),
                    "tasks": map_of({"balanced_iia": _SPREAD, "mlp_test_accuracy": _SPREAD}),
                    "networks": nonempty([{"task": str, "seed": int, "mlp_test_accuracy": float,
                                           "iia": float, "control_iia": float}])},
}


def _grid_complete(payload: dict) -> None:
    """The grid has every (trained on, tested on, inputs) cell once, each with one row per
    network, in the order of ``seeds``."""
    cells = [(c["train_model"], c["test_model"], c["inputs"]) for c in payload["cells"]]
    want = [(p, q, i) for p in mlp_grid.TASKS for q in mlp_grid.TASKS for i in mlp_grid.INPUTS]
    if sorted(cells) != sorted(want):
        raise ValueError(f"cells {sorted(cells)} are not one of each of {want}")
    for c in payload["cells"]:
        if [r["seed"] for r in c["per_network"]] != payload["seeds"]:
            raise ValueError(f"cell {c['train_model']}->{c['test_model']} ({c['inputs']}) has "
                             f"networks {[r['seed'] for r in c['per_network']]}, not the seeds "
                             f"{payload['seeds']}")


#: one kind per result file (``full_compute/das_mlp/<name>.json``), by name
SCHEMAS = {name: Kind(f"das_mlp_{name}", "08_das_mlp", {**shape, "params_key": str},
                      extra=_grid_complete if name == "wrong_model" else None)
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
                     (("hand", HAND_KEY), ("networks", NETWORKS_KEY), ("equality", EQUALITY_KEY),
                      ("grid", GRID_KEY))}
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
                          ("DAS_N_TEST", mlp_das.CF_BYTES), ("SWEEP_N_TRAIN", mlp_das.CF_BYTES),
                          ("GRID_N_TRAIN", mlp_das.CF_BYTES)):
            check_fits(name, v[name], per, what="its examples or counterfactuals, with the "
                       "network's activations")
        if v["WRONG_MODEL"]:   # before anything is trained
            mlp_grid.check_grid_args(v["GRID_NETWORKS"], v["GRID_N_TRAIN"])
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
        """The wrong-causal-model grid (:mod:`lib.studies.das.mlp_grid`) over GRID_NETWORKS
        networks per task; ``None`` when the WRONG_MODEL parameter is off."""
        v = self.values
        return self._result("wrong_model", "grid", lambda: mlp_grid.wrong_model_grid(
            self.semantics[0], self.mlp_args, self.das_args, v["DAS_N_TEST"],
            v["GRID_N_TRAIN"], v["GRID_NETWORKS"], v["SEED"], counterfactuals)) \
            if v["WRONG_MODEL"] else None


def main_table(equality_result: dict) -> pd.DataFrame:
    """The layer-0 runs of the equality study, one row per semantics: the selected network's
    test IIA and control beside the median validation IIA of all candidates (selection
    semantics only: the selection ran with it) and pyvene's number, one unselected network's."""
    sel = equality_result["selection"]
    seed, n = equality_result["mlp"]["seed"], len(sel["candidates"])
    median = (float(pd.Series([c["validation_iia"] for c in sel["candidates"]]).median())
              if sel["candidates"] else None)
    return pd.DataFrame([{"semantics": s, f"selected network (seed {seed}), test IIA": r["iia"],
                          "random control": r["control_iia"],
                          f"median of the {n} candidates (validation IIA)":
                              median if s == sel["semantics"] else None,
                          "pyvene (one network, not selected)": PYVENE_IIA.get(s),
                          "n_train": r["n_train"], "n_test": r["n_test"],
                          "‖RᵀR − I‖": r["orthogonality_error"]}
                         for s, r in equality_result["main"].items()])


def _spread(summary: dict) -> dict:
    return {"median": summary["median"], "95% CI of the median":
            f"[{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]",
            "min–max": f"{summary['min']:.3f}–{summary['max']:.3f}"}


def grid_table(grid_result: dict, inputs: str = "own") -> pd.DataFrame:
    """The wrong-model grid on one input distribution, one row per (trained on, tested on)
    cell: balanced IIA over the networks (median, interval, range), the control's median, the
    share of True labels and the networks' median True shares (unintervened and intervened)."""
    return pd.DataFrame([{"DAS trained on (network of)": c["train_model"],
                          "tested on": c["test_model"],
                          **{f"balanced IIA {k}": v for k, v in _spread(c["balanced_iia"]).items()},
                          "control (median)": c["control_balanced_iia"]["median"],
                          "IIA (median)": c["iia"]["median"],
                          "label True share": c["label_true_share"],
                          "network True share": c["factual_true_share"]["median"],
                          "True share after swap": c["prediction_true_share"]["median"]}
                         for c in grid_result["cells"] if c["inputs"] == inputs])


def task_table(grid_result: dict) -> pd.DataFrame:
    """AABB, ABAB and ABBA each on its own task over the grid's networks: MLP test accuracy
    and balanced IIA at block 0 (own inputs), median and spread."""
    return pd.DataFrame([{"task": p, "networks": t["balanced_iia"]["n"],
                          "MLP test accuracy (median)": t["mlp_test_accuracy"]["median"],
                          **{f"balanced IIA {k}": v for k, v in _spread(t["balanced_iia"]).items()},
                          "balanced IIA IQR": f"{t['balanced_iia']['q1']:.3f}–"
                                              f"{t['balanced_iia']['q3']:.3f}"}
                         for p, t in grid_result["tasks"].items()])


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
