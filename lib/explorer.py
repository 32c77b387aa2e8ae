"""Prompt explorer for the domain-separation study: continuation, top next tokens, token-set
masses, and what a last-token swap at one layer does to them (notebook 04).

The swap is an interchange intervention (activation patching; Vig et al. 2020 "Causal mediation
analysis for interpreting neural NLP"; Geiger et al. 2021 "Causal abstractions of neural
networks"): in the run on one prompt of a minimal pair, the output of one component (attention or
MLP) at one layer at the prompt's last token is replaced by the value it had at the last token of
the paired prompt of the other domain (:func:`lib.hooks.patch`). Sides follow
:mod:`lib.domain_swap`: ``b_into_a`` = base is the domain-A prompt with B's activation,
``a_into_b`` = base is the B prompt with A's activation.

For each side, :meth:`Explorer.view` gives

* the greedy continuation (``n_continuation`` tokens) without and with the swap (the swap is
  applied at the prompt's last position on every step; each step reruns the whole sequence);
* the top-k next tokens and their probabilities, without and with the swap;
* each domain's token-set mass, mass_D = Σ_{t ∈ set_D} p(t) over the ids of
  ``token_sets/<model>.json`` (notebook 01), without and with the swap.

Without a token-set file the masses are left out with a message; everything else still works.
The charts, the static rendering and the widgets live in :mod:`lib.plots.explorer`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from lib.activations import token_ids
from lib.hooks import Intervention, capture, patch
from lib.sites import site_name

SIDES = ("b_into_a", "a_into_b")
EXPLORER_COMPONENTS = ("attn_out", "mlp_out", "resid_post")


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
    x = torch.tensor([ids], device=lm.device)
    with patch(lm, interventions):
        return lm.model(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1].float()


@torch.no_grad()
def greedy_continuation(lm, ids: list[int], n_tokens: int,
                        interventions: Sequence[Intervention] = ()) -> list[int]:
    """``n_tokens`` greedy next tokens (stops early at EOS). Interventions use absolute
    positions, so each step reruns the whole sequence with them applied."""
    ids = list(ids)
    out = []
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


def token_sets_or_message(model: str, token_sets_dir: str | os.PathLike | None = None):
    """(token_sets dict, None) or (None, message saying why there are none and how to fix it)."""
    from lib.domain_swap import TokenSetMissingError, load_token_sets

    try:
        return load_token_sets(model, token_sets_dir), None
    except TokenSetMissingError as err:
        return None, f"No token-set masses: {err}"
    except ValueError as err:
        return None, f"No token-set masses: {err}"


class Explorer:
    """Computes :class:`PromptView` objects for paired prompts, with results cached."""

    def __init__(self, lm, pair_sets: Sequence, token_sets: dict | None = None,
                 token_sets_message: str | None = None, top_k: int = 10,
                 n_continuation: int = 12):
        self.lm = lm
        self.pairs = {ps.name: ps for ps in pair_sets}
        if not self.pairs:
            raise ValueError("no prompt pairs given")
        self.token_sets = token_sets
        self.token_sets_message = token_sets_message
        self.top_k = int(top_k)
        self.n_continuation = int(n_continuation)
        self._cache: dict = {}

    def _check(self, pair: str, index: int, layer: int, component: str):
        if pair not in self.pairs:
            raise KeyError(f"unknown pair {pair!r}; loaded pairs: {sorted(self.pairs)}")
        n = len(self.pairs[pair])
        if not 0 <= index < n:
            raise IndexError(f"prompt index {index} is out of range for {pair} (0 to {n - 1})")
        if not 0 <= layer < self.lm.n_layers:
            raise ValueError(f"layer {layer} is out of range: {self.lm.name} has "
                             f"{self.lm.n_layers} layers (0 to {self.lm.n_layers - 1})")
        if component not in EXPLORER_COMPONENTS:
            raise ValueError(f"component must be one of {EXPLORER_COMPONENTS}, got {component!r}")

    def _set_ids(self, pair: str) -> tuple[dict[str, list[int]], str | None]:
        if self.token_sets is None:
            return {}, self.token_sets_message or "No token sets loaded."
        from lib.domain_swap import token_set_ids

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
        """Both sides of pair ``pair``, prompt ``index``, swap at ``component`` of ``layer``."""
        self._check(pair, index, layer, component)
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
        return PromptView(pair, index, layer, component, (dom_a, dom_b), pd.DataFrame(texts),
                          pd.DataFrame(top), pd.DataFrame(masses), message)
