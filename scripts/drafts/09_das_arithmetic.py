# %% [markdown]
# # 09 Distributed alignment search on a language model: X+Y+Z=
#
# **Reads:** only its parameters (the 1,000 prompts `X+Y+Z=`, X, Y, Z in 1..10, are generated).
# **Writes:** `full_compute/<model>/das_finetune.json` (tokenization, accuracy as shipped, the
# split, fine-tuning curves, test accuracy), `full_compute/<model>/das_iia.json` (IIA per
# causal model, layer, rank and site, with random-subspace controls, the 3 × 3 sanity grid and
# the full-dimension swap), `full_compute/<model>/das_rotations/*.safetensors`,
# `graphs/<model>/das_*.{png,pdf}`. The fine-tuned weights are cached as safetensors in
# `.cache/arithmetic/` (keyed by the model and every training parameter; rebuilt when missing).
# **Why:** the thesis (maraPislar) asks which causal model of three-number addition a language
# model follows: does it compute X+Y first (M1), X+Z (M2), Y+Z (M3), or keep one input
# (M4–M6) or only the sum (M7)? DAS learns a low-rank rotated subspace of the residual stream
# after block l such that swapping it from a source prompt sets the causal model's
# intermediate P to the source's value; IIA is how often the output then equals the causal
# model's counterfactual sum, on held-out arrangements.
#
# Steps: (1) how the tokenizer splits the prompts, (2) accuracy as shipped, (3) fine-tuning a
# 28-way classification head (the sums 3..30, on the last token's final state, as the thesis'
# `GPT2ForSequenceClassification`), (4) DAS per causal model, layer, rank and site, (5) the
# sanity checks.

# %% tags=["parameters"]
MODEL: str = "smollm2-135m"        # [model] short name, HF id or local dir (lib.models); Llama or Gemma 3
FORMAT: str = "padded"             # [padded|plain] prompt format; padded writes two digits per number (one layout for all prompts)
SPLIT_SEED: int = 0                # [0..] seed of the train / val / test split of the 1,000 arrangements
N_VAL: int = 100                   # [1..] validation arrangements
N_TEST: int = 200                  # [1..] test arrangements (held out from fine-tuning and DAS training)
N_SHIPPED: int = 100               # [1..1000] prompts sampled for the accuracy as shipped
SHOTS: int = 3                     # [0..] solved examples before the prompt in the few-shot measurement
FT_EPOCHS: int = 12                # [1..] most fine-tuning epochs
FT_BATCH: int = 32                 # [1..] fine-tuning batch size
FT_LR: float = 0.0001              # [0..] AdamW learning rate (linear decay to 0)
FT_VAL_TARGET: float = 0.98        # [0..1] stop after the first epoch with this validation accuracy
FREEZE_EMBEDDINGS: bool = True     # keep the input embeddings frozen while fine-tuning
CAUSAL_MODELS: str = "1,2,3,4,5,6,7"  # [some of 1|2|3|4|5|6|7] causal models M1..M7 DAS is trained on
LAYERS: str = "14,22"              # [layers] blocks whose output (resid_post) DAS intervenes on
RANKS: list[int] = [64]            # [1..] low-rank dimensions of the rotation
SITES: str = "all"                 # [some of all|X|plus1|Y|plus2|Z|eq] "all": one rotation shared over every position; a slot (eq is the last token): its positions only
DAS_N_TRAIN: int = 1280            # [1..] training counterfactuals per run (from training arrangements)
DAS_N_TEST: int = 1000             # [1..] test counterfactuals per causal model (test arrangements)
DAS_EPOCHS: int = 1                # [1..] DAS epochs
DAS_BATCH: int = 64                # [1..] DAS batch size
DAS_LR: float = 0.01               # [0..] Adam learning rate of the rotation (the thesis' 0.01)
SEMANTICS: str = "independent"     # [independent|conditioned] counterfactual sampling semantics
GRAPH_ARRANGEMENTS: int = 40       # [0..1000] pairwise-IIA graphs on this many arrangements (the first of a seeded permutation; 1000: the thesis' full graphs); 0 skips them
GRAPH_LAYERS: str = "22"           # [layers] layers (of LAYERS) whose rotations get a graph, one per causal model
THREADS: int = 0                   # [0..] torch CPU threads; 0 keeps the current count (the runner's --threads)
SEED: int = 0                      # [0..] seed of fine-tuning, counterfactuals and rotations
DEVICE: str = "auto"               # [device] auto -> cuda if available, else cpu
DTYPE: str = "auto"                # [dtype] auto -> bfloat16 on cuda, float32 on cpu
FULL_COMPUTE_DIR: str = ""         # "" -> full_compute/
GRAPHS_DIR: str = ""               # "" -> graphs/
CACHE_DIR: str = ""                # "" -> .cache/arithmetic/ (fine-tuned weights)
FORCE: bool = False                # recompute even if results with the same parameters exist

