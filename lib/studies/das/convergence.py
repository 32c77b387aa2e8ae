"""Convergence of notebook 09's DAS rotations: held-out IIA against the training budget.

Distributed alignment search (Geiger, Wu, Potts, Icard and Goodman 2023, "Finding alignments
between interpretable causal variables and distributed neural representations") reports the
interchange-intervention accuracy (IIA) of a trained rotation; a rotation stopped before its
loss settles understates it. :func:`convergence_grid` trains, for every causal model and seed,
one rotation as 09 does by default (rank 64, one rotation shared over every position, Adam at
lr 0.01, batches of 64, "independent" counterfactuals), all of them stacked in one pass per
step (:class:`lib.studies.das.stacked.Stack`), and measures at each budget of a doubling grid
of optimizer steps (20, 40, 80, ...) the IIA on 09's held-out test counterfactuals, the random
control's IIA and the mean training loss of the steps since the last checkpoint. Training
continues between checkpoints (the same rotations and Adam state), it does not restart.

Training counterfactuals are fresh at every step: budget s uses s × batch pairs, drawn in
blocks of ``block_steps`` steps (:data:`BLOCK_PAIRS` / DAS_BATCH = 20; :func:`pair_seed`: block 0
of seed ``s`` is 09's own training set for ``SEED = s``, the later blocks new draws from the
training arrangements),
each block in the order of a permutation from the member's seed, as
:func:`lib.studies.das.stacked.train_stacked` orders one epoch. So the first budget of seed 0
is 09's run, and a budget's training is the same whatever larger budgets follow. This loop
steps a ``Stack`` itself because ``train_stacked`` permutes all of its pairs at once, which
would make the first steps depend on the largest budget.

The random control (:func:`lib.studies.das.random_control`, seed + 1, as ``das_run``'s) does
not train, so its IIA is measured once per member and reported at every checkpoint.
:func:`plateau` decides, per causal model, the first budget from which every further doubling
of the grid moves the seed-mean IIA by less than a tolerance; :func:`summary` gives each budget's seed mean with
Student's t interval (:func:`lib.core.stats.t_interval`; a bootstrap over three seeds has 10
distinct resamples and never leaves [min, max]). :data:`CONVERGENCE_SCHEMA` is the kind of
``full_compute/<model>/das_convergence.json``; :func:`compute` writes it from 09's tuned model.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from lib.core import io
from lib.core import tensorfiles as tf
from lib.core.schema import NUM, Kind, maybe, nonempty, optional
from lib.core.stats import mean_t_interval
from lib.studies import das
from lib.studies.das import arithmetic as ar
from lib.studies.das import arithmetic_das as da
from lib.studies.das import stacked as st
from lib.studies.das import train_state as ts

#: seed offset between two blocks of training pairs (above every seed * 1000 + 10 + m of 09)
BLOCK_SEED_STEP = 1_000_000
#: the pairs of one block: 09's training set before its budget was raised to the plateau
#: (1,280 = 20 steps of 64), the first budget of the grid
BLOCK_PAIRS = 1280
#: the tolerance of the plateau decision: a doubling that moves the seed-mean IIA by less
TOLERANCE = 0.01


def pair_seed(model: int, seed: int, block: int) -> int:
    """The seed of block ``block`` of training counterfactuals of causal model ``model`` and
    seed ``seed``: 09's ``seed * 1000 + 10 + model`` for block 0, then ``BLOCK_SEED_STEP``
    further per block."""
    return seed * 1000 + 10 + model + BLOCK_SEED_STEP * block


def doubling_grid(start: int, largest: int) -> list[int]:
    """``start, 2 start, 4 start, ...`` up to ``largest`` (included where it is on the grid)."""
    if not isinstance(start, int) or isinstance(start, bool) or start < 1:
        raise das.DASError(f"the first budget must be a positive int of steps, got {start!r}")
    if not isinstance(largest, int) or isinstance(largest, bool) or largest < start:
        raise das.DASError(f"the largest budget must be an int of at least the first budget "
                           f"{start}, got {largest!r}")
    out = [start]
    while out[-1] * 2 <= largest:
        out.append(out[-1] * 2)
    return out


def check_grid(lm, layer: int, model_ids: Sequence[int], seeds: Sequence[int],
               budgets: Sequence[int], rank: int, batch_size: int, lr: float,
               block_steps: int = 20) -> None:
    """Refuse, naming the parameter, before any work: a layer outside the model (or an
    architecture the stored stream cannot start from), an unknown or repeated causal model,
    no or repeated or negative seeds, a budget grid that is not ``b, 2b, 4b, ...`` of
    multiples of ``block_steps`` (the steps of one block of training pairs), a rank
    outside 1..d_model, a batch size below 1, a learning rate that is not positive."""
    da.check_layer_start(lm)
    da._check_layer(lm, layer)
    for name, given in (("causal models", model_ids), ("seeds", seeds)):
        if not given or len(set(given)) != len(given):
            raise das.DASError(f"{name}: give at least one, each once; got {list(given)}")
    unknown = [m for m in model_ids if m not in ar.MODEL_IDS]
    if unknown:
        raise das.DASError(f"unknown causal models {unknown}: choose from {list(ar.MODEL_IDS)}")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise das.DASError(f"seeds must be ints from 0, got {list(seeds)}")
    if not budgets or list(budgets) != doubling_grid(budgets[0], budgets[-1]):
        raise das.DASError(f"budgets must be a doubling grid b, 2b, 4b, ... of steps, got "
                           f"{list(budgets)}")
    st._positive_int("block_steps", block_steps)
    if budgets[0] % block_steps:
        raise das.DASError(f"budgets must be multiples of the block of {block_steps} steps "
                           f"(one block of training pairs), got {list(budgets)}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= lm.d_model:
        raise das.DASError(f"rank must be an int from 1 to d_model = {lm.d_model}, got {rank!r}")
    st._positive_int("batch_size", batch_size)
    if not lr > 0:
        raise das.DASError(f"lr must be positive, got {lr!r}")


def convergence_grid(lm, layer: int, states: torch.Tensor, train_models: Mapping,
                     test_pairs: Mapping, seeds: Sequence[int], budgets: Sequence[int],
                     model_ids: Sequence[int] | None = None, rank: int = 64,
                     batch_size: int = 64, lr: float = 0.01, semantics: str = "independent",
                     block_steps: int = 20, progress: Callable[[int], None] | None = None,
                     state_file: str | os.PathLike | None = None, state_key: str | None = None
                     ) -> tuple[list[dict], list[da.AtPositions]]:
    """Train one rotation per (causal model, seed) at ``blocks.layer.resid_post`` (shared over
    every position), all stacked, for ``budgets[-1]`` steps of ``batch_size`` fresh training
    counterfactuals (module docstring), and measure at every budget its IIA on
    ``test_pairs[m]``. ``train_models[m]`` is causal model m on the training arrangements,
    ``states`` the stored stream after block ``layer`` (1000, T, d), ``model_ids`` default to
    ``test_pairs``' keys. ``block_steps``: the steps of one block of training pairs (module
    docstring). ``progress(steps)`` is called after every step (first with the step a
    resumed grid starts from).

    ``state_file`` (with ``state_key``, the key of everything but the budgets): after each
    budget the rotations and Adam's state are written there (:mod:`lib.studies.das.train_state`),
    and a grid whose budgets begin with a stored state's (an interrupted run, or a smaller grid
    now extended) starts from it: the same computation as training straight through. A state
    beyond this grid is left as it is; an unreadable one is set aside.

    Returns ``(runs, modules)``: per member, in the order (model, seed),
    ``{"model", "seed", "points": [{"steps", "iia", "control_iia", "loss"}]}`` (loss: the mean
    cross-entropy of the steps since the previous budget) and its trained module."""
    model_ids = sorted(test_pairs) if model_ids is None else list(model_ids)
    budgets, seeds = [int(b) for b in budgets], [int(s) for s in seeds]
    check_grid(lm, layer, model_ids, seeds, budgets, rank, batch_size, lr, block_steps)
    missing = [m for m in model_ids if m not in train_models or m not in test_pairs]
    if missing:
        raise das.DASError(f"causal models {missing} have no training model or test pairs")
    members = [(m, s) for m in model_ids for s in seeds]
    stack = st.Stack(lm, layer, states, [rank] * len(members), [s for _, s in members])
    opt = torch.optim.Adam([{"params": group} for group in stack.parameters()], lr=lr)
    gens = [torch.Generator().manual_seed(s) for _, s in members]
    block, n_block = block_steps, block_steps * batch_size
    step, runs, kept = _resume(state_file, state_key, stack, opt, members, budgets)
    for _ in range(step // block):   # the orders of the blocks already trained
        for g in gens:
            torch.randperm(n_block, generator=g)
    if runs is None:
        controls = [da.shared_iia(lm, layer,
                                  da.AtPositions(das.random_control(inner, seed=s + 1)),
                                  states, test_pairs[m])
                    for inner, (m, s) in zip(stack.inners, members)]
        runs = [{"model": m, "seed": s, "points": []} for m, s in members]
    else:   # the control does not train: measured once, stored with every point
        controls = [r["points"][0]["control_iia"] for r in runs]
        if progress is not None:
            progress(step)
    segment: list[list[float]] = [[] for _ in members]
    for b in range(step // block, budgets[-1] // block):
        pairs = [{k: torch.as_tensor(v) for k, v in ar.counterfactual_pairs(
            train_models[m], n_block, pair_seed(m, s, b), semantics).items()}
            for m, s in members]
        orders = [torch.randperm(n_block, generator=g) for g in gens]
        for a in range(0, n_block, batch_size):
            losses, _, _, _ = st.step_stack(stack, opt, pairs, orders, a, batch_size)
            step += 1
            for j, loss in enumerate(losses):
                segment[j].append(float(loss.detach()))
            if progress is not None:
                progress(step)
        if step in budgets:
            for j, (module, (m, _)) in enumerate(zip(stack.modules, members)):
                runs[j]["points"].append({
                    "steps": step, "iia": da.shared_iia(lm, layer, module, states, test_pairs[m]),
                    "control_iia": controls[j], "loss": sum(segment[j]) / len(segment[j])})
            segment = [[] for _ in members]
            if state_file is not None and step > kept:
                ts.save_state(state_file, stack, opt, step, members,
                              {"budgets": [b for b in budgets if b <= step], "runs": runs},
                              str(state_key))
    return runs, stack.modules


def _resume(path, key, stack, opt, members, budgets) -> tuple[int, list | None, int]:
    """``(step, runs, kept)``: the step and runs of the stored state at ``path`` where this
    grid continues it (its budgets up to the state's step are the state's), put into
    ``stack`` and ``opt``; else ``(0, None, kept)``, ``kept`` being the step of a state beyond
    this grid (not to be overwritten by a shorter training) or 0."""
    if path is None or not Path(path).exists():
        return 0, None, 0
    try:
        config, _, _ = tf.read_header(path, ts.WHAT)
        step = int(config["step"])
        if config["record"]["budgets"] != [b for b in budgets if b <= step]:
            print(f"{path}: a training state at step {step} of budgets "
                  f"{config['record']['budgets']}, which this grid ({list(budgets)}) does not "
                  "continue; training from step 0 and leaving it")
            return 0, None, step
        step, record = ts.load_state(path, stack, opt, members, key)
    except tf.TensorFileError as err:
        tf.set_aside(err, "training from step 0")
        return 0, None, 0
    except (KeyError, TypeError, ValueError) as err:   # a header of another shape
        tf.set_aside(tf.TensorFileError(Path(path), f"has no training record ({err})"),
                     "training from step 0")
        return 0, None, 0
    print(f"resumed from the training state at step {step} ({path})")
    return step, record["runs"], step


def summary(runs: Sequence[dict]) -> list[dict]:
    """Per causal model and budget: the IIA over seeds (mean, std, Student's t 95 % interval),
    the control's and the training loss's mean over seeds."""
    out = []
    for m in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == m]
        for i, point in enumerate(mine[0]["points"]):
            at = [r["points"][i] for r in mine]
            out.append({"model": m, "steps": point["steps"],
                        "iia": mean_t_interval([p["iia"] for p in at]),
                        "control_iia": mean_t_interval([p["control_iia"] for p in at]),
                        "loss": mean_t_interval([p["loss"] for p in at])})
    return out


def plateau(budgets: Sequence[int], means: Sequence[float], tolerance: float = TOLERANCE
            ) -> dict:
    """The plateau decision on one causal model's seed-mean IIA per budget (``means``, one per
    doubling-grid budget): the first budget from which every further doubling of the grid
    moves it by less than ``tolerance`` and every later budget's mean stays within
    ``tolerance`` of its own (``steps``; ``reached`` True), else not reached by the
    largest budget (``steps`` None: the last doubling moved it by ``tolerance`` or more, or
    there is none). The first small doubling alone is not enough: a curve that rises slowly at
    first (M1 at layer 22: +0.008 from 20 to 40 steps, then +0.033 to 320) is not flat there.
    ``deltas``: each doubling's change."""
    if len(budgets) != len(means) or not budgets:
        raise ValueError(f"{len(budgets)} budgets for {len(means)} means; give one mean each")
    deltas = [{"from": a, "to": b, "delta": y - x}
              for a, b, x, y in zip(budgets, budgets[1:], means, means[1:])]
    start = len(deltas)
    while start > 0 and abs(deltas[start - 1]["delta"]) < tolerance:
        start -= 1

    def drift(i: int) -> float:   # how far any later budget's mean lies from budget i's
        return max(abs(m - means[i]) for m in means[i + 1:])

    # small steps that add up (M5 at layer 22: +0.010, +0.008, +0.003, +0.004) are no plateau
    while start < len(deltas) and drift(start) >= tolerance:
        start += 1
    if start == len(deltas):
        return {"reached": False, "steps": None, "tolerance": tolerance, "deltas": deltas,
                "decision": f"not reached by {budgets[-1]} steps"}
    moved = max(abs(d["delta"]) for d in deltas[start:])
    return {"reached": True, "steps": budgets[start], "tolerance": tolerance, "deltas": deltas,
            "decision": f"plateau at {budgets[start]} steps: every doubling from there to "
                        f"{budgets[-1]} moves the seed-mean IIA by less than {tolerance} "
                        f"(at most {moved:.4f}) and every later budget stays within "
                        f"{tolerance} of it (at most {drift(start):.4f})"}


