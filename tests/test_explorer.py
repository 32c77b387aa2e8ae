"""The prompt explorer's computations on a tiny random model (notebook 04's logic)."""

import json

import pytest
import torch

from lib import explorer as E
from lib.plots import explorer as ep
from lib.hooks import count_hooks
from lib.prompts import PromptPairs

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
        torch.testing.assert_close(torch.tensor(swapped.prob.tolist()), values, atol=1e-5,
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
    with pytest.raises(IndexError, match="0 to 1"):
        ex.view("cpp_python", 2, 0, "mlp_out")
    with pytest.raises(ValueError, match="out of range"):
        ex.view("cpp_python", 0, 9, "mlp_out")
    with pytest.raises(ValueError, match="component"):
        ex.view("cpp_python", 0, 0, "head_out")


def test_no_widgets_outside_a_front_end(llama, monkeypatch):
    ok, why = ep.widget_frontend(True)
    assert not ok and why
    assert ep.widget_frontend(False) == (False, "INTERACTIVE is False")
    monkeypatch.setenv("CAUSAL_HEADLESS", "1")
    assert ep.widget_frontend(True)[0] is False


def test_widgets_build_and_follow_changes(llama):
    pytest.importorskip("ipywidgets")
    ex = E.Explorer(llama, [PAIRS], top_k=3, n_continuation=1)
    box = ep.build_widgets(ex, "cpp_python", 0, 0, "mlp_out")
    assert ("cpp_python", 0, 0, "mlp_out") in ex._cache
    layer_slider = box.children[1]
    layer_slider.value = 1
    assert ("cpp_python", 0, 1, "mlp_out") in ex._cache
    assert "Sort a vector" not in box.children[3].value
    box.children[0].children[1].value = 1
    assert "Sort a vector in C++" in box.children[3].value


def test_show_token():
    assert E.show_token(" a\n") == "␣a⏎"
    assert E.show_token("") == "∅"
