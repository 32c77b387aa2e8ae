"""The compute step of each notebook that writes a result: load the model, compute (through the
study modules, resuming from units where they exist), and return ``(payload, provenance)``.

Notebooks call these only through :func:`lib.core.io.load_or_compute`, which first asks whether the
stored result is current; so a fresh clone whose committed results are current never loads a
model or reads a unit. Each function takes the notebook's checked parameters as arguments and
its ``parameters`` dict (the key of the result) for the provenance. The kinds of result of 01,
02 and 06 (:class:`lib.core.schema.Kind`: name and shape, checked on every read) are declared
here, beside the steps that build them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lib.core import io
from lib.core.memory import check_fits
from lib.core.schema import NUM, STAT, Kind, map_of, maybe, names, nonempty, optional

# --- the kinds of result of notebooks 01, 02 and 06 (lib.core.schema), checked on every read -

#: one token of a set: its id, text, score and mean clean probability
_ENTRY = {"id": int, "token": str, "score": float, "clean_p": optional(float)}
_SETS = map_of(map_of([_ENTRY]))            # pair -> domain -> entries
#: 01 writes every key; a token-set file written by hand (or before splits) has the first three,
#: enough for 04, and 02 refuses it with the fix (:func:`lib.studies.domain_swap.held_out_pairs`)
TOKEN_SETS_SCHEMA = Kind("token_sets", "01_reverse_intervention", {
    "model": str, "top_n": int, "pairs": _SETS, "layers": optional(nonempty([int])),
    "components": optional(names),
    "split": optional(map_of({"discovery": [int], "held_out": [int], "discovery_keys": [str]})),
    "pair_info": optional(map_of({"domains": [str], "n_prompts": int,
                                  "n_candidates": map_of(int)})),
    "score": optional({"name": str}), "assignment": optional({"name": str}),
    "reference": optional(_SETS), "agreement": optional(map_of(map_of(map_of(map_of(NUM))))),
    "alternatives": optional(map_of(_SETS)), "method": optional(str)},
    folder="TOKEN_SETS_DIR")

_SIDE = {"kl": STAT, "delta": optional(STAT), "per_prompt": optional(dict)}
_PER_LAYER = [{"layer": int, "score": NUM, "rank": maybe(int), "group": str,
               "sides": map_of(_SIDE)}]
_CORRELATION = {"rho": NUM, "p_value": NUM, "n": int}
_EFFECTS_OF_PAIR = {
    "domains": [str], "n_prompts": int, "layers": [int], "evaluated_pairs": optional([int]),
    "token_set_sizes": map_of(int), "layer_ranking": map_of([int]), "top_layers": map_of([int]),
    "bottom_layers": map_of([int]),
    "swap": map_of({"per_layer": _PER_LAYER, "spearman": map_of(map_of(_CORRELATION)),
                    "top_vs_bottom": {"k": int, "top_layers": [int], "bottom_layers": [int]},
                    "depth_control": optional(dict)}),
    "zero_ablation": map_of({"per_layer": _PER_LAYER,
                             "spearman": map_of(map_of(_CORRELATION))}),
    "injection": map_of({"layer": int, "alphas": [float], "vector_norm": NUM,
                         "sides": map_of([{"alpha": float, "kl": STAT}])})}
FULL_COMPUTE_SCHEMA = Kind("domain_effects", "02_all_model_causal", {
    "model": str, "metric": str, "components": names, "k": int,
    "pairs": map_of(_EFFECTS_OF_PAIR), "sides": optional(map_of(str)),
    "effects": optional(map_of(str))}, folder="FULL_COMPUTE_DIR")

_TRACE_HEAD = {"answer": str, "answer_id": int, "p_clean": float, "p_corrupt": float,
               "noise": float, "layers": [int]}
#: notebook 06's single-prompt traces (causal_trace_<kind>.json: a TraceResult's dict)
TRACE_SCHEMA = Kind("causal_trace", "06_causal_tracing", {
    **_TRACE_HEAD, "kind": str, "window": int, "prompt": str, "subject": str, "samples": int,
    "seed": int, "tokens": [str], "subject_range": [int], "token_rows": [int],
    "prefix_rows": [int], "scores": [[NUM]]})
SEVERED_SCHEMA = Kind("causal_trace_severed", "06_causal_tracing", {
    **_TRACE_HEAD, "token": int, "token_str": str, "ordinary": [float], "mlp_severed": [float],
    "attention_severed": [float]})
_FACT = {"prompt": str, "subject": str, "answer": str, "answer_id": int, "top_token": str,
         "correct": bool, "p_clean": float, "subject_range": [int], "n_tokens": int,
         "p_corrupt": optional(float), "rows": optional(map_of(int)),
         "scores": optional(map_of(map_of([float])))}
FACTS_SCHEMA = Kind("causal_trace_facts", "06_causal_tracing", {
    "summary": {"n_facts": int, "n_correct": int, "ate": float, "p_clean_mean": float,
                "p_corrupt_mean": float, "peaks": map_of(map_of({"aie": float, "layer": int}))},
    "effects": nonempty([{"kind": str, "token": str, "layer": int, "mean": float, "std": NUM,
                          "n": int, "lo": NUM, "hi": NUM}]),
    "facts": nonempty([_FACT])})


def prompts_input(pair_sets: Sequence) -> dict:
    """The ``inputs`` entry of results computed from paired prompts (their digest)."""
    from lib.studies.separability import prompts_digest

    return {"prompts": prompts_digest(pair_sets)}


def domain_inputs(pair_sets: Sequence, token_sets: dict, scores: dict) -> dict:
    """``inputs`` of notebook 02's result: the prompts, the token sets of 01 (their sets and
    split) and the separability scores of 00 (their comparisons)."""
    return {**prompts_input(pair_sets),
            "token_sets": io.digest({k: token_sets[k] for k in ("pairs", "split")}),
            "scores": io.digest(scores.get("comparisons", []))}


def layer_scores(model: str, device: str, dtype: str, pair_sets: Sequence, layers_spec: str,
                 components: list[str], metrics: list[str], n_folds: int, n_projections: int,
                 seed: int, batch_size: int, n_prompts: int, parameters: dict):
    """Notebook 00: separability of every comparison at every layer and component."""
    from lib.studies import separability as S
    from lib.core.models import load_model
    from lib.core.parsers import parse_layers

    comparisons = S.build_comparisons(pair_sets)
    if "fisher" in metrics:   # a file too small for the folds: refused before the model loads
        S.check_folds(comparisons, n_folds)
    lm = load_model(model, device, dtype)
    layers = parse_layers(layers_spec, lm.n_layers)
    if "wasserstein" in metrics:   # before any forward: the directions and the projections,
        # float64, about six P x (n_a + n_b) arrays in flight (sorted copies, gathers)
        pool = max(len(c.prompts_a) + len(c.prompts_b) for c in comparisons)
        check_fits("N_PROJECTIONS", n_projections, 8 * (lm.d_model + 6 * pool),
                   what=f"directions of width {lm.d_model} and {pool} prompts projected")
    print(f"{lm.name}: {lm.n_layers} layers, d_model={lm.d_model}; scoring {len(layers)} "
          f"layers x {len(components)} components x {len(comparisons)} comparisons")
    results = S.score_layers(lm, comparisons, layers, components, metrics, n_folds=n_folds,
                             n_projections=n_projections, seed=seed, batch_size=batch_size)
    payload = {"model": model, "components": list(components), "metrics": list(metrics),
               "layers": layers, "n_prompts": n_prompts or None, "comparisons": results}
    return payload, io.provenance(lm, parameters, seed)


def token_sets(model: str, device: str, dtype: str, seed: int, pair_sets: Sequence,
               layers_spec: str, components: list[str], top_n: int, score: str,
               assignment: str, prob_floor: float, held_out_fraction: float,
               exclude_special: bool, batch_size: int, units_dir: Path, unit_parameters: dict,
               parameters: dict, force: bool = False):
    """Notebook 01: the reverse intervention on each pair file's discovery half (one resumable
    unit per file, holding every score and filing), then the chosen score and filing."""
    from lib.studies import domain_swap as ds
    from lib.core.models import load_model
    from lib.core.parsers import parse_layers

    lm = load_model(model, device, dtype, seed=seed)
    layers = parse_layers(layers_spec, lm.n_layers)
    print(f"{lm.name}: {lm.n_layers} layers; layers used: {layers}; components: {components}")
    store = io.UnitStore(Path(units_dir) / lm.slug,
                         {**unit_parameters, "model": lm.name, "layers": layers, "seed": seed},
                         force=force)
    units = {}
    for p in pair_sets:
        units[p.name] = store.get_or_compute(
            f"{p.name}-{io.params_key({'a': p.a, 'b': p.b})}",
            lambda p=p: ds.token_set_unit(lm, p, layers, components, top_n, exclude_special,
                                          batch_size, progress=True,
                                          held_out_fraction=held_out_fraction, seed=seed,
                                          prob_floor=prob_floor))
    chosen = {name: ds.assign_token_sets(u, score, assignment) for name, u in units.items()}
    payload = {"model": lm.name, "top_n": top_n,
               "pairs": {name: u["sets"] for name, u in chosen.items()},
               "pair_info": {name: {k: u[k] for k in ("domains", "n_prompts", "n_candidates")}
                             for name, u in chosen.items()},
               "score": {"name": score, "meaning": ds.SCORES[score], "prob_floor": prob_floor},
               "assignment": {"name": assignment, "meaning": ds.ASSIGNMENTS[assignment]},
               "split": {name: u["split"] for name, u in chosen.items()},
               "reference": {name: u["reference"] for name, u in chosen.items()},
               "agreement": {name: u["agreement"] for name, u in chosen.items()},
               "alternatives": {name: {s: units[name]["scores"][s]["sets"] for s in ds.SCORES}
                                for name in units},
               "method": "score(t) = mean over discovery prompts, layers and components of the "
                         "change of the next-token distribution on each side (SCORE); top_n "
                         "positive scores per domain, disjoint (a token scored on both sides "
                         "goes to the side with the larger score); reference = contrast of the "
                         "domains' clean next-token log-probabilities; agreement = Jaccard with "
                         "it",
               "layers": layers, "components": list(components)}
    return payload, io.provenance(lm, parameters, seed)


def domain_effects(model: str, device: str, dtype: str, seed: int, pair_sets: Sequence,
                   token_sets: dict, scores: dict, layers_spec: str, metric: str,
                   components: list[str], k: int, alphas: list[float], inject_layer: int,
                   zero: bool, n_bootstrap: int, n_permutations: int, store_per_prompt: bool,
                   batch_size: int, units_dir: Path, parameters: dict, force: bool = False):
    """Notebook 02: swaps, zero ablation and injection on each pair file's held-out half (one
    resumable unit per file)."""
    from lib.studies import domain_swap as ds
    from lib.core.models import load_model
    from lib.core.parsers import parse_layers

    lm = load_model(model, device, dtype, seed=seed)
    layers = parse_layers(layers_spec, lm.n_layers)
    print(f"{lm.name}: {lm.n_layers} layers; swapped: {layers}")
    store = io.UnitStore(Path(units_dir) / lm.slug,
                         {**parameters, "model": lm.name, "layers": layers, "seed": seed,
                          "token_sets": io.params_key({k: token_sets[k]
                                                       for k in ("pairs", "split")}),
                          "scores": io.params_key(scores.get("comparisons", []))}, force=force)
    results = {}
    for p in pair_sets:
        results[p.name] = store.get_or_compute(
            f"{p.name}-{io.params_key({'a': p.a, 'b': p.b})}",
            lambda p=p: ds.full_compute_unit(
                lm, p, layers, token_sets, scores, metric=metric, components=components, k=k,
                alphas=alphas, inject_layer=inject_layer, zero=zero, n_bootstrap=n_bootstrap,
                n_permutations=n_permutations, seed=seed, batch_size=batch_size,
                store_per_prompt=store_per_prompt, progress=True))
    payload = {"model": lm.name, "metric": metric, "components": list(components), "k": k,
               "sides": ds.SIDE_DOC, "effects": {"kl": "KL(base || swapped)",
                                                 "abs_delta": "|Δ bias| (mass_B - mass_A shift)"},
               "pairs": results}
    return payload, io.provenance(lm, parameters, seed)


def trace_files(out: Path, kinds: Sequence[str], severed: bool, averages: bool) -> dict:
    """Notebook 06's result files in ``out`` and their kinds (for
    :func:`lib.core.io.check_results` before the model loads): one trace per kind, the severed
    curves when ``severed``, the fact averages when ``averages``."""
    files: dict = {Path(out) / f"causal_trace_{k}.json": TRACE_SCHEMA for k in kinds}
    if severed:
        files[Path(out) / "causal_trace_severed.json"] = SEVERED_SCHEMA
    if averages:
        files[Path(out) / "causal_trace_facts.json"] = FACTS_SCHEMA
    return files


def fact_averages(lm, facts: Sequence[dict], noise: float, samples: int, seed: int,
                  window: int, kinds: Sequence[str], severed: bool, batch_size: int,
                  units_dir: Path, parameters: dict, force: bool = False):
    """Notebook 06: causal traces of every fact (one resumable unit each), averaged over the
    facts the model answers correctly."""
    from lib.studies import tracing_facts

    store = io.UnitStore(units_dir, parameters, force=force)
    results = tracing_facts.trace_facts(lm, facts, store, noise, samples=samples, seed=seed,
                                        window=window, kinds=kinds, severed=severed,
                                        batch_size=batch_size)
    kept = [r for r in results if r["correct"]]
    if len(kept) < 20:
        print(f"WARNING: only {len(kept)} correct facts; ROME-style averages want 20 or more")
    effects = tracing_facts.average_effects(kept)
    payload = {"summary": tracing_facts.summarize_facts(results, effects),
               "effects": effects.to_dict(orient="records"), "facts": results}
    return payload, io.provenance(lm, parameters, seed)


def interchange_grid(model: str, device: str, dtype: str, seed: int, base: str, source: str,
                     tokens: list[str], components: list[str], layers_spec: str,
                     positions_spec: str, batch_size: int, engine: str, top_k: int,
                     attribution: bool, key: dict, parameters: dict):
    """Notebook 05: the interchange grid (every component, layer and position), with attribution
    patching beside it."""
    import time

    from lib.studies import interchange
    from lib.core.models import load_model

    lm = load_model(model, device, dtype, seed=seed)
    started = time.perf_counter()
    payload = interchange.run_interchange(
        lm, base, source, tokens, components, layers_spec, positions_spec,
        batch_size=batch_size, engine=engine, top_k=top_k, attribution=attribution,
        progress=True)
    payload["params_key"] = io.params_key(key)
    n_cells = len(payload["records"]) // len(payload["answers"])
    print(f"{n_cells} interventions (+ attribution) in {time.perf_counter() - started:.1f} s on "
          f"{lm.device.type}, {lm.dtype}")
    return payload, io.provenance(lm, parameters, seed)


def capital_patches(lm, base_ids, source_ids, tokens: list[str], cum_positions: list[int],
                    batch_size: int, parameters: dict, seed: int):
    """Notebook 07, part 1: node x position patches and the cumulative direct-path patch on
    nano-causal-interventions' capital prompts."""
    import time

    from lib.studies import interchange
    from lib.studies import path_patching as pp

    started = time.perf_counter()
    token_ids = interchange.answer_token_ids(lm, tokens)
    capital = pp.capital_study(lm, base_ids, source_ids, tokens, token_ids, cum_positions,
                               batch_size=batch_size)
    capital.update(base_tokens=lm.token_strings(base_ids[0]),
                   source_tokens=lm.token_strings(source_ids[0]), tokens=list(tokens))
    print(f"{len(capital['records']) // len(tokens)} node x position patches and "
          f"{len(capital['cumulative']) // len(tokens)} cumulative patches in "
          f"{time.perf_counter() - started:.1f} s; engine {capital['engine_stats']}")
    return capital, io.provenance(lm, parameters, seed)