def plateaus(runs: Sequence[dict], tolerance: float = TOLERANCE) -> list[dict]:
    """:func:`plateau` for every causal model of ``runs``."""
    rows = summary(runs)
    out = []
    for m in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == m]
        out.append({"model": m, **plateau([r["steps"] for r in mine],
                                          [r["iia"]["mean"] for r in mine], tolerance)})
    return out


_MEAN_CI = {"mean": float, "std": maybe(float), "n": int, "ci_low": float, "ci_high": float}


def _check_payload(payload: dict) -> None:
    budgets, models, seeds = payload["budgets"], payload["causal_models"], payload["seeds"]
    if budgets != doubling_grid(budgets[0], budgets[-1]):
        raise ValueError(f"budgets {budgets} are not a doubling grid")
    got = sorted((r["model"], r["seed"]) for r in payload["runs"])
    if got != sorted((m, s) for m in models for s in seeds):
        raise ValueError(f"runs {got} are not one per causal model {models} and seed {seeds}")
    for i, run in enumerate(payload["runs"]):
        if [p["steps"] for p in run["points"]] != budgets:
            raise ValueError(f"$.runs[{i}]: checkpoints {[p['steps'] for p in run['points']]}, "
                             f"not the budgets {budgets}")
        for p in run["points"]:
            for k in ("iia", "control_iia"):
                if not 0 <= p[k] <= 1:
                    raise ValueError(f"$.runs[{i}]: {k} {p[k]!r} is not an accuracy in [0, 1]")
    if sorted(p["model"] for p in payload["plateau"]) != sorted(models):
        raise ValueError("plateau: one decision per causal model")


