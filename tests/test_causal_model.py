"""Causal models: hand-computed labels for every task model, interchange runs, exact dataset
sizes, the two sampling semantics, equal frequency of the three intervention sets, errors."""

import pytest
import torch

from lib.studies.das.causal_model import (CausalModel, CausalModelError, encode, hierarchical_equality,
                              pair_equality_model, pattern_sampler)

torch.set_num_threads(1)

A, B, C, D = (torch.tensor([[v, 0.5]]) for v in (0.1, 0.2, 0.3, 0.4))


def _inputs(pattern: str) -> dict:
    objs = {"A": A, "B": B, "C": C, "D": D}
    return {v: objs[ch] for v, ch in zip("WXYZ", pattern)}


# (pairing, output, pattern) -> (P, Q, O) computed by hand
HAND = [
    ("AABB", "equal", "AABB", (True, True, True)),
    ("AABB", "equal", "ABCD", (False, False, True)),
    ("AABB", "equal", "ABCC", (False, True, False)),
    ("AABB", "equal", "AACD", (True, False, False)),
    ("AABB", "equal", "ABAB", (False, False, True)),
    ("ABAB", "equal", "ABAB", (True, True, True)),
    ("ABAB", "equal", "ABCD", (False, False, True)),
    ("ABAB", "equal", "ABAC", (True, False, False)),
    ("ABAB", "equal", "ABCB", (False, True, False)),
    ("ABAB", "equal", "AABB", (False, False, True)),
    ("ABAB", "and", "ABAB", (True, True, True)),
    ("ABAB", "and", "ABCD", (False, False, False)),
    ("ABAB", "and", "ABAC", (True, False, False)),
    ("ABBA", "equal", "ABBA", (True, True, True)),
    ("ABBA", "equal", "ABCA", (True, False, False)),
    ("ABBA", "equal", "AABB", (False, False, True)),
    ("ABBA", "and", "ABBC", (False, True, False)),
]


@pytest.mark.parametrize("pairing,output,pattern,expected", HAND)
def test_hand_computed_labels(pairing, output, pattern, expected):
    model = pair_equality_model(pairing, output, object_dim=2)
    run = model.run_forward(_inputs(pattern))
    p, q = model.intermediates
    assert (bool(run[p]), bool(run[q]), bool(run["O"])) == expected
    assert model.label(run["O"]).tolist() == [int(expected[2])]


def test_structure_of_the_tutorial_model():
    model = hierarchical_equality()
    assert model.inputs == ["W", "X", "Y", "Z"]
    assert model.intermediates == ["WX", "YZ"]
    assert model.outputs == ["O"]
    assert model.order.index("O") > max(model.order.index("WX"), model.order.index("YZ"))


def test_clamping_and_interchange_by_hand():
    model = hierarchical_equality(object_dim=2)
    base = _inputs("AABB")                                   # WX=T, YZ=T, O=T
    assert bool(model.run_forward({**base, "WX": False})["O"]) is False
    assert bool(model.run_forward({**base, "WX": False, "YZ": False})["O"]) is True
    # WX from a source ABCC (WX=F): O = [F == T] = F
    cf = model.run_interchange(base, {"WX": _inputs("ABCC")})
    assert (bool(cf["WX"]), bool(cf["YZ"]), bool(cf["O"])) == (False, True, False)
    # both from ABCD sources: O = [F == F] = T
    cf = model.run_interchange(base, {"WX": _inputs("ABCD"), "YZ": _inputs("ABCC")})
    assert (bool(cf["WX"]), bool(cf["YZ"]), bool(cf["O"])) == (False, True, False)
    cf = model.run_interchange(base, {"WX": _inputs("ABCD"), "YZ": _inputs("ABCD")})
    assert bool(cf["O"]) is True
    # ABAB model: P from an ABAC source (P=T) into ABCD base (P=F, Q=F): O = [T == F] = F
    abab = pair_equality_model("ABAB", "equal", 2)
    cf = abab.run_interchange(_inputs("ABCD"), {"P": _inputs("ABAC")})
    assert bool(cf["O"]) is False
    assert bool(pair_equality_model("ABAB", "and", 2).run_interchange(
        _inputs("ABAC"), {"Q": _inputs("ABAB")})["O"]) is True


