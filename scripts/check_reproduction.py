"""Regenerate chosen notebooks into a scratch folder and check every number of every result
against the committed file under the tolerance contract (``scripts/compare_results.py``).

    python scripts/check_reproduction.py --notebooks 00 01 02 05          # smollm2-135m
    python scripts/check_reproduction.py --notebooks 06 --models gemma3-270m --scratch /tmp/r
    python scripts/check_reproduction.py --from /tmp/r --models smollm2-135m   # compare only

The notebooks run through the runner with ``--force`` and every output folder parameter
(``SCORES_DIR``, ``TOKEN_SETS_DIR``, ``FULL_COMPUTE_DIR``, ``GRAPHS_DIR``) pointed into the
scratch folder, so nothing committed is read as a cache or overwritten; a notebook reads its
inputs (01's token sets for 02, ...) from the scratch folder too, so the chain is regenerated
as a whole. Each regenerated JSON is then compared with the committed file of the same name.
Exit status 1 when a number lies outside the contract, a file is missing, or anything
non-numeric differs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from compare_results import compare  # noqa: E402

FOLDERS = {"SCORES_DIR": "scores", "TOKEN_SETS_DIR": "token_sets",
           "FULL_COMPUTE_DIR": "full_compute", "GRAPHS_DIR": "graphs"}
RESULT_FOLDERS = ("scores", "token_sets", "full_compute")


def regenerate(scratch: Path, notebooks: list[str], models: list[str]) -> None:
    from lib.core.params import read_parameters
    from lib.runner import select_notebooks

    cmd = [sys.executable, "-m", "lib.runner", "--force", "--notebooks", *notebooks,
           "--models", *models, "--runs-dir", str(scratch / "runs")]
    # only the folders the chosen notebooks have (the runner refuses a parameter none declares)
    declared = {name for nb in select_notebooks(notebooks) for name in read_parameters(nb)}
    for param, folder in FOLDERS.items():
        if param in declared:
            cmd += ["-p", f"{param}={scratch / folder}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def regenerated_files(scratch: Path, models: list[str]) -> list[Path]:
    from lib.core.io import slug

    slugs = {slug(m) for m in models}
    found = []
    for folder in RESULT_FOLDERS:
        for path in sorted((scratch / folder).rglob("*.json")):
            rel = path.relative_to(scratch)
            if any(part.startswith(".") for part in rel.parts):   # unit caches
                continue
            if rel.stem in slugs or slugs & set(rel.parts):
                found.append(rel)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", nargs="*", default=["00", "01", "02", "05"])
    parser.add_argument("--models", nargs="*", default=["smollm2-135m"])
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for the regenerated results (default: a new temporary one)")
    parser.add_argument("--from", dest="existing", type=Path, default=None,
                        help="compare the results already regenerated in this folder")
    args = parser.parse_args(argv)
    scratch = args.existing or args.scratch or Path(tempfile.mkdtemp(prefix="reproduction-"))
    if args.existing is None:
        regenerate(scratch, args.notebooks, args.models)
    files = regenerated_files(scratch, args.models)
    if not files:
        print(f"no regenerated results of {args.models} under {scratch}", file=sys.stderr)
        return 1
    bad = 0
    for rel in files:
        committed = ROOT / rel
        if not committed.exists():
            print(f"NEW      {rel} (no committed file to compare with)")
            continue
        out = compare(json.loads(committed.read_text(encoding="utf-8")),
                      json.loads((scratch / rel).read_text(encoding="utf-8")))
        ok = not out["over"] and not out["other"]
        bad += not ok
        print(f"{'within  ' if ok else 'OUTSIDE '} {rel}: {out['n']} numbers, largest "
              f"|difference| {out['max']:.3g} at {out['where'] or '-'}; {out['widened']} beyond "
              f"1e-5 within their rule; {out['tokens_swapped']} tokens traded at a boundary")
        for line in (out["over"] + out["other"])[:10]:
            print("          ", line)
    print(f"{len(files) - bad} of {len(files)} files within the tolerance contract "
          f"(regenerated in {scratch})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