#: ``full_compute/<model>/das_convergence.json`` (fields: docs/das_arithmetic.md)
CONVERGENCE_SCHEMA = Kind("das_convergence", "scripts/das_convergence.py", {
    "layer": int, "rank": int, "site": str, "batch_size": int, "lr": float, "semantics": str,
    "causal_models": nonempty([int]), "seeds": nonempty([int]), "budgets": nonempty([int]),
    "block_steps": int, "n_test": int, "test_arrangements": int, "pair_seeds": str, "interval": str,
    "uniform_loss": float,
    "runs": nonempty([{"model": int, "seed": int,
                       "points": nonempty([{"steps": int, "iia": float, "control_iia": float,
                                            "loss": NUM}])}]),
    "summary": nonempty([{"model": int, "steps": int, "iia": _MEAN_CI,
                          "control_iia": _MEAN_CI, "loss": _MEAN_CI}]),
    "plateau": nonempty([{"model": int, "reached": bool, "steps": maybe(int),
                          "tolerance": float, "decision": str,
                          "deltas": [{"from": int, "to": int, "delta": float}]}]),
    "params_key": str, "tuned_weights_sha256": optional(str),
    # causal models whose runs were read from an earlier result of the same grid and weights
    "reused": optional([int])}, extra=_check_payload)