# %%
import time

import pandas as pd
import torch
from IPython.display import display

from lib import arithmetic as ar
from lib import das, das_arithmetic as da, paths
from lib.io import (UnitStore, inside, params_key, provenance, read_current, require_keys,
                    save_tensors, slug as model_slug, write_json)
from lib.models import load_model
from lib.params import check_layers_within, check_namespace, parse_layers, parse_list
from lib.plots import save_figure
from lib.plots.das import plot_wrong_model_grid
from lib.plots.das_arithmetic import plot_finetune_curves, plot_graph_means, plot_iia_by_layer

check_namespace(paths.NOTEBOOKS / "09_das_arithmetic.ipynb", globals())
torch.manual_seed(SEED)
if THREADS:
    torch.set_num_threads(THREADS)
print("torch threads:", torch.get_num_threads())
full_compute_dir = paths.resolve_dir(FULL_COMPUTE_DIR, paths.FULL_COMPUTE)
graphs_dir = paths.resolve_dir(GRAPHS_DIR, paths.GRAPHS)
cache_dir = paths.resolve_dir(CACHE_DIR, ar.CACHE)
slug = model_slug(MODEL)
out_dir = inside(full_compute_dir, slug)
model_ids = sorted(int(m) for m in parse_list(CAUSAL_MODELS, str, "CAUSAL_MODELS"))
sites = parse_list(SITES, str, "SITES")
ranks = [int(r) for r in RANKS]
PARAMETERS = dict(MODEL=MODEL, FORMAT=FORMAT, SPLIT_SEED=SPLIT_SEED, N_VAL=N_VAL, N_TEST=N_TEST,
                  N_SHIPPED=N_SHIPPED, SHOTS=SHOTS, FT_EPOCHS=FT_EPOCHS, FT_BATCH=FT_BATCH,
                  FT_LR=FT_LR, FT_VAL_TARGET=FT_VAL_TARGET, FREEZE_EMBEDDINGS=FREEZE_EMBEDDINGS,
                  CAUSAL_MODELS=model_ids, LAYERS=LAYERS, RANKS=ranks, SITES=sites,
                  DAS_N_TRAIN=DAS_N_TRAIN, DAS_N_TEST=DAS_N_TEST, DAS_EPOCHS=DAS_EPOCHS,
                  DAS_BATCH=DAS_BATCH, DAS_LR=DAS_LR, SEMANTICS=SEMANTICS,
                  GRAPH_ARRANGEMENTS=GRAPH_ARRANGEMENTS, GRAPH_LAYERS=GRAPH_LAYERS, SEED=SEED,
                  DEVICE=DEVICE, DTYPE=DTYPE)
KEY_FT = {k: PARAMETERS[k] for k in ("MODEL", "FORMAT", "SPLIT_SEED", "N_VAL", "N_TEST",
                                     "N_SHIPPED", "SHOTS", "FT_EPOCHS", "FT_BATCH", "FT_LR",
                                     "FT_VAL_TARGET", "FREEZE_EMBEDDINGS", "SEED", "DEVICE",
                                     "DTYPE")}
if GRAPH_ARRANGEMENTS:  # a graph needs a rotation trained at its layer: refused before any work
    check_layers_within(GRAPH_LAYERS, LAYERS)
FT_ARGS = dict(fmt=FORMAT, split_seed=SPLIT_SEED, n_val=N_VAL, n_test=N_TEST, epochs=FT_EPOCHS,
               batch_size=FT_BATCH, lr=FT_LR, seed=SEED, val_target=FT_VAL_TARGET,
               freeze_embeddings=FREEZE_EMBEDDINGS, device=DEVICE, dtype=DTYPE,
               cache_dir=cache_dir, force=FORCE)
print(out_dir, "| causal models", [f"M{m}" for m in model_ids], "| ranks", ranks, "| sites", sites)

