"""Notebook 09's DAS runs over seeds (:mod:`lib.studies.das.seeds`, ``das_runs(seeds=...)``):
which runs a cell trains, how they are named and stored, and each cell's mean and interval."""

import pytest
import torch

from lib.core import io
from lib.core.stats import mean_t_interval
from lib.plots.das_arithmetic import plot_iia, plot_iia_by_layer, plot_iia_by_model
from lib.studies.das import arithmetic_study as study
from lib.studies.das.seeds import above_control, cells, seed_list, separated

torch.set_num_threads(1)


def run(model, iia, control, seed, layer=22, loss=1.0):
    return {"model": model, "layer": layer, "rank": 64, "site": "all", "seed": seed,
            "iia": iia, "control_iia": control, "curve": [{"epoch": 1, "loss": loss}],
            "steps": 160}


def test_seed_list_starts_at_seed_and_refuses_no_runs():
    assert seed_list(0, 3) == [0, 1, 2] and seed_list(5, 1) == [5]
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="DAS_SEEDS"):
            seed_list(0, bad)


def test_a_cell_is_the_mean_of_its_seeds_with_students_interval():
    runs = [run(7, 0.9, 0.06, 0), run(7, 0.8, 0.05, 1), run(7, 0.85, 0.07, 2),
            run(1, 0.2, 0.08, 0, loss=3.0), run(1, 0.1, 0.08, 1, loss=2.0)]
    m7, m1 = cells(runs)
    assert (m7["model"], m7["seeds"], m1["seeds"]) == (7, [0, 1, 2], [0, 1])
    assert m7["iia"]["mean"] == pytest.approx(0.85) and m7["iia"]["n"] == 3
    # by hand: s = 0.05, t(0.975, 2) = 4.3027, half width 4.3027 * 0.05 / sqrt(3)
    assert m7["iia"]["ci_high"] - 0.85 == pytest.approx(4.302653 * 0.05 / 3 ** 0.5, rel=1e-5)
    assert m1["final_loss"]["mean"] == pytest.approx(2.5)
    assert m7["control_iia"] == mean_t_interval([0.06, 0.05, 0.07])
    assert above_control(m7)
    # two runs: t(0.975, 1) = 12.7 makes M1's interval [-0.49, 0.79], so no ranking is stated
    assert m1["iia"]["ci_low"] < 0 and not separated(m7, m1)
    # a wide interval overlapping the control's: not above it
    assert not above_control(cells([run(2, 0.3, 0.1, 0), run(2, 0.05, 0.1, 1)])[0])


def test_a_cell_of_one_run_separates_from_nothing():
    old = {k: v for k, v in run(7, 0.9, 0.06, 0).items() if k != "seed"}   # before seeds
    [cell] = cells([old])
    assert cell["seeds"] == [None] and cell["iia"]["n"] == 1
    assert cell["iia"]["ci_low"] == cell["iia"]["ci_high"] == 0.9
    assert not separated(cell, cells([run(1, 0.1, 0.05, 0), run(1, 0.12, 0.05, 1)])[0])
    assert not above_control(cell)


def test_the_cells_table_ranks_only_where_intervals_separate():
    runs = [run(7, v, 0.06, s) for s, v in enumerate((0.9, 0.91, 0.92))] \
        + [run(3, v, 0.06, s) for s, v in enumerate((0.3, 0.31, 0.32))] \
        + [run(4, v, 0.06, s) for s, v in enumerate((0.1, 0.5, 0.29))]
    table = study.cells_table(cells(runs))
    assert list(table["model"]) == ["M7", "M3", "M4"]
    assert list(table["above next row"]) == [True, False, False]   # M3 vs M4: overlapping
    assert list(table["above control"]) == [True, True, False]


def test_the_layer_figure_draws_bands_and_single_runs():
    runs = [run(m, 0.5 + 0.01 * s, 0.06, s, layer) for m in (1, 7) for layer in (14, 22)
            for s in range(3)]
    plot_iia_by_layer(cells(runs)).draw()
    plot_iia_by_layer(cells(runs[:1])).draw()   # one run: no interval, still drawn
    one_layer = [r for r in runs if r["layer"] == 22]
    plot_iia_by_model(cells(one_layer)).draw()
    # several layers: lines over layers; one layer: points per causal model
    assert "layer" == plot_iia(cells(runs), "t").mapping["x"]
    assert "model" == plot_iia(cells(one_layer), "t").mapping["x"]
    # one panel per causal model, named with its formula; a second rank or site is named too
    assert list(plot_iia_by_layer(cells(runs)).data["panel"].cat.categories) == [
        "M1 (X+Y)+Z", "M7 (X+Y+Z)"]
    ranked = runs + [{**r, "rank": 192} for r in runs if r["model"] == 1]
    assert list(plot_iia_by_layer(cells(ranked)).data["panel"].cat.categories) == [
        "M1 (X+Y)+Z, rank 64", "M1 (X+Y)+Z, rank 192", "M7 (X+Y+Z), rank 64"]


@pytest.fixture(scope="module")
def task(arithmetic_task):
    return arithmetic_task


def runs_of(task, folder, seeds, stored=None):
    units = io.UnitStore(folder / "units", {"DAS_LR": 0.01})
    return study.das_runs(task["lm"], [1, 7], [0], [4], {"all": None}, task["states"],
                          task["train_models"], task["test_pairs"], stored, units,
                          folder / "rotations", 64, 1, 32, 0.01, "independent", 0, seeds)


def test_seeds_add_runs_beside_the_first_seeds_own(task, tmp_path):
    one, modules, trained = runs_of(task, tmp_path / "a", None)
    assert trained == {"M1_L0_k4_all", "M7_L0_k4_all"} and [r["seed"] for r in one] == [0, 0]
    # the same computation (the stack of M1 and M7 at seed 0) run twice: equal
    three, modules3, trained3 = runs_of(task, tmp_path / "b", [0, 1, 2])
    assert [(r["model"], r["seed"]) for r in three] == [(1, 0), (1, 1), (1, 2), (7, 0), (7, 1),
                                                        (7, 2)]
    assert [three[0], three[3]] == one
    assert sorted(modules3) == sorted(modules) == ["M1_L0_k4_all", "M7_L0_k4_all"]
    assert "M7_L0_k4_all_s2" in trained3 and len(trained3) == 6
    # each seed starts elsewhere and trains on its own counterfactuals
    assert len({r["curve"][-1]["loss"] for r in three if r["model"] == 7}) == 3
    # adding seeds to a stored one-seed result trains only the new seeds
    _, _, added = runs_of(task, tmp_path / "a", [0, 1], stored={"runs": one})
    assert added == {"M1_L0_k4_all_s1", "M7_L0_k4_all_s1"}
    # a result written before seeds were counted (no "seed") is the first seed's
    legacy = [{k: v for k, v in r.items() if k != "seed"} for r in one]
    again, _, none = runs_of(task, tmp_path / "a", None, stored={"runs": legacy})
    assert none == set() and again == legacy
