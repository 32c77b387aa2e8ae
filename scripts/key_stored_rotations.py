"""Give the committed rotation files the key of the parameters that made them, tensors untouched.

Rotation files written before tensor files carried a key (``lib.core.tensorfiles``) name no
parameters, and notebook 09 now retrains a rotation whose key is not its DAS unit store's. This
script adds the key to each stored rotation of a current result, and nothing else:

* notebook 09 (``<folder>/<model>/das_iia.json`` with ``das_rotations/<key>/``): the key of the DAS
  unit store the result's runs were computed under, derived from the result's provenance as
  ``lib.studies.das.arithmetic_study.Notebook`` derives it (the result's parameters less the
  grid's, plus the torch thread count): ``io.UnitStore(..., key_unit).key``;
* notebook 08 (``<folder>/das_mlp/equality.json`` with ``rotations/``): the equality result's
  own ``params_key``.

Each file is written again by ``lib.core.tensorfiles.save_tensors`` from the tensors read from
it, and then checked against the old bytes: the tensor data section is byte for byte the same,
every tensor's dtype, shape and offsets are the same, and the header's config and metadata are
the same; only the key is new. A file that already carries the right key is left as it is, one
that carries another is reported and left as it is.

    python scripts/key_stored_rotations.py            # add the keys
    python scripts/key_stored_rotations.py --check    # only report (exit 1 if any lacks it)
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.core import io, paths  # noqa: E402
from lib.core.tensorfiles import HEADER_KEY, read_header, save_tensors  # noqa: E402
from lib.studies.das import arithmetic_study  # noqa: E402
from lib.studies.das.arithmetic_das import run_name  # noqa: E402


def split_file(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's parsed header and its data section."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def das_unit_key(result: dict) -> str:
    """The key of the DAS unit store a stored ``das_iia.json`` was computed under."""
    prov = result["provenance"]
    key_unit = {k: v for k, v in prov["parameters"].items()
                if k not in arithmetic_study.GRID_KEY}
    return io.params_key({**key_unit, "torch_threads": prov["torch_threads"]})


def targets(root: Path) -> list[tuple[Path, str]]:
    """(rotation file, its key) for every stored rotation of a result under ``root``."""
    out = []
    for result_path in sorted(root.rglob("das_iia.json")):
        result = json.loads(result_path.read_text(encoding="utf-8"))
        key = das_unit_key(result)
        for run in result["runs"]:
            name = run_name(run["model"], run["layer"], run["rank"], run["site"])
            out.append((arithmetic_study.rotation_path(result_path.parent / "das_rotations",
                                                       key, name), key))
    for result_path in sorted(root.rglob("equality.json")):
        result = json.loads(result_path.read_text(encoding="utf-8"))
        for path in sorted((result_path.parent / "rotations").glob("equality_*.safetensors")):
            out.append((path, result["params_key"]))
    return out


def add_key(path: Path, key: str) -> None:
    """Write ``path`` again with ``key`` in its header; refuse (and restore the old bytes)
    unless everything but the key is unchanged."""
    from safetensors import safe_open

    old_bytes = path.read_bytes()
    old_header, old_data = split_file(path)
    config, metadata, _ = read_header(path, "rotation")
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    save_tensors(path, tensors, config, metadata, key=key)
    new_header, new_data = split_file(path)
    old_meta = json.loads(old_header.pop("__metadata__")[HEADER_KEY])
    new_meta = json.loads(new_header.pop("__metadata__")[HEADER_KEY])
    same = (new_data == old_data and new_header == old_header
            and new_meta.pop("key") == key and new_meta == old_meta)
    if not same:
        path.write_bytes(old_bytes)
        raise SystemExit(f"{path}: rewriting changed more than its key; restored the old file")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(paths.FULL_COMPUTE))
    parser.add_argument("--check", action="store_true", help="only report")
    args = parser.parse_args(argv)
    missing = 0
    for path, key in targets(Path(args.root)):
        if not path.exists():
            print(f"missing: {path}")
            missing += 1
            continue
        _, _, stored = read_header(path, "rotation")
        if stored == key:
            continue
        if stored is not None:
            print(f"other key ({stored}, expected {key}), left as it is: {path}")
            missing += 1
        elif args.check:
            print(f"no key: {path}")
            missing += 1
        else:
            add_key(path, key)
            print(f"keyed {key}: {path}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
