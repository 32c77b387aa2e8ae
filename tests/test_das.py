"""Rotated-subspace interventions: swaps they must equal, orthogonality through training, the
random control, safetensors round trip, lib.core.hooks integration with gradients, the hand-built
MLP (factual accuracy and vanilla-swap IIA 1.00), and errors."""

import pytest
import torch

from conftest import F32_ATOL, assert_f32_close
from lib.studies import das
from lib.studies.das.causal_model import encode, hierarchical_equality
from lib.studies.das.mlp import (MLP, accuracy, hand_built_equality_mlp, interchange_data, load_mlp,
                     save_mlp, train_mlp, train_mlps)

torch.set_num_threads(1)
D = 16


def _acts(n=32, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = shape or (n, D)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_identity_rotation_over_all_dims_equals_vanilla_swap():
    base, src, _ = _acts()
    iv = das.RotatedSpaceIntervention(D)
    iv.set_rotation(torch.eye(D))
    assert torch.allclose(iv(base, src), src, atol=F32_ATOL)
    # and with two halves, each from its own source: a vanilla half swap
    iv2 = das.RotatedSpaceIntervention(D, [(0, 8), (8, 16)])
    iv2.set_rotation(torch.eye(D))
    base, s1, s2 = _acts(seed=1)
    masks = torch.tensor([[True, False], [False, True], [True, True], [False, False]]).repeat(8, 1)
    out = iv2(base, [s1, s2], masks)
    expected = base.clone()
    expected[masks[:, 0], :8] = s1[masks[:, 0], :8]
    expected[masks[:, 1], 8:] = s2[masks[:, 1], 8:]
    assert torch.allclose(out, expected, atol=F32_ATOL)
    assert torch.equal(out[~masks.any(1)], base[~masks.any(1)])


def test_any_full_rotation_over_all_dims_is_a_full_swap():
    base, src, _ = _acts(seed=2)
    iv = das.RotatedSpaceIntervention(D, seed=5)
    assert torch.allclose(iv(base, src), src, atol=F32_ATOL)


def test_low_rank_with_k_equal_d_is_a_full_swap_and_smaller_k_is_a_projection():
    base, src, _ = _acts(seed=3)
    full = das.LowRankRotatedSpaceIntervention(D, rank=D, seed=1)
    assert torch.allclose(full(base, src), src, atol=F32_ATOL)
    low = das.LowRankRotatedSpaceIntervention(D, rank=3, seed=1)
    R = low.R.detach()
    assert torch.allclose(low(base, src), base + (src - base) @ R @ R.T, atol=F32_ATOL)
    # the part of the base orthogonal to span(R) is untouched
    P = torch.eye(D) - R @ R.T
    assert torch.allclose(low(base, src) @ P, base @ P, atol=F32_ATOL)


def test_boundless_mask_covering_everything_is_a_full_swap():
    base, src, _ = _acts(seed=4)
    iv = das.BoundlessRotatedSpaceIntervention(D, init_fraction=1.0, temperature=1e-3, seed=2)
    assert torch.allclose(iv.coordinate_masks(), torch.ones(1, D))
    assert torch.allclose(iv(base, src), src, atol=F32_ATOL)
    half = das.BoundlessRotatedSpaceIntervention(D, init_fraction=0.25, temperature=1e-3)
    assert half.coordinate_masks().sum().item() == pytest.approx(4.0)


@pytest.mark.parametrize("kind", ["full", "low_rank", "boundless"])
@pytest.mark.parametrize("orth", ["matrix_exp", "cayley", "householder"])
def test_rotation_stays_orthogonal_through_training(kind, orth):
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(D, 2)
    base, s1, s2 = _acts(256, seed=6)
    data = das.InterchangeData(base, torch.stack([s1, s2]),
                               torch.randint(0, 2, (256, 2), generator=g).bool(),
                               torch.randint(0, 2, (256,), generator=g))
    if kind == "full":
        iv = das.RotatedSpaceIntervention(D, [(0, 8), (8, 16)], orthogonal_map=orth)
    elif kind == "low_rank":
        iv = das.LowRankRotatedSpaceIntervention(D, 6, [(0, 3), (3, 6)], orthogonal_map=orth)
    else:
        iv = das.BoundlessRotatedSpaceIntervention(D, [(0, 8), (8, 16)], orthogonal_map=orth)
    before = iv.R.detach().clone()
    for p in head.parameters():
        p.requires_grad_(False)
    out = das.train_das(iv, head, data, epochs=5, batch_size=32, lr=0.05, seed=0)
    assert not torch.allclose(iv.R.detach(), before)          # it did train
    assert das.orthogonality_error(iv) <= 1e-5
    assert len(out["curve"]) == 5 and out["steps"] == 40
    if kind == "boundless":
        assert iv.temperature == pytest.approx(0.1)


def test_training_learns_a_planted_subspace_and_the_random_control_does_not():
    """A head that reads only rotated coordinates 0..3 of a hidden rotation Q: DAS on that
    subspace reaches IIA near 1; the random control of the same rank stays near chance."""
    g = torch.Generator().manual_seed(0)
    Q = das.random_rotation(D, D, seed=9)
    w = torch.randn(4, generator=g)

    def head(h):
        score = (h @ Q[:, :4]) @ w
        return torch.stack([-score, score], -1) * 5

    n = 4096
    base, src, _ = _acts(n, seed=7)
    labels = ((src @ Q[:, :4]) @ w > 0).long()       # the source's value decides
    data = das.InterchangeData(base, src[None], torch.ones(n, 1, dtype=torch.bool), labels)
    iv = das.LowRankRotatedSpaceIntervention(D, 4, seed=0)
    das.train_das(iv, head, data, epochs=30, batch_size=512, lr=0.02, seed=0)
    assert das.iia(iv, head, data) > 0.95
    control = das.random_control(iv, seed=1)
    assert control.config() == iv.config()
    assert not any(p.requires_grad for p in control.parameters())
    assert das.iia(control, head, data) < 0.8
    with pytest.raises(das.DASError, match="no trainable"):
        das.train_das(control, head, data, epochs=1)


def test_batch_shuffle_keeps_each_block_of_batch_size_together():
    """shuffle="batches" (the tutorial's sampler): every batch is one run of consecutive
    examples; the loss seen per step equals that of training on exactly those blocks."""
    n, bs = 96, 32
    base, s1, _ = _acts(n, seed=11)
    seen = []

    def head(h):
        seen.append(h.detach().clone())
        return torch.stack([h[:, 0], -h[:, 0]], -1)

    data = das.InterchangeData(base, s1[None], torch.zeros(n, 1, dtype=torch.bool),
                               torch.zeros(n, dtype=torch.long))
    iv = das.RotatedSpaceIntervention(D, seed=0)
    das.train_das(iv, head, data, epochs=2, batch_size=bs, lr=1e-3, seed=0, shuffle="batches")
    blocks = {tuple(base[i:i + bs].flatten().tolist()) for i in range(0, n, bs)}
    assert len(seen) == 6
    for h in seen:                                   # no swap: the head sees the bases
        assert tuple(h.flatten().tolist()) in blocks
    with pytest.raises(das.DASError, match="shuffle"):
        das.train_das(iv, head, data, epochs=1, shuffle="rows")


def test_mlp_init_torch_and_normal_differ_and_are_seeded():
    a, b = MLP(16, 16, 3, seed=3, init="torch"), MLP(16, 16, 3, seed=3, init="torch")
    c = MLP(16, 16, 3, seed=3, init="normal")
    assert torch.equal(a.blocks[0].weight, b.blocks[0].weight)
    assert float(c.blocks[0].weight.std()) == pytest.approx(0.02, rel=0.2)
    assert float(a.blocks[0].weight.abs().max()) <= 0.25 + 1e-6   # U(-1/sqrt(16), 1/sqrt(16))
    assert float(a.blocks[0].bias.abs().sum()) > 0 and float(c.blocks[0].bias.abs().sum()) == 0


@pytest.mark.parametrize("kind", ["full", "low_rank", "boundless"])
def test_save_and_load_safetensors(tmp_path, kind):
    iv = das.build({"full": {"kind": "full", "d": D, "subspaces": [(0, 8), (8, 16)], "seed": 3},
                    "low_rank": {"kind": "low_rank", "d": D, "rank": 5, "seed": 3},
                    "boundless": {"kind": "boundless", "d": D, "seed": 3,
                                  "init_fraction": 0.3}}[kind])
    path = das.save_intervention(iv, tmp_path / "rot.safetensors", {"layer": 0})
    back, meta = das.load_intervention(path)
    assert meta == {"layer": 0} and back.config()["kind"] == kind
    assert torch.allclose(back.R, iv.R, atol=F32_ATOL)
    base, src, _ = _acts(seed=8)
    assert torch.allclose(back(base, src), iv(base, src), atol=F32_ATOL)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    with pytest.raises(FileNotFoundError, match="train and save"):
        das.load_intervention(tmp_path / "missing.safetensors")


def test_through_lib_hooks_gradients_reach_the_rotation():
    from lib.core.hooks import capture, patch
    from lib.core.models import load_model

    lm = load_model("tiny-random-llama")
    base_ids, src_ids = lm.tokenize("abcdef"), lm.tokenize("ghijkl")
    site = "blocks.0.resid_post"
    with capture(lm, [site]) as cache:
        lm.model(input_ids=src_ids)
    d = cache[site].shape[-1]
    src = cache[site][:, [2, 3]]
    iv = das.LowRankRotatedSpaceIntervention(d, 2, seed=0)
    hook_iv = das.hooks_intervention(iv, site, src, positions=(2, 3))
    assert hook_iv.kind == "function"
    with patch(lm, [hook_iv]):
        logits = lm.model(input_ids=base_ids).logits
    logits[0, -1].logsumexp(-1).backward()
    grads = [p.grad for p in iv.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # a full-rank rotation over all dimensions equals patching in the source activation
    full = das.RotatedSpaceIntervention(d, seed=1)
    with torch.no_grad():
        with patch(lm, [das.hooks_intervention(full, site, cache[site])]):
            patched = lm.model(input_ids=base_ids).logits
        clean_src = lm.model(input_ids=src_ids).logits
    assert torch.allclose(patched, clean_src, atol=1e-4)


def test_hand_built_mlp_accuracy_and_vanilla_half_swap_iia():
    model = hierarchical_equality(object_dim=2)
    net = hand_built_equality_mlp()
    x, y = model.factual_dataset(100_000, seed=0)
    assert accuracy(net, encode(x, model.inputs), y) == 1.0
    data = interchange_data(net, 0, model.counterfactual_dataset(2048, seed=1))
    vanilla = das.RotatedSpaceIntervention(8, [(0, 4), (4, 8)])
    vanilla.set_rotation(torch.eye(8))
    assert das.iia(vanilla, lambda h: net.forward_from(0, h), data) == 1.0
    # swapping the wrong halves breaks it: the check can fail
    wrong = das.RotatedSpaceIntervention(8, [(4, 8), (0, 4)])
    wrong.set_rotation(torch.eye(8))
    assert das.iia(wrong, lambda h: net.forward_from(0, h), data) < 0.9


def test_mlp_save_load(tmp_path):
    net = MLP(seed=1)
    path = save_mlp(net, tmp_path / "mlp.safetensors", {"note": "x"})
    back, meta = load_mlp(path)
    x = torch.randn(5, 16)
    assert torch.equal(back(x), net(x)) and meta == {"note": "x"}


def test_bad_configuration_is_named():
    with pytest.raises(das.DASError, match="overlap"):
        das.RotatedSpaceIntervention(D, [(0, 9), (8, 16)])
    with pytest.raises(das.DASError, match="inside"):
        das.RotatedSpaceIntervention(D, [(0, 17)])
    with pytest.raises(das.DASError, match="rank"):
        das.LowRankRotatedSpaceIntervention(D, 0)
    with pytest.raises(das.DASError, match="orthogonal_map"):
        das.RotatedSpaceIntervention(D, orthogonal_map="qr")
    iv = das.RotatedSpaceIntervention(D, [(0, 8), (8, 16)])
    base, s1, _ = _acts()
    with pytest.raises(das.DASError, match="one per subspace"):
        iv(base, [s1])
    with pytest.raises(das.DASError, match="width"):
        iv(base[:, :8], s1[:, :8])
    with pytest.raises(ValueError, match="layer"):
        MLP().hidden(base, 3)


@pytest.mark.parametrize("orth", ["householder", "matrix_exp", "cayley"])
def test_training_does_not_depend_on_the_global_generator(orth):
    # PyTorch completes a d x k (k < d) start into a d x d base with torch.randn; unseeded, the
    # base (and so the trained rotation) changed with whatever had drawn random numbers before
    torch.manual_seed(0)
    base, src = torch.randn(64, 12), torch.randn(64, 12)
    target = torch.randint(0, 3, (64,))
    head = torch.nn.Linear(12, 3)
    data = das.InterchangeData(base, src[None], torch.ones(64, 1, dtype=torch.bool), target)
    trained = []
    for draws in (0, 7):
        torch.rand(draws)
        before = torch.random.get_rng_state()
        module = das.LowRankRotatedSpaceIntervention(12, 3, seed=5, orthogonal_map=orth)
        assert torch.equal(torch.random.get_rng_state(), before), "the global generator moved"
        das.train_das(module, head, data, epochs=2, batch_size=16, lr=0.05, seed=1)
        trained.append(module.R.detach().clone())
    assert torch.equal(trained[0], trained[1])
    control = das.random_control(module, seed=2)
    again = das.random_control(module, seed=2)
    assert torch.equal(control.R, again.R)


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_networks_trained_together_equal_each_trained_alone(loss):
    """lib.studies.das.mlp.train_mlps stacks networks into batched matmuls; each must come out as train_mlp
    (one at a time) makes it, curves included, so one cache serves both. Batched and single
    matmuls round differently on some kernels (AVX512 here; bit for bit under AVX2 and the
    default kernels), so: equal within the float32 tolerance."""
    model = hierarchical_equality(object_dim=4)
    seeds = [3, 7, 11]
    data = [model.factual_dataset(600, seed=s) for s in seeds]
    xs = [encode(x, model.inputs) for x, _ in data]
    ys = [y for _, y in data]
    evals = [(xs[i][:100], ys[i][:100]) for i in range(3)]
    together = [MLP(seed=s, init="torch") for s in seeds]
    curves = train_mlps(together, xs, ys, 2, 64, 1e-2, seeds, evals, loss=loss)
    for i, s in enumerate(seeds):
        alone = MLP(seed=s, init="torch")
        curve = train_mlp(alone, xs[i], ys[i], 2, 64, 1e-2, s, *evals[i], loss=loss)
        assert [sorted(row) for row in curve] == [sorted(row) for row in curves[i]]
        for row, stacked in zip(curve, curves[i]):
            assert_f32_close([float(v) for v in row.values()],
                             [float(stacked[k]) for k in row], msg=str(row))
        for a, b in zip(alone.state_dict().values(), together[i].state_dict().values()):
            assert_f32_close(a, b)
    assert not any(p.requires_grad for net in together for p in net.parameters())
    with pytest.raises(ValueError, match="one training set and seed per network"):
        train_mlps(together, xs[:2], ys, seeds=seeds)
    with pytest.raises(ValueError, match="one shape"):
        train_mlps([MLP(h_dim=16), MLP(h_dim=8)], xs[:2], ys[:2])


def test_task_networks_share_the_cache_of_task_network_and_selection_takes_the_best(tmp_path):
    from lib.studies.das import mlp_das

    model = hierarchical_equality(object_dim=4)
    args = dict(n_train=512, n_test=64, epochs=1, batch_size=64, lr=1e-2, init="torch",
                cache_dir=tmp_path)
    nets = mlp_das.task_networks(model, [0, 1, 2], group=2, **args)
    assert [info["cached"] for _, info in nets] == [False] * 3
    alone, info = mlp_das.task_network(model, seed=1, **args)
    assert info["cached"] and info["test_accuracy"] == nets[1][1]["test_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(),
                                                 nets[1][0].state_dict().values()))
    train = model.counterfactual_dataset(256, seed=5)
    val = model.counterfactual_dataset(128, seed=6)
    chosen, rows = mlp_das.select_network([(s, n) for s, (n, _) in zip([0, 1, 2], nets)], 0,
                                          train, val, epochs=1, batch_size=64, lr=1e-2, seed=0)
    assert [r["seed"] for r in rows] == [0, 1, 2]
    assert chosen == max(rows, key=lambda r: r["validation_iia"])["seed"]
    assert all(0 <= r["validation_iia"] <= 1 and 0 <= r["control_iia"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="at least one candidate"):
        mlp_das.select_network([], 0, train, val, 1, 64, 1e-2, 0)


# --- balanced IIA and the wrong-model grid (lib.studies.das.scores, mlp_grid) --------------------

def test_balanced_iia_and_shares_on_hand_made_predictions():
    from lib.studies.das.scores import balanced_iia, class_iia, iia_scores

    labels = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0])       # 6 True, 2 False
    preds = torch.tensor([1, 1, 1, 1, 1, 0, 0, 1])        # True: 5 of 6 right; False: 1 of 2
    assert class_iia(preds, labels) == [0.5, 5 / 6]
    assert balanced_iia(preds, labels) == pytest.approx((0.5 + 5 / 6) / 2)   # 0.6667
    scores = iia_scores(preds, labels, factual_predictions=torch.tensor([1, 0, 1, 0, 1, 1, 1, 1]))
    assert scores["iia"] == 6 / 8 and scores["label_true_share"] == 6 / 8
    assert scores["prediction_true_share"] == 6 / 8 and scores["factual_true_share"] == 6 / 8
    # always True: plain IIA is the True share of the labels, balanced IIA one half
    ones = torch.ones(8, dtype=torch.long)
    assert iia_scores(ones, labels)["iia"] == 0.75 and balanced_iia(ones, labels) == 0.5
    # a class no example has is left out of the mean (and reported as None)
    assert class_iia(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1])) == [None, 2 / 3]
    assert balanced_iia(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1])) == 2 / 3
    with pytest.raises(ValueError, match="one length"):
        balanced_iia(torch.tensor([1, 0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="class indices"):
        balanced_iia(torch.tensor([1, 0]), torch.tensor([1, 2]))


def _always_true_network() -> MLP:
    net = MLP(init="torch")
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.tensor([0.0, 1.0]))     # class 1 (True) on every input
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@pytest.mark.parametrize("rotation_seed", [0, 1, 2])
def test_a_grid_cell_of_a_network_that_always_answers_true_scores_one_half(rotation_seed):
    """The failure the issue found: a network answering True on (nearly) every input of another
    pairing scores the True share of the labels with plain IIA, whatever the rotation; balanced
    IIA is 0.5 for every rotation, and the shares say why."""
    from lib.studies.das import mlp_grid

    test = mlp_grid.task_model("ABAB").counterfactual_dataset(512, seed=3)
    module = das.random_control(das.RotatedSpaceIntervention(16, [(0, 8), (8, 16)], seed=0),
                                seed=rotation_seed)
    scores = mlp_grid.cell_scores(_always_true_network(), 0, module, test)
    assert scores["balanced_iia"] == 0.5 and scores["class_iia"] == [0.0, 1.0]
    assert scores["iia"] == scores["label_true_share"] == float(test.labels.float().mean())
    assert scores["factual_true_share"] == 1.0 and scores["prediction_true_share"] == 1.0


def test_shared_inputs_vary_every_pairings_variables():
    from lib.studies.das import mlp_grid

    assert len(mlp_grid.SHARED_PATTERNS) == 10 and "ABCD" in mlp_grid.SHARED_PATTERNS
    for pairing in mlp_grid.TASKS:
        data = mlp_grid.task_model(pairing, "shared").counterfactual_dataset(2000, seed=1)
        share = float(data.base_labels.float().mean())
        assert 0.7 < share < 0.9        # 8 of the 10 patterns are True under each pairing
    with pytest.raises(ValueError, match="inputs must be one of"):
        mlp_grid.task_model("AABB", "mixed")


@pytest.mark.parametrize("n_networks,n_train,name", [
    (0, 1000, "GRID_NETWORKS"), (65, 1000, "GRID_NETWORKS"), (True, 1000, "GRID_NETWORKS"),
    (8, 0, "GRID_N_TRAIN"), (8, 10_000_001, "GRID_N_TRAIN"), (8, 1.5, "GRID_N_TRAIN")])
def test_grid_refuses_bad_sizes_before_training(n_networks, n_train, name, tmp_path):
    from lib.studies.das import mlp_grid, mlp_study

    with pytest.raises(ValueError, match=rf"{name} must be .*; choose"):
        mlp_grid.wrong_model_grid("independent", {"cache_dir": tmp_path}, {}, 64, n_train,
                                  n_networks, 0, mlp_study.counterfactuals, progress=False)
    assert not list(tmp_path.iterdir())    # nothing was trained or cached


def test_grid_result_has_its_declared_shape(tmp_path):
    from lib.core.schema import SchemaError
    from lib.studies.das import mlp_grid, mlp_study

    mlp_args = dict(n_train=512, n_test=64, epochs=1, batch_size=128, lr=1e-2, seed=0,
                    init="torch", cache_dir=tmp_path)
    das_args = dict(epochs=1, batch_size=128, lr=1e-2, seed=0)
    grid = mlp_grid.wrong_model_grid("independent", mlp_args, das_args, 128, 256, 2, 0,
                                     mlp_study.counterfactuals, progress=False)
    mlp_study.SCHEMAS["wrong_model"]({**grid, "params_key": "x"})
    assert len(grid["cells"]) == 3 * 3 * 2 and grid["seeds"] == [0, 1]
    for cell in grid["cells"]:
        assert [r["seed"] for r in cell["per_network"]] == [0, 1]
        values = sorted(r["balanced_iia"] for r in cell["per_network"])
        s = cell["balanced_iia"]
        assert s["n"] == 2 and s["min"] == values[0] and s["max"] == values[1]
        assert s["median"] == pytest.approx(sum(values) / 2)
        assert s["min"] <= s["ci_low"] <= s["ci_high"] <= s["max"]
        assert 0 < cell["label_true_share"] < 1
    assert set(grid["tasks"]) == set(mlp_grid.TASKS) and len(grid["networks"]) == 6
    own = mlp_study.task_table(grid)
    assert list(own["task"]) == list(mlp_grid.TASKS)
    assert len(mlp_study.grid_table(grid, "shared")) == 9
    broken = {**grid, "params_key": "x", "cells": [{k: v for k, v in grid["cells"][0].items()
                                                    if k != "label_true_share"}]}
    with pytest.raises(SchemaError, match="label_true_share"):
        mlp_study.SCHEMAS["wrong_model"](broken)
    missing = {**grid, "params_key": "x", "cells": grid["cells"][1:]}
    with pytest.raises(SchemaError, match="not one of each"):
        mlp_study.SCHEMAS["wrong_model"](missing)


def test_notebook_08_refuses_grid_sizes_out_of_its_bounds_before_any_kernel():
    from lib.core import paths
    from lib.core.params import ParameterError, check_params
    from lib.studies.das import mlp_study

    nb = paths.NOTEBOOKS / "08_das_mlp.ipynb"
    for name, bad in (("GRID_NETWORKS", 0), ("GRID_NETWORKS", 65), ("GRID_N_TRAIN", 0),
                      ("GRID_N_TRAIN", 10_000_001)):
        with pytest.raises(ParameterError, match=name):
            check_params([nb], {name: bad})
    check_params([nb], {"GRID_NETWORKS": 64, "GRID_N_TRAIN": 1280000})
    # the study object refuses them too (a caller that skips the runner), before any work
    from lib.core.params import read_parameters
    values = {k: p.default for k, p in read_parameters(nb).items()}
    with pytest.raises(ValueError, match="GRID_NETWORKS"):
        mlp_study.Notebook({**values, "GRID_NETWORKS": 0, "THREADS": 0})