def ioi_heads(lm, pairs: list[dict], n_patch: int, n_receivers: int, batch_size: int,
              parameters: dict, seed: int, n_query: int = 0):
    """Notebook 07, part 3: clean IOI metrics over every pair, and head path patching (head ->
    logits on the first ``n_patch`` pairs, head -> queries on the first ``n_query``; 0: all)."""
    from lib.core.engine import Context, Engine
    from lib.studies import ioi
    from lib.studies import path_patching as pp

    # every pair's clean run as an engine context (batched with the pairs of its length)
    clean = Engine(lm, [Context(pair["base_ids"]) for pair in pairs])
    lds = [float(ioi.logit_diff(clean.clean_readout(i), pair["io_id"], pair["s_id"]))
           for i, pair in enumerate(pairs)]
    # 0: all pairs
    study = pp.ioi_head_study(lm, pairs[:n_patch or None], n_receivers, batch_size,
                              query_pairs=n_query or None)
    result = {**study, "n_pairs": len(pairs), "n_pairs_patched": study["n_pairs"],
              "accuracy": sum(x > 0 for x in lds) / len(lds),
              "mean_logit_diff": sum(lds) / len(lds), "logit_diff": lds}
    return result, io.provenance(lm, parameters, seed)


def eap_edges(lm, pairs: list[dict], layers_spec: str, ig_steps: int, exact_pairs: int,
              batch_size: int, parameters: dict, seed: int):
    """Notebook 07, part 4: EAP and EAP-IG on every pair beside exact edge patching on the
    first ``exact_pairs``."""
    from lib.studies import path_patching as pp
    from lib.core.parsers import parse_layers

    layers = parse_layers(layers_spec, lm.n_layers, "EAP_LAYERS")
    result = pp.eap_study(lm, pairs, layers, ig_steps=ig_steps, exact_pairs=exact_pairs,
                          batch_size=batch_size)
    print(f"{len(result['records'])} edges; {result['n_pairs']} pairs (exact on "
          f"{result['exact_pairs']}); seconds {result['seconds']}")
    return result, io.provenance(lm, parameters, seed)