def payload(runs: list[dict], layer: int, rank: int, batch_size: int, lr: float,
            semantics: str, seeds: Sequence[int], budgets: Sequence[int], n_test: int,
            test_arrangements: int, key: dict, block_steps: int = 20) -> dict:
    """The ``das_convergence.json`` payload of :func:`convergence_grid`'s ``runs``."""
    out = {"layer": layer, "rank": rank, "site": "all", "batch_size": batch_size, "lr": lr,
           "semantics": semantics, "causal_models": sorted({r["model"] for r in runs}),
           "seeds": list(seeds), "budgets": list(budgets), "block_steps": block_steps, "n_test": n_test,
           "test_arrangements": test_arrangements,
           "pair_seeds": pair_seeds_rule(block_steps),
           "interval": "Student's t 95 % interval of the mean over seeds",
           "uniform_loss": math.log(ar.N_CLASSES),
           "runs": runs, "summary": summary(runs), "plateau": plateaus(runs),
           "params_key": io.params_key(key)}
    CONVERGENCE_SCHEMA(out)   # refused here, before the provenance is built
    return out


def key_of(run, layer: int, model_ids: Sequence[int], seeds: Sequence[int],
           budgets: Sequence[int], rank: int) -> dict:
    """The key of a convergence result: 09's fine-tune key and tuned weights' fingerprint,
    09's DAS training and test parameters, and the grid's own."""
    from lib.studies.das.arithmetic_study import weights_key

    v = run.values
    return {**run.key_ft, **weights_key(run.ft), "LAYER": layer,
            "CAUSAL_MODELS": list(model_ids), "SEEDS": list(seeds), "BUDGETS": list(budgets),
            "RANK": rank, "SITE": "all", "DAS_N_TRAIN": v["DAS_N_TRAIN"],
            "DAS_N_TEST": v["DAS_N_TEST"],
            "DAS_BATCH": v["DAS_BATCH"], "DAS_LR": v["DAS_LR"], "SEMANTICS": v["SEMANTICS"],
            "BLOCK_SEED_STEP": BLOCK_SEED_STEP}


