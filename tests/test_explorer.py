"""The prompt explorer's computations on a tiny random model (notebook 04's logic)."""

import json

import pandas as pd
import pytest
import torch

from conftest import F32_ATOL
from lib.studies import explorer as E
from lib.plots import explorer as ep
from lib.ui import explorer as ui_explorer
from lib.core.hooks import count_hooks
from lib.core.prompts import PromptPairs, load_pairs

PAIRS = PromptPairs("cpp_python", ("cpp", "python"),
                    ("Write C++ code now", "Sort a vector in C++"),
                    ("Write Python code", "Sort a list in Python please"))


def token_sets_for(llama, ids_cpp, ids_py, model=None):
    entry = lambda i: {"id": int(i), "token": llama.tokenizer.decode([int(i)]), "score": 1.0}
    return {"model": model or llama.name, "top_n": len(ids_cpp),
            "pairs": {"cpp_python": {"cpp": [entry(i) for i in ids_cpp],
                                     "python": [entry(i) for i in ids_py]}},
            "provenance": {}}


def probs_of(llama, text):
    ids = llama.tokenizer(text)["input_ids"]
    with torch.no_grad():
        return torch.softmax(llama.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)


def test_view_shapes_and_clean_values(llama):
    ex = E.Explorer(llama, [PAIRS], None, "no token sets here", top_k=5, n_continuation=4)
    view = ex.view("cpp_python", 1, 0, "mlp_out")
    assert count_hooks(llama.model) == 0
    assert len(view.texts) == 4 and set(view.texts.condition) == {"clean", "swapped"}
    assert len(view.top) == 2 * 2 * 5
    assert view.masses.empty and view.message == "no token sets here"
    # the clean top token of the cpp prompt is the argmax of an unpatched run
    clean = probs_of(llama, PAIRS.a[1])
    row = view.top[(view.top.side == "b_into_a") & (view.top.condition == "clean")
                   & (view.top["rank"] == 1)].iloc[0]
    assert row.token_id == int(clean.argmax())
    assert row.prob == pytest.approx(float(clean.max()), rel=1e-5)
    # continuation: 4 greedy tokens, the first is the clean argmax
    text = view.texts[(view.texts.side == "b_into_a") & (view.texts.condition == "clean")]
    assert text.continuation.iloc[0].startswith(llama.tokenizer.decode([int(clean.argmax())]))


def test_swapping_the_last_residual_gives_the_source_distribution(llama):
    """Replacing the final block's residual output at the last token with the paired prompt's
    makes the next-token distribution exactly the paired prompt's: a check that the swap
    really writes the source activation at the base's last position."""
    ex = E.Explorer(llama, [PAIRS], top_k=8, n_continuation=2)
    view = ex.view("cpp_python", 0, llama.n_layers - 1, "resid_post")
    for side, source_text in (("b_into_a", PAIRS.b[0]), ("a_into_b", PAIRS.a[0])):
        swapped = view.top[(view.top.side == side) & (view.top.condition == "swapped")]
        src = probs_of(llama, source_text)
        values, order = src.topk(8)
        assert swapped.token_id.tolist() == order.tolist()
        torch.testing.assert_close(torch.tensor(swapped.prob.tolist()), values, atol=F32_ATOL,
                                   rtol=1e-4)


def test_masses_are_sums_over_the_set(llama):
    clean_a = probs_of(llama, PAIRS.a[0])
    top_ids = clean_a.topk(3).indices.tolist()
    ts = token_sets_for(llama, top_ids[:2], [top_ids[2], 7])
    ex = E.Explorer(llama, [PAIRS], ts, top_k=3, n_continuation=1)
    view = ex.view("cpp_python", 0, 1, "attn_out")
    table = view.mass_table()
    row = table[(table.side == "b_into_a") & (table.token_set == "cpp")].iloc[0]
    assert row.clean == pytest.approx(float(clean_a[top_ids[:2]].sum()), rel=1e-5)
    row = table[(table.side == "b_into_a") & (table.token_set == "python")].iloc[0]
    assert row.clean == pytest.approx(float(clean_a[[top_ids[2], 7]].sum()), rel=1e-5)
    assert (table.change == table.swapped - table.clean).all()
    assert ep.plot_masses(view) is not None and ep.plot_top_tokens(view) is not None


def test_swap_changes_something_at_some_layer(llama):
    ex = E.Explorer(llama, [PAIRS], top_k=5, n_continuation=1)
    moved = []
    for layer in range(llama.n_layers):
        top = ex.view("cpp_python", 0, layer, "mlp_out").top
        clean = top[(top.side == "b_into_a") & (top.condition == "clean")].prob.to_numpy()
        swapped = top[(top.side == "b_into_a") & (top.condition == "swapped")].prob.to_numpy()
        moved.append(abs(clean - swapped).max())
    assert max(moved) > 1e-4


