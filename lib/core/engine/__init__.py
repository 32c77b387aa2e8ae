"""The intervention engine: many interventions, batched forward passes, shared work done once.

Every study in this repository (activation patching / interchange intervention, Vig et al. 2020
and Geiger et al. 2021; causal tracing, Meng et al. 2022; the domain swaps of the seed study;
path patching, Wang et al. 2022; distributed alignment search, Geiger, Wu et al. 2023) is the
same computation: a list of *rows*, each one run of the model on some input with some
interventions, read out at the end. This module runs them all, and is the one place that
calls the model with a key/value cache or detects the prefixes runs share. A few other
forward passes say in one line why they are not rows: fine-tuning and its evaluation
(:mod:`lib.studies.das.arithmetic`; gradients through changing weights), greedy generation
(growing inputs), last-token activations of prompts of many lengths
(:mod:`lib.core.activations`; right padding, no interventions) and path patching's one-token
head -> logits path (:func:`lib.studies.path_patching.paths.local_logits`; no forward pass).

Vocabulary
----------
* :class:`Context`: an input (one prompt, token ids ``(1, T)``) plus interventions that hold in
  every row on it (causal tracing's noise on the subject; nothing for a plain base prompt).
* :class:`Row`: a context plus the row's own interventions
  (:class:`lib.core.interventions.Intervention`, positions absolute; their ``rows`` field is
  ignored: the engine assigns batch rows).
* A readout: ``"logits"`` (last-position logits, float32, the default), any callable of the
  last-position logits ``(rows, vocab) -> (rows, ...)`` (e.g. two answer probabilities), or
  :class:`Capture` (activations at sites, positions of the caller's choice).
* :class:`Ref`: an intervention's ``value`` may name another run, "the activation at this site
  in context j, itself under these interventions"; references are resolved in stages (a
  reference's own interventions may hold references) and each distinct one is computed once.

What is done once
-----------------
* Each context runs once, clean (under its own interventions), batched with the other contexts
  of the same length: its key/value cache, its residual stream entering every block, the
  activations the rows need, and its clean readout are stored.
* :func:`plan` (a pure function of the rows, tested without a model) groups rows by context
  length, first patched position and first patched layer; a batch continues from the stored
  key/value cache of positions ``[0, p)`` (causal attention: nothing before the first patched
  position ``p`` changes) and, where the architecture allows it, starts at the batch's lowest
  patched layer ``L`` from the stored residual stream, skipping blocks ``0..L-1`` (nothing below
  the lowest patched layer changes). Whether starting mid-stack is exact is checked once per
  model (GPT-2 adds position embeddings to its input, so there it is not, and the engine runs
  from the token ids instead).
* Rows whose interventions change nothing (checked bit for bit on the context's stored
  activations) get the context's clean readout without running.
* The interventions of one site in a batch are merged into one multi-row operation.
* Only the last position goes through the LM head.

``grad=True`` keeps autograd through the interventions (their values and ``fn`` parameters,
e.g. DAS rotations); the stored caches and residual streams are constants. :func:`run_naive`
is the reference loop (one full, unbatched forward per row, references resolved the same naive
way) that every study's rows are checked against.
"""

from lib.core.engine.data import Context, Row, Ref, Capture  # noqa: F401
from lib.core.engine.planning import (  # noqa: F401
    site_layer, row_start, Batch, plan, LAYER_COST, BATCH_COST, _cuts, merge_interventions,
)
from lib.core.engine.passes import (  # noqa: F401
    skip_blocks, _PassThrough, _kv_cache, _logits_to_keep, _full_positions, _restrict, _clip,
    _AFTER_ATTENTION, _Group, _join_hooks, _read, _positions, _clip_end, _iv_key, _substitute,
    _ref_slice,
)
from lib.core.engine.core import Engine, _LAYER_START_OK, layer_start_exact, run  # noqa: F401
from lib.core.engine.naive import run_naive  # noqa: F401
from lib.core.engine.stream import (  # noqa: F401
    StreamPrefix, prefix_groups, prefix_limit, run_stream, run_stream_pairs, shared_prefix_split,
)