#: where :func:`compute` keeps each grid's training state (one file per key; not committed)
STATE_DIR = "das_convergence_state"


def state_key(key: Mapping, model_ids: Sequence[int]) -> str:
    """The key of a grid's training state: the result's ``key`` without its budgets (a larger
    grid goes on from a smaller one), for the causal models trained (``model_ids``), at this
    process's thread count (the float rounding, and so the rotations, move with it)."""
    return io.params_key({**{k: v for k, v in key.items() if k != "BUDGETS"},
                          "CAUSAL_MODELS": list(model_ids),
                          "TORCH_THREADS": torch.get_num_threads()})


def block_of(values: Mapping) -> int:
    """The steps of one block of training pairs, DAS_N_TRAIN / DAS_BATCH (the script sets
    DAS_N_TRAIN to :data:`BLOCK_PAIRS`: 1280 / 64 = 20); refused unless DAS_N_TRAIN is a
    multiple of DAS_BATCH."""
    n, batch = values["DAS_N_TRAIN"], values["DAS_BATCH"]
    if n % batch:
        raise das.DASError(f"DAS_N_TRAIN = {n} is not a multiple of DAS_BATCH = {batch}: a "
                           "block of training pairs must be whole steps")
    return n // batch


#: what a stored result's runs must share with this computation to be reused
REUSE_FIELDS = ("layer", "rank", "site", "batch_size", "lr", "semantics", "seeds", "budgets",
                "block_steps", "n_test", "test_arrangements", "pair_seeds",
                "tuned_weights_sha256")


