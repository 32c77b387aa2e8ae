"""Notebook 08's wrong-causal-model grid over many networks per task, scored by balanced IIA.

The ablation of maraPislar's thesis experiments on the DAS tutorial's networks (Geiger, Wu et
al. 2023): three causal models with the same inputs and shape, AABB (P = [W==X], Q = [Y==Z]),
ABAB (P = [W==Y], Q = [X==Z]) and ABBA (P = [W==Z], Q = [X==Y]), each with O = [P == Q]. For each
training model M, ``n_networks`` networks (seeds ``seed`` .. ``seed + n_networks - 1``) solve M's
task; DAS at block 0 is trained on each with M's counterfactuals; every (network, model M')
cell is then scored on held-out counterfactuals of M' drawn from two input distributions:

* ``"own"``: M''s own patterns (its input sampler). On another pairing's patterns a network of
  M answers True nearly always (all of M's pairs differ), so plain IIA there is the share of
  True labels whatever the rotation does; balanced IIA (:mod:`lib.studies.das.scores`) is 0.5
  for such a network, and the label and answer shares stand beside it.
* ``"shared"``: the ten patterns of the three tasks together (:data:`SHARED_PATTERNS`), the same
  inputs in every cell, on which every model's variables take both values.

Each cell reports, over the networks, the median, quartiles, range and a 95 % percentile
bootstrap interval of the median (:func:`lib.core.stats.summarize_median`) of balanced IIA, IIA
and the random-rotation control, the share of True counterfactual labels and the networks'
True shares with and without the intervention.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from lib.core.stats import summarize_median
from lib.studies import das
from lib.studies.das import mlp_das
from lib.studies.das.causal_model import (CausalModel, CounterfactualDataset, _patterns_for,
                                          PAIRINGS, pair_equality_model)
from lib.studies.das.mlp import MLP, interchange_data
from lib.studies.das.scores import intervened_predictions, iia_scores

TASKS = ("AABB", "ABAB", "ABBA")
INPUTS = ("own", "shared")
#: every pattern of the three tasks (both pairs equal, neither, only one), each drawn alike
SHARED_PATTERNS = tuple(dict.fromkeys(p for t in TASKS for p in _patterns_for(PAIRINGS[t],
                                                                              "equal")))
#: the largest number of networks per task, and of DAS training examples, the grid accepts
MAX_NETWORKS, MAX_N_TRAIN = 64, 10_000_000
#: the per-network quantities summarised in every cell
SUMMARISED = ("balanced_iia", "iia", "control_balanced_iia", "control_iia",
              "prediction_true_share", "factual_true_share")


def check_grid_args(n_networks: int, n_train: int) -> None:
    """Refuse sizes the grid cannot use before anything is trained, naming the parameter."""
    if not isinstance(n_networks, int) or isinstance(n_networks, bool) \
            or not 1 <= n_networks <= MAX_NETWORKS:
        raise ValueError(f"GRID_NETWORKS must be an int from 1 to {MAX_NETWORKS} (networks per "
                         f"task), got {n_networks!r}; choose e.g. 8")
    if not isinstance(n_train, int) or isinstance(n_train, bool) \
            or not 1 <= n_train <= MAX_N_TRAIN:
        raise ValueError(f"GRID_N_TRAIN must be an int from 1 to {MAX_N_TRAIN:,} (DAS training "
                         f"counterfactuals per network), got {n_train!r}; choose e.g. 256000")


def task_model(pairing: str, inputs: str = "own") -> CausalModel:
    """The pairing's causal model (O = [P == Q]) with its own input patterns or the shared
    ones."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    return pair_equality_model(pairing, "equal", object_dim=4,
                               patterns=list(SHARED_PATTERNS) if inputs == "shared" else None)


def cell_scores(net: MLP, layer: int, module: das._RotatedBase,
                test: CounterfactualDataset) -> dict:
    """:func:`lib.studies.das.scores.iia_scores` of ``module`` at block ``layer`` of ``net`` on
    ``test``, with the network's own answers on the unintervened bases."""
    data = interchange_data(net, layer, test)
    preds, labels = intervened_predictions(module, lambda h: net.forward_from(layer, h), data)
    return iia_scores(preds, labels, net(test.base_tensor()).argmax(-1))


def wrong_model_grid(semantics: str, mlp_args: dict, das_args: dict, n_test: int, n_train: int,
                     n_networks: int, seed: int, counterfactuals, progress: bool = True) -> dict:
    """The grid (module docstring). ``counterfactuals(model, n, semantics, seed, offset)``
    draws a seeded set (:func:`lib.studies.das.mlp_study.counterfactuals`); training sets take
    offset 41, the test sets 42 (own inputs) and 43 (shared inputs)."""
    check_grid_args(n_networks, n_train)
    seeds = list(range(seed, seed + n_networks))
    tests = {(inputs, q): counterfactuals(task_model(q, inputs), n_test, semantics, seed,
                                          42 if inputs == "own" else 43)
             for inputs in INPUTS for q in TASKS}
    per_cell: dict[tuple[str, str, str], list[dict]] = {}
    networks = []
    bar = tqdm(total=len(TASKS) * n_networks, desc="grid networks", disable=not progress)
    for p in TASKS:
        model = task_model(p)
        trained = mlp_das.task_networks(model, seeds,
                                        **{k: v for k, v in mlp_args.items() if k != "seed"})
        train = counterfactuals(model, n_train, semantics, seed, 41)
        for net_seed, (net, info) in zip(seeds, trained):
            module, res = mlp_das.das_at_layer(net, 0, train, tests[("own", p)], **das_args)
            control = das.random_control(module, seed=das_args["seed"] + 1)
            for (inputs, q), test in tests.items():
                learned, ctrl = cell_scores(net, 0, module, test), cell_scores(net, 0, control, test)
                per_cell.setdefault((p, q, inputs), []).append(
                    {"seed": net_seed, **learned, "control_iia": ctrl["iia"],
                     "control_balanced_iia": ctrl["balanced_iia"]})
            networks.append({"task": p, "seed": net_seed,
                             "mlp_test_accuracy": info["test_accuracy"], "iia": res["iia"],
                             "control_iia": res["control_iia"]})
            bar.update()
    bar.close()
    cells = []
    for (p, q, inputs), rows in per_cell.items():
        cells.append({"train_model": p, "test_model": q, "inputs": inputs,
                      "label_true_share": rows[0]["label_true_share"],
                      **{name: summarize_median([r[name] for r in rows], seed=seed)
                         for name in SUMMARISED},
                      "per_network": rows})
    tasks = {p: {"balanced_iia": next(c["balanced_iia"] for c in cells if c["train_model"] == p
                                      and c["test_model"] == p and c["inputs"] == "own"),
                 "mlp_test_accuracy": summarize_median(
                     [n["mlp_test_accuracy"] for n in networks if n["task"] == p], seed=seed)}
             for p in TASKS}
    return {"semantics": semantics, "layer": 0, "n_networks": n_networks, "seeds": seeds,
            "n_train": n_train, "n_test": n_test,
            "shared_patterns": list(SHARED_PATTERNS), "cells": cells, "tasks": tasks,
            "networks": networks}
