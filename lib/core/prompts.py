"""Prompt files: loading with shape checks that name the file and the entry (paired prompts;
:func:`load_facts` reads the fact files of causal tracing).

A pair file is a JSON list of objects, each with exactly two keys, the two domain names, each
mapping to a non-empty prompt string, e.g. ``{"cpp": "Write a C++ ...", "python": "Write a
Python ..."}``. Entry ``i`` of a file is a *minimal pair*: the same task in the two domains.
The committed files live in ``prompt_set/`` (``<domain_a>_<domain_b>.json``); any file of the
same shape can be passed to the notebooks instead.

A prompt repeated on one side while the pairs differ (published prompt sets have this) is a
:class:`DuplicatePromptWarning` naming the entries, and the file loads; an entry that repeats a
whole pair is an error.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from lib.core import paths

DEFAULT_PAIR_FILES = ("cpp_python.json", "finance_medical.json", "science_maths.json",
                      "physics_chemistry.json")


class PromptFileError(ValueError):
    """A prompt file that does not have the documented shape."""


class DuplicatePromptWarning(UserWarning):
    """One side of a pair file repeats a prompt (the pairs themselves differ)."""


@dataclass(frozen=True)
class PromptPairs:
    """Paired prompts of two domains, loaded from one file."""

    name: str                 # e.g. "cpp_python" (the file stem)
    domains: tuple[str, str]  # in the order of the first entry's keys
    a: tuple[str, ...]        # prompts of domains[0]
    b: tuple[str, ...]        # prompts of domains[1], entry i pairs with a[i]
    path: str = ""

    def __len__(self) -> int:
        return len(self.a)

    def head(self, n: int | None) -> "PromptPairs":
        """The first ``n`` pairs (all when ``n`` is None or <= 0)."""
        if not n or n <= 0 or n >= len(self):
            return self
        return PromptPairs(self.name, self.domains, self.a[:n], self.b[:n], self.path)

    def select(self, indices) -> "PromptPairs":
        """The pairs at ``indices`` (in that order), e.g. one half of a seeded split."""
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"{self.name}: pair indices {bad} out of range 0..{len(self) - 1}")
        return PromptPairs(self.name, self.domains, tuple(self.a[i] for i in idx),
                           tuple(self.b[i] for i in idx), self.path)

    def prompts(self, domain: str) -> tuple[str, ...]:
        if domain not in self.domains:
            raise KeyError(f"{self.name} has domains {self.domains}, not {domain!r}")
        return self.a if domain == self.domains[0] else self.b


def load_pairs(path: str | os.PathLike) -> PromptPairs:
    """Load and check one pair file. Errors say which file and which entry is wrong."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = paths.PROMPT_SET / path
    if not path.exists():
        available = ", ".join(sorted(p.name for p in paths.PROMPT_SET.glob("*.json")))
        raise PromptFileError(f"prompt file {path} does not exist; files in prompt_set/: {available}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list) or not data:
        raise PromptFileError(f"{path}: expected a non-empty JSON list of objects, got "
                              f"{type(data).__name__}")
    first = data[0]
    if not isinstance(first, dict) or len(first) != 2:
        raise PromptFileError(f"{path}: entry 0 must be an object with exactly two keys (the two "
                              f"domain names), got {first!r:.120}")
    domains = tuple(first)
    if not all(isinstance(d, str) and d.strip() for d in domains) or domains[0] == domains[1]:
        raise PromptFileError(f"{path}: entry 0's keys {list(domains)} must be two different, "
                              "non-empty domain names")
    seen: dict[str, dict[str, int]] = {d: {} for d in domains}
    seen_pairs: dict[tuple[str, str], int] = {}
    repeats: list[str] = []
    columns: dict[str, list[str]] = {d: [] for d in domains}
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise PromptFileError(f"{where} must be an object, got {type(entry).__name__}")
        if set(entry) != set(domains):
            missing = sorted(set(domains) - set(entry))
            extra = sorted(set(entry) - set(domains))
            raise PromptFileError(f"{where} must have exactly the keys {list(domains)}"
                                  + (f"; missing {missing}" if missing else "")
                                  + (f"; unexpected {extra}" if extra else ""))
        for d in domains:
            text = entry[d]
            if not isinstance(text, str):
                raise PromptFileError(f"{where}, key {d!r}: prompt must be a string, got "
                                      f"{type(text).__name__}")
            if not text.strip():
                raise PromptFileError(f"{where}, key {d!r}: prompt is empty; write the prompt "
                                      "or remove the entry")
        pair = (entry[domains[0]], entry[domains[1]])
        if pair in seen_pairs:
            raise PromptFileError(f"{where} repeats the whole pair of entry {seen_pairs[pair]} "
                                  f"({pair[0]!r:.60} / {pair[1]!r:.60}); remove one of them")
        seen_pairs[pair] = i
        for d in domains:
            text = entry[d]
            if text in seen[d]:
                repeats.append(f"entry {i} repeats entry {seen[d][text]} on {d!r} "
                               f"({text!r:.60})")
            else:
                seen[d][text] = i
            columns[d].append(text)
    if repeats:
        shown = "; ".join(repeats[:10]) + (f"; and {len(repeats) - 10} more"
                                           if len(repeats) > 10 else "")
        warnings.warn(f"{path}: {len(repeats)} prompt(s) repeated on one side while the pairs "
                      f"differ: {shown}. The file is used as it is.", DuplicatePromptWarning,
                      stacklevel=2)
    return PromptPairs(path.stem, domains, tuple(columns[domains[0]]),
                       tuple(columns[domains[1]]), str(path))


def load_pair_files(files: list[str] | tuple[str, ...] = DEFAULT_PAIR_FILES,
                    n_prompts: int | None = None) -> list[PromptPairs]:
    """Load several pair files, each cut to its first ``n_prompts`` pairs."""
    loaded = [load_pairs(f).head(n_prompts) for f in files]
    names = [p.name for p in loaded]
    if len(set(names)) != len(names):
        raise PromptFileError(f"two prompt files share a name: {names}")
    return loaded


def load_facts(path, n: int = 0) -> list[dict]:
    """A fact file: JSON list of {"prompt", "subject", "answer"}; the first ``n`` (0 = all)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"fact file {path} does not exist")
    facts = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(facts, list) or not facts:
        raise ValueError(f"{path}: expected a non-empty JSON list of facts")
    for i, fact in enumerate(facts):
        missing = {"prompt", "subject", "answer"} - set(fact if isinstance(fact, dict) else {})
        if missing:
            raise ValueError(f"{path}: fact {i} lacks {sorted(missing)}; each fact needs "
                             "'prompt', 'subject' and 'answer'")
        if fact["subject"] not in fact["prompt"]:
            raise ValueError(f"{path}: fact {i}: subject {fact['subject']!r} is not in its "
                             f"prompt {fact['prompt']!r}")
    return facts[:n] if n and n > 0 else facts
