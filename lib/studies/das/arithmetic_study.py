"""Notebook 09's results, each a function of the notebook's parameters: the fine-tune (accuracy
as shipped, tokenization, the tuned model's curve and fingerprint), the DAS runs (one per
causal model, layer, rank and site, resumable), their checks (sanity grid, full-dimension
swap) and the pairwise-IIA graphs (:mod:`lib.studies.das.arithmetic_graphs`; maraPislar's DAS
thesis on X+Y+Z=; Geiger, Wu et al. 2023).

:class:`Notebook` calls :func:`finetune`, :func:`checks` and
:func:`lib.studies.das.arithmetic_graphs.graphs` through :func:`lib.core.io.load_or_compute`. The
DAS runs are assembled by :func:`das_runs` from what is stored: a run of a current ``das_iia.json``
(with its committed rotation) is read, one in the unit store is read, and only the others are
trained. The building blocks live in :mod:`lib.studies.das.arithmetic` and
:mod:`lib.studies.das.arithmetic_das`.

Fine-tuning from the same parameters on another kind of CPU rounds differently, so every result
after the fine-tune names the tuned weights' fingerprint (``TUNED_WEIGHTS_SHA256`` in its key;
:func:`weights_key`), and :class:`lib.studies.das.tuning.LazyTuned` refuses other weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lib.core import io, paths, schema
from lib.core.memory import check_fits
from lib.core.params import ParameterError
from lib.core.parsers import check_layers_within, parse_layers, parse_list
from lib.core.tensorfiles import TensorFileError, set_aside
from lib.core.schema import NUM, Kind, map_of, maybe, nonempty, one_of, optional
from lib.studies import das
from lib.studies.das import arithmetic as ar
from lib.studies.das import arithmetic_das as da
from lib.studies.das import arithmetic_graphs as ag
from lib.studies.das import tuning as tu
from lib.studies.das.seeds import seed_list
from lib.studies.das.arithmetic_tables import (cells_of, cells_table, graphs_table,  # noqa: F401
                                               sanity_cells, shipped_table, tokenization_lines)

NOTEBOOK = paths.NOTEBOOKS / "09_das_arithmetic.ipynb"
# each result's key: the parameters its numbers depend on (the DAS and graph keys add the tuned
# weights' fingerprint, :func:`weights_key`)
FT_KEY = ("MODEL", "FORMAT", "SPLIT_SEED", "N_VAL", "N_TEST", "N_SHIPPED", "SHOTS", "FT_EPOCHS",
          "FT_BATCH", "FT_LR", "FT_VAL_TARGET", "FREEZE_EMBEDDINGS", "SEED", "DEVICE", "DTYPE")
GRID_KEY = ("CAUSAL_MODELS", "LAYERS", "RANKS", "SITES")
DAS_KEY = GRID_KEY + ("DAS_N_TRAIN", "DAS_N_TEST", "DAS_EPOCHS", "DAS_BATCH", "DAS_LR",
                      "SEMANTICS")
GRAPH_KEY = ("GRAPH_ARRANGEMENTS", "GRAPH_LAYERS")

# the kinds of result notebook 09 writes (lib.core.schema), checked on every read
FT_SCHEMA = Kind("das_finetune", "09_das_arithmetic", {
    "tokenization": map_of(one_of({"error": str}, {
        "prompt": str, "ids": [int], "tokens": [str], "length": int, "slots": map_of([int])})),
    "shipped": nonempty([{"format": str, "shots": int, "n": int, "accuracy": float,
                          "examples": [{"prompt": str, "continuation": str, "correct": bool}]}]),
    "split": {"train": nonempty([int]), "val": [int], "test": nonempty([int])},
    "curve": nonempty([{"epoch": int, "train_loss": NUM, "train_accuracy": float,
                        "val_loss": NUM, "val_accuracy": float}]),
    "steps": int, "trainable_parameters": int, "test_accuracy": float, "val_accuracy": float,
    "weights_sha256": optional(str), "head": str, "params_key": str})
#: one DAS run, as :func:`das_runs` stores it (a unit) and ``das_iia.json`` lists it; its IIAs
#: are accuracies in [0, 1] besides (:func:`check_run`)
RUN_SHAPE = {"model": int, "layer": int, "rank": int, "site": str,
             "positions": one_of(str, [int]), "iia": float, "control_iia": float,
             "curve": [{"epoch": int, "loss": NUM}], "steps": int, "trainable_parameters": int,
             "orthogonality_error": float, "n_train": int, "n_test": int,
             "seed": optional(int)}   # files written before seeds were counted name none
INTERVAL = {"mean": NUM, "std": maybe(NUM), "n": int, "ci_low": NUM, "ci_high": NUM}
#: one cell over its seeds (:func:`lib.studies.das.seeds.cells`)
CELL_SHAPE = {"model": int, "layer": int, "rank": int, "site": str, "seeds": [maybe(int)],
              "iia": INTERVAL, "control_iia": INTERVAL, "final_loss": INTERVAL, "steps": int}


def check_run(res: Any, where: str = "run") -> None:
    """A DAS run (a unit, or an item of ``das_iia.json``'s runs) as :func:`das_runs` reads it:
    of :data:`RUN_SHAPE`, its IIAs numbers in [0, 1]; raises
    :class:`lib.core.schema.SchemaError` (a ValueError) otherwise."""
    schema.check(RUN_SHAPE, res, where)
    for k in ("iia", "control_iia"):
        if not 0 <= res[k] <= 1:
            raise schema.SchemaError(f"at {where}.{k}: an accuracy in [0, 1], got {res[k]!r}")


def _check_runs(payload: dict) -> None:
    for i, run in enumerate(payload["runs"]):
        check_run(run, f"$.runs[{i}]")


DAS_SCHEMA = Kind("das_iia", "09_das_arithmetic", {
    "runs": nonempty([RUN_SHAPE]),
    "sanity_grid": [{"train_model": str, "test_model": str, "layer": int, "rank": int,
                     "site": str, "iia": float}],
    "full_swap": [{"model": int, "layer": int, "iia": float, "source_prediction_is_label": float,
                   "source_sum_is_label": float}],
    "layers": nonempty([int]), "ranks": nonempty([int]), "sites": map_of(maybe([int])),
    "causal_models": map_of(str), "n_test_arrangements": int, "params_key": str,
    "cells": optional([CELL_SHAPE]), "seeds": optional([int])},
    extra=_check_runs)


def finetune(model: str, n_shipped: int, shots: int, layers_spec: str, ft_args: dict,
             key: dict, seed: int, ranks: list[int] | None = None):
    """The model as shipped (accuracy in three formats, tokenization of each format), then
    fine-tuned on the training arrangements (or loaded from the cache). Returns
    ``(payload, provenance)``. Layers and ranks the model cannot have, and an architecture DAS
    here cannot run on, are refused once the model is loaded, before any measurement."""
    from lib.core.models import load_model

    started = time.perf_counter()
    shipped_lm = load_model(model, device=ft_args["device"], dtype=ft_args["dtype"], seed=seed)
    parse_layers(layers_spec, shipped_lm.n_layers)   # a layer the model lacks: refused first
    too_big = [r for r in ranks or [] if r > shipped_lm.d_model]
    if too_big:
        raise ParameterError(f"RANKS {too_big} exceed {model}'s width d_model = "
                             f"{shipped_lm.d_model}; choose ranks from 1 to {shipped_lm.d_model}")
    da.check_layer_start(shipped_lm)                  # GPT-2: refused before any measurement
    tokenization = {}
    for fmt in ar.FORMATS:
        try:
            tokenization[fmt] = ar.task_tokens(shipped_lm.tokenizer, fmt).describe(
                shipped_lm.tokenizer)
        except ar.TaskError as err:
            tokenization[fmt] = {"error": str(err)}
    shipped = [ar.shipped_accuracy(shipped_lm, n_shipped, s, fmt, seed=seed)
               for fmt, s in (("plain", 0), ("plain", shots), ("padded", shots))]
    del shipped_lm
    print(f"shipped accuracy measured in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    lm, _, split, info = tu.tuned_model(model, progress=True, **ft_args)
    print(f"tuned model ready in {time.perf_counter() - started:.0f} s "
          f"({'from the cache' if info['cached'] else 'trained'})")
    if "seconds_per_step" in info:
        print(f"fine-tuning: {info['seconds_per_step']:.2f} s per step of "
              f"{ft_args['batch_size']}")
    payload = {"tokenization": tokenization, "shipped": shipped, "split": split,
               "curve": info["curve"], "steps": info["steps"],
               "trainable_parameters": info["trainable_parameters"],
               "test_accuracy": info["test_accuracy"], "val_accuracy": info["val_accuracy"],
               "weights_sha256": info["weights_sha256"],
               "head": "Linear(d_model, 28, bias=False) over the sums 3..30 on the last token's "
                       "final state, replacing the LM head",
               "params_key": io.params_key(key)}
    return payload, io.provenance(lm, key, seed)


def tuned(model: str, ft: dict, ft_args: dict) -> tu.LazyTuned:
    """The tuned model of a fine-tune result, loaded (from the cache, or trained) only when a
    run, check or graph needs it, and refused unless its weights are the ones ``ft`` names."""
    return tu.LazyTuned(model, expected_sha256=ft.get("weights_sha256"),
                        **{**ft_args, "force": False})


def weights_key(ft: dict) -> dict:
    """The fingerprint entry of every later result's key (files written before fingerprints
    name none)."""
    return {"TUNED_WEIGHTS_SHA256": ft["weights_sha256"]} if "weights_sha256" in ft else {}


def stored_rotation(path: Path, key: str, name: str, d_model: int, rank: int,
                    positions) -> da.AtPositions | None:
    """The rotation of run ``name`` stored at ``path`` for a stored result of that run, or
    None when it must be trained again: missing, or (set aside with a warning naming it,
    :func:`lib.core.tensorfiles.set_aside`) unreadable, not finite, of another shape, not orthonormal,
    of another run, or written with other parameters than ``key`` (the DAS unit store's key,
    the one the stored result was computed under)."""
    if not path.exists():
        return None
    try:
        inner, meta = das.load_intervention(path, key=key, expect={"kind": "low_rank",
                                                                   "d": d_model, "rank": rank})
        if meta.get("unit", name) != name:
            raise TensorFileError(path, f"holds the rotation of run {meta['unit']}, not "
                                     f"of {name}")
    except TensorFileError as err:
        set_aside(err, "training it again")
        return None
    return da.AtPositions(inner, positions)


def rotation_path(rotations_dir: Path, key: str, name: str) -> Path:
    """Where run ``name``'s rotation is stored: one folder per DAS unit store key (the run's
    parameters apart from the grid, and the thread count), so that two parameter sets
    written into one folder each keep, and reuse, their own rotations."""
    return Path(rotations_dir) / key / f"{name}.safetensors"


def das_runs(lm, model_ids: list[int], layers: list[int], ranks: list[int],
             site_positions: dict, states, train_models: dict, test_pairs: dict,
             stored: dict | None, units: io.UnitStore, rotations_dir: Path, n_train: int,
             epochs: int, batch_size: int, lr: float, semantics: str, seed: int,
             seeds: Sequence[int] | None = None):
    """Every DAS run of the grid (causal model x layer x rank x site x seed): read from a
    current ``das_iia.json`` (``stored``) or the unit store when its rotation file is there and
    carries the unit store's key (:func:`stored_rotation`), else trained on the training
    arrangements, evaluated on the test arrangements, its rotation saved with that key and its
    result stored as a unit. ``seeds`` (default ``[seed]``): one run per seed s, its rotation
    started from s and trained on its own counterfactuals (seed ``s * 1000 + 10 + model``);
    the run of ``seed`` keeps the name it had before seeds were counted
    (:func:`lib.studies.das.arithmetic_das.run_name`). The runs to train at one layer, rank,
    site and seed (one per causal model) train stacked, in one pass of the blocks above the
    layer per step (:func:`lib.studies.das.stacked.das_runs_stacked`; all of them when one is
    missing, so a run is always the same computation). Rotations live in
    ``rotations_dir / <key> /`` (:func:`rotation_path`), so runs of other parameters into the
    same folder keep their own files and never overwrite these. Returns ``(runs, modules,
    trained)``; ``modules`` maps the name of each run of ``seed`` (the one the checks and
    graphs read) to ``(model, layer, rank, site, module)``; ``trained`` names the runs trained
    here, whose results then replace any stored ones (what was computed from their old
    rotations, checks and graphs, is computed again)."""
    from tqdm.auto import tqdm

    from lib.studies.das import stacked as st

    seeds = [seed] if seeds is None else list(seeds)

    def name_of(m: int, layer: int, rank: int, site: str, s: int) -> str:
        return da.run_name(m, layer, rank, site, None if s == seed else s)

    stored_runs = {name_of(r["model"], r["layer"], r["rank"], r["site"], r.get("seed", seed)): r
                   for r in (stored or {}).get("runs", [])}
    pairs = {(m, s): ar.counterfactual_pairs(train_models[m], n_train, s * 1000 + 10 + m,
                                             semantics)
             for m in model_ids for s in seeds}
    found: dict[str, tuple[dict, Any]] = {}
    missing: dict[tuple, list[int]] = {}
    for layer in layers:
        for rank in ranks:
            for site, positions in site_positions.items():
                for s in seeds:
                    for m in model_ids:
                        name = name_of(m, layer, rank, site, s)
                        res = stored_runs.get(name) or units.get(name, check_run)
                        module = None if res is None else stored_rotation(
                            rotation_path(rotations_dir, units.key, name), units.key, name,
                            lm.d_model, rank, positions)
                        if res is None or module is None:
                            missing.setdefault((layer, rank, site, s), []).append(m)
                        else:
                            found[name] = (res, module)
    trained = set()
    steps = epochs * -(-n_train // batch_size)
    bar = tqdm(total=len(missing) * steps, unit="step", desc="DAS training (stacked)",
               disable=not missing)
    for (layer, rank, site, s), ms in missing.items():
        t0 = time.perf_counter()
        # the whole stack of the grid's causal models, even when one run is missing: a run is
        # then always the same computation (batched rows round like their neighbours), so a
        # damaged rotation trains again to the same bytes on this CPU
        members = [st.Member(rank, s, pairs[m, s]) for m in model_ids]
        out = st.das_runs_stacked(lm, layer, states[layer], members,
                                  [test_pairs[m] for m in model_ids], site_positions[site],
                                  epochs, batch_size, lr, on_step=bar.update)
        for m, (module, res) in zip(model_ids, out):
            if m not in ms:   # stored and current: kept as stored
                continue
            name = name_of(m, layer, rank, site, s)
            per_epoch = res.pop("stack_seconds")
            res = {"model": m, "site": site, "seed": s, **res}
            das.save_intervention(module.inner, rotation_path(rotations_dir, units.key, name),
                                  {"unit": name}, key=units.key)
            units.put(name, res)
            trained.add(name)
            found[name] = (res, module)
            bar.write(f"{name}: IIA {res['iia']:.3f} (control {res['control_iia']:.3f}), final "
                      f"loss {res['curve'][-1]['loss']:.3f}, {res['steps']} steps")
        bar.write(f"layer {layer}, rank {rank}, site {site}, seed {s}: {len(model_ids)} "
                  f"rotation(s) stacked, {sum(per_epoch) / out[0][1]['steps']:.2f} s per step, "
                  f"{time.perf_counter() - t0:.0f} s with evaluation")
    bar.close()
    runs, modules = [], {}
    for m in model_ids:   # the order before seeds were counted, each cell's seeds together
        for layer in layers:
            for rank in ranks:
                for site in site_positions:
                    for s in seeds:
                        name = name_of(m, layer, rank, site, s)
                        res, module = found[name]
                        runs.append(res)
                        if s == seed:
                            modules[name] = (m, layer, rank, site, module)
    return runs, modules, trained


def checks(lm, tokens: ar.TaskTokens, runs: list[dict], modules: dict, states,
           test_pairs: dict, grid_ids: list[int], layers: list[int], ranks: list[int],
           site_positions: dict, n_test_arrangements: int, key: dict, seed: int,
           seeds: Sequence[int] | None = None):
    """``das_iia.json``: the runs, each cell over its seeds (:func:`lib.studies.das.seeds.cells`:
    mean and 95 % t interval of the IIA and of the control's), the sanity grid (each of
    M1-M3's rotations of ``seed`` on each of their test sets) and the full-dimension swap check
    per layer and causal model. Returns ``(payload, provenance)``."""
    from lib.studies.das.seeds import cells

    grid = []
    for _, (m, layer, rank, site, module) in modules.items():
        if m not in grid_ids:
            continue
        for t in grid_ids:
            value = next(r["iia"] for r in runs if r["model"] == m and r["layer"] == layer
                         and r["rank"] == rank and r["site"] == site
                         and r.get("seed", seed) == seed) if t == m else \
                da.iia_on(lm, layer, module, states[layer], test_pairs[t])
            grid.append({"train_model": f"M{m}", "test_model": f"M{t}", "layer": layer,
                         "rank": rank, "site": site, "iia": value})
    preds = da.predictions(lm, tokens)
    full_swap = [{"model": t, "layer": layer,
                  **da.full_swap_check(lm, layer, states[layer], test_pairs[t], preds)}
                 for layer in layers for t in sorted(test_pairs)]
    payload = {"runs": runs, "sanity_grid": grid, "full_swap": full_swap, "layers": layers,
               "ranks": ranks, "sites": {s: (None if p is None else list(p))
                                         for s, p in site_positions.items()},
               "causal_models": {f"M{m}": ar.MODEL_NAMES[m] for m in ar.MODEL_IDS},
               "n_test_arrangements": n_test_arrangements, "params_key": io.params_key(key),
               "cells": cells(runs), "seeds": list(seeds or [seed])}
    return payload, io.provenance(lm, key, seed)


class Notebook:
    """Notebook 09 from its parameter values (:func:`lib.core.params.notebook_values`): the
    parsed lists, folders and keys, and one method per result, in the notebook's order (each
    runs the ones before it if they have not run): :meth:`finetune`, :meth:`das`,
    :meth:`checks`, :meth:`graphs`. A current result is read; the tuned model is loaded only
    when a result needs it. Sets torch's seed (and threads, unless 0) as the parameters say."""

    def __init__(self, values: dict[str, Any]):
        v = self.values = values
        torch.manual_seed(v["SEED"])
        if v["THREADS"]:
            torch.set_num_threads(v["THREADS"])
        self.slug = io.slug(v["MODEL"])
        self.out_dir = io.inside(paths.resolve_dir(v["FULL_COMPUTE_DIR"], paths.FULL_COMPUTE),
                                 self.slug)
        self.graphs_dir = paths.resolve_dir(v["GRAPHS_DIR"], paths.GRAPHS)
        self.model_ids = sorted(int(m) for m in parse_list(v["CAUSAL_MODELS"], str,
                                                           "CAUSAL_MODELS"))
        self.sites = parse_list(v["SITES"], str, "SITES")
        self.ranks = [int(r) for r in v["RANKS"]]
        self.seeds = seed_list(v["SEED"], v["DAS_SEEDS"])
        self.parsed = {**v, "CAUSAL_MODELS": self.model_ids, "RANKS": self.ranks,
                       "SITES": self.sites}
        for name, given in (("CAUSAL_MODELS", self.model_ids), ("RANKS", self.ranks),
                            ("SITES", self.sites)):
            if len(set(given)) != len(given):   # each would run twice
                raise ParameterError(f"{name} names {given}: a value twice; name each once")
        if v["GRAPH_ARRANGEMENTS"] == 1:
            raise ParameterError("GRAPH_ARRANGEMENTS = 1: a graph needs two arrangements or "
                                 "more (0 skips the graphs)")
        if v["GRAPH_POOL"] == "test" and v["GRAPH_ARRANGEMENTS"] > v["N_TEST"]:
            ag.graph_pool(v["GRAPH_ARRANGEMENTS"], 0, range(v["N_TEST"]))   # its refusal
        if v["N_VAL"] + v["N_TEST"] >= len(ar.ARRANGEMENTS):   # before any model call
            raise ParameterError(f"N_VAL + N_TEST = {v['N_VAL'] + v['N_TEST']} leaves no training "
                                 f"arrangement of the {len(ar.ARRANGEMENTS)}; lower them")
        # one test set of counterfactuals per evaluated causal model (those run and M7), one
        # training set per causal model and seed: refused before any model call when they
        # cannot fit (the larger named first, the other's memory counted as taken)
        sizes = {"DAS_N_TEST": len(set(self.model_ids) | {7}) * ar.CF_BYTES,
                 "DAS_N_TRAIN": len(self.model_ids) * len(self.seeds) * ar.CF_BYTES}
        total = sum(v[name] * per for name, per in sizes.items())
        for name, per in sorted(sizes.items(), key=lambda item: -v[item[0]] * item[1]):
            check_fits(name, v[name], per, total - v[name] * per,
                       what="the test counterfactuals of every evaluated causal model and "
                       "the training sets of every causal model and seed")
        if v["GRAPH_ARRANGEMENTS"]:  # a graph needs a rotation trained at its layer: refused first
            check_layers_within(v["GRAPH_LAYERS"], v["LAYERS"])
        self.ft_args = dict(fmt=v["FORMAT"], split_seed=v["SPLIT_SEED"], n_val=v["N_VAL"],
                            n_test=v["N_TEST"], epochs=v["FT_EPOCHS"], batch_size=v["FT_BATCH"],
                            lr=v["FT_LR"], seed=v["SEED"], val_target=v["FT_VAL_TARGET"],
                            freeze_embeddings=v["FREEZE_EMBEDDINGS"], device=v["DEVICE"],
                            dtype=v["DTYPE"], force=v["FORCE"],
                            cache_dir=paths.resolve_dir(v["CACHE_DIR"], ar.CACHE))
        self.key_ft = {k: self.parsed[k] for k in FT_KEY}
        self.ft: dict | None = None
        self.runs: list[dict] | None = None
        self.trained: set[str] = set()   # runs trained here: what is stored of them is redone

    def _key(self, *names: str) -> dict:
        assert self.ft is not None
        return {**self.key_ft, **{k: self.parsed[k] for k in names}, **weights_key(self.ft)}

    def finetune(self) -> dict:
        """``das_finetune.json``: accuracy as shipped, tokenization, the fine-tuning curve."""
        v = self.values
        self.ft = io.load_or_compute(
            self.out_dir / "das_finetune.json", self.key_ft, force=v["FORCE"], check=FT_SCHEMA,
            compute=lambda: finetune(v["MODEL"], v["N_SHIPPED"], v["SHOTS"], v["LAYERS"],
                                     self.ft_args, self.key_ft, v["SEED"], self.ranks))
        self.lm = tuned(v["MODEL"], self.ft, self.ft_args)   # loads only when a result needs it
        self.split = self.ft["split"]
        self.tokens = ar.task_tokens(self.lm.tokenizer, v["FORMAT"])
        self.key_das = self._key(*DAS_KEY)
        if v["DAS_SEEDS"] != 1:   # one seed per cell is what every run was before DAS_SEEDS:
            self.key_das["DAS_SEEDS"] = v["DAS_SEEDS"]   # keyed as then, so it stays current
        # one DAS run depends on these alone, so adding a causal model, layer, rank or site
        # reuses the runs already stored
        self.key_unit = {k: x for k, x in self.key_das.items()
                         if k not in GRID_KEY and k != "DAS_SEEDS"}
        return self.ft

    def das(self) -> list[dict]:
        """Every DAS run (causal model x layer x rank x site), read or trained."""
        if self.ft is None:
            self.finetune()
        v, lm = self.values, self.lm
        self.layers = parse_layers(v["LAYERS"], lm.n_layers)
        self.graph_layers = (check_layers_within(v["GRAPH_LAYERS"], v["LAYERS"], lm.n_layers)
                             if v["GRAPH_ARRANGEMENTS"] else [])
        self.site_positions = {s: (None if s == "all" else self.tokens.slots[s])
                               for s in self.sites}
        # residual streams: computed when a run, check or graph needs them
        self.states = da.LazyStates(lm, self.tokens, self.layers)
        self.grid_ids: list[int] = [m for m in (1, 2, 3) if m in self.model_ids]
        eval_ids = sorted(set(self.model_ids) | set(self.grid_ids) | {7})
        test_models = ar.causal_models(self.split["test"])
        self.test_pairs = {m: ar.counterfactual_pairs(test_models[m], v["DAS_N_TEST"],
                                                      v["SEED"] * 1000 + 20 + m, v["SEMANTICS"])
                           for m in eval_ids}
        stored = io.read_current(self.out_dir / "das_iia.json", self.key_das, v["FORCE"],
                                 check=DAS_SCHEMA)
        self.runs, self.modules, self.trained = das_runs(
            lm, self.model_ids, self.layers, self.ranks, self.site_positions, self.states,
            ar.causal_models(self.split["train"]), self.test_pairs, stored,
            io.UnitStore(self.out_dir / "das_units", self.key_unit, v["FORCE"]),
            self.out_dir / "das_rotations", v["DAS_N_TRAIN"], v["DAS_EPOCHS"], v["DAS_BATCH"],
            v["DAS_LR"], v["SEMANTICS"], v["SEED"], self.seeds)
        return self.runs

    def checks(self) -> dict:
        """``das_iia.json``: the runs, the sanity grid and the full-dimension swap check."""
        if self.runs is None:
            self.das()
        v = self.values
        # a run trained here replaces its stored result: the file is written again (the same
        # bytes when training gave the same rotation)
        return io.load_or_compute(
            self.out_dir / "das_iia.json", self.key_das, force=v["FORCE"] or bool(self.trained),
            check=DAS_SCHEMA,
            compute=lambda: checks(self.lm, self.tokens, self.runs or [], self.modules,
                                   self.states, self.test_pairs, self.grid_ids, self.layers,
                                   self.ranks, self.site_positions, len(self.split["test"]),
                                   self.key_das, v["SEED"], self.seeds))

    def graphs(self) -> dict | None:
        """``das_graph.json``: the pairwise-IIA graphs; ``None`` when GRAPH_ARRANGEMENTS is 0."""
        v = self.values
        if not v["GRAPH_ARRANGEMENTS"]:
            return None
        if self.runs is None:
            self.das()
        key = self._key(*DAS_KEY, *GRAPH_KEY)
        pool_key = {"GRAPH_ARRANGEMENTS": v["GRAPH_ARRANGEMENTS"]}
        # GRAPH_POOL "all" is what every graph was before it existed: keyed as then, so those
        # results stay current; a held-out pool is a key of its own
        if v["GRAPH_POOL"] != "all":
            key["GRAPH_POOL"] = pool_key["GRAPH_POOL"] = v["GRAPH_POOL"]
        # a graph depends on its rotation (a DAS unit) and the pool alone
        units = io.UnitStore(self.out_dir / "das_units" / "graphs",
                             {**self.key_unit, **pool_key}, v["FORCE"])
        # a graph of a run trained here is computed again (the file keeps its bytes when
        # training gave the same rotation)
        redo = {n for n, (_, layer, r, s, _) in self.modules.items() if n in self.trained
                and r == self.ranks[0] and s == self.sites[0] and layer in (self.graph_layers or [])}
        return io.load_or_compute(
            self.out_dir / "das_graph.json", key, force=v["FORCE"] or bool(redo),
            check=ag.GRAPH_SCHEMA,
            compute=lambda: ag.graphs(self.lm, self.modules, self.states, v["GRAPH_ARRANGEMENTS"],
                                   self.ranks[0], self.sites[0], self.graph_layers or [], units,
                                   self.out_dir / "das_graph_predictions.safetensors", key,
                                   v["SEED"], redo,
                                   None if v["GRAPH_POOL"] == "all" else self.split["test"]))

    def model_used(self) -> bool:
        """Whether the tuned model was loaded (False when every result was stored and current)."""
        return self.ft is not None and not (isinstance(self.lm, tu.LazyTuned)
                                            and not self.lm.loaded)