@pytest.mark.parametrize("size", [1, 7, 1000, 1283])
@pytest.mark.parametrize("semantics", ["independent", "conditioned"])
def test_exact_size_and_labels_agree_with_the_model(size, semantics):
    model = hierarchical_equality()
    ds = model.counterfactual_dataset(size, seed=3, semantics=semantics, block_size=16)
    assert len(ds) == size and ds.base_tensor().shape == (size, 16)
    assert all(s.shape == (size, 16) for s in ds.source_tensors())
    # recompute every label from the stored base and sources, example by example
    for i in range(min(size, 50)):
        one = lambda d: {k: v[i:i + 1] for k, v in d.items()}  # noqa: E731
        srcs = {v: one(ds.sources[j]) for j, v in enumerate(ds.intermediates) if ds.masks[i, j]}
        cf = model.run_interchange(one(ds.base), srcs)
        assert model.label(cf["O"]).item() == ds.labels[i].item()
        assert model.label(model.run_forward(one(ds.base))["O"]).item() == ds.base_labels[i]
    # sources of variables not intervened on are zeros
    for j in range(2):
        off = ~ds.masks[:, j]
        assert torch.all(ds.source_tensors()[j][off] == 0)
        assert torch.all(ds.source_tensors()[j][~off].abs().sum(-1) > 0)


def test_three_intervention_sets_equally_often_and_blocks_share_one():
    model = hierarchical_equality()
    ids = model.sample_intervention_ids(30_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=3).float() / len(ids)
    assert freq.shape == (3,) and torch.all((freq - 1 / 3).abs() < 0.01), freq
    blocks = model.sample_intervention_ids(6400, torch.Generator().manual_seed(1), block_size=64)
    assert all(len(set(blocks[i:i + 64].tolist())) == 1 for i in range(0, 6400, 64))
    assert model.intervened_variables(0) == ["WX"] and model.intervened_variables(1) == ["YZ"]
    assert model.intervened_variables(2) == ["WX", "YZ"]


def test_seeded_and_semantics_differ():
    model = hierarchical_equality()
    a = model.counterfactual_dataset(500, seed=5)
    b = model.counterfactual_dataset(500, seed=5)
    c = model.counterfactual_dataset(500, seed=6)
    assert torch.equal(a.base_tensor(), b.base_tensor()) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.base_tensor(), c.base_tensor())
    d = model.counterfactual_dataset(500, seed=5, semantics="conditioned")
    assert not torch.equal(a.source_tensors()[0], d.source_tensors()[0])


def test_conditioned_sources_take_uniform_values():
    """Conditioned on a uniformly drawn value, the source's variable is True about half the
    time even where the input sampler alone makes it rare."""
    model = pair_equality_model("AABB", "equal", 2, patterns=["ABCD", "ABCD", "ABCD", "AABB"])
    for semantics, expected in (("independent", 0.25), ("conditioned", 0.5)):
        ds = model.counterfactual_dataset(8000, seed=0, semantics=semantics)
        on = ds.masks[:, 0]
        src = {k: v[on] for k, v in ds.sources[0].items()}
        frac = model.run_forward(src)["WX"].float().mean().item()
        assert abs(frac - expected) < 0.03, (semantics, frac)


def test_pattern_sampler_objects():
    sample = pattern_sampler(["AABB"], object_dim=4)(100, torch.Generator().manual_seed(0))
    assert torch.equal(sample["W"], sample["X"]) and torch.equal(sample["Y"], sample["Z"])
    assert not torch.equal(sample["W"], sample["Y"])
    assert sample["W"].abs().max() <= 1 and torch.equal(sample["W"], torch.round(sample["W"] * 100) / 100)
    assert encode(sample, "WXYZ").shape == (100, 16)


def test_bad_input_is_named():
    model = hierarchical_equality()
    with pytest.raises(CausalModelError, match="size"):
        model.counterfactual_dataset(0, seed=0)
    with pytest.raises(CausalModelError, match="semantics"):
        model.counterfactual_dataset(10, seed=0, semantics="new")
    with pytest.raises(CausalModelError, match="lacks inputs"):
        model.run_forward({"W": A})
    with pytest.raises(CausalModelError, match="cannot intervene"):
        model.run_interchange(_inputs("AABB"), {"W": _inputs("ABCD")})
    with pytest.raises(CausalModelError, match="cycle"):
        CausalModel(["a", "b"], {"a": [0], "b": [0]}, {"a": ["b"], "b": ["a"]},
                    {"a": lambda b: b, "b": lambda a: a})
    with pytest.raises(CausalModelError, match="pairing"):
        pair_equality_model("AAAA")
