"""The tolerance contract of regenerated results (scripts/compare_results.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from compare_results import compare, rule_for  # noqa: E402


def _tokens(*pairs):
    return [{"id": i, "score": s, "token": f"t{i}"} for i, s in pairs]


def test_numbers_follow_the_float32_rule_unless_a_rule_widens_them():
    assert not compare({"x": 1.0}, {"x": 1.0 + 9e-6})["over"]
    assert compare({"x": 1.0}, {"x": 1.0 + 2e-5})["over"]                   # absolute near 1
    assert not compare({"x": 100.0}, {"x": 100.0 + 9e-4})["over"]           # relative above 1
    p = {"pairs": {"a": {"swap": {"top_vs_bottom": {"p_value": 0.5}}}}}
    q = {"pairs": {"a": {"swap": {"top_vs_bottom": {"p_value": 0.5005}}}}}
    out = compare(p, q)
    assert not out["over"] and out["widened"] == 1
    assert compare(p, {"pairs": {"a": {"swap": {"top_vs_bottom": {"p_value": 0.51}}}}})["over"]
    assert rule_for("/pairs/x/swap/attn_out/depth_control/both/kl/ratio_to_zero/rho")[0] == 1e-3
    assert rule_for("/scores/fisher")[0] is None


def test_non_numbers_and_shapes_must_match():
    assert compare({"a": "x"}, {"a": "y"})["other"]
    assert compare({"a": [1, 2]}, {"a": [1, 2, 3]})["other"]
    assert compare({"a": 1}, {"b": 1})["other"]
    assert not compare({"provenance": {"t": 1}}, {"provenance": {"t": 2}})["other"]


def test_token_lists_may_trade_places_only_at_a_tie():
    old = {"sets": _tokens((1, 0.9), (2, 0.5), (3, 0.30000001))}
    # token 3 and token 4 tie at the boundary: 3 leaves, 4 enters
    tied = {"sets": _tokens((1, 0.9), (2, 0.5), (4, 0.3))}
    out = compare(old, tied)
    assert not out["other"] and out["tokens_swapped"] == 1
    # a token far above the boundary cannot leave
    far = {"sets": _tokens((1, 0.9), (3, 0.30000001), (4, 0.3))}
    assert compare(old, far)["other"]
    # two tokens whose scores differ cannot exchange ranks
    swapped = {"sets": _tokens((2, 0.5), (1, 0.9), (3, 0.30000001))}
    assert compare(old, swapped)["other"]
    # a tie may exchange ranks
    tie = {"sets": _tokens((1, 0.5), (2, 0.5 + 1e-7), (3, 0.1))}
    tie_swapped = {"sets": _tokens((2, 0.5 + 1e-7), (1, 0.5), (3, 0.1))}
    assert not compare(tie, tie_swapped)["other"]


def test_edge_effects_get_the_logit_rule_and_engine_stats_are_no_result():
    old = {"records": [{"exact": 0.04, "estimate": 4.7}], "engine_stats": {"forwards": 12}}
    new = {"records": [{"exact": 0.04 + 5e-5, "estimate": 4.7 + 5e-5}],
           "engine_stats": {"forwards": 13, "joined": 2}}
    out = compare(old, new)
    assert not out["over"] and not out["other"] and out["widened"] == 2
    assert compare(old, {**new, "records": [{"exact": 0.04 + 2e-4, "estimate": 4.7}]})["over"]
