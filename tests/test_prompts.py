"""Prompt-file loading: shape checks that name the file and the entry; committed files' sizes."""

import json

import pytest

from lib.core import paths
from lib.core.prompts import (DEFAULT_PAIR_FILES, DuplicatePromptWarning, PromptFileError,
                         PromptPairs, load_pair_files, load_pairs)

GOOD = [{"cpp": "Write C++ code.", "python": "Write Python code."},
        {"cpp": "Sort in C++.", "python": "Sort in Python."},
        {"cpp": "Parse JSON in C++.", "python": "Parse JSON in Python."}]


def write(tmp_path, data, name="x_y.json", raw=False):
    path = tmp_path / name
    path.write_text(data if raw else json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("name,minimum", [("cpp_python.json", 100), ("finance_medical.json", 50),
                                          ("science_maths.json", 50),
                                          ("physics_chemistry.json", 50)])
def test_committed_files_are_large_enough_and_well_formed(name, minimum):
    pairs = load_pairs(name)
    assert len(pairs) >= minimum, f"{name} has {len(pairs)} pairs, needs >= {minimum}"
    assert len(pairs.a) == len(pairs.b) == len(pairs)
    assert pairs.name == name.removesuffix(".json")
    assert pairs.name == "_".join(pairs.domains), "file stem must be <domain_a>_<domain_b>"
    assert all(a != b for a, b in zip(pairs.a, pairs.b)), "a pair's two prompts are identical"


def test_default_files_load_together_with_distinct_domains():
    sets = load_pair_files()
    assert [s.name + ".json" for s in sets] == list(DEFAULT_PAIR_FILES)
    domains = [d for s in sets for d in s.domains]
    assert len(set(domains)) == len(domains) == 8
    short = load_pair_files(n_prompts=7)
    assert all(len(s) == 7 for s in short)
    assert short[0].a == sets[0].a[:7]


def test_a_file_from_elsewhere_of_the_same_shape_loads(tmp_path):
    path = write(tmp_path, GOOD, "rust_go.json")
    pairs = load_pairs(path)
    assert isinstance(pairs, PromptPairs)
    assert pairs.name == "rust_go" and pairs.domains == ("cpp", "python")
    assert pairs.a[1] == "Sort in C++." and pairs.b[2] == "Parse JSON in Python."
    assert pairs.prompts("python") == pairs.b
    assert pairs.path == str(path)
    with pytest.raises(KeyError, match="rust"):
        pairs.prompts("rust")


def _expect_error(tmp_path, data, *fragments, raw=False):
    path = write(tmp_path, data, raw=raw)
    with pytest.raises(PromptFileError) as info:
        load_pairs(path)
    message = str(info.value)
    assert str(path) in message, f"the error does not name the file: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_bad_json_names_the_file(tmp_path):
    _expect_error(tmp_path, '[{"cpp": "a", "python": "b"},', "not valid JSON", raw=True)


def test_not_a_list(tmp_path):
    _expect_error(tmp_path, {"cpp": "a", "python": "b"}, "list", "dict")
    _expect_error(tmp_path, [], "non-empty")


def test_entry_not_an_object(tmp_path):
    _expect_error(tmp_path, GOOD[:2] + ["just a string"], "entry 2", "object", "str")


def test_missing_key(tmp_path):
    bad = GOOD[:2] + [{"cpp": "Only C++ here."}]
    _expect_error(tmp_path, bad, "entry 2", "missing ['python']")


def test_unexpected_key(tmp_path):
    bad = [GOOD[0], {"cpp": "C++ again.", "pyton": "typo"}]
    _expect_error(tmp_path, bad, "entry 1", "missing ['python']", "unexpected ['pyton']")


def test_empty_prompt(tmp_path):
    bad = GOOD[:1] + [{"cpp": "Fine.", "python": "   "}]
    _expect_error(tmp_path, bad, "entry 1", "'python'", "empty")


def test_one_side_repeating_a_prompt_is_a_warning_naming_the_entries(tmp_path):
    data = GOOD + [{"cpp": "Something new.", "python": "Sort in Python."}]
    path = write(tmp_path, data)
    with pytest.warns(DuplicatePromptWarning) as record:
        pairs = load_pairs(path)
    message = str(record[0].message)
    assert str(path) in message and "entry 3 repeats entry 1 on 'python'" in message
    assert len(pairs) == 4 and pairs.b[3] == pairs.b[1]  # the run goes on, file unchanged


def test_a_repeated_pair_is_an_error(tmp_path):
    bad = GOOD + [dict(GOOD[1])]
    _expect_error(tmp_path, bad, "entry 3", "repeats the whole pair of entry 1")


def test_wrong_type(tmp_path):
    bad = GOOD[:1] + [{"cpp": 42, "python": "A number?"}]
    _expect_error(tmp_path, bad, "entry 1", "'cpp'", "string", "int")


def test_first_entry_shape(tmp_path):
    _expect_error(tmp_path, [{"cpp": "one key only"}], "entry 0", "exactly two keys")


def test_missing_file_lists_the_available_ones(tmp_path):
    with pytest.raises(PromptFileError) as info:
        load_pairs(tmp_path / "nope.json")
    assert "does not exist" in str(info.value) and "cpp_python.json" in str(info.value)


def test_two_files_with_one_name_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    p1, p2 = write(tmp_path / "a", GOOD), write(tmp_path / "b", GOOD)
    with pytest.raises(PromptFileError, match="share a name"):
        load_pair_files([str(p1), str(p2)])


def test_committed_prompt_files_are_all_checked():
    """Every JSON pair file in prompt_set/ (except the facts and IOI files, other formats
    checked by lib.studies.tracing and lib.studies.ioi) loads."""
    files = sorted(p for p in paths.PROMPT_SET.glob("*.json")
                   if p.name not in ("facts.json", "ioi.json"))
    assert {p.name for p in files} >= set(DEFAULT_PAIR_FILES)
    for path in files:
        assert len(load_pairs(path)) > 0