def test_token_set_problems_give_messages(llama, tmp_path):
    sets, message = E.token_sets_or_message("tiny-random-llama", tmp_path)
    assert sets is None and "01_reverse_intervention" in message
    (tmp_path / "tiny-random-llama.json").write_text(json.dumps(token_sets_for(llama, [5], [6])))
    sets, message = E.token_sets_or_message("tiny-random-llama", tmp_path)
    assert message is None and sets["pairs"]["cpp_python"]["cpp"][0]["id"] == 5
    other = PromptPairs("finance_medical", ("finance", "medical"), ("a b", "c d"), ("e f", "g h"))
    view = E.Explorer(llama, [other], sets, top_k=2, n_continuation=1).view(
        "finance_medical", 0, 0, "attn_out")
    assert view.masses.empty and "finance_medical" in view.message
    bad = token_sets_for(llama, [10 ** 6], [6])
    view = E.Explorer(llama, [PAIRS], bad, top_k=2, n_continuation=1).view("cpp_python", 0, 0,
                                                                        "mlp_out")
    assert view.masses.empty and "outside the vocabulary" in view.message


def test_bad_choices_are_refused(llama):
    ex = E.Explorer(llama, [PAIRS])
    with pytest.raises(KeyError, match="unknown pair"):
        ex.view("rust_go", 0, 0, "mlp_out")
    with pytest.raises(E.PromptIndexError, match=r"prompt index 2 is out of range .* 0\.\.1"):
        ex.view("cpp_python", 2, 0, "mlp_out")
    with pytest.raises(IndexError, match=r"0\.\.1"):   # also an IndexError / ValueError
        ex.view("cpp_python", -1, 0, "mlp_out")
    with pytest.raises(ValueError, match="out of range"):
        ex.view("cpp_python", 0, 9, "mlp_out")
    with pytest.raises(ValueError, match="component"):
        ex.view("cpp_python", 0, 0, "head_out")
    assert not ex._cache   # refused before any model run
    assert ex.prompt_range("cpp_python") == range(2)


def test_prompt_index_is_checked_against_its_file_not_clamped():
    other = PromptPairs("finance_medical", ("finance", "medical"), ("a", "b", "c"),
                        ("d", "e", "f"), "prompt_set/finance_medical.json")
    sets = [PAIRS, other]
    assert E.check_prompt_index(sets, "finance_medical", 2) == 2
    with pytest.raises(E.PromptIndexError) as err:
        E.check_prompt_index(sets, "cpp_python", 2, "PROMPT_INDEX")
    assert "PROMPT_INDEX 2" in str(err.value) and "0..1" in str(err.value)
    with pytest.raises(E.PromptIndexError, match=r"finance_medical.json has 3 prompt pairs.*0\.\.2"):
        E.check_prompt_index({p.name: p for p in sets}, "finance_medical", 3, "PROMPT_INDEX")
    with pytest.raises(E.PromptIndexError, match="integer"):
        E.check_prompt_index(sets, "cpp_python", 1.5)
    with pytest.raises(E.PromptIndexError, match="integer"):
        E.check_prompt_index(sets, "cpp_python", True)
    with pytest.raises(KeyError, match="PROMPT_FILES"):
        E.check_prompt_index(sets, "rust_go", 0)


# --- what the token-set file says about the sets ---------------------------------------------

def new_style_token_sets(llama):
    """A token-set file with the optional keys of the split/reference format (hand-made)."""
    entry = lambda i, score: {"id": i, "token": llama.tokenizer.decode([i]), "score": score}
    sets = token_sets_for(llama, list(range(65, 65 + 12)), list(range(97, 97 + 12)))
    sets["reference"] = {"cpp_python": {"cpp": [entry(48, 2.0), entry(49, 1.0)],
                                        "python": [entry(50, 3.0)]}}
    sets["split"] = {"cpp_python": {"seed": 7, "discovery": [1], "held_out": [0],
                                    "held_out_fraction": 0.5}}
    sets["score"] = {"name": "dlogp", "meaning": "mean change of log max(p, floor)"}
    return sets


