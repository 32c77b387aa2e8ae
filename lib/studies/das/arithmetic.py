"""The three-number addition task of the DAS thesis (maraPislar), for a language model.

Prompts ``X+Y+Z=`` with X, Y, Z in 1..10: 1,000 arrangements (itertools.product order, X
slowest, so arrangement ``i`` is ``(i // 100 + 1, i // 10 % 10 + 1, i % 10 + 1)``) and 28 sums
3..30 (class ``sum - 3``). This module holds the task data and everything about it that does not
depend on DAS itself:

* :func:`task_tokens`: the prompts of every arrangement tokenized by a model's tokenizer, with
  the positions of each slot (X, ``plus1``, Y, ``plus2``, Z, ``eq``: the pieces X, ``+``, Y,
  ``+``, Z, ``=``). A shared rotation over all
  positions, or a per-position one, only means something if position p holds the same slot in
  base and source, so every prompt must tokenize to the same length and every slot to the same
  positions; otherwise a :class:`TaskError` says so. SmolLM2 and Gemma 3 split numbers into
  digits ("10" is two tokens, "3" one), so the plain format ``3+10+7=`` gives prompts of 6 to 9
  tokens; the format ``"padded"`` writes every number with two digits (``03+10+07=``): 9
  tokens for SmolLM2, 10 for Gemma 3 (``<bos>`` first), X at the same two positions everywhere.
* :func:`split_arrangements`: train / validation / test sets disjoint *by arrangement*
  (the thesis sampled all three with replacement from the same 1,000, so they overlapped).
* :func:`causal_models`: the thesis' seven causal models M1–M7 (``src/causal_models.py``,
  numbered as its ``construct_graph.py``): inputs X, Y, Z, one intermediate P and output O.
  Each model gets its own value sets (thesis bug 9: its families shared one mutable dict, and
  resetting P's values for M7 changed M4–M6's). Input samplers draw arrangements from a given
  pool, so counterfactuals can be drawn inside one split.
* :func:`shipped_accuracy`: greedy answers of the model as shipped (zero-shot or few-shot).
* :func:`attach_classifier` / :func:`class_logits` / :func:`accuracy`: a 28-way
  classification head on the last token's final state (as the thesis'
  ``GPT2ForSequenceClassification``). Fine-tuning it, the tuned weights' cache and the lazily
  loaded tuned model are :mod:`lib.studies.das.tuning`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lib.core import paths
from lib.studies.das.causal_model import CausalModel

NUMBERS = tuple(range(1, 11))
ARRANGEMENTS: tuple[tuple[int, int, int], ...] = tuple(
    itertools.product(NUMBERS, NUMBERS, NUMBERS))
SUMS = tuple(range(3, 31))
N_CLASSES = len(SUMS)
FORMATS = ("padded", "plain")
SLOTS = ("X", "plus1", "Y", "plus2", "Z", "eq")   # the pieces X + Y + Z =
CACHE = paths.REPO_ROOT / ".cache" / "arithmetic"


class TaskError(ValueError):
    """A task request (format, tokenizer, split, model name) that cannot be used."""


def arrangement_index(x, y, z):
    """Index in :data:`ARRANGEMENTS` (works on ints and on tensors)."""
    return (x - 1) * 100 + (y - 1) * 10 + (z - 1)


def arrangement_tensor() -> torch.Tensor:
    """(1000, 3) long: X, Y, Z of every arrangement."""
    return torch.tensor(ARRANGEMENTS, dtype=torch.long)


def label_of(x, y, z):
    """The class of the sum (0 for 3, ..., 27 for 30)."""
    return x + y + z - SUMS[0]


def slot_texts(x: int, y: int, z: int, fmt: str = "padded") -> list[str]:
    """The prompt's pieces, one per slot in :data:`SLOTS`."""
    if fmt not in FORMATS:
        raise TaskError(f"format must be one of {FORMATS}, got {fmt!r}")
    num = (lambda v: f"{v:02d}") if fmt == "padded" else str
    return [num(x), "+", num(y), "+", num(z), "="]


def prompt(x: int, y: int, z: int, fmt: str = "padded") -> str:
    return "".join(slot_texts(x, y, z, fmt))


