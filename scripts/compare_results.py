"""Compare two result JSON files number by number (provenance left out).

    python scripts/compare_results.py OLD.json NEW.json [--ignore key ...]

Prints the largest absolute difference of any number, how many numbers differ by more than
1e-5 relative to their size (|a - b| > 1e-5 * max(1, |a|): probabilities absolutely, logits and
norms relatively, since float32 rounding of batched matmuls scales with magnitude), and every
non-numeric difference (up to 20). Exit code 1 when anything else differs.
"""

from __future__ import annotations

import argparse
import json
import sys


def walk(a, b, path, out, ignore):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in ignore:
                continue
            if k not in a or k not in b:
                out["other"].append(f"{path}/{k}: only in {'new' if k not in a else 'old'}")
                continue
            walk(a[k], b[k], f"{path}/{k}", out, ignore)
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
        if d > 1e-5 * max(1.0, abs(float(a))):
            out["over"].append(f"{path}: {a} vs {b}")
    elif a != b:
        out["other"].append(f"{path}: {a!r:.60} vs {b!r:.60}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--ignore", nargs="*", default=["provenance", "params_key", "engine"])
    args = parser.parse_args(argv)
    a = json.load(open(args.old, encoding="utf-8"))
    b = json.load(open(args.new, encoding="utf-8"))
    out = {"n": 0, "max": 0.0, "where": "", "over": [], "other": []}
    walk(a, b, "", out, set(args.ignore))
    print(f"{args.new}: {out['n']} numbers, largest |difference| {out['max']:.3g} at "
          f"{out['where'] or '-'}; {len(out['over'])} over 1e-5 (relative above 1); {len(out['other'])} other")
    for line in (out["over"] + out["other"])[:20]:
        print("   ", line)
    return 0 if not out["over"] and not out["other"] else 1


if __name__ == "__main__":
    sys.exit(main())