def head_roles(lm, pairs: list[dict], ioi_result: dict, n_heads: int, parameters: dict,
               seed: int):
    """Notebook 07, part 3b: the roles of the ``n_heads`` heads with the largest |mean change|
    of the logit difference (head -> logits, the first freeze policy) in ``ioi_result``."""
    from lib.studies import path_patching as pp

    strongest = pp.strongest_heads(ioi_result["to_logits"], n_heads)
    result = pp.head_roles(lm, pairs, [r["sender"] for r in strongest],
                           path_delta={r["sender"]: r["delta"] for r in strongest},
                           progress=True)
    return result, io.provenance(lm, parameters, seed)


def circuits(lm, pairs: list[dict], eap_result: dict, n_points: int, batch_size: int,
             parameters: dict, seed: int):
    """Notebook 07, part 5: faithfulness curves of the circuits ranked by EAP, EAP-IG (means
    over every pair) and exact edge effects (means over the exact pairs), kept and removed."""
    from lib.studies import path_patching as pp

    records = eap_result["records"]
    edges = [(r["sender"], r["receiver"]) for r in records]
    rankings = {"eap": [r["eap_all"] for r in records],
                "eap_ig": [r["eap_ig_all"] for r in records],
                "exact": [r["exact"] for r in records]}
    result = pp.circuit_study(lm, pairs, edges, rankings, n_points=n_points,
                              batch_size=batch_size, exact_pairs=eap_result["exact_pairs"])
    return result, io.provenance(lm, parameters, seed)