@dataclass
class TaskTokens:
    """Token ids of every arrangement's prompt, all the same length, and where each slot is."""

    fmt: str
    input_ids: torch.Tensor              # (1000, T)
    slots: dict[str, tuple[int, ...]]    # slot -> positions, identical for every prompt
    offset: int                          # special tokens before X (Gemma's <bos>: 1)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def describe(self, tokenizer, index: int = arrangement_index(10, 3, 7)) -> dict:
        ids = self.input_ids[index].tolist()
        return {"prompt": prompt(*ARRANGEMENTS[index], self.fmt), "ids": ids,
                "tokens": [tokenizer.decode([i]) for i in ids], "length": self.length,
                "slots": {k: list(v) for k, v in self.slots.items()}}


def task_tokens(tokenizer, fmt: str = "padded") -> TaskTokens:
    """Tokenize all 1,000 prompts; check that each is the concatenation of its slots' own
    tokens (no merge across a slot boundary) at the same positions in every prompt.

    Raises :class:`TaskError` naming two prompts whose positions would mean different things.
    """
    if fmt not in FORMATS:
        raise TaskError(f"format must be one of {FORMATS}, got {fmt!r}")
    rows, layout0, first = [], None, None
    for x, y, z in ARRANGEMENTS:
        text = prompt(x, y, z, fmt)
        full = tokenizer(text)["input_ids"]
        pieces = [tokenizer(p, add_special_tokens=False)["input_ids"]
                  for p in slot_texts(x, y, z, fmt)]
        joined = [t for p in pieces for t in p]
        offset = len(full) - len(joined)
        if offset < 0 or full[offset:] != joined:
            raise TaskError(f"{text!r} does not tokenize as its slots concatenated "
                            f"({tokenizer.convert_ids_to_tokens(full)}): a token spans two "
                            "slots, so no position holds one slot; use another format")
        layout = (offset, tuple(len(p) for p in pieces))
        if layout0 is None:
            layout0, first = layout, text
        elif layout != layout0:
            raise TaskError(
                f"{first!r} and {text!r} tokenize to different layouts (special tokens, tokens "
                f"per slot {SLOTS}: {layout0} vs {layout}): position p would not mean the same "
                f"slot in base and source. Use fmt='padded' (two digits per number) for "
                "tokenizers that split numbers into digits")
        rows.append(full)
    assert layout0 is not None  # ARRANGEMENTS is not empty: the loop set it
    offset, widths = layout0
    slots, pos = {}, offset
    for name, w in zip(SLOTS, widths):
        slots[name] = tuple(range(pos, pos + w))
        pos += w
    return TaskTokens(fmt, torch.tensor(rows, dtype=torch.long), slots, offset)


# --- splits ------------------------------------------------------------------------------

