"""Prompt explorer for the domain-separation study: continuation, top next tokens, token-set
masses, and what a last-token swap at one layer does to them (notebook 04).

The swap is an interchange intervention (activation patching; Vig et al. 2020 "Causal mediation
analysis for interpreting neural NLP"; Geiger et al. 2021 "Causal abstractions of neural
networks"): in the run on one prompt of a minimal pair, the output of one component (attention or
MLP) at one layer at the prompt's last token is replaced by the value it had at the last token of
the paired prompt of the other domain (:func:`lib.core.hooks.patch`). Sides follow
:mod:`lib.studies.domain_swap`: ``b_into_a`` = base is the domain-A prompt with B's activation,
``a_into_b`` = base is the B prompt with A's activation.

For each side, :meth:`Explorer.view` gives

* the greedy continuation (``n_continuation`` tokens) without and with the swap (the swap is
  applied at the prompt's last position on every step; each step reruns the whole sequence);
* the top-k next tokens and their probabilities, without and with the swap;
* each domain's token-set mass, mass_D = Σ_{t ∈ set_D} p(t) over the ids of
  ``token_sets/<model>.json`` (notebook 01), without and with the swap.

Without a token-set file the masses are left out with a message; everything else still works.

Each view also carries what the token-set file says about the sets (:func:`token_set_table`,
:func:`split_of`), read with ``.get`` so that files written before these keys existed still
load:

* ``pairs[pair][domain]``: the sets used for the masses, ``[{"id", "token", "score"}]`` best
  first; the view shows the top ``n_set_tokens`` of each domain;
* ``reference[pair][domain]`` (optional): the intervention-free reference sets (tokens from the
  contrast of the two domains' clean next-token distributions), shown next to them;
* ``split[pair] = {"seed", "discovery": [indices], "held_out": [indices]}`` (optional): the
  token sets were found on the discovery half of the pair file and effects are measured on the
  held-out half; the view says which half the chosen prompt is in;
* ``score = {"name", "meaning"}`` (optional): which score ranked the tokens.

A prompt index outside its pair file is an error that states the file's range
(:func:`check_prompt_index`, :class:`PromptIndexError`); nothing clamps it.
The charts and the static rendering live in :mod:`lib.plots.explorer`, the widgets in
:mod:`lib.ui.explorer`.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from lib.core.activations import token_ids
from lib.core.interventions import Intervention
from lib.core.hooks import capture, patch
from lib.core.sites import site_name

SIDES = ("b_into_a", "a_into_b")
EXPLORER_COMPONENTS = ("attn_out", "mlp_out", "resid_post")
N_SET_TOKENS = 10
SPLIT_HALVES = {"discovery": "discovery", "held_out": "held-out"}


class PromptIndexError(IndexError, ValueError):
    """A prompt index outside the entries of its pair file (the message states the range)."""


def check_prompt_index(pair_sets, pair: str, index, name: str = "prompt index") -> int:
    """``index`` as an int, checked against the pair file of ``pair``; ``pair_sets`` is a
    sequence of :class:`lib.core.prompts.PromptPairs` or a ``{name: PromptPairs}`` mapping.

    An unknown pair is a ``KeyError`` naming the loaded pairs; an index that is not an integer
    or is outside 0..n-1 (n = entries of that pair file) is a :class:`PromptIndexError` that
    names ``name``, the file and its range. Needs no model, so a notebook can call it before
    loading one."""
    pairs = pair_sets if isinstance(pair_sets, Mapping) else {ps.name: ps for ps in pair_sets}
    if pair not in pairs:
        raise KeyError(f"unknown pair {pair!r}; loaded pairs: {sorted(pairs)} (PAIR must be the "
                       "stem of one of PROMPT_FILES)")
    ps = pairs[pair]
    n = len(ps)
    where = os.path.basename(ps.path) if getattr(ps, "path", "") else f"{pair}.json"
    if isinstance(index, bool):
        raise PromptIndexError(f"{name} must be an integer in 0..{n - 1}, got {index!r}")
    try:
        index = operator.index(index)
    except TypeError:
        raise PromptIndexError(f"{name} must be an integer in 0..{n - 1} (the entries of "
                               f"{where}), got {index!r}") from None
    if not 0 <= index < n:
        raise PromptIndexError(f"{name} {index} is out of range for pair {pair}: {where} has "
                               f"{n} prompt pairs, so it must be in 0..{n - 1}")
    return index


@dataclass
class PromptView:
    """Everything the explorer shows for one (pair, prompt, layer, component)."""

    pair: str
    index: int
    layer: int
    component: str
    domains: tuple[str, str]
    texts: pd.DataFrame         # side, base_domain, source_domain, prompt, condition, continuation
    top: pd.DataFrame           # side, condition, rank, token_id, token, prob
    masses: pd.DataFrame        # side, condition, token_set, mass (empty without token sets)
    message: str | None = None  # e.g. why masses are missing
    notes: list[str] = field(default_factory=list)
    sets: pd.DataFrame | None = None   # top tokens of each domain's set (token_set_table)
    sets_note: str | None = None       # which score found them, on which prompts (sets_note)
    split: str | None = None           # "discovery" / "held_out" / "outside" / None (split_of)
    split_note: str | None = None      # the same in words

    def mass_table(self) -> pd.DataFrame:
        """Masses per side and token set: clean, swapped and their difference."""
        if self.masses.empty:
            return self.masses
        wide = self.masses.pivot_table(index=["side", "token_set"], columns="condition",
                                       values="mass", sort=False).reset_index()
        wide["change"] = wide["swapped"] - wide["clean"]
        return wide[["side", "token_set", "clean", "swapped", "change"]]


def show_token(text: str) -> str:
    """A token made visible: spaces as '␣', newlines as '⏎', tabs as '⇥'."""
    return text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


@torch.no_grad()
def _logits_last(lm, ids: list[int], interventions: Sequence[Intervention] = ()) -> torch.Tensor:
    """One run through :func:`lib.core.hooks.patch`. Not engine rows: one interactive prompt
    at a time, and generation grows its input."""
    x = torch.tensor([ids], device=lm.device)
    with patch(lm, interventions):
        return lm.model(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1].float()


@torch.no_grad()
def greedy_continuation(lm, ids: list[int], n_tokens: int,
                        interventions: Sequence[Intervention] = ()) -> list[int]:
    """``n_tokens`` greedy next tokens (stops early at EOS). Interventions use absolute
    positions, so each step reruns the whole sequence with them applied."""
    ids = list(ids)
    out: list[int] = []
    eos = lm.tokenizer.eos_token_id
    for _ in range(n_tokens):
        nxt = int(_logits_last(lm, ids + out, interventions).argmax())
        out.append(nxt)
        if eos is not None and nxt == eos:
            break
    return out


@torch.no_grad()
def last_token_activation(lm, ids: list[int], site: str) -> torch.Tensor:
    """Activation at ``site`` at the last token of ``ids`` (d_model,)."""
    with capture(lm, [site], positions=[len(ids) - 1]) as cache:
        lm.model(input_ids=torch.tensor([ids], device=lm.device), use_cache=False,
                 logits_to_keep=1)
    return cache[site][0, 0]


def token_sets_or_message(model: str, token_sets_dir: str | Path | None = None):
    """(token_sets dict, None) or (None, message saying why there are none and how to fix it)."""
    from lib.studies.domain_swap import TokenSetMissingError, load_token_sets

    try:
        return load_token_sets(model, token_sets_dir), None
    except TokenSetMissingError as err:
        return None, f"No token-set masses: {err}"
    except ValueError as err:
        return None, f"No token-set masses: {err}"


def _entries(value) -> list[dict]:
    """The ``{"id", "token", "score"}`` entries of a set, skipping anything not shaped so."""
    if not isinstance(value, list):
        return []
    return [e for e in value if isinstance(e, dict) and "token" in e]


def token_set_table(token_sets: dict | None, pair: str, domains: Sequence[str],
                    n: int = N_SET_TOKENS) -> pd.DataFrame | None:
    """The top ``n`` tokens of each domain's set of ``pair``, side by side (index: rank from 1).

    Columns: ``<domain>`` (the token, made visible with :func:`show_token`) and ``<domain>
    score`` for the sets used (``pairs``), then ``reference <domain>`` for the reference sets
    when the file has ``reference[pair]``. None when the file has no sets for ``pair``."""
    if not token_sets or not isinstance(token_sets.get("pairs"), dict):
        return None
    used = token_sets["pairs"].get(pair)
    if not isinstance(used, dict):
        return None
    ref = token_sets.get("reference")
    ref = ref.get(pair) if isinstance(ref, dict) else None
    cols: dict[str, list] = {}
    for dom in domains:
        entries = _entries(used.get(dom))[:n]
        cols[dom] = [show_token(str(e["token"])) for e in entries]
        cols[f"{dom} score"] = [e.get("score") for e in entries]
    if isinstance(ref, dict):
        for dom in domains:
            cols[f"reference {dom}"] = [show_token(str(e["token"]))
                                        for e in _entries(ref.get(dom))[:n]]
    length = max((len(v) for v in cols.values()), default=0)
    if length == 0:
        return None
    cols = {k: list(v) + [None] * (length - len(v)) for k, v in cols.items()}
    return pd.DataFrame(cols, index=pd.RangeIndex(1, length + 1, name="rank"))


def sets_note(token_sets: dict | None, pair: str) -> str | None:
    """One line on how the sets of ``pair`` were found (score name and meaning, split sizes
    and seed), from the optional ``score`` and ``split`` keys; None when neither is there."""
    if not token_sets:
        return None
    parts = []
    score = token_sets.get("score")
    if isinstance(score, dict) and score.get("name"):
        meaning = f" ({score['meaning']})" if score.get("meaning") else ""
        parts.append(f"ranked by score {score['name']}{meaning}")
    split = _split(token_sets, pair)
    if split is not None:
        parts.append(f"found on the discovery half of {pair} ({len(split['discovery'])} "
                     f"pairs; {len(split['held_out'])} held out, seed {split.get('seed')})")
    elif pair in (token_sets.get("pairs") or {}):
        parts.append("found on every prompt (this file has no discovery/held-out split)")
    return "Token sets " + "; ".join(parts) + "." if parts else None


def _split(token_sets: dict | None, pair: str) -> dict | None:
    split = (token_sets or {}).get("split")
    split = split.get(pair) if isinstance(split, dict) else None
    if not isinstance(split, dict):
        return None
    if not all(isinstance(split.get(k), list) for k in ("discovery", "held_out")):
        return None
    return split


def split_of(token_sets: dict | None, pair: str, index: int) -> str | None:
    """Which half of the token sets' split of ``pair`` prompt ``index`` is in: ``"discovery"``
    (the sets were found on it), ``"held_out"`` (effects are measured on it), ``"outside"``
    (in neither, e.g. notebook 01 ran on the first N pairs only), or None without a split."""
    split = _split(token_sets, pair)
    if split is None:
        return None
    if index in {int(i) for i in split["discovery"]}:
        return "discovery"
    if index in {int(i) for i in split["held_out"]}:
        return "held_out"
    return "outside"


def split_text(where: str | None, pair: str, index: int) -> str | None:
    """:func:`split_of` in words (None stays None)."""
    if where is None:
        return None
    if where == "discovery":
        return (f"prompt {index} is in the discovery half of {pair}: the token sets were found "
                "on it, so its masses are not an independent test")
    if where == "held_out":
        return (f"prompt {index} is in the held-out half of {pair}: the token sets were found "
                "without it (effects in notebook 02 are measured on this half)")
    return (f"prompt {index} is outside {pair}'s recorded split (notebook 01 ran on part of the "
            "file): the token sets were found without it")


class Explorer:
    """Computes :class:`PromptView` objects for paired prompts, with results cached."""

    def __init__(self, lm, pair_sets: Sequence, token_sets: dict | None = None,
                 token_sets_message: str | None = None, top_k: int = 10,
                 n_continuation: int = 12, n_set_tokens: int = N_SET_TOKENS):
        self.lm = lm
        self.pairs = {ps.name: ps for ps in pair_sets}
        if not self.pairs:
            raise ValueError("no prompt pairs given")
        self.token_sets = token_sets
        self.token_sets_message = token_sets_message
        self.top_k = int(top_k)
        self.n_continuation = int(n_continuation)
        self.n_set_tokens = int(n_set_tokens)
        self._cache: dict = {}

    def prompt_range(self, pair: str) -> range:
        """The valid prompt indices of ``pair`` (0..n-1 for its pair file)."""
        if pair not in self.pairs:
            raise KeyError(f"unknown pair {pair!r}; loaded pairs: {sorted(self.pairs)}")
        return range(len(self.pairs[pair]))

    def check(self, pair: str, index: int, layer: int, component: str,
              index_name: str = "prompt index") -> None:
        """Refuse an unknown pair, an index outside the pair file, a layer the model lacks or
        an unknown component, with the valid choices in the message (no model run)."""
        check_prompt_index(self.pairs, pair, index, index_name)
        if not 0 <= layer < self.lm.n_layers:
            raise ValueError(f"layer {layer} is out of range: {self.lm.name} has "
                             f"{self.lm.n_layers} layers (0 to {self.lm.n_layers - 1})")
        if component not in EXPLORER_COMPONENTS:
            raise ValueError(f"component must be one of {EXPLORER_COMPONENTS}, got {component!r}")

    def _set_ids(self, pair: str) -> tuple[dict[str, list[int]], str | None]:
        if self.token_sets is None:
            return {}, self.token_sets_message or "No token sets loaded."
        from lib.studies.domain_swap import token_set_ids

        vocab = self.lm.model.get_output_embeddings().weight.shape[0]
        out = {}
        try:
            for dom in self.pairs[pair].domains:
                ids = token_set_ids(self.token_sets, pair, dom)
                bad = [i for i in ids if not 0 <= i < vocab]
                if bad:
                    return {}, (f"token set {pair}/{dom} has ids {bad[:5]} outside the "
                                f"vocabulary of {self.lm.name} ({vocab}); rerun notebook 01")
                out[dom] = ids
        except (FileNotFoundError, ValueError) as err:
            return {}, f"No token-set masses: {err}"
        return out, None

    def view(self, pair: str, index: int, layer: int, component: str) -> PromptView:
        """Both sides of pair ``pair``, prompt ``index``, swap at ``component`` of ``layer``.
        Choices are checked first (:meth:`check`): an index outside 0..n-1 of the pair file is
        a :class:`PromptIndexError` stating that range."""
        self.check(pair, index, layer, component)
        key = (pair, index, layer, component)
        if key not in self._cache:
            self._cache[key] = self._compute(pair, index, layer, component)
        return self._cache[key]

    def _compute(self, pair: str, index: int, layer: int, component: str) -> PromptView:
        lm, ps = self.lm, self.pairs[pair]
        dom_a, dom_b = ps.domains
        ids = dict(zip((dom_a, dom_b), token_ids(lm, [ps.a[index], ps.b[index]])))
        text = {dom_a: ps.a[index], dom_b: ps.b[index]}
        site = site_name(component, layer)
        acts = {d: last_token_activation(lm, ids[d], site) for d in (dom_a, dom_b)}
        set_ids, message = self._set_ids(pair)
        texts, top, masses = [], [], []
        for side, base, source in (("b_into_a", dom_a, dom_b), ("a_into_b", dom_b, dom_a)):
            iv = Intervention(site, positions=(len(ids[base]) - 1,), kind="replace",
                              value=acts[source],
                              source=f"run:{pair} {source} prompt {index}")
            for condition, ivs in (("clean", []), ("swapped", [iv])):
                probs = torch.softmax(_logits_last(lm, ids[base], ivs), -1)
                cont = greedy_continuation(lm, ids[base], self.n_continuation, ivs)
                texts.append({"side": side, "base_domain": base, "source_domain": source,
                              "prompt": text[base], "condition": condition,
                              "continuation": lm.tokenizer.decode(cont)})
                values, order = probs.topk(self.top_k)
                for rank, (tid, p) in enumerate(zip(order.tolist(), values.tolist()), 1):
                    top.append({"side": side, "condition": condition, "rank": rank,
                                "token_id": tid, "token": lm.tokenizer.decode([tid]),
                                "prob": p})
                for dom, dom_ids in set_ids.items():
                    masses.append({"side": side, "condition": condition, "token_set": dom,
                                   "mass": float(probs[dom_ids].sum())})
        where = split_of(self.token_sets, pair, index)
        return PromptView(pair, index, layer, component, (dom_a, dom_b), pd.DataFrame(texts),
                          pd.DataFrame(top), pd.DataFrame(masses), message,
                          sets=token_set_table(self.token_sets, pair, (dom_a, dom_b),
                                               self.n_set_tokens),
                          sets_note=sets_note(self.token_sets, pair), split=where,
                          split_note=split_text(where, pair, index))
