"""Compare two result JSON files number by number under the repository's tolerance contract.

    python scripts/compare_results.py OLD.json NEW.json [--ignore key ...]

The tolerance contract: what a regeneration of a committed result may change when it runs on
another CPU (other kernels: AVX512, AVX2), at another thread count or through another batching
of the same computation. It is written once, here (:data:`CONTRACT`), and the README states it:

* every number: ``|a - b| <= 1e-5 * max(1, |a|)``: float32 keeps ~7 digits, and batched
  matmuls round with the size of what they sum (probabilities absolutely, logits and norms
  relatively);
* statistics that amplify rounding get the wider bound of their rule (below), each with the
  reason and the largest change seen;
* ranked token lists (``{"id", "score", ...}`` entries) are compared token by token: a token
  may enter or leave a list, or two may swap, only where its score is within the list's
  tolerance of the neighbour it trades places with (a boundary tie); counts of candidate
  tokens may move by one token whose score sits at zero, and a Jaccard overlap by one token.

Prints the largest absolute difference, every difference the contract does not allow (up to
20) and every non-numeric difference; exit code 1 when anything is outside the contract.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

RELATIVE = 1e-5   # the float32 rule of every number without a rule of its own

#: (path pattern, absolute bound, why): the first matching rule is the number's bound. Paths
#: look like ``/pairs/cpp_python/swap/attn_out/depth_control/both/kl/ratio_to_zero/rho``.
CONTRACT: list[tuple[str, float, str]] = [
    (r".*/depth_control/.*", 1e-3,
     "02's depth control divides effects that are ~0 on some prompts (share swap/(swap+zero), "
     "ratios to zero ablation), so float32 rounding of the effects is amplified; seen: 1.7e-5"),
    (r".*p_value$", 2e-3,
     "permutation and bootstrap p-values count resamples (steps of 1/N): a statistic moved "
     "by rounding flips a few of them; seen: 5 and 3 in 10,000"),
    (r".*/attribution/.*/(exact|estimate)$", 1e-4,
     "05's attribution effects are differences of logits of 8-17: their rounding is the "
     "logits' (1e-5 relative); seen: 1.3e-5"),
    (r".*/attribution/correlation/.*", 1e-4,
     "05's correlations of attribution with exact patching include cells whose effects are "
     "rounding-sized; seen: 1.0e-5"),
    (r".*/kl(/(mean|std|ci_low|ci_high))?$", 1e-4,
     "a KL sums p (log p - log q) over the vocabulary; log q of a float32 softmax of logits of "
     "+-30 carries their 1e-6 relative rounding, ~3e-5 on the KL of a zero ablation that "
     "destroys the output; seen: 3.2e-5 on a spread of 3.13"),
    (r"/records/(exact|estimate|estimate_ig|eap_all|eap_ig_all)$", 1e-4,
     "07's exact edge-patching, EAP and EAP-IG effects are differences of logits of ~15: their "
     "rounding is the logits' (1e-5 relative); seen: 5.2e-5"),
    (r".*/n_candidates/.*", 1.0,
     "01's count of tokens with a positive score: one whose score is ~0 may cross zero; seen: 1"),
    (r".*/agreement/.*", 0.05,
     "01's Jaccard overlaps move by one token's share when a token trades places at a list's "
     "boundary (1/21 for lists of 20 tokens in the overlap's denominator)"),
]
TOKEN_KEYS = {"id", "score"}


def rule_for(path: str) -> tuple[float | None, str]:
    for pattern, bound, why in CONTRACT:
        if re.fullmatch(pattern, path):
            return bound, why
    return None, "float32"


def allowed(path: str, a: float, b: float) -> bool:
    bound, _ = rule_for(path)
    d = abs(a - b)
    if d <= RELATIVE * max(1.0, abs(a)):
        return True
    return bound is not None and d <= bound


def _is_token_list(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(e, dict) and TOKEN_KEYS <= set(e)
                                                   for e in x)


def _walk_tokens(a: list, b: list, path: str, out: dict, ignore) -> None:
    """Ranked token lists: the same tokens compared field by field; a token only on one side
    must sit at the boundary (its score within tolerance of the last kept score of the other
    list), and so must any pair of tokens whose ranks were exchanged."""
    ia, ib = {e["id"]: e for e in a}, {e["id"]: e for e in b}
    if len(a) != len(b):
        out["other"].append(f"{path}: {len(a)} vs {len(b)} tokens")
    for tid in ia.keys() & ib.keys():
        walk(ia[tid], ib[tid], f"{path}[id={tid}]", out, ignore)
    floor_a, floor_b = min(e["score"] for e in a), min(e["score"] for e in b)
    for tid in ia.keys() - ib.keys():
        if not allowed(f"{path}/score", ia[tid]["score"], floor_b):
            out["other"].append(f"{path}: token {tid} only in old, score {ia[tid]['score']:.6g}, "
                                f"new list ends at {floor_b:.6g}")
    for tid in ib.keys() - ia.keys():
        if not allowed(f"{path}/score", ib[tid]["score"], floor_a):
            out["other"].append(f"{path}: token {tid} only in new, score {ib[tid]['score']:.6g}, "
                                f"old list ends at {floor_a:.6g}")
    order_a = [e["id"] for e in a if e["id"] in ib]
    order_b = [e["id"] for e in b if e["id"] in ia]
    for x, y in zip(order_a, order_b):
        if x != y and not allowed(f"{path}/score", ia[x]["score"], ia[y]["score"]):
            out["other"].append(f"{path}: tokens {x} and {y} exchanged ranks with scores "
                                f"{ia[x]['score']:.6g} vs {ia[y]['score']:.6g}")
            break
    out["tokens_swapped"] += len(ia.keys() ^ ib.keys()) // 2


def walk(a, b, path: str, out: dict, ignore) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in ignore:
                continue
            if k not in a or k not in b:
                out["other"].append(f"{path}/{k}: only in {'new' if k not in a else 'old'}")
                continue
            walk(a[k], b[k], f"{path}/{k}", out, ignore)
    elif _is_token_list(a) and _is_token_list(b):
        _walk_tokens(a, b, path, out, ignore)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out["other"].append(f"{path}: lengths {len(a)} vs {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, f"{path}[{i}]", out, ignore)
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
            not isinstance(a, bool) and not isinstance(b, bool):
        d = abs(float(a) - float(b))
        out["n"] += 1
        if d > out["max"]:
            out["max"], out["where"] = d, path
        if d > RELATIVE * max(1.0, abs(float(a))):
            plain = re.sub(r"\[\d+\]", "", path)   # rules name keys, not list positions
            if allowed(plain, float(a), float(b)):
                out["widened"] += 1
            else:
                out["over"].append(f"{path}: {a} vs {b} (rule: {rule_for(plain)[1]})")
    elif a != b:
        out["other"].append(f"{path}: {a!r:.60} vs {b!r:.60}")


#: keys that are no result: where a file came from, how the engine planned the work (its
#: forward and joined-row counts change when planning improves; the numbers may not) and the
#: wall-clock seconds a study records beside its numbers
IGNORED = ("provenance", "params_key", "engine", "engine_stats", "seconds")


def compare(old: dict, new: dict, ignore=IGNORED) -> dict:
    """The comparison of two payloads: numbers compared, the largest difference and where,
    differences the contract allows only by a rule of its own (``widened``), those outside it
    (``over``), other differences (``other``) and tokens that traded places at a boundary."""
    out = {"n": 0, "max": 0.0, "where": "", "over": [], "other": [], "widened": 0,
           "tokens_swapped": 0}
    walk(old, new, "", out, set(ignore))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--ignore", nargs="*", default=list(IGNORED))
    args = parser.parse_args(argv)
    a = json.load(open(args.old, encoding="utf-8"))
    b = json.load(open(args.new, encoding="utf-8"))
    out = compare(a, b, args.ignore)
    print(f"{args.new}: {out['n']} numbers, largest |difference| {out['max']:.3g} at "
          f"{out['where'] or '-'}; {out['widened']} beyond 1e-5 (relative above 1) within "
          f"their rule, {len(out['over'])} outside the contract, {out['tokens_swapped']} "
          f"tokens traded at a boundary, {len(out['other'])} other differences")
    for line in (out["over"] + out["other"])[:20]:
        print("   ", line)
    return 0 if not out["over"] and not out["other"] else 1


if __name__ == "__main__":
    sys.exit(main())