def reusable_runs(stored: Sequence[dict], expect: Mapping, model_ids: Sequence[int]
                  ) -> dict[int, list[dict]]:
    """The runs of ``model_ids`` that earlier results ``stored`` (``das_convergence.json``
    payloads of any causal models, checked by :data:`CONVERGENCE_SCHEMA`) hold for exactly
    this grid: every :data:`REUSE_FIELDS` equal to ``expect``'s (the same tuned weights among
    them), so adding causal models to a grid trains only the new ones. The first result that
    holds a causal model gives all its seeds."""
    found: dict[int, list[dict]] = {}
    for result in stored:
        CONVERGENCE_SCHEMA(result)
        if any(result.get(k) != expect[k] for k in REUSE_FIELDS):
            continue
        for m in model_ids:
            if m not in found and m in result["causal_models"]:
                found[m] = [r for r in result["runs"] if r["model"] == m]
    return found


def compute(run, layer: int, model_ids: Sequence[int], seeds: Sequence[int],
            budgets: Sequence[int], rank: int, key: dict,
            progress: Callable[[int], None] | None = None,
            stored: Sequence[dict] = ()) -> tuple[dict, dict]:
    """``das_convergence.json``'s ``(payload, provenance)`` from notebook 09's ``run`` (a
    :class:`lib.studies.das.arithmetic_study.Notebook` whose :meth:`finetune` has run): its
    tuned model, split and tokens, the stream after ``layer``, 09's test counterfactuals
    (``DAS_N_TEST``, seed ``SEED * 1000 + 20 + m``) and training arrangements. The causal
    models whose runs an earlier result in ``stored`` holds for this grid and these weights
    (:func:`reusable_runs`) are read from it, not trained (listed under ``reused``). The
    others' training state is kept in ``<out_dir>/das_convergence_state/`` after each budget,
    so an interrupted run resumes and a larger grid goes on from a smaller one."""
    v, lm = run.values, run.lm
    block_steps = block_of(v)
    check_grid(lm, layer, model_ids, seeds, budgets, rank, v["DAS_BATCH"], v["DAS_LR"],
               block_steps)
    # the weights used, named even where 09's fine-tune result (written before fingerprints)
    # names none and so the key cannot
    sha = weights_sha256(lm, v["FREEZE_EMBEDDINGS"])
    expect = {"layer": layer, "rank": rank, "site": "all", "batch_size": v["DAS_BATCH"],
              "lr": v["DAS_LR"], "semantics": v["SEMANTICS"], "seeds": list(seeds),
              "budgets": list(budgets), "block_steps": block_steps, "n_test": v["DAS_N_TEST"],
              "test_arrangements": len(run.split["test"]),
              "pair_seeds": pair_seeds_rule(block_steps), "tuned_weights_sha256": sha}
    reused = reusable_runs(stored, expect, model_ids)
    todo = [m for m in model_ids if m not in reused]
    runs: list[dict] = []
    if todo:
        print(f"{len(todo) * len(seeds)} rotations stacked at layer {layer}, budgets "
              f"{list(budgets)} steps")
        started = time.perf_counter()
        states = da.residual_states(lm, run.tokens, [layer])[layer]
        print(f"residual stream after block {layer}: {time.perf_counter() - started:.0f} s")
        test_models = ar.causal_models(run.split["test"])
        test_pairs = {m: ar.counterfactual_pairs(test_models[m], v["DAS_N_TEST"],
                                                 v["SEED"] * 1000 + 20 + m, v["SEMANTICS"])
                      for m in todo}
        train_models = ar.causal_models(run.split["train"])
        skey = state_key(key, todo)
        runs, _ = convergence_grid(lm, layer, states, train_models, test_pairs, seeds,
                                   budgets, todo, rank, v["DAS_BATCH"], v["DAS_LR"],
                                   v["SEMANTICS"], block_steps, progress,
                                   run.out_dir / STATE_DIR / f"{skey[:16]}.safetensors", skey)
    if reused:
        print(f"reused from earlier results: {['M%d' % m for m in sorted(reused)]}")
    runs = sorted(runs + [r for rs in reused.values() for r in rs],
                  key=lambda r: (r["model"], seeds.index(r["seed"])))
    out = payload(runs, layer, rank, v["DAS_BATCH"], v["DAS_LR"], v["SEMANTICS"], seeds,
                  budgets, v["DAS_N_TEST"], len(run.split["test"]), key, block_steps)
    out["tuned_weights_sha256"] = sha
    if reused:
        out["reused"] = sorted(reused)
    CONVERGENCE_SCHEMA(out)
    return out, io.provenance(lm, key, v["SEED"])