def test_token_set_table_split_and_score_from_a_new_style_file(llama):
    ts = new_style_token_sets(llama)
    table = E.token_set_table(ts, "cpp_python", ("cpp", "python"), n=10)
    assert list(table.columns) == ["cpp", "cpp score", "python", "python score",
                                   "reference cpp", "reference python"]
    assert len(table) == 10 and table.index[0] == 1           # top 10 of 12, ranked from 1
    assert table["cpp"].iloc[0] == E.show_token(llama.tokenizer.decode([65]))
    assert table["python"].iloc[9] == E.show_token(llama.tokenizer.decode([106]))
    dec = lambda i: E.show_token(llama.tokenizer.decode([i]))
    assert table["reference cpp"].tolist()[:2] == [dec(48), dec(49)]
    assert pd.isna(table["reference cpp"].iloc[2])                 # shorter lists padded
    assert table["reference python"].iloc[0] == dec(50)
    assert E.split_of(ts, "cpp_python", 0) == "held_out"
    assert E.split_of(ts, "cpp_python", 1) == "discovery"
    assert E.split_of(ts, "cpp_python", 5) == "outside"
    assert "found without it" in E.split_text("outside", "cpp_python", 5)
    note = E.sets_note(ts, "cpp_python")
    assert "dlogp" in note and "mean change of log" in note and "seed 7" in note
    ex = E.Explorer(llama, [PAIRS], ts, top_k=2, n_continuation=1)
    held, disc = ex.view("cpp_python", 0, 0, "mlp_out"), ex.view("cpp_python", 1, 0, "mlp_out")
    assert held.split == "held_out" and "held-out half" in held.split_note
    assert disc.split == "discovery" and "discovery half" in disc.split_note
    assert held.sets.equals(table) and held.sets_note == note
    assert not held.masses.empty                                # masses still use pairs[...]


def test_old_style_files_still_work(llama):
    ts = token_sets_for(llama, [65, 66], [97])     # today's files: no reference/split/score
    table = E.token_set_table(ts, "cpp_python", ("cpp", "python"))
    assert list(table.columns) == ["cpp", "cpp score", "python", "python score"]
    assert table["python"].iloc[0] == E.show_token(llama.tokenizer.decode([97]))
    assert pd.isna(table["python"].iloc[1])
    assert E.split_of(ts, "cpp_python", 0) is None
    assert "no discovery/held-out split" in E.sets_note(ts, "cpp_python")
    view = E.Explorer(llama, [PAIRS], ts, top_k=2, n_continuation=1).view("cpp_python", 0, 0,
                                                                         "attn_out")
    assert view.split is None and view.split_note is None and view.sets is not None
    assert E.token_set_table(None, "cpp_python", ("cpp", "python")) is None
    assert E.token_set_table(ts, "finance_medical", ("finance", "medical")) is None
    broken = dict(ts, split={"cpp_python": {"seed": 0}}, reference="nonsense")
    assert E.split_of(broken, "cpp_python", 0) is None
    assert "reference cpp" not in E.token_set_table(broken, "cpp_python", ("cpp", "python"))


def test_render_shows_sets_and_split(llama, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs: shown.extend(objs))
    ts = new_style_token_sets(llama)
    view = E.Explorer(llama, [PAIRS], ts, top_k=2, n_continuation=1).view("cpp_python", 0, 0,
                                                                         "mlp_out")
    ep.render(view)
    markdown = " ".join(o.data for o in shown if isinstance(o, IPython.display.Markdown))
    assert "held-out half" in markdown and "dlogp" in markdown and "reference" in markdown
    tables = [o for o in shown if isinstance(o, pd.DataFrame)]
    assert any("reference cpp" in t.columns for t in tables)


# --- widgets ----------------------------------------------------------------------------------

def test_no_widgets_outside_a_front_end(llama, monkeypatch):
    ok, why = ui_explorer.widget_frontend(True)
    assert not ok and why
    assert ui_explorer.widget_frontend(False) == (False, "INTERACTIVE is False")
    monkeypatch.setenv("CAUSAL_HEADLESS", "1")
    assert ui_explorer.widget_frontend(True)[0] is False


def spy_on_view(ui, monkeypatch):
    """Record the UI's state, status text, stale mark and controls while a view computes."""
    seen = []
    original = ui.explorer.view

    def view(*args):
        seen.append({"choice": args, "state": ui.state, "status": ui.status.value,
                     "stale": ui_explorer.STALE_CLASS in ui.out._dom_classes,
                     "disabled": all(c.disabled for c in ui.controls)})
        return original(*args)

    monkeypatch.setattr(ui.explorer, "view", view)
    return seen


