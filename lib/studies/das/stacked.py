"""Several DAS rotations at one layer trained in one batched pass of the frozen blocks above it.

Distributed alignment search (Geiger, Wu, Potts, Icard and Goodman 2023, "Finding alignments
between interpretable causal variables and distributed neural representations") trains one
rotation per causal model, seed and rank; with the language model frozen these trainings share
everything but the rotation. Here k of them (a :class:`Member` each: rank, seed, training
counterfactuals, e.g. of its own causal model) train together at one layer and one site:

* every step, member j's batch is intervened with its own rotation (from the stored residual
  stream after block ``layer``, :func:`lib.studies.das.arithmetic_das.residual_states`), the k
  batches are stacked along the batch axis and run once through blocks ``layer+1..``;
* only the last position's class scores are computed: the tuned model's head is already the
  28-way classifier over the sums (:func:`lib.studies.das.arithmetic.attach_classifier`), and
  :func:`lib.core.engine.run_stream` keeps the last position's logits only;
* the loss is the sum of the k members' mean cross-entropies, so each rotation gets the
  gradient of its own loss (rows of one member do not touch another's rotation);
* one Adam over all rotations, one parameter group per member: Adam's update is elementwise per
  parameter, so this is k independent Adams (the same steps as training each alone);
* at a site whose first intervened position is ``p0 > 0`` (a slot, e.g. ``eq``: the last token)
  positions ``[0, p0)`` are the base prompt's own clean stream, so their keys and values in the
  blocks above ``layer`` are computed once per arrangement (:func:`base_prefix`) and every run
  continues from them with positions ``[p0, T)`` only (forward and backward).

Each member's order of examples comes from its own seed, as in
:func:`lib.studies.das.train_das`, so a member trained alone (k = 1) with positions ``None``
runs exactly today's computation (:func:`lib.studies.das.arithmetic_das.das_run`); with a
prefix the same numbers up to float32 rounding (tested, as is k stacked against each alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lib.core.engine import StreamPrefix, prefix_limit, run_stream
from lib.studies import das
from lib.studies.das import arithmetic_das as da


@dataclass(frozen=True)
class Member:
    """One rotation of a stack: its ``rank`` (a d × rank low-rank rotation), its ``seed`` (the
    rotation's start, its random control is ``seed + 1``, and the order of its examples) and
    its training counterfactuals ``pairs`` (``base``, ``source``, ``label``: arrangement indices
    and counterfactual classes, :func:`lib.studies.das.arithmetic.counterfactual_pairs`)."""

    rank: int
    seed: int
    pairs: dict


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise das.DASError(f"{name} must be a positive int, got {value!r}")
    return value


def check_stack(lm, layer: int, states: torch.Tensor, members: Sequence[Member],
                positions: Sequence[int] | None, epochs: int, batch_size: int,
                lr: float) -> int:
    """Refuse, naming the parameter, what no training could use, before any work: an
    architecture or layer the stored stream cannot start from, no member, a rank outside
    1..d_model, a member without training counterfactuals (a budget below 1) or with another
    number of them than the first (the members step together), epochs or a batch size below 1,
    a learning rate that is not positive, positions outside the prompt. Returns the number of
    training counterfactuals per member."""
    da.check_layer_start(lm)
    da._check_layer(lm, layer)
    if not members:
        raise das.DASError("members is empty: give at least one rotation to train")
    for j, m in enumerate(members):
        if not isinstance(m.rank, int) or isinstance(m.rank, bool) \
                or not 1 <= m.rank <= lm.d_model:
            raise das.DASError(f"member {j}: rank must be an int from 1 to d_model = "
                               f"{lm.d_model}, got {m.rank!r}")
        lengths = {k: len(m.pairs[k]) for k in ("base", "source", "label")}
        if len(set(lengths.values())) != 1:
            raise das.DASError(f"member {j}: base, source and label must have one entry per "
                               f"counterfactual, got {lengths}")
        if lengths["label"] < 1:
            raise das.DASError(f"member {j}: no training counterfactuals (the budget of "
                               "training pairs must be at least 1)")
    n = len(members[0].pairs["label"])
    if any(len(m.pairs["label"]) != n for m in members):
        raise das.DASError("members step together: give each the same number of training "
                           f"counterfactuals, got {[len(m.pairs['label']) for m in members]}")
    _positive_int("epochs", epochs)
    _positive_int("batch_size", batch_size)
    if not lr > 0:
        raise das.DASError(f"lr must be positive, got {lr!r}")
    length = states.shape[1]
    if positions is not None:
        pos = list(positions)
        if not pos or any(not 0 <= int(p) < length for p in pos) or len(set(pos)) != len(pos):
            raise das.DASError(f"positions must be distinct positions from 0 to {length - 1}, "
                               f"got {positions!r}")
    for j, m in enumerate(members):
        for k in ("base", "source"):
            idx = torch.as_tensor(m.pairs[k])
            if int(idx.min()) < 0 or int(idx.max()) >= len(states):
                raise das.DASError(f"member {j}: {k} indices must lie in 0..{len(states) - 1}")
    return n


@torch.no_grad()
def base_prefix(lm, layer: int, states: torch.Tensor, length: int,
                chunk: int = 250) -> StreamPrefix:
    """Keys and values of positions ``[0, length)`` of every stored prompt ``states``
    (prompts, T, d) in the blocks above ``layer``: the part of an intervened run before its
    first intervened position, which is the base prompt's own clean stream."""
    parts = [run_stream(lm, layer, states[a:a + chunk, :length], keep_prefix=True)[1]
             for a in range(0, len(states), chunk)]
    return StreamPrefix(layer, length, [torch.cat(k) for k in zip(*(p.keys for p in parts))],
                        [torch.cat(v) for v in zip(*(p.values for p in parts))])


def prefix_start(lm, positions: Sequence[int] | None, use_prefix: bool = True) -> int:
    """The first position a stack runs through the blocks: the first intervened one, or 0
    (no prefix) for ``positions`` None, with ``use_prefix`` False, or where a sliding window
    would not keep the prefix whole (:func:`lib.core.engine.prefix_limit`)."""
    if positions is None or not use_prefix:
        return 0
    start = min(int(p) for p in positions)
    limit = prefix_limit(lm)
    return 0 if limit is not None and start > limit else start


class Stack:
    """k low-rank rotations at ``blocks.layer.resid_post`` and one site (``positions``, None:
    one rotation shared over every position), and what their steps share: the stored stream
    ``states`` and, where the site starts at ``p0 > 0``, the base prompts' keys and values of
    positions ``[0, p0)`` (:func:`base_prefix`, computed here unless ``prefix`` is given;
    :func:`prefix_start`). ``modules`` are the rotations as
    :func:`lib.studies.das.arithmetic_das.das_run` builds them (``AtPositions``)."""

    def __init__(self, lm, layer: int, states: torch.Tensor, ranks: Sequence[int],
                 seeds: Sequence[int], positions: Sequence[int] | None = None,
                 use_prefix: bool = True, prefix: StreamPrefix | None = None):
        da.check_layer_start(lm)
        da._check_layer(lm, layer)   # ranks: refused by the rotations' constructor
        self.lm, self.layer, self.states, self.positions = lm, layer, states, positions
        self.start = prefix_start(lm, positions, use_prefix)
        self.inners = [das.LowRankRotatedSpaceIntervention(lm.d_model, int(r), seed=int(s))
                       for r, s in zip(ranks, seeds)]
        self.modules = [da.AtPositions(inner, positions) for inner in self.inners]
        shifted = None if positions is None else tuple(int(p) - self.start for p in positions)
        self._runners = [da.AtPositions(inner, shifted) for inner in self.inners]
        started = time.perf_counter()
        if self.start and (prefix is None or prefix.length != self.start
                           or prefix.layer != layer or len(prefix.keys[0]) != len(states)):
            prefix = base_prefix(lm, layer, states, self.start)
        self.prefix = prefix if self.start else None
        self.prefix_seconds = time.perf_counter() - started

    def parameters(self) -> list[list[torch.Tensor]]:
        """The trainable tensors of each rotation (one Adam parameter group per member)."""
        return [[p for p in inner.parameters() if p.requires_grad] for inner in self.inners]

    def logits(self, batches: Sequence[tuple]) -> tuple[torch.Tensor, list[int]]:
        """Class scores at the last position of every counterfactual of ``batches`` (one
        ``(base, source)`` pair of arrangement-index tensors per member, in member order), all
        in one pass through the blocks above the layer; and the row bounds of each member."""
        dev, start = self.states.device, self.start
        streams, rows = [], []
        for run, (base, source) in zip(self._runners, batches):
            ones = torch.ones(len(base), 1, dtype=torch.bool, device=dev)
            streams.append(run(self.states[base.to(dev), start:],
                               [self.states[source.to(dev), start:]], ones))
            rows.append(base)
        h = torch.cat(streams)
        logits = run_stream(self.lm, self.layer, h) if self.prefix is None else \
            run_stream(self.lm, self.layer, h, self.prefix, torch.cat(rows))
        return logits, torch.cumsum(torch.tensor([0] + [len(b) for b, _ in batches]),
                                    0).tolist()

    def losses(self, batches: Sequence[tuple]) -> tuple[list[torch.Tensor], torch.Tensor,
                                                       list[int]]:
        """Each member's mean cross-entropy on its batch ``(base, source, label)`` (their sum's
        gradient is each rotation's own), with the logits and row bounds."""
        logits, bounds = self.logits([(b, s) for b, s, _ in batches])
        losses = [nn.functional.cross_entropy(logits[a:e], y.to(logits.device))
                  for a, e, (_, _, y) in zip(bounds, bounds[1:], batches)]
        return losses, logits, bounds


def step_stack(stack: "Stack", opt: torch.optim.Optimizer, pairs: Sequence[dict],
               orders: Sequence[torch.Tensor], start: int, batch_size: int):
    """One optimizer step of every member of ``stack`` on the rows ``start .. start +
    batch_size`` of its own order over its own pairs: the members' losses summed, so each
    rotation gets its own gradient. Returns ``(losses, logits, bounds, batches)``."""
    rows = [o[start:start + batch_size] for o in orders]
    batches = [(p["base"][r], p["source"][r], p["label"][r]) for p, r in zip(pairs, rows)]
    losses, logits, bounds = stack.losses(batches)
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return losses, logits, bounds, batches


def train_stacked(lm, layer: int, states: torch.Tensor, members: Sequence[Member],
                  positions: Sequence[int] | None = None, epochs: int = 1,
                  batch_size: int = 64, lr: float = 0.01, use_prefix: bool = True,
                  prefix: StreamPrefix | None = None,
                  on_step: Callable[[], None] | None = None
                  ) -> tuple[list[da.AtPositions], dict]:
    """Train one low-rank rotation per member at ``blocks.layer.resid_post`` (at
    ``positions``, None: one rotation shared over every position), all members in one pass
    per step (module docstring; :class:`Stack`). Returns the trained modules (as
    :func:`lib.studies.das.arithmetic_das.das_run` builds them) and
    ``{"curves": [per member: epoch, loss, train_accuracy], "steps", "seconds": [per epoch],
    "prefix_seconds", "start"}``; seconds are timings, not for result files. ``on_step`` is
    called after every step (a progress bar's update)."""
    n = check_stack(lm, layer, states, members, positions, epochs, batch_size, lr)
    stack = Stack(lm, layer, states, [m.rank for m in members], [m.seed for m in members],
                  positions, use_prefix, prefix)
    opt = torch.optim.Adam([{"params": group} for group in stack.parameters()], lr=lr)
    gens = [torch.Generator().manual_seed(int(m.seed)) for m in members]
    pairs = [{k: torch.as_tensor(m.pairs[k]) for k in ("base", "source", "label")}
             for m in members]
    curves: list[list[dict]] = [[] for _ in members]
    seconds, step = [], 0
    for epoch in range(epochs):
        started = time.perf_counter()
        orders = [torch.randperm(n, generator=g) for g in gens]
        totals, correct = [0.0] * len(members), [0] * len(members)
        for s in range(0, n, batch_size):
            losses, logits, bounds, batches = step_stack(stack, opt, pairs, orders, s,
                                                         batch_size)
            step += 1
            predicted = logits.detach().argmax(-1).cpu()
            for j, (a, e, loss) in enumerate(zip(bounds, bounds[1:], losses)):
                totals[j] += float(loss.detach()) * (e - a)
                correct[j] += int((predicted[a:e] == batches[j][2]).sum())
            if on_step is not None:
                on_step()
        seconds.append(time.perf_counter() - started)
        for j in range(len(members)):
            curves[j].append({"epoch": epoch + 1, "loss": totals[j] / n,
                              "train_accuracy": correct[j] / n})
    return stack.modules, {"curves": curves, "steps": step, "seconds": seconds,
                           "prefix_seconds": stack.prefix_seconds, "start": stack.start}


def das_runs_stacked(lm, layer: int, states: torch.Tensor, members: Sequence[Member],
                     test_pairs: Sequence[dict], positions: Sequence[int] | None = None,
                     epochs: int = 1, batch_size: int = 64, lr: float = 0.01,
                     use_prefix: bool = True, on_step: Callable[[], None] | None = None
                     ) -> list[tuple[da.AtPositions, dict]]:
    """:func:`lib.studies.das.arithmetic_das.das_run` for every member at once: the members
    train stacked (:func:`train_stacked`), then each is evaluated on its own ``test_pairs``
    beside its random control (seed + 1). Returns ``(module, result)`` per member, each result
    as ``das_run``'s (the curve without ``seconds``; the stack's seconds per epoch under
    ``stack_seconds``); ``on_step`` as :func:`train_stacked`'s."""
    if len(test_pairs) != len(members):
        raise das.DASError(f"{len(test_pairs)} test sets for {len(members)} members; give one "
                           "per member")
    modules, out = train_stacked(lm, layer, states, members, positions, epochs, batch_size, lr,
                                 use_prefix=use_prefix, on_step=on_step)
    results = []
    for module, member, test, curve in zip(modules, members, test_pairs, out["curves"]):
        result = da.run_result(lm, layer, member.rank, module, states, test, member.seed,
                               curve, out["steps"], len(member.pairs["label"]))
        results.append((module, {**result, "stack_seconds": out["seconds"]}))
    return results