def pair_seeds_rule(block_steps: int) -> str:
    """The ``pair_seeds`` field: how block b's training pairs are seeded."""
    return (f"block b of {block_steps} steps: seed * 1000 + 10 + model + {BLOCK_SEED_STEP} * b "
            "(block 0: notebook 09's training pairs)")


def weights_sha256(lm, freeze_embeddings: bool) -> str:
    """:func:`lib.core.tensorfiles.tensors_sha256` of the tuned model's fine-tuned tensors, as
    :func:`lib.studies.das.tuning.tuned_model` fingerprints them."""
    from lib.core.tensorfiles import tensors_sha256
    from lib.studies.das.tuning import _trainable

    names = {n for n, _ in _trainable(lm, freeze_embeddings)}
    return tensors_sha256({n: p.detach().cpu().contiguous()
                           for n, p in lm.model.named_parameters() if n in names})


def redecide(result: dict) -> dict:
    """``result`` (a ``das_convergence.json``) with its ``summary`` and ``plateau`` derived
    again from its stored ``runs`` by this module's :func:`summary` and :func:`plateaus`: after
    a change of the decision rule, without training again. Provenance as stored."""
    out = {k: v for k, v in result.items() if k != "provenance"}
    out["summary"], out["plateau"] = summary(result["runs"]), plateaus(result["runs"])
    CONVERGENCE_SCHEMA(out)
    return out
