"""IOI dataset: sizes, determinism, disjoint splits, label rules and named positions (SmolLM2 tokenizer)."""

from __future__ import annotations

import re

import pytest

from das_cli import ioi
from das_cli.errors import DasError
from das_cli.examples import Example, encode
from das_cli.models import embedded_tokenizer

N_TRAIN, N_TEST, N_VAL = 120, 60, 30


@pytest.fixture(scope="session")
def tok():
    return embedded_tokenizer()


@pytest.fixture(scope="session")
def position_splits(tok):
    return ioi.make_ioi(tok, "io_position", N_TRAIN, N_TEST, seed=3, n_val=N_VAL)


@pytest.fixture(scope="session")
def name_splits(tok):
    return ioi.make_ioi(tok, "io_name", N_TRAIN, N_TEST, seed=3, n_val=N_VAL)


@pytest.fixture(scope="session")
def position_data(position_splits):
    return position_splits.train, position_splits.test


@pytest.fixture(scope="session")
def name_data(name_splits):
    return name_splits.train, name_splits.test


def _names(prompt: str) -> list[str]:
    """The capitalised words of a prompt that are pool names, in order."""
    return [w for w in re.findall(r"[A-Z][a-z]+", prompt) if w in ioi.NAMES]


def _roles(prompt: str) -> tuple[str, str, bool]:
    """(IO, S, is_abb) read off the prompt text: S is the name that occurs twice."""
    first, second, third = _names(prompt)
    assert third in (first, second)
    s = third
    io = second if s == first else first
    return io, s, io == first


def test_sizes(position_data, name_data):
    (train, test), (name_train, name_test) = position_data, name_data
    assert len(train) == len(name_train) == N_TRAIN and len(name_test) == N_TEST
    assert all(ex.kind == "cause" for ex in train + name_train + name_test)
    assert [ex.kind for ex in test] == ["cause"] * N_TEST + ["isolate"] * N_TEST  # io_position: flips, then non-flips


def test_io_position_isolate_pairs_keep_the_base_answer(tok, position_data, monkeypatch):
    _, test = position_data
    flips, isolate = test[:N_TEST], test[N_TEST:]
    assert all(ex.label != ex.base_label and ex.base_value != ex.source_value for ex in flips)
    assert all(ex.label == ex.base_label and ex.base_value == ex.source_value for ex in isolate)
    assert {ex.base_value for ex in isolate} == {"first", "second"}
    # the non-flips are drawn after the flips: without them, the train pairs and the flips are the same
    monkeypatch.setattr(ioi, "_isolate_pairs", lambda *args: [])
    without = ioi.make_ioi(tok, "io_position", N_TRAIN, N_TEST, seed=3, n_val=N_VAL)
    assert (without.train, without.test) == (position_data[0], flips)


def test_validation_split_is_held_out(position_splits, name_splits):
    for splits in (position_splits, name_splits):
        assert len(splits.val) == N_VAL and all(ex.kind == "cause" for ex in splits.val)
        val_templates = {ex.group for ex in splits.val}
        assert val_templates and all(val_templates.isdisjoint({ex.group for ex in other}) for other in (splits.train, splits.test))
    pools = (ioi.NAMES, ioi.PLACES, ioi.OBJECTS)
    words = lambda exs, pool: {w for ex in exs for p in (ex.base, ex.source) for w in re.findall(r"\w+", p) if w in pool}  # noqa: E731
    for pool in pools:
        val = words(position_splits.val, pool)
        assert val and val.isdisjoint(words(position_splits.train, pool)) and val.isdisjoint(words(position_splits.test, pool))
    assert all(ex.label != ex.base_label for ex in position_splits.val)  # flips, like the test's cause pairs


def test_test_split_does_not_depend_on_the_other_splits(tok, position_splits):
    """Validation is cut from the training pools and each split draws from its own random stream."""
    for n_train, n_val in ((N_TRAIN, 0), (7, N_VAL), (0, 5)):
        assert ioi.make_ioi(tok, "io_position", n_train, N_TEST, seed=3, n_val=n_val).test == position_splits.test
    no_val = ioi.make_ioi(tok, "io_position", N_TRAIN, N_TEST, seed=3)
    assert no_val.val == [] and {ex.group for ex in no_val.train} > {ex.group for ex in position_splits.train}


def test_deterministic_in_seed(tok, position_splits):
    assert ioi.make_ioi(tok, "io_position", N_TRAIN, N_TEST, seed=3, n_val=N_VAL) == position_splits
    assert ioi.make_ioi(tok, "io_position", N_TRAIN, N_TEST, seed=4, n_val=N_VAL) != position_splits


