"""Notebook 09's results, each a function of the notebook's parameters: the fine-tune (accuracy
as shipped, tokenization, the tuned model's curve and fingerprint), the DAS runs (one per
causal model, layer, rank and site, resumable), their checks (sanity grid, full-dimension
swap) and the pairwise-IIA graphs (maraPislar's DAS thesis on X+Y+Z=; Geiger, Wu et al. 2023).

The notebook calls :func:`finetune`, :func:`checks` and :func:`graphs` through
:func:`lib.core.io.load_or_compute`. The DAS runs are assembled by :func:`das_runs` from what is
stored: a run of a current ``das_iia.json`` (with its committed rotation) is read, one in the
unit store is read, and only the others are trained. The building blocks live in
:mod:`lib.studies.das.arithmetic` and :mod:`lib.studies.das.arithmetic_das`.

Fine-tuning from the same parameters on another kind of CPU rounds differently, so every result
after the fine-tune names the tuned weights' fingerprint (``TUNED_WEIGHTS_SHA256`` in its key;
:func:`weights_key`), and :class:`lib.studies.das.arithmetic.LazyTuned` refuses other weights.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lib.studies.das import arithmetic as ar
from lib.studies import das
from lib.studies.das import arithmetic_das as da
from lib.core import io

FT_SCHEMA = io.require_keys("tokenization", "shipped", "split", "curve", "test_accuracy")
DAS_SCHEMA = io.require_keys("runs", "sanity_grid", "full_swap", lists=("layers", "ranks"))
GRAPH_SCHEMA = io.require_keys("graphs", lists=("arrangements",))
#: mean edge weight of the thesis' full graphs (GPT-2, layer 7, rank 256), per causal model
THESIS_GRAPH = {1: 0.8490, 2: 0.6787, 3: 0.6771, 4: 0.6235, 5: 0.6872, 6: 0.8415, 7: 0.9758}


def finetune(model: str, n_shipped: int, shots: int, layers_spec: str, ft_args: dict,
             key: dict, seed: int):
    """The model as shipped (accuracy in three formats, tokenization of each format), then
    fine-tuned on the training arrangements (or loaded from the cache). Returns
    ``(payload, provenance)``."""
    from lib.core.models import load_model
    from lib.core.params import parse_layers

    started = time.perf_counter()
    shipped_lm = load_model(model, device=ft_args["device"], dtype=ft_args["dtype"], seed=seed)
    parse_layers(layers_spec, shipped_lm.n_layers)   # a layer the model lacks: refused first
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
    lm, _, split, info = ar.tuned_model(model, progress=True, **ft_args)
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


def tuned(model: str, ft: dict, ft_args: dict) -> ar.LazyTuned:
    """The tuned model of a fine-tune result, loaded (from the cache, or trained) only when a
    run, check or graph needs it, and refused unless its weights are the ones ``ft`` names."""
    return ar.LazyTuned(model, expected_sha256=ft.get("weights_sha256"),
                        **{**ft_args, "force": False})


def weights_key(ft: dict) -> dict:
    """The fingerprint entry of every later result's key (files written before fingerprints
    name none)."""
    return {"TUNED_WEIGHTS_SHA256": ft["weights_sha256"]} if "weights_sha256" in ft else {}


def das_runs(lm, model_ids: list[int], layers: list[int], ranks: list[int],
             site_positions: dict, states, train_models: dict, test_pairs: dict,
             stored: dict | None, units: io.UnitStore, rotations_dir: Path, n_train: int,
             epochs: int, batch_size: int, lr: float, semantics: str, seed: int):
    """Every DAS run of the grid (causal model x layer x rank x site): read from a current
    ``das_iia.json`` (``stored``) or the unit store when its rotation file is there, else
    trained on the training arrangements, evaluated on the test arrangements, its rotation
    saved and its result stored as a unit. Returns ``(runs, modules)``; ``modules`` maps each
    run's name to ``(model, layer, rank, site, module)``."""
    stored_runs = {da.run_name(r["model"], r["layer"], r["rank"], r["site"]): r
                   for r in (stored or {}).get("runs", [])}
    runs, modules = [], {}
    for m in model_ids:
        train_pairs = ar.counterfactual_pairs(train_models[m], n_train, seed * 1000 + 10 + m,
                                              semantics)
        for layer in layers:
            for rank in ranks:
                for site, positions in site_positions.items():
                    name = da.run_name(m, layer, rank, site)
                    rot_path = Path(rotations_dir) / f"{name}.safetensors"
                    res = stored_runs.get(name) or units.get(name)
                    if res is not None and rot_path.exists():
                        inner, _ = das.load_intervention(rot_path)
                        module = da.AtPositions(inner, positions)
                    else:
                        t0 = time.perf_counter()
                        module, res = da.das_run(lm, layer, rank, states[layer], train_pairs,
                                                 test_pairs[m], positions, epochs, batch_size,
                                                 lr, seed)
                        sec = [row.pop("seconds") for row in res["curve"]]
                        res = {"model": m, "site": site, **res}
                        das.save_intervention(module.inner, rot_path, {"unit": name})
                        units.put(name, res)
                        print(f"{name}: IIA {res['iia']:.3f} (control {res['control_iia']:.3f}), "
                              f"{res['steps']} steps, {sum(sec) / res['steps']:.2f} s per step, "
                              f"{time.perf_counter() - t0:.0f} s")
                    runs.append(res)
                    modules[name] = (m, layer, rank, site, module)
    return runs, modules


