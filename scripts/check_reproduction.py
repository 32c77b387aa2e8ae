"""Did a clone's main job reproduce the committed results? Compares every committed result file
of a model (or study) in a clone's working tree with the clone's own HEAD.

    git clone <repo> /tmp/fresh/main && cd /tmp/fresh/main
    git ls-files scores token_sets full_compute | grep -E 'smollm2-135m|das_mlp' | xargs rm
    bash scripts/main.sh                                     # recomputes what was removed
    python scripts/check_reproduction.py /tmp/fresh/main smollm2-135m das_mlp

JSON files are equal when they are byte-identical once ``provenance.created_utc`` and
``provenance.git_commit`` are left out (the two fields that say when and from which commit a
file was written; ``lib.io.write_json`` keeps an existing file's bytes when nothing else
changed, so a main job run with ``FORCE=True`` over the committed files leaves them untouched).
Other files (safetensors) must be byte-identical. Exit status 1 when a file differs or is
missing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.io import same_apart_from_time  # noqa: E402

FOLDERS = ("scores", "token_sets", "full_compute")


def committed(clone: Path, path: str) -> bytes:
    return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=clone, capture_output=True,
                          check=True).stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clone", type=Path, help="the clone whose main job ran")
    parser.add_argument("names", nargs="+", help="model slugs or study names, e.g. smollm2-135m")
    args = parser.parse_args(argv)
    listed = subprocess.run(["git", "ls-files", *FOLDERS], cwd=args.clone, capture_output=True,
                            text=True, check=True).stdout.split()
    files = [f for f in listed if any(n in Path(f).parts or Path(f).stem == n
                                      for n in args.names)]
    if not files:
        print(f"no committed result files of {args.names} in {args.clone}", file=sys.stderr)
        return 1
    bad = 0
    for rel in files:
        path = args.clone / rel
        if not path.exists():
            print(f"MISSING  {rel}")
            bad += 1
            continue
        old, new = committed(args.clone, rel), path.read_bytes()
        if rel.endswith(".json"):
            same = same_apart_from_time(json.loads(old), json.loads(new))
        else:
            same = old == new
        print(f"{'same    ' if same else 'DIFFERS '} {rel}")
        bad += not same
    print(f"{len(files) - bad} of {len(files)} files reproduced")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
