"""Indirect-object identification (IOI) prompts in the style of Wang et al. 2022
("Interpretability in the Wild: a Circuit for Indirect Object Identification in GPT-2 small").

``prompt_set/ioi.json`` (written for this repository by ``scripts/make_ioi.py``) is a list of
pairs ``{template, order, base, source, io, s, source_names}``: ``base`` names the indirect
object ``io`` once and the subject ``s`` twice and ends before the indirect object; ``source``
is the same sentence with all three names replaced (the ABC corruption). The metric is the
logit difference logit(io) - logit(s) at the last position of the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lib.core import paths

KEYS = {"template": int, "order": str, "base": str, "source": str, "io": str, "s": str,
        "source_names": list}


def load_ioi(path: str | Path = "ioi.json") -> list[dict]:
    """The pairs of an IOI file (a bare name is looked up in ``prompt_set/``), schema-checked:
    a missing or mistyped key, or a base that does not hold ``io`` once and ``s`` twice, is an
    error naming the entry."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = paths.PROMPT_SET / path
    if not path.is_file():
        raise FileNotFoundError(f"IOI file {path} does not exist; give a file in prompt_set/ "
                                "(e.g. ioi.json) or a path, or write one with "
                                "scripts/make_ioi.py")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"IOI file {path} is not valid JSON ({err}); restore it "
                         "(git checkout prompt_set/) or write it again") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of IOI pairs")
    for i, entry in enumerate(data):
        where = f"{path.name} entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        for key, typ in KEYS.items():
            if key not in entry:
                raise ValueError(f"{where}: missing key {key!r}")
            if not isinstance(entry[key], typ):
                raise ValueError(f"{where}: {key!r} must be {typ.__name__}")
        words = entry["base"].replace(",", " ").replace(".", " ").split()
        if words.count(entry["io"]) != 1 or words.count(entry["s"]) != 2:
            raise ValueError(f"{where}: the base must name io {entry['io']!r} once and s "
                             f"{entry['s']!r} twice: {entry['base']!r}")
    return data


def name_token(lm, name: str) -> int:
    """The token id of `` name`` (one token for the embedded tokenizers); for a tokenizer that
    splits it (the tiny models' byte tokenizer) the first token of ``name`` without the space."""
    ids = lm.tokenizer(" " + name, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return int(ids[0])
    return int(lm.tokenizer(name, add_special_tokens=False)["input_ids"][0])


def aligned_pairs(lm, pairs: list[dict]) -> list[dict]:
    """Pairs whose base and source have the same token length, with token ids and the
    metric's token ids added (``first_diff``: the first position where they differ)."""
    out = []
    for i, p in enumerate(pairs):
        b, s = lm.tokenize(p["base"]), lm.tokenize(p["source"])
        if b.shape != s.shape:
            continue
        io_id, s_id = name_token(lm, p["io"]), name_token(lm, p["s"])
        # the metric compares the names' tokens as the prompt spells them: a name opening a
        # sentence has no leading space, so its answer token would never occur in the prompt
        for role, tid in (("io", io_id), ("s", s_id)):
            if tid not in b[0].tolist():
                raise ValueError(
                    f"IOI pair {i}: the {role} name {p[role]!r} (token {tid}, "
                    f"{lm.tokenizer.decode([tid])!r}) is not a token of its base prompt "
                    f"{p['base']!r}; write the prompt so that the name follows a space (e.g. "
                    "not at the start), as scripts/make_ioi.py does")
        diff = torch.nonzero(b[0] != s[0]).flatten()
        out.append({**p, "base_ids": b, "source_ids": s, "io_id": io_id, "s_id": s_id,
                    "first_diff": int(diff[0]) if len(diff) else b.shape[1] - 1})
    return out


def logit_diff(logits: torch.Tensor, io_id: int, s_id: int) -> torch.Tensor:
    return logits[..., io_id] - logits[..., s_id]
