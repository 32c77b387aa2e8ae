"""Distributed alignment search on the small MLPs of notebook 08: the experiment steps.

Geiger, Wu et al. 2023, "Finding alignments between interpretable causal variables and
distributed neural representations" (hierarchical equality, section 4); the thesis experiments
of maraPislar (ABAB pattern tasks, wrong-causal-model ablation). The pieces are
:mod:`lib.studies.das.causal_model` (tasks and counterfactual data), :mod:`lib.studies.das.mlp` (networks) and
:mod:`lib.studies.das` (rotated-subspace interventions); this module strings them together so that the
notebook stays thin, and caches trained networks as safetensors (never pickles) under
``.cache/das_mlp/`` keyed by everything that determines them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from lib.studies import das
from lib.core import paths
from lib.studies.das.causal_model import CausalModel, CounterfactualDataset, encode
from lib.core.io import params_key
from lib.core.tensorfiles import TensorFileError, set_aside, tensors_sha256
from lib.studies.das.mlp import MLP, accuracy, interchange_data, load_mlp, save_mlp, train_mlps

CACHE = paths.REPO_ROOT / ".cache" / "das_mlp"
#: memory of one counterfactual with its block activations (``interchange_data``) and of one
#: factual example, at their peak, for :func:`lib.core.memory.check_fits` (measured on
#: hierarchical equality, object_dim 4: 940 and 240 bytes at 0.4-0.8 million, rounded up)
CF_BYTES, EXAMPLE_BYTES = 1000, 256


def network_spec(model: CausalModel, n_train: int, n_test: int, epochs: int, batch_size: int,
                 lr: float, seed: int, h_dim: int = 16, n_layers: int = 3,
                 init: str = "torch") -> dict:
    """Everything that determines the network :func:`task_network` trains: its cache file is
    named by, and carries, this spec's key."""
    return {"task": model.name, "n_train": n_train, "n_test": n_test, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "seed": seed, "h_dim": h_dim,
            "n_layers": n_layers, "init": init, "version": 2}


def network_path(model: CausalModel, n_train: int, n_test: int, epochs: int, batch_size: int,
                 lr: float, seed: int, h_dim: int = 16, n_layers: int = 3,
                 cache_dir: Path = CACHE, init: str = "torch") -> Path:
    """Where :func:`task_network` caches the network trained with these settings."""
    spec = network_spec(model, n_train, n_test, epochs, batch_size, lr, seed, h_dim, n_layers,
                        init)
    return Path(cache_dir) / f"{model.name}-{params_key(spec)}.safetensors"


def task_network(model: CausalModel, n_train: int, n_test: int, epochs: int, batch_size: int,
                 lr: float, seed: int, h_dim: int = 16, n_layers: int = 3,
                 cache_dir: Path | None = CACHE, force: bool = False,
                 init: str = "torch") -> tuple[MLP, dict]:
    """Train an MLP on ``model``'s factual task (or load the cached one); returns it and
    ``{"curve", "test_accuracy", "n_train", "n_test"}``. Training and test inputs come from
    different seeds (fresh random object vectors).

    ``init`` (see :class:`lib.studies.das.mlp.MLP`): ``"torch"``, nn.Linear's default, or
    ``"normal"`` (weights N(0, 0.02²), biases 0), what a fresh pyvene ``MLPForClassification``
    gets (measured with pyvene 0.1.8, transformers 4.57.6, torch 2.13.0:
    ``scripts/pyvene_mlp_init.py``)."""
    return task_networks(model, [seed], n_train, n_test, epochs, batch_size, lr, h_dim,
                         n_layers, cache_dir, force, init)[0]


def _test_set(model: CausalModel, n_test: int, seed: int):
    setting, labels = model.factual_dataset(n_test, seed=seed * 1000 + 2)
    return encode(setting, model.inputs), labels


def _measured(net: MLP, x_test: torch.Tensor, y_test: torch.Tensor) -> dict:
    """What a network's info reports about its test set, measured now."""
    return {"test_accuracy": accuracy(net, x_test, y_test),
            "test_label_counts": torch.bincount(y_test, minlength=2).tolist()}


def cached_network(path: Path, key: str, model: CausalModel, n_test: int,
                   seed: int) -> tuple[MLP, dict] | None:
    """The network cached at ``path`` and its info, or None when it must be trained again: a
    file that is unreadable, not finite, of other shapes than its config's network or written
    with another spec (``key``; a file without one is named by it) is set aside with a
    warning. Its stored test accuracy is reported only when the tensors match the checksum
    stored with it; else (files written before checksums, or changed since) it is measured
    again on the test set."""
    try:
        net, meta = load_mlp(path, key=key, unkeyed_ok=True)
    except TensorFileError as err:
        set_aside(err, "training it again")
        return None
    if meta.pop("weights_sha256", None) != tensors_sha256(net.state_dict()):
        meta.update(_measured(net, *_test_set(model, n_test, seed)))
    return net, {**meta, "cached": True}