# %% [markdown]
# ## 1–3. Tokenization, accuracy as shipped, fine-tuning
#
# Both embedded models split numbers into digits ("10" is two tokens), so in the plain format
# `3+10+7=` the prompts have 6 to 9 tokens and position p holds different slots in different
# prompts: a rotation shared over positions, or one at a position, would mix slots between
# base and source. `lib.arithmetic.task_tokens` refuses such a format; the `padded` format
# writes every number with two digits (`03+10+07=`), one layout for all 1,000 prompts. The
# accuracy as shipped is greedy decoding of the answer (3 new tokens) on `N_SHIPPED` sampled
# prompts in the plain format (the task as posed), zero-shot and with `SHOTS` solved examples
# (one per line), and in the padded format (what the model is fine-tuned on) with `SHOTS`.
#
# Fine-tuning: the LM head is replaced by a 28-way linear head over the sums 3..30 on the last
# token's final state (the thesis' `GPT2ForSequenceClassification`); AdamW with linear decay,
# gradient clipping at 1, embeddings frozen, trained on the training arrangements only, and
# stopped at the first epoch whose validation accuracy reaches `FT_VAL_TARGET`. The split is
# disjoint by arrangement (the thesis' overlapped).

# %%
ft_path = out_dir / "das_finetune.json"
FT_SCHEMA = require_keys("tokenization", "shipped", "split", "curve", "test_accuracy")
ft = read_current(ft_path, KEY_FT, FORCE)
if ft is None:
    started = time.perf_counter()
    shipped_lm = load_model(MODEL, device=DEVICE, dtype=DTYPE, seed=SEED)
    parse_layers(LAYERS, shipped_lm.n_layers)   # a layer the model lacks: refused before any work
    tokenization = {}
    for fmt in ar.FORMATS:
        try:
            tokenization[fmt] = ar.task_tokens(shipped_lm.tokenizer, fmt).describe(
                shipped_lm.tokenizer)
        except ar.TaskError as err:
            tokenization[fmt] = {"error": str(err)}
    shipped = [ar.shipped_accuracy(shipped_lm, N_SHIPPED, shots, fmt, seed=SEED)
               for fmt, shots in (("plain", 0), ("plain", SHOTS), ("padded", SHOTS))]
    del shipped_lm
    print(f"shipped accuracy measured in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    lm, tokens, split, info = ar.tuned_model(MODEL, progress=True, **FT_ARGS)
    print(f"tuned model ready in {time.perf_counter() - started:.0f} s "
          f"({'from the cache' if info['cached'] else 'trained'})")
    if "seconds_per_step" in info:
        print(f"fine-tuning: {info['seconds_per_step']:.2f} s per step of {FT_BATCH}")
    ft = {"tokenization": tokenization, "shipped": shipped, "split": split,
          "curve": info["curve"], "steps": info["steps"],
          "trainable_parameters": info["trainable_parameters"],
          "test_accuracy": info["test_accuracy"], "val_accuracy": info["val_accuracy"],
          "weights_sha256": info["weights_sha256"],
          "head": "Linear(d_model, 28, bias=False) over the sums 3..30 on the last token's "
                  "final state, replacing the LM head",
          "params_key": params_key(KEY_FT)}
    write_json(ft_path, ft, provenance(lm, KEY_FT, SEED), check=FT_SCHEMA)
else:   # the tuned model loads (from the cache, or trains) only if a run, check or graph needs it
    # and must be the one the stored results were computed with (refused otherwise)
    lm, split = ar.LazyTuned(MODEL, expected_sha256=ft.get("weights_sha256"), **FT_ARGS), \
        ft["split"]
# every result below depends on the tuned weights, not only on the parameters: fine-tuning from
# the same parameters on another kind of CPU rounds differently, so the weights' fingerprint is
# part of what makes a stored result current (files written before fingerprints name none)
WEIGHTS = {"TUNED_WEIGHTS_SHA256": ft["weights_sha256"]} if "weights_sha256" in ft else {}
KEY_DAS = {**KEY_FT, **{k: PARAMETERS[k] for k in ("CAUSAL_MODELS", "LAYERS", "RANKS", "SITES",
                                                  "DAS_N_TRAIN", "DAS_N_TEST", "DAS_EPOCHS",
                                                  "DAS_BATCH", "DAS_LR", "SEMANTICS")},
           **WEIGHTS}
KEY_GRAPH = {**KEY_DAS, "GRAPH_ARRANGEMENTS": GRAPH_ARRANGEMENTS, "GRAPH_LAYERS": GRAPH_LAYERS}
# one DAS run (causal model, layer, rank, site; its name says which) depends on these alone, so
# adding a causal model, layer, rank or site to the lists reuses the runs already stored
KEY_UNIT = {k: v for k, v in KEY_DAS.items() if k not in ("CAUSAL_MODELS", "LAYERS", "RANKS",
                                                          "SITES")}
print("tuned weights:", f"sha256 {ft['weights_sha256'][:16]}..." if WEIGHTS else
      f"not named in {ft_path.name} (written before weights were fingerprinted)")
tokens = ar.task_tokens(lm.tokenizer, FORMAT)
for fmt, t in ft["tokenization"].items():
    print(f"{fmt}: " + (t["error"] if "error" in t else
                        f"{t['prompt']!r} -> {t['tokens']} (ids {t['ids']}), slots {t['slots']}"))
display(pd.DataFrame([{k: s[k] for k in ("format", "shots", "n", "accuracy")}
                      for s in ft["shipped"]]))
print(f"fine-tuned: {len(ft['curve'])} epochs, {ft['steps']} steps; validation accuracy "
      f"{ft['val_accuracy']:.3f} ({N_VAL}), test accuracy {ft['test_accuracy']:.3f} "
      f"({N_TEST} held-out arrangements)")
fig = plot_finetune_curves(ft["curve"], f"{MODEL}: fine-tuning on X+Y+Z= (28 sums)")
save_figure(fig, "das_finetune", slug, graphs_dir)
fig

# %% [markdown]
# ## 4. DAS per causal model, layer, rank and site
#
# The residual stream after each block in `LAYERS` of all 1,000 prompts is computed once
# (`lib.engine`), when a run first needs it, and stored; the model is frozen, so a rotation
# trains on pairs of indices into that table and runs only the blocks above the layer
# (`lib.das_arithmetic.run_from`).
# Training counterfactuals draw base and source from the training arrangements, test
# counterfactuals from the test arrangements. Beside each learned rotation: a random
# subspace of the same rank (the control).

# %%
layers = parse_layers(LAYERS, lm.n_layers)
graph_layers = (check_layers_within(GRAPH_LAYERS, LAYERS, lm.n_layers) if GRAPH_ARRANGEMENTS
                else [])
site_positions = {s: (None if s == "all" else tokens.slots[s]) for s in sites}
states = da.LazyStates(lm, tokens, layers)   # computed when a run, check or graph needs them
train_models = ar.causal_models(split["train"])
test_models = ar.causal_models(split["test"])
grid_ids = [m for m in (1, 2, 3) if m in model_ids]
eval_ids = sorted(set(model_ids) | set(grid_ids))
test_pairs = {m: ar.counterfactual_pairs(test_models[m], DAS_N_TEST, SEED * 1000 + 20 + m,
                                         SEMANTICS) for m in sorted(set(eval_ids) | {7})}
units = UnitStore(out_dir / "das_units", KEY_UNIT, FORCE)
das_path = out_dir / "das_iia.json"
DAS_SCHEMA = require_keys("runs", "sanity_grid", "full_swap", lists=("layers", "ranks"))
stored = read_current(das_path, KEY_DAS, FORCE, check=DAS_SCHEMA)
# a current das_iia.json and its committed rotations stand in for the (uncommitted) units
stored_runs = {da.run_name(r["model"], r["layer"], r["rank"], r["site"]): r
               for r in (stored or {}).get("runs", [])}
rot_dir = out_dir / "das_rotations"
runs, modules = [], {}
for m in model_ids:
    train_pairs = ar.counterfactual_pairs(train_models[m], DAS_N_TRAIN, SEED * 1000 + 10 + m,
                                          SEMANTICS)
    for layer in layers:
        for rank in ranks:
            for site, positions in site_positions.items():
                name = da.run_name(m, layer, rank, site)
                rot_path = rot_dir / f"{name}.safetensors"
                res = stored_runs.get(name) or units.get(name)
                if res is not None and rot_path.exists():
                    inner, _ = das.load_intervention(rot_path)
                    module = da.AtPositions(inner, positions)
                else:
                    t0 = time.perf_counter()
                    module, res = da.das_run(lm, layer, rank, states[layer], train_pairs,
                                             test_pairs[m], positions, DAS_EPOCHS, DAS_BATCH,
                                             DAS_LR, SEED)
                    sec = [row.pop("seconds") for row in res["curve"]]
                    res = {"model": m, "site": site, **res}
                    das.save_intervention(module.inner, rot_path, {"unit": name})
                    units.put(name, res)
                    print(f"{name}: IIA {res['iia']:.3f} (control {res['control_iia']:.3f}), "
                          f"{res['steps']} steps, {sum(sec) / res['steps']:.2f} s per step, "
                          f"{time.perf_counter() - t0:.0f} s")
                runs.append(res)
                modules[name] = (m, layer, rank, site, module)
print("residual streams", "computed" if states.computed else "not needed: every run is stored")
display(pd.DataFrame([{k: r[k] for k in ("model", "layer", "rank", "site", "iia", "control_iia")}
                      for r in runs]))

# %% [markdown]
# ## 5. Sanity checks
#
# * **3 × 3 grid** (the thesis' sanity check): each rotation trained on M1, M2 or M3 is tested
#   on the test counterfactuals of all three. A rotation that captured its model's P should do
#   best on its own model; the models agree on many counterfactuals, so the off-diagonal cells
#   are not at chance.
# * **Full-dimension swap**: a rank-d rotation at every position replaces the whole residual
#   stream by the source's, so the output is the source's own prediction; its IIA must equal
#   how often the source's predicted sum is the counterfactual label (≈ 1 for M7).

# %%
if stored is not None:   # the checks of these runs are stored: read, not recomputed
    grid, full_swap = stored["sanity_grid"], stored["full_swap"]
else:
    grid = []
    for name, (m, layer, rank, site, module) in modules.items():
        if m not in grid_ids:
            continue
        for t in grid_ids:
            value = next(r["iia"] for r in runs if r["model"] == m and r["layer"] == layer
                         and r["rank"] == rank and r["site"] == site) if t == m else \
                da.iia_on(lm, layer, module, states[layer], test_pairs[t])
            grid.append({"train_model": f"M{m}", "test_model": f"M{t}", "layer": layer,
                         "rank": rank, "site": site, "iia": value})
    preds = da.predictions(lm, tokens)
    full_swap = []
    for layer in layers:
        for t in sorted(test_pairs):
            full_swap.append({"model": t, "layer": layer,
                              **da.full_swap_check(lm, layer, states[layer], test_pairs[t],
                                                   preds)})
    payload = {"runs": runs, "sanity_grid": grid, "full_swap": full_swap, "layers": layers,
               "ranks": ranks, "sites": {s: (None if p is None else list(p))
                                         for s, p in site_positions.items()},
               "causal_models": {f"M{m}": ar.causal_model(m).name for m in ar.MODEL_IDS},
               "n_test_arrangements": len(split["test"]), "params_key": params_key(KEY_DAS)}
    write_json(das_path, payload, provenance(lm, KEY_DAS, SEED), check=DAS_SCHEMA)
display(pd.DataFrame(full_swap))
print(das_path)

# %%
rows = []
for r in runs:
    for rot, key in (("learned", "iia"), ("random control", "control_iia")):
        rows.append({"model": f"M{r['model']}", "layer": r["layer"], "rank": r["rank"],
                     "site": r["site"], "rotation": rot, "iia": r[key]})
fig = plot_iia_by_layer(rows, f"{MODEL}: DAS IIA per layer (held-out arrangements)")
save_figure(fig, "das_iia_layers", slug, graphs_dir)
fig

# %%
if grid:
    last = max(layers)
    cells = [g for g in grid if g["layer"] == last and g["rank"] == ranks[0]
             and g["site"] == sites[0]]
    fig = plot_wrong_model_grid(cells, f"{MODEL}: sanity grid, layer {last}, rank {ranks[0]}, "
                                       f"site {sites[0]}", y_label="DAS trained on")
    save_figure(fig, "das_sanity_grid", slug, graphs_dir)
    display(fig)

# %% [markdown]
# ## 6. Pairwise-IIA graphs and cliques (`GRAPH_ARRANGEMENTS > 0`)
#
# For each trained rotation (first rank and site, every causal model, the layers of
# `GRAPH_LAYERS`), the thesis' graph: nodes are arrangements, the weight of (i, j) is the IIA
# over the two counterfactuals (base i, source j) and (base j, source i), in {0, 0.5, 1}. Every
# ordered pair is written at its own cell (the thesis' committed graphs were mis-indexed,
# methods.md 1.6); the clique analysis keeps weight-1 edges and removes greedy maximum cliques
# of at least 5 nodes. By default the graph is on 40 arrangements drawn at random (1,560
# ordered pairs per causal model): the full graph, `GRAPH_ARRANGEMENTS = 1000`, is 999,000
# runs of the blocks above the layer per causal model (runs that share their first positions
# share that work, `lib.das_arithmetic.pair_predictions`), about half an hour each at layer 22
# on this CPU (the time printed below); each finished graph is stored, so an interrupted run
# resumes. The interval beside the mean weight resamples the arrangements
# (nodes), so it says what the sample tells about the full graph's mean. The thesis' numbers
# (fixed code, GPT-2, layer 7, rank 256, all 1,000 arrangements) are printed beside ours; they
# are for another model, layer and rank.

# %%
THESIS_GRAPH = {1: 0.8490, 2: 0.6787, 3: 0.6771, 4: 0.6235, 5: 0.6872, 6: 0.8415, 7: 0.9758}
if GRAPH_ARRANGEMENTS:
    graph_path = out_dir / "das_graph.json"
    graphs = read_current(graph_path, KEY_GRAPH, FORCE)
    # a graph depends on its rotation (a DAS unit) and the pool alone
    graph_units = UnitStore(out_dir / "das_units" / "graphs",
                            {**KEY_UNIT, "GRAPH_ARRANGEMENTS": GRAPH_ARRANGEMENTS}, FORCE)
    if graphs is None:
        perm = torch.randperm(1000, generator=torch.Generator().manual_seed(SEED))
        pool = sorted(perm[:GRAPH_ARRANGEMENTS].tolist()) if GRAPH_ARRANGEMENTS < 1000 \
            else list(range(1000))
        summaries, predictions = [], {}
        for name, (m, layer, rank, site, module) in modules.items():
            if rank != ranks[0] or site != sites[0] or layer not in graph_layers:
                continue
            # each graph's predictions are a unit: an interrupted run of the full graphs
            # (hours on a CPU) resumes at the first graph it had not finished
            stored_pred = graph_units.get(name)
            if stored_pred is None:
                t0 = time.perf_counter()
                pred = da.pair_predictions(lm, layer, module, states[layer], pool,
                                           progress=True)
                n_pairs = len(pool) * (len(pool) - 1)
                sec = time.perf_counter() - t0
                print(f"{name}: {n_pairs:,} ordered pairs in {sec:.0f} s "
                      f"({sec / n_pairs * 1e3:.2f} ms per pair)")
                graph_units.put(name, pred.tolist())
            else:
                pred = torch.tensor(stored_pred)
            predictions[name] = pred.to(torch.int8)
            W = da.graph_weights(pred, ar.causal_model(m), pool)
            summary = {**da.graph_summary(W), **da.graph_intervals(W, seed=SEED)}
            summaries.append({"model": m, "layer": layer, "rank": rank, "site": site,
                              "thesis_mean_weight_gpt2_layer7_rank256": THESIS_GRAPH[m],
                              **{k: v for k, v in summary.items() if k != "cliques"},
                              "cliques": [[pool[v] for v in c] for c in summary["cliques"]]})
        graphs = {"arrangements": pool, "graphs": summaries, "params_key": params_key(KEY_GRAPH),
                  "predictions_file": "das_graph_predictions.safetensors"}
        # every ordered pair's predicted class (rows: base, columns: source, -1 on the
        # diagonal), so the graphs can be read again against any causal model's labels
        save_tensors(out_dir / graphs["predictions_file"], predictions,
                     {"params_key": params_key(KEY_GRAPH), "arrangements": pool})
        write_json(graph_path, graphs, provenance(lm, KEY_GRAPH, SEED),
                   check=require_keys("graphs", lists=("arrangements",)))
    display(pd.DataFrame([{**{k: g[k] for k in ("model", "layer", "mean_weight")},
                           "95% interval (nodes resampled)": "{:.3f}–{:.3f}".format(
                               *g["mean_weight_ci"]),
                           "weight-1 fraction": g["fraction"]["1.0"],
                           **{k: g[k] for k in ("thesis_mean_weight_gpt2_layer7_rank256",
                                                "mean_weight1_degree", "clique_sizes")}}
                          for g in graphs["graphs"]]))
    fig = plot_graph_means(graphs["graphs"], f"{MODEL}: pairwise-IIA graphs on "
                                             f"{len(graphs['arrangements'])} arrangements")
    save_figure(fig, "das_graph_means", slug, graphs_dir)
    display(fig)

# %%
print("tuned model:", "not loaded, every result was stored and current"
      if isinstance(lm, ar.LazyTuned) and not lm.loaded else "used")