def split_arrangements(seed: int, n_val: int = 100, n_test: int = 200
                       ) -> dict[str, list[int]]:
    """Train / val / test arrangement indices, disjoint, from a seeded permutation of the 1,000
    (each list sorted)."""
    for name, v in (("n_val", n_val), ("n_test", n_test)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise TaskError(f"{name} must be a positive int, got {v!r}")
    if n_val + n_test >= len(ARRANGEMENTS):
        raise TaskError(f"n_val + n_test = {n_val + n_test} leaves no training arrangement")
    perm = torch.randperm(len(ARRANGEMENTS), generator=torch.Generator().manual_seed(int(seed)))
    test = sorted(perm[:n_test].tolist())
    val = sorted(perm[n_test:n_test + n_val].tolist())
    train = sorted(perm[n_test + n_val:].tolist())
    return {"train": train, "val": val, "test": test}


# --- causal models M1-M7 -------------------------------------------------------------------

# id -> (name, P as a function of X, Y, Z, the inputs P reads, O given P and the others)
_MODELS: dict[int, tuple[str, tuple[str, ...], Callable[..., Any], tuple[str, ...]]] = {
    1: ("(X+Y)+Z", ("X", "Y"), lambda x, y: x + y, ("P", "Z")),
    2: ("(X+Z)+Y", ("X", "Z"), lambda x, z: x + z, ("P", "Y")),
    3: ("X+(Y+Z)", ("Y", "Z"), lambda y, z: y + z, ("P", "X")),
    4: ("(X)+Y+Z", ("X",), lambda x: x, ("P", "Y", "Z")),
    5: ("X+(Y)+Z", ("Y",), lambda y: y, ("P", "X", "Z")),
    6: ("X+Y+(Z)", ("Z",), lambda z: z, ("P", "X", "Y")),
    7: ("(X+Y+Z)", ("X", "Y", "Z"), lambda x, y, z: x + y + z, ("P",)),
}
MODEL_IDS = tuple(_MODELS)
# "M1 (X+Y)+Z": how tables and figures name a causal model (its CausalModel's name)
MODEL_NAMES = {i: f"M{i} {spec[0]}" for i, spec in _MODELS.items()}


def pool_sampler(pool: Sequence[int]):
    """Input sampler drawing arrangements uniformly (with replacement) from ``pool``."""
    pool_t = torch.as_tensor(list(pool), dtype=torch.long)
    if pool_t.numel() == 0:
        raise TaskError("the arrangement pool is empty")
    if pool_t.min() < 0 or pool_t.max() >= len(ARRANGEMENTS):
        raise TaskError(f"arrangement indices must be in 0..{len(ARRANGEMENTS) - 1}")
    table = arrangement_tensor()

    def sample(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        idx = pool_t[torch.randint(0, len(pool_t), (n,), generator=generator)]
        xyz = table[idx]
        return {"X": xyz[:, 0], "Y": xyz[:, 1], "Z": xyz[:, 2]}

    return sample


def causal_model(model_id: int, pool: Sequence[int] | None = None) -> CausalModel:
    """Thesis model ``M{model_id}`` (1..7); inputs are drawn from arrangements ``pool``
    (default all 1,000). Value sets are fresh lists per model (no sharing)."""
    if model_id not in _MODELS:
        raise TaskError(f"causal model ids are {MODEL_IDS} (M1..M7), got {model_id!r}")
    _, p_parents, p_fn, o_parents = _MODELS[model_id]
    p_values = sorted({int(p_fn(*(dict(zip("XYZ", a))[v] for v in p_parents)))
                       for a in ARRANGEMENTS})
    return CausalModel(
        variables=["X", "Y", "Z", "P", "O"],
        values={"X": list(NUMBERS), "Y": list(NUMBERS), "Z": list(NUMBERS), "P": p_values,
                "O": list(SUMS)},
        parents={"X": [], "Y": [], "Z": [], "P": list(p_parents), "O": list(o_parents)},
        functions={"P": p_fn, "O": lambda *args: sum(args)},
        input_sampler=pool_sampler(range(len(ARRANGEMENTS)) if pool is None else pool),
        name=MODEL_NAMES[model_id])


def causal_models(pool: Sequence[int] | None = None) -> dict[int, CausalModel]:
    return {i: causal_model(i, pool) for i in MODEL_IDS}


#: memory of one counterfactual of :func:`counterfactual_pairs` at its peak, for
#: :func:`lib.core.memory.check_fits` (measured: 200-290 bytes at 0.2-0.8 million, rounded up)
CF_BYTES = 320


def counterfactual_pairs(model: CausalModel, size: int, seed: int,
                         semantics: str = "independent") -> dict[str, torch.Tensor]:
    """``size`` counterfactuals of ``model`` as arrangement indices: ``base``, ``source`` and
    ``label`` (the counterfactual class, P taken from the source), ``base_label``."""
    cf = model.counterfactual_dataset(size, seed=seed, semantics=semantics)
    b, s = cf.base, cf.sources[0]
    return {"base": arrangement_index(b["X"], b["Y"], b["Z"]),
            "source": arrangement_index(s["X"], s["Y"], s["Z"]),
            "label": cf.labels, "base_label": cf.base_labels}


# --- the model as shipped --------------------------------------------------------------------

def _greedy(lm, texts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations, one full forward per new token (no key/value cache: prompts are
    short, and only lib.core.engine uses caches). Prompts of the same token length run as one
    batch, without padding, so each row computes what it would alone. Not engine rows: the
    engine runs fixed inputs, generation appends to them."""
    ids = [lm.tokenize(t)[0] for t in texts]
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_length.setdefault(len(x), []).append(i)
    out: list[str] = [""] * len(texts)
    with torch.no_grad():
        for members in by_length.values():
            batch = torch.stack([ids[i] for i in members]).to(lm.device)
            new = []
            for _ in range(max_new_tokens):
                nxt = lm.model(input_ids=batch, use_cache=False,
                               logits_to_keep=1).logits[:, -1].argmax(-1)
                new.append(nxt)
                batch = torch.cat([batch, nxt[:, None]], dim=1)
            for k, i in enumerate(members):
                out[i] = lm.tokenizer.decode([int(t[k]) for t in new])
    return out


def parse_answer(text: str) -> int | None:
    """The integer the continuation starts with (spaces allowed), or None."""
    m = re.match(r"\s*(\d+)", text)
    return int(m.group(1)) if m else None


def shipped_accuracy(lm, n: int = 100, shots: int = 0, fmt: str = "plain", seed: int = 0,
                     max_new_tokens: int = 3) -> dict:
    """Greedy accuracy of the model as shipped on ``n`` arrangements sampled without
    replacement (seeded); ``shots`` solved examples (other arrangements, one per line) precede
    each prompt. Returns accuracy, and the first few prompts with their answers."""
    if not isinstance(shots, int) or shots < 0:
        raise TaskError(f"shots must be a non-negative int, got {shots!r}")
    if not isinstance(n, int) or not 1 <= n <= len(ARRANGEMENTS):
        raise TaskError(f"n must be an int from 1 to {len(ARRANGEMENTS)}, got {n!r}")
    gen = torch.Generator().manual_seed(int(seed))
    picks: list[int] = torch.randperm(len(ARRANGEMENTS), generator=gen)[:n].tolist()
    texts = []
    for i in picks:
        others: list[int] = [j for j in torch.randperm(len(ARRANGEMENTS), generator=gen)[:shots + 1].tolist()
                  if j != i][:shots]
        context = "".join(f"{prompt(*ARRANGEMENTS[j], fmt)}{sum(ARRANGEMENTS[j])}\n"
                          for j in others)
        texts.append(context + prompt(*ARRANGEMENTS[i], fmt))
    correct, examples = 0, []
    for k, (i, text, answer) in enumerate(zip(picks, texts,
                                             _greedy(lm, texts, max_new_tokens))):
        ok = parse_answer(answer) == sum(ARRANGEMENTS[i])
        correct += ok
        if k < 5:
            examples.append({"prompt": text, "continuation": answer, "correct": bool(ok)})
    return {"n": n, "shots": shots, "format": fmt, "accuracy": correct / n,
            "examples": examples}


# --- fine-tuning: a 28-way classification head ----------------------------------------------

def attach_classifier(lm, seed: int = 0) -> nn.Linear:
    """Replace the LM head by ``Linear(d_model, 28, bias=False)`` over the sums (as
    ``GPT2ForSequenceClassification``'s ``score``): the model's last-position "logits" are then
    the 28 class scores, so :mod:`lib.core.engine` readouts and ``lib.studies.das`` heads work unchanged.
    Tied input embeddings stay as they were (the new head is a separate module)."""
    g = torch.Generator().manual_seed(int(seed))
    head = nn.Linear(lm.d_model, N_CLASSES, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(N_CLASSES, lm.d_model, generator=g) * 0.02)
    head = head.to(device=lm.device, dtype=lm.dtype)
    lm.model.lm_head = head
    return head


@torch.no_grad()
def class_logits(lm, input_ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Last-position class logits of prompts of one length. Not engine rows: it is evaluated
    between fine-tuning steps, on weights that change, and needs none of the engine's stored
    state."""
    out = []
    for a in range(0, len(input_ids), batch_size):
        ids = input_ids[a:a + batch_size].to(lm.device)
        out.append(lm.model(input_ids=ids, use_cache=False).logits[:, -1].float().cpu())
    return torch.cat(out)


def accuracy(lm, tokens: TaskTokens, indices: Sequence[int]) -> float:
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    labels = label_of(*arrangement_tensor()[idx].T)
    pred = class_logits(lm, tokens.input_ids[idx]).argmax(-1)
    return float((pred == labels).float().mean())