def checks(lm, tokens: ar.TaskTokens, runs: list[dict], modules: dict, states,
           test_pairs: dict, grid_ids: list[int], layers: list[int], ranks: list[int],
           site_positions: dict, n_test_arrangements: int, key: dict, seed: int):
    """``das_iia.json``: the runs, the sanity grid (each of M1-M3's rotations on each of their
    test sets) and the full-dimension swap check per layer and causal model. Returns
    ``(payload, provenance)``."""
    grid = []
    for _, (m, layer, rank, site, module) in modules.items():
        if m not in grid_ids:
            continue
        for t in grid_ids:
            value = next(r["iia"] for r in runs if r["model"] == m and r["layer"] == layer
                         and r["rank"] == rank and r["site"] == site) if t == m else \
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
               "causal_models": {f"M{m}": ar.causal_model(m).name for m in ar.MODEL_IDS},
               "n_test_arrangements": n_test_arrangements, "params_key": io.params_key(key)}
    return payload, io.provenance(lm, key, seed)


def graphs(lm, modules: dict, states, n_arrangements: int, rank: int, site: str,
           graph_layers: list[int], units: io.UnitStore, predictions_path: Path, key: dict,
           seed: int):
    """Pairwise-IIA graphs on ``n_arrangements`` arrangements (the first of a seeded
    permutation) for the rotations of ``rank`` and ``site`` at ``graph_layers``: every ordered
    pair's predicted class (one unit per graph, so an interrupted run resumes; all stored in
    ``predictions_path``), the edge weights against each causal model, their summary and
    node-resampled intervals. Returns ``(payload, provenance)``."""
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(seed))
    pool = sorted(perm[:n_arrangements].tolist()) if n_arrangements < 1000 else list(range(1000))
    summaries, predictions = [], {}
    for name, (m, layer, r, s, module) in modules.items():
        if r != rank or s != site or layer not in graph_layers:
            continue
        stored_pred = units.get(name)
        if stored_pred is None:
            t0 = time.perf_counter()
            pred = da.pair_predictions(lm, layer, module, states[layer], pool, progress=True)
            n_pairs = len(pool) * (len(pool) - 1)
            sec = time.perf_counter() - t0
            print(f"{name}: {n_pairs:,} ordered pairs in {sec:.0f} s "
                  f"({sec / n_pairs * 1e3:.2f} ms per pair)")
            units.put(name, pred.tolist())
        else:
            pred = torch.tensor(stored_pred)
        predictions[name] = pred.to(torch.int8)
        W = da.graph_weights(pred, ar.causal_model(m), pool)
        summary = {**da.graph_summary(W), **da.graph_intervals(W, seed=seed)}
        summaries.append({"model": m, "layer": layer, "rank": r, "site": s,
                          "thesis_mean_weight_gpt2_layer7_rank256": THESIS_GRAPH[m],
                          **{k: v for k, v in summary.items() if k != "cliques"},
                          "cliques": [[pool[v] for v in c] for c in summary["cliques"]]})
    payload = {"arrangements": pool, "graphs": summaries, "params_key": io.params_key(key),
               "predictions_file": Path(predictions_path).name}
    # every ordered pair's predicted class (rows: base, columns: source, -1 on the diagonal),
    # so the graphs can be read again against any causal model's labels
    io.save_tensors(predictions_path, predictions,
                    {"params_key": io.params_key(key), "arrangements": pool})
    return payload, io.provenance(lm, key, seed)