def task_networks(model: CausalModel, seeds: list[int], n_train: int, n_test: int, epochs: int,
                  batch_size: int, lr: float, h_dim: int = 16, n_layers: int = 3,
                  cache_dir: Path | None = CACHE, force: bool = False, init: str = "torch",
                  group: int = 16) -> list[tuple[MLP, dict]]:
    """:func:`task_network` for each of ``seeds``. The ones not cached (:func:`cached_network`)
    are trained ``group`` at a time by :func:`lib.studies.das.mlp.train_mlps`, which gives every
    network the weights it would get alone (so a network is the same whichever call trained
    it, and one cache serves both)."""
    if not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be a positive int, got {group!r}")
    out: dict[int, tuple[MLP, dict]] = {}
    todo = []
    for seed in dict.fromkeys(int(s) for s in seeds):
        key = params_key(network_spec(model, n_train, n_test, epochs, batch_size, lr, seed,
                                      h_dim, n_layers, init))
        path = (network_path(model, n_train, n_test, epochs, batch_size, lr, seed, h_dim,
                             n_layers, cache_dir, init) if cache_dir else None)
        found = cached_network(path, key, model, n_test, seed) \
            if path is not None and path.exists() and not force else None
        if found is not None:
            out[seed] = found
        else:
            todo.append((seed, path, key))
    for first in range(0, len(todo), group):
        chunk = todo[first:first + group]
        nets, xs, ys, tests = [], [], [], []
        for seed, _, _ in chunk:
            tests.append(_test_set(model, n_test, seed))
            x, y = model.factual_dataset(n_train, seed=seed * 1000 + 1)
            xs.append(encode(x, model.inputs))
            ys.append(y)
            nets.append(MLP(d_in=xs[-1].shape[1], h_dim=h_dim, n_layers=n_layers, seed=seed,
                            init=init))
        curves = train_mlps(nets, xs, ys, epochs, batch_size, lr, [s for s, _, _ in chunk],
                            tests)
        del xs, ys
        for (seed, path, key), net, curve, (x_test, y_test) in zip(chunk, nets, curves, tests):
            info = {"curve": curve, **_measured(net, x_test, y_test), "n_train": n_train,
                    "n_test": n_test}
            if path is not None:   # the accuracy is stored with the checksum it belongs to
                save_mlp(net, path, {**info, "weights_sha256": tensors_sha256(net.state_dict())},
                         key=key)
            out[seed] = (net, {**info, "cached": False})
    return [out[int(s)] for s in seeds]


def select_network(candidates: list[tuple[int, MLP]], layer: int, train: CounterfactualDataset,
                   validation: CounterfactualDataset, epochs: int, batch_size: int, lr: float,
                   seed: int, progress: bool = False) -> tuple[int, list[dict]]:
    """Which of several networks trained alike has the best alignment at block ``layer``: DAS
    (:func:`das_at_layer`) on each, scored on ``validation`` counterfactuals, which must be
    drawn apart from any test set that is reported afterwards. Returns the chosen network's
    seed (highest validation IIA; the first on ties) and one row per candidate: ``seed``,
    ``validation_iia``, ``control_iia``."""
    if not candidates:
        raise ValueError("select_network needs at least one candidate network")
    rows = []
    for net_seed, net in tqdm(candidates, desc="networks", disable=not progress):
        _, res = das_at_layer(net, layer, train, validation, epochs, batch_size, lr, seed)
        rows.append({"seed": int(net_seed), "validation_iia": res["iia"],
                     "control_iia": res["control_iia"]})
    best = max(rows, key=lambda r: r["validation_iia"])
    return best["seed"], rows


def das_at_layer(net: MLP, layer: int, train: CounterfactualDataset,
                 test: CounterfactualDataset, epochs: int, batch_size: int, lr: float, seed: int,
                 subspaces=None, progress: bool = False) -> tuple[das.RotatedSpaceIntervention, dict]:
    """Train a full rotation at block ``layer`` (each intermediate variable owns an equal share
    of the rotated coordinates unless ``subspaces`` says otherwise); returns it and its
    held-out IIA, the IIA of a random rotation with the same subspaces, and the curve."""
    d = net.h_dim
    k = len(train.intermediates)
    subspaces = subspaces or [(j * d // k, (j + 1) * d // k) for j in range(k)]
    train_data = interchange_data(net, layer, train)
    test_data = interchange_data(net, layer, test)
    module = das.RotatedSpaceIntervention(d, subspaces, seed=seed)

    def head(h):
        return net.forward_from(layer, h)

    out = das.train_das(module, head, train_data, epochs, batch_size, lr, seed, test_data,
                        progress=progress)
    control = das.random_control(module, seed=seed + 1)
    seconds = [row.pop("seconds") for row in out["curve"]]
    result = {"layer": layer, "iia": das.iia(module, head, test_data),
              "control_iia": das.iia(control, head, test_data), "curve": out["curve"],
              "trainable_parameters": out["trainable_parameters"],
              "orthogonality_error": das.orthogonality_error(module),
              "n_train": len(train), "n_test": len(test), "semantics": train.semantics,
              "subspaces": [list(s) for s in subspaces]}
    result["seconds_per_epoch"] = sum(seconds) / len(seconds)  # timing: printed, not stored
    return module, result


def iia_on(net: MLP, layer: int, module: das._RotatedBase,
           test: CounterfactualDataset) -> float:
    """IIA of a trained ``module`` on counterfactuals ``test`` (possibly of another model)."""
    return das.iia(module, lambda h: net.forward_from(layer, h), interchange_data(net, layer, test))