def test_templates_disjoint(position_data, name_data):
    for train, test in (position_data, name_data):
        assert {ex.group for ex in train}.isdisjoint({ex.group for ex in test})
        assert all(re.fullmatch(r"t\d\d", ex.group) for ex in train + test)


def test_io_position_names_places_objects_disjoint(position_data):
    train, test = position_data

    def words(examples, pool):
        return {w for ex in examples for p in (ex.base, ex.source) for w in re.findall(r"\w+", p) if w in pool}

    for pool in (ioi.NAMES, ioi.PLACES, ioi.OBJECTS):
        assert words(train, pool).isdisjoint(words(test, pool))


def test_io_position_labels(position_data):
    train, test = position_data
    for ex in train + test:
        b_io, b_s, b_abb = _roles(ex.base)
        s_io, s_s, s_abb = _roles(ex.source)
        assert {b_io, b_s}.isdisjoint({s_io, s_s})
        assert ex.base_label == " " + b_io
        assert ex.label == " " + (b_io if b_abb == s_abb else b_s)
        # same template, place and object: only the names differ
        assert re.sub(r"[A-Z][a-z]+", "N", ex.base) == re.sub(r"[A-Z][a-z]+", "N", ex.source)


def test_io_position_pattern_mix(position_data):
    train, test = position_data
    pairs = lambda exs: {(_roles(ex.base)[2], _roles(ex.source)[2]) for ex in exs}  # noqa: E731
    assert pairs(train) == {(True, True), (True, False), (False, True), (False, False)}
    cause = [ex for ex in test if ex.kind == "cause"]
    assert pairs(cause) == {(True, False), (False, True)}
    assert all(ex.label != ex.base_label for ex in cause)  # cause pairs are flips: "no effect" scores 0


def test_io_name_labels(name_data):
    train, test = name_data
    for ex in train + test:
        b_io, b_s, _ = _roles(ex.base)
        s_io, s_s, _ = _roles(ex.source)
        assert {b_io, b_s}.isdisjoint({s_io, s_s})
        assert ex.label == " " + s_io and ex.base_label == " " + b_io
    pool = {n for ex in train + test for p in (ex.base, ex.source) for n in _names(p)}
    assert len(pool) <= ioi.IO_NAME_POOL


def test_positions_point_at_names(tok, position_data, name_data):
    for ex in position_data[0] + position_data[1] + name_data[0] + name_data[1]:
        for prompt, pos in ((ex.base, ex.base_positions), (ex.source, ex.source_positions)):
            ids = encode(tok, prompt)
            io, s, abb = _roles(prompt)
            at = lambda key: tok.decode([ids[pos[key]]])  # noqa: E731
            assert at("io") == " " + io
            assert at("s1") == " " + s and at("s2") == " " + s
            assert pos["s1"] < pos["s2"]
            assert (at("name1"), at("name2")) == ((" " + io, " " + s) if abb else (" " + s, " " + io))
            assert pos["last"] == len(ids) - 1 and at("last") == " to"


def test_equal_lengths(tok, position_data, name_data):
    lengths: dict[str, set[int]] = {}
    for ex in position_data[0] + position_data[1] + name_data[0] + name_data[1]:
        n_base, n_source = len(encode(tok, ex.base)), len(encode(tok, ex.source))
        assert n_base == n_source
        lengths.setdefault(ex.group, set()).add(n_base)
    assert all(len(v) == 1 for v in lengths.values())


def test_pools_survive_tokenizer(tok):
    assert len(ioi.TEMPLATES) >= 12
    assert len(ioi.single_token_words(tok, ioi.NAMES)) >= 40
    assert len(ioi.single_token_words(tok, ioi.PLACES)) >= 10
    assert len(ioi.single_token_words(tok, ioi.OBJECTS)) >= 10


def test_prompts_are_short(tok):
    for template in ioi.TEMPLATES:
        prompt = template.format(name1="Mary", name2="John", S="John", place="store", object="drink")
        assert len(encode(tok, prompt)) < 25


def test_bad_variable(tok):
    message = r"^dataset.variable=io_colour: not a valid choice; valid choices: io_position, io_name$"
    with pytest.raises(DasError, match=message):
        ioi.make_ioi(tok, "io_colour", 10, 10, seed=0)


def test_too_few_names(tok, monkeypatch):
    monkeypatch.setattr(ioi, "NAMES", ("Mary", "John", "Xyzzyqwv"))
    with pytest.raises(DasError, match="names"):
        ioi.make_ioi(tok, "io_position", 10, 10, seed=0)


def test_unequal_group_lengths_named(tok):
    short = Example("When Mary and John", "When Mary and John", " Mary", " Mary", group="t05")
    long = Example("When Mary and John went", "When Mary and John went", " Mary", " Mary", group="t05")
    with pytest.raises(DasError, match="template t05"):
        ioi._check_group_lengths(tok, [short, long])
