"""High-level causal models and their counterfactual datasets, for distributed alignment search.

A causal model (Geiger, Wu et al. 2023, "Finding alignments between interpretable causal
variables and distributed neural representations"; the ``CausalModel`` of pyvene, Wu et al. 2024)
is plain data: variables, a value set per variable, the parents of each variable and a function
of the parents' values. Inputs are the variables without parents; outputs those without children.

Everything here is **batched**: a *setting* maps variable names to tensors whose first axis is the
example, and every function maps batched parent values to a batched value (``W == X`` on rows of
vectors is ``(w == x).all(-1)``). One example is a batch of one.

* :meth:`CausalModel.run_forward` evaluates every variable in topological order; variables in the
  setting are clamped to the given values.
* :meth:`CausalModel.run_interchange` sets each intervened variable to the value it takes on its
  own source input, and returns the resulting run of the base (the *counterfactual*).
* :meth:`CausalModel.counterfactual_dataset` draws exactly ``size`` examples (seeded) in one of two
  sampling semantics: ``"independent"`` (the source is drawn independently of the sampled
  intervention value, as in pyvene before March 2024) or ``"conditioned"`` (the source of V is
  drawn conditioned on V taking a value drawn uniformly from V's value set, as after pyvene PR
  #131). Intervention sets are drawn as pyvene does: a fair coin per intermediate variable,
  redrawn until the set is non-empty, so with two intermediates {V1}, {V2}, {V1, V2} each have
  probability 1/3.

The task models of the DAS tutorial and of the thesis (hierarchical equality, the ABAB pattern
tasks, and the same-shaped AABB/ABBA pair models of the wrong-causal-model ablation) are built by
:func:`pair_equality_model`.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

SEMANTICS = ("independent", "conditioned")

Sampler = Callable[[int, torch.Generator], dict]


class CausalModelError(ValueError):
    """A causal model, setting or dataset request that cannot be used."""


@dataclass
class CausalModel:
    """Variables, value sets, parents and functions; inputs and outputs are derived.

    ``values[v]`` lists the values of ``v`` (``None`` for a continuous input such as an object
    vector). ``functions[v]`` takes the parents' batched values in ``parents[v]`` order. An input
    variable needs no function. ``input_sampler(n, generator)`` returns ``n`` batched inputs.
    """

    variables: Sequence[str]
    values: Mapping[str, Sequence | None]
    parents: Mapping[str, Sequence[str]]
    functions: Mapping[str, Callable]
    input_sampler: Sampler | None = None
    name: str = "causal_model"
    inputs: list[str] = field(init=False)
    outputs: list[str] = field(init=False)
    intermediates: list[str] = field(init=False)
    order: list[str] = field(init=False)

    def __post_init__(self):
        self.variables = list(self.variables)
        if len(set(self.variables)) != len(self.variables):
            raise CausalModelError(f"{self.name}: variable names repeat in {self.variables}")
        known = set(self.variables)
        for var in self.variables:
            if var not in self.parents:
                raise CausalModelError(f"{self.name}: no parents given for {var!r}; use [] for "
                                       f"an input")
            if var not in self.values:
                raise CausalModelError(f"{self.name}: no value set given for {var!r} (None for "
                                       f"a continuous input)")
            bad = [p for p in self.parents[var] if p not in known]
            if bad:
                raise CausalModelError(f"{self.name}: parents {bad} of {var!r} are not variables")
            if self.parents[var] and var not in self.functions:
                raise CausalModelError(f"{self.name}: {var!r} has parents but no function")
        children = {v: [c for c in self.variables if v in self.parents[c]] for v in self.variables}
        self.inputs = [v for v in self.variables if not self.parents[v]]
        self.outputs = [v for v in self.variables if not children[v] and self.parents[v]]
        self.intermediates = [v for v in self.variables
                              if v not in self.inputs and v not in self.outputs]
        self.order = _topological_order(self.variables, self.parents, self.name)
        for var in self.intermediates + self.outputs:
            if self.values[var] is None:
                raise CausalModelError(f"{self.name}: {var!r} needs a finite value set")

    # --- running ------------------------------------------------------------------------

    def run_forward(self, setting: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """Evaluate every variable; variables in ``setting`` are clamped to the given values.

        Every input must be in ``setting`` (batched tensors, first axis the example). A clamped
        intermediate may be a tensor of shape (n,) or a Python scalar (broadcast).
        """
        missing = [v for v in self.inputs if v not in setting]
        if missing:
            raise CausalModelError(f"{self.name}: the setting lacks inputs {missing}")
        unknown = [v for v in setting if v not in self.variables]
        if unknown:
            raise CausalModelError(f"{self.name}: the setting names unknown variables {unknown}")
        n = len(torch.as_tensor(setting[self.inputs[0]]))
        out: dict[str, torch.Tensor] = {}
        for var in self.order:
            if var in setting:
                val = torch.as_tensor(setting[var])
                if val.dim() == 0:
                    val = val.expand(n)
                out[var] = val
            else:
                out[var] = torch.as_tensor(self.functions[var](*(out[p] for p in self.parents[var])))
        return out

    def run_interchange(self, base: Mapping[str, object],
                        sources: Mapping[str, Mapping[str, object]]) -> dict[str, torch.Tensor]:
        """Run ``base`` with each variable ``v`` in ``sources`` set to its value on ``sources[v]``."""
        bad = [v for v in sources if v not in self.variables or v in self.inputs]
        if bad:
            raise CausalModelError(f"{self.name}: cannot intervene on {bad}; intervenable "
                                   f"variables are {self.intermediates + self.outputs}")
        clamp = {v: self.run_forward(src)[v] for v, src in sources.items()}
        return self.run_forward({**{k: base[k] for k in self.inputs}, **clamp})

    def label(self, values: torch.Tensor, output: str | None = None) -> torch.Tensor:
        """Class index of each output value (its position in the output's value set)."""
        output = output or self.outputs[0]
        labels = torch.full(values.shape[:1], -1, dtype=torch.long)
        value_set = self.values[output]
        assert value_set is not None  # __post_init__: every output has a finite value set
        for k, v in enumerate(value_set):
            labels[values == v] = k
        if (labels < 0).any():
            raise CausalModelError(f"{self.name}: output values outside the value set of "
                                   f"{output!r}")
        return labels

    # --- sampling -----------------------------------------------------------------------

    def sample_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if self.input_sampler is None:
            raise CausalModelError(f"{self.name}: no input_sampler was given")
        return self.input_sampler(n, generator)

    def sample_intervention_ids(self, n: int, generator: torch.Generator,
                                block_size: int = 1) -> torch.Tensor:
        """Intervention-set ids, one per example (shared by blocks of ``block_size``).

        Per block: a fair coin per intermediate variable, redrawn until at least one is set.
        The id of a set S is ``sum(2**i for i in S) - 1`` (pyvene's order: with WX and YZ,
        0 is {WX}, 1 is {YZ}, 2 is both).
        """
        k = len(self.intermediates)
        if k == 0:
            raise CausalModelError(f"{self.name}: no intermediate variable to intervene on")
        n_blocks = -(-n // block_size)
        codes = torch.zeros(n_blocks, dtype=torch.long)
        todo = torch.ones(n_blocks, dtype=torch.bool)
        weights = 2 ** torch.arange(k)
        while todo.any():
            coins = torch.randint(0, 2, (int(todo.sum()), k), generator=generator)
            codes[todo] = (coins * weights).sum(-1)
            todo = codes == 0
        return (codes - 1).repeat_interleave(block_size)[:n]

    def intervened_variables(self, intervention_id: int) -> list[str]:
        code = int(intervention_id) + 1
        return [v for i, v in enumerate(self.intermediates) if code >> i & 1]

    def _sample_conditioned(self, var: str, wanted: torch.Tensor, generator: torch.Generator,
                            max_rounds: int = 1000) -> dict[str, torch.Tensor]:
        """Inputs whose value of ``var`` equals ``wanted`` row by row (rejection sampling)."""
        n = len(wanted)
        chunks: dict[str, torch.Tensor] | None = None
        filled = torch.zeros(n, dtype=torch.bool)
        for _ in range(max_rounds):
            need = int((~filled).sum())
            if need == 0:
                assert chunks is not None  # n >= 1 (size is positive): the first round set it
                return chunks
            cand = self.sample_inputs(max(2 * need, 64), generator)
            cand_val = self.run_forward(cand)[var]
            if chunks is None:
                chunks = {k: torch.zeros((n, *v.shape[1:]), dtype=v.dtype) for k, v in cand.items()}
            used = torch.zeros(len(cand_val), dtype=torch.bool)
            for value in torch.unique(wanted[~filled]):
                rows = torch.nonzero(~filled & (wanted == value)).flatten()
                pool = torch.nonzero(~used & (cand_val == value)).flatten()[:len(rows)]
                rows = rows[:len(pool)]
                for k in chunks:
                    chunks[k][rows] = cand[k][pool]
                used[pool] = True
                filled[rows] = True
        raise CausalModelError(f"{self.name}: could not draw sources with the requested values "
                               f"of {var!r} in {max_rounds} rounds; is some value impossible?")

    def counterfactual_dataset(self, size: int, seed: int, semantics: str = "independent",
                               block_size: int = 1) -> "CounterfactualDataset":
        """Exactly ``size`` (base, sources, intervention set, counterfactual label) examples.

        ``semantics``: ``"independent"`` draws each source with the input sampler, ignoring the
        sampled value; ``"conditioned"`` draws the source of V given V equals a value drawn
        uniformly from V's value set. Sources of variables not intervened on are zeros.
        """
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise CausalModelError(f"size must be a positive int, got {size!r}")
        if semantics not in SEMANTICS:
            raise CausalModelError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise CausalModelError(f"block_size must be a positive int, got {block_size!r}")
        gen = torch.Generator().manual_seed(int(seed))
        ids = self.sample_intervention_ids(size, gen, block_size)
        base = self.sample_inputs(size, gen)
        sources = []
        for i, var in enumerate(self.intermediates):
            if semantics == "independent":
                src = self.sample_inputs(size, gen)
            else:
                vals = self.values[var]
                assert vals is not None  # __post_init__: intermediates have finite value sets
                pick = torch.randint(0, len(vals), (size,), generator=gen)
                wanted = torch.as_tensor(list(vals))[pick]
                src = self._sample_conditioned(var, wanted, gen)
            on = ((ids + 1) >> i & 1).bool()
            sources.append({k: torch.where(on.view(-1, *[1] * (v.dim() - 1)), v,
                                           torch.zeros_like(v)) for k, v in src.items()})
        out = self.outputs[0]
        labels = torch.empty(size, dtype=torch.long)
        for code in torch.unique(ids).tolist():
            rows = ids == code
            pick_rows = lambda d: {k: v[rows] for k, v in d.items()}  # noqa: E731
            srcs = {var: pick_rows(sources[self.intermediates.index(var)])
                    for var in self.intervened_variables(code)}
            labels[rows] = self.label(self.run_interchange(pick_rows(base), srcs)[out])
        base_labels = self.label(self.run_forward(base)[out])
        return CounterfactualDataset(self.name, list(self.intermediates), list(self.inputs), base,
                                     sources, ids, labels, base_labels, semantics, int(seed))

    def factual_dataset(self, size: int, seed: int) -> tuple[dict, torch.Tensor]:
        """``size`` sampled inputs and their output labels."""
        if not isinstance(size, int) or size < 1:
            raise CausalModelError(f"size must be a positive int, got {size!r}")
        gen = torch.Generator().manual_seed(int(seed))
        inputs = self.sample_inputs(size, gen)
        return inputs, self.label(self.run_forward(inputs)[self.outputs[0]])


@dataclass
class CounterfactualDataset:
    """Batched counterfactual examples; ``sources[i]`` belongs to ``intermediates[i]``."""

    model: str
    intermediates: list[str]
    inputs: list[str]
    base: dict[str, torch.Tensor]
    sources: list[dict[str, torch.Tensor]]
    intervention_id: torch.Tensor        # (n,), see CausalModel.sample_intervention_ids
    labels: torch.Tensor                 # (n,) counterfactual label (class index)
    base_labels: torch.Tensor            # (n,) factual label of the base
    semantics: str
    seed: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def masks(self) -> torch.Tensor:
        """(n, n_intermediates) bool: which variables each example intervenes on."""
        bits = torch.arange(len(self.intermediates))
        return ((self.intervention_id[:, None] + 1) >> bits & 1).bool()

    def base_tensor(self) -> torch.Tensor:
        return encode(self.base, self.inputs)

    def source_tensors(self) -> list[torch.Tensor]:
        return [encode(s, self.inputs) for s in self.sources]


def encode(setting: Mapping[str, torch.Tensor], inputs: Sequence[str]) -> torch.Tensor:
    """The network input: the input variables' vectors concatenated in ``inputs`` order."""
    parts = [torch.as_tensor(setting[v]).float() for v in inputs]
    return torch.cat([p if p.dim() > 1 else p[:, None] for p in parts], dim=-1)


def _topological_order(variables, parents, name) -> list[str]:
    order, done, visiting = [], set(), set()

    def visit(v):
        if v in done:
            return
        if v in visiting:
            raise CausalModelError(f"{name}: the graph has a cycle through {v!r}")
        visiting.add(v)
        for p in parents[v]:
            visit(p)
        visiting.discard(v)
        done.add(v)
        order.append(v)

    for v in variables:
        visit(v)
    return order


# --- the task models ----------------------------------------------------------------------

def pattern_sampler(patterns: Sequence[str], object_dim: int,
                    variables: Sequence[str] = ("W", "X", "Y", "Z")) -> Sampler:
    """Inputs built from letter patterns (``"AABB"``: W = X = A, Y = Z = B), one pattern drawn
    uniformly per example, each letter a fresh vector uniform in [-1, 1]^object_dim rounded to
    2 decimals (the DAS tutorial's objects)."""
    patterns = [p.upper() for p in patterns]
    if not patterns or any(len(p) != len(variables) for p in patterns):
        raise CausalModelError(f"patterns must each have {len(variables)} letters, got {patterns}")
    letters = sorted(set("".join(patterns)))
    slot = torch.tensor([[letters.index(c) for c in p] for p in patterns])  # (n_patterns, n_vars)

    def sample(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        objects = torch.rand(n, len(letters), object_dim, generator=generator) * 2 - 1
        objects = torch.round(objects * 100) / 100
        which = slot[torch.randint(0, len(patterns), (n,), generator=generator)]  # (n, n_vars)
        rows = torch.arange(n)[:, None]
        picked = objects[rows, which]                                              # (n, n_vars, d)
        return {v: picked[:, i].contiguous() for i, v in enumerate(variables)}

    return sample


def _eq(a, b):
    return (a == b).all(-1) if a.dim() > 1 else a == b


def _patterns_for(pairs: tuple[tuple[int, int], tuple[int, int]], output: str) -> list[str]:
    """Four letter patterns: both pairs equal, neither, only the first, only the second (for
    ``"and"``: both or neither)."""
    (a, b), (c, d) = pairs

    def build(first_equal: bool, second_equal: bool) -> str:
        letters = list(string.ascii_uppercase)
        slots: list[str | None] = [None] * 4
        slots[a] = letters.pop(0)
        slots[b] = slots[a] if first_equal else letters.pop(0)
        slots[c] = letters.pop(0)
        slots[d] = slots[c] if second_equal else letters.pop(0)
        # rename letters by first appearance, so the pattern reads like "ABAB"
        names: dict[str | None, str] = {}
        out = ""
        for s in slots:
            names.setdefault(s, string.ascii_uppercase[len(names)])
            out += names[s]
        return out

    cases = [(False, False), (True, True)]
    if output == "equal":
        cases += [(True, False), (False, True)]
    return [build(*c) for c in cases]


PAIRINGS = {"AABB": ((0, 1), (2, 3)), "ABAB": ((0, 2), (1, 3)), "ABBA": ((0, 3), (1, 2))}


def pair_equality_model(pairing: str = "AABB", output: str = "equal", object_dim: int = 4,
                        patterns: Sequence[str] | None = None) -> CausalModel:
    """Two pair-equality variables over inputs W, X, Y, Z, and an output that combines them.

    ``pairing``: ``"AABB"`` (P = [W==X], Q = [Y==Z]; the hierarchical-equality task of the DAS
    tutorial, whose variables are WX and YZ), ``"ABAB"`` (P = [W==Y], Q = [X==Z]; the thesis'
    pattern task) or ``"ABBA"`` (P = [W==Z], Q = [X==Y]). ``output``: ``"equal"`` (O = [P==Q])
    or ``"and"`` (O = P AND Q). The input sampler draws one of the task's patterns uniformly:
    for ``"equal"`` the four of both, neither, only the first, only the second pair equal
    (AABB: ABCD, AABB, AACD, ABCC; ABAB: ABCD, ABAB, ABAC, ABCB); for ``"and"`` the two of
    neither and both (ABAB: ABCD, ABAB), as the thesis' script does.
    """
    if pairing not in PAIRINGS:
        raise CausalModelError(f"pairing must be one of {sorted(PAIRINGS)}, got {pairing!r}")
    if output not in ("equal", "and"):
        raise CausalModelError(f"output must be 'equal' or 'and', got {output!r}")
    if not isinstance(object_dim, int) or object_dim < 1:
        raise CausalModelError(f"object_dim must be a positive int, got {object_dim!r}")
    (a, b), (c, d) = PAIRINGS[pairing]
    names = ["W", "X", "Y", "Z"]
    if pairing == "AABB":
        p, q = "WX", "YZ"
    else:
        p, q = "P", "Q"
    combine = (lambda u, v: u == v) if output == "equal" else (lambda u, v: u & v)
    model = CausalModel(
        variables=names + [p, q, "O"],
        values={**{v: None for v in names}, p: [False, True], q: [False, True],
                "O": [False, True]},
        parents={**{v: [] for v in names}, p: [names[a], names[b]], q: [names[c], names[d]],
                 "O": [p, q]},
        functions={p: _eq, q: _eq, "O": combine},
        input_sampler=pattern_sampler(patterns or _patterns_for(PAIRINGS[pairing], output),
                                      object_dim, names),
        name=f"{pairing.lower()}_{output}")
    return model


def hierarchical_equality(object_dim: int = 4) -> CausalModel:
    """The DAS tutorial's task: O = [(W==X) == (Y==Z)], patterns ABCD, AABB, AACD, ABCC."""
    return pair_equality_model("AABB", "equal", object_dim)