def test_widgets_show_busy_then_the_new_view(llama, monkeypatch):
    pytest.importorskip("ipywidgets")
    ex = E.Explorer(llama, [PAIRS], new_style_token_sets(llama), top_k=3, n_continuation=1)
    rendered = []
    ui = ui_explorer.ExplorerUI(ex, "cpp_python", 0, 0, "mlp_out", render_view=rendered.append)
    assert ui.state == "idle"
    seen = spy_on_view(ui, monkeypatch)
    ui.refresh()
    assert ui.state == "done" and rendered[-1].layer == 0
    ui.layer_w.value = 1
    during = seen[-1]
    assert during["choice"] == ("cpp_python", 0, 1, "mlp_out")
    assert during["state"] == "computing" and during["stale"] and during["disabled"]
    assert "computing" in during["status"]
    assert "pair cpp_python, prompt 0, layer 1, component mlp_out" in during["status"]
    # afterwards: the new view, status done, nothing greyed or disabled
    assert ui.state == "done" and rendered[-1].layer == 1
    assert "computing" not in ui.status.value and "layer 1" in ui.status.value
    assert ui_explorer.STALE_CLASS not in ui.out._dom_classes
    assert not any(c.disabled for c in ui.controls)
    # the prompt line follows the index and says which half of the split it is in
    assert "held-out half" in ui.prompt_w.value
    ui.index_slider.value = 1
    assert ui.index_w.value == 1 and rendered[-1].index == 1
    assert "Sort a vector in C++" in ui.prompt_w.value and "discovery half" in ui.prompt_w.value
    assert ui.range_w.value == "of 0..1"
    ui.index_w.value = 0                          # typing an index moves the slider too
    assert ui.index_slider.value == 0 and rendered[-1].index == 0


def test_widgets_report_an_out_of_range_index_with_its_range(llama, monkeypatch):
    pytest.importorskip("ipywidgets")
    other = PromptPairs("finance_medical", ("finance", "medical"), ("a", "b", "c"),
                        ("d", "e", "f"))
    ex = E.Explorer(llama, [PAIRS, other], top_k=2, n_continuation=1)
    rendered = []
    ui = ui_explorer.ExplorerUI(ex, "finance_medical", 2, 0, "mlp_out", render_view=rendered.append)
    ui.refresh()
    assert ui.state == "done" and ui.range_w.value == "of 0..2" and ui.index_slider.max == 2
    n_views = len(rendered)
    ui.pair_w.value = "cpp_python"           # index 2 does not exist there: said, not clamped
    assert ui.index_w.value == 2 and ui.range_w.value == "of 0..1" and ui.index_slider.max == 1
    assert ui.state == "error" and isinstance(ui.last_error, E.PromptIndexError)
    assert "error" in ui.status.value and "0..1" in ui.status.value
    assert len(rendered) == n_views           # no view drawn for it
    assert ui_explorer.STALE_CLASS not in ui.out._dom_classes
    assert not any(c.disabled for c in ui.controls)
    ui.index_w.value = 1                      # a valid index again: back to a view
    assert ui.state == "done" and rendered[-1].index == 1 and ui.index_slider.value == 1
    ui.index_w.value = 99
    assert ui.state == "error" and "prompt index 99 is out of range" in ui.status.value
    assert ui.index_w.value == 99


def test_widgets_show_compute_errors(llama, monkeypatch):
    pytest.importorskip("ipywidgets")
    ex = E.Explorer(llama, [PAIRS], top_k=2, n_continuation=1)
    ui = ui_explorer.ExplorerUI(ex, "cpp_python", 0, 0, "mlp_out", render_view=lambda v: None)

    def broken(*args):
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(ex, "view", broken)
    ui.comp_w.value = "attn_out"
    assert ui.state == "error" and "RuntimeError: the model fell over" in ui.status.value
    assert isinstance(ui.last_error, RuntimeError)
    assert not any(c.disabled for c in ui.controls)


def test_build_widgets_renders_the_first_view(llama):
    pytest.importorskip("ipywidgets")
    ex = E.Explorer(llama, [PAIRS], top_k=3, n_continuation=1)
    ui = ui_explorer.build_widgets(ex, "cpp_python", 0, 0, "mlp_out", show=False)
    assert ("cpp_python", 0, 0, "mlp_out") in ex._cache and ui.state == "done"
    assert ui.box.children[-1] is ui.out and ui.status in ui.box.children


def test_show_token():
    assert E.show_token(" a\n") == "␣a⏎"
    assert E.show_token("") == "∅"


def test_notebook_04_refuses_an_out_of_range_prompt_index_with_its_range(tmp_path):
    """PROMPT_INDEX passes the parameter rule ``[0..]`` (the range depends on the file), so the
    notebook checks it against the pair file right after loading the file (before the model)."""
    from lib.core import paths
    from lib.runner import NotebookFailed, run_notebooks

    nb = paths.NOTEBOOKS / "04_prompt_visualization.ipynb"
    params = {"PROMPT_FILES": ["finance_medical.json"], "PAIR": "finance_medical",
              "PROMPT_INDEX": 500, "TOKEN_SETS_DIR": str(tmp_path)}
    n = len(load_pairs("finance_medical.json"))
    with pytest.raises(NotebookFailed) as err:
        run_notebooks([nb], ["tiny-random"], params, runs_dir=tmp_path / "runs", timeout=120,
                      progress=False)
    text = str(err.value)
    assert "PromptIndexError" in text and "PROMPT_INDEX 500 is out of range" in text
    assert f"finance_medical.json has {n} prompt pairs, so it must be in 0..{n - 1}" in text
