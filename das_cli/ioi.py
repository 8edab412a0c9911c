"""The IOI (indirect object identification) dataset: counterfactual pairs for `io_position` and `io_name`.

A prompt names two people, repeats one of them (the subject S) and ends right before the
other (the indirect object IO): "When Mary and John went to the store, John gave a drink to"
-> " Mary". Pattern ABB puts IO in the first name slot, BAB puts S there.

- io_position: base and source share template, place and object, with independent names;
  label = base IO if both put S in the same slot, else base S. Train mixes all four pattern
  pairs; validation holds `n_val` flips; test holds `n_test` flips (kind `cause`) and as many
  non-flips (kind `isolate`: the label is the base's own answer). Templates, names, places and
  objects are disjoint between the splits.
- io_name: source has two new names; label = the source's IO. A restricted name pool is
  shared by the splits; templates (and places, objects) are disjoint.

Every pool entry is kept only if it is one token with its leading space, so all prompts of
a template have one token length; this is verified, and `group` is the template id.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from .errors import DasError, choices_error
from .examples import Example, Splits, encode, single_token_id

VARIABLES = ("io_position", "io_name")
TRAIN_FRACTION = 0.7
VAL_TRAIN_FRACTION = 0.8  # with a validation split: the share of the training pools kept for training
MIN_NAMES = 8
IO_NAME_POOL = 16
# (base is ABB, source is ABB): training cycles through all four, test through the two flips.
ALL_PAIRS = ((True, True), (True, False), (False, True), (False, False))
FLIP_PAIRS = ((True, False), (False, True))

# ABB form: {name1} is the IO, {name2} is S, {S} repeats S. Every slot follows a space.
TEMPLATES = (
    "When {name1} and {name2} went to the {place}, {S} gave a {object} to",
    "After {name1} and {name2} arrived at the {place}, {S} handed a {object} to",
    "While {name1} and {name2} were waiting at the {place}, {S} passed a {object} to",
    "Then, {name1} and {name2} had a long day at the {place}. {S} gave a {object} to",
    "When {name1} and {name2} got back from the {place}, {S} offered a {object} to",
    "Yesterday {name1} and {name2} spent the morning at the {place}, and {S} brought a {object} to",
    "At the {place}, {name1} and {name2} found a {object}. Later, {S} gave it to",
    "Once {name1} and {name2} had left the {place}, {S} threw a {object} to",
    "On the way to the {place}, {name1} and {name2} stopped to rest, and {S} sold a {object} to",
    "The friends {name1} and {name2} met at the {place}. {S} lent a {object} to",
    "The {place} was quiet when {name1} and {name2} came in, so {S} showed a {object} to",
    "After a long walk to the {place}, {name1} and {name2} sat down, and {S} passed a {object} to",
    "When {name1} and {name2} were cleaning the {place}, {S} tossed a {object} to",
    "Since {name1} and {name2} both worked at the {place}, {S} mailed a {object} to",
    "As {name1} and {name2} walked into the {place}, {S} sent a {object} to",
    "Later that day {name1} and {name2} visited the {place}, where {S} gave a {object} to",
    "During a trip to the {place}, {name1} and {name2} talked for hours, and {S} gave a {object} to",
)

NAMES = (
    "Mary", "John", "James", "Michael", "David", "Robert", "William", "Richard", "Thomas",
    "Daniel", "Paul", "Mark", "George", "Kevin", "Brian", "Edward", "Steven", "Jason",
    "Jeff", "Ryan", "Eric", "Peter", "Adam", "Scott", "Frank", "Sarah", "Lisa", "Susan",
    "Karen", "Nancy", "Laura", "Emily", "Anna", "Rachel", "Kate", "Emma", "Amy", "Jessica",
    "Linda", "Helen", "Alice", "Julia", "Maria", "Rose", "Grace", "Jennifer", "Elizabeth",
    "Patricia", "Barbara", "Michelle", "Sandra", "Ashley", "Amanda", "Melissa", "Rebecca",
    "Claire", "Lucy", "Sophie", "Joe", "Tom", "Sam", "Alex", "Ben", "Chris", "Matt", "Dan",
)

PLACES = (
    "store", "park", "school", "hospital", "station", "office", "restaurant", "garden",
    "library", "beach", "market", "house", "museum", "church", "cafe", "bank", "airport",
    "hotel", "farm", "river", "gym", "theater", "kitchen", "bakery",
)

# Consonant-initial, so "a {object}" reads right.
OBJECTS = (
    "drink", "book", "ring", "ball", "bag", "card", "pen", "cup", "box", "gift", "hat", "key",
    "map", "coin", "note", "phone", "cake", "shirt", "lamp", "bottle", "letter", "basket",
    "toy", "watch",
)


@dataclass(frozen=True)
class _Split:
    """What one split may draw from."""

    templates: list[tuple[str, str]]  # (group id, template text)
    names: list[str]
    places: list[str]
    objects: list[str]


def make_ioi(tokenizer, variable: str, n_train: int, n_test: int, seed: int, n_val: int = 0) -> Splits:
    """Train, validation and test IOI pairs for `variable` ("io_position" or "io_name"), deterministic in `seed`.

    The pools are cut once from `seed`; each split then draws its pairs from a random stream of its own
    (seeded by `seed` and the split's name), so a split's pairs do not depend on the other splits' sizes.
    """
    if variable not in VARIABLES:
        raise choices_error("dataset.variable", variable, VARIABLES)
    if min(n_train, n_test, n_val) < 0:
        raise DasError(f"dataset: n_train={n_train}, n_val={n_val}, n_test={n_test}: sizes must be non-negative")
    pools = _splits(tokenizer, variable, random.Random(seed), with_val=n_val > 0)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    pairs = {name: _split_pairs(tokenizer, variable, pools[name], sizes[name], name, random.Random(f"{seed}:{name}"))
             for name in pools}
    _check_group_lengths(tokenizer, [ex for split in pairs.values() for ex in split])
    return Splits(train=pairs["train"], val=pairs.get("val", []), test=pairs["test"])


def _split_pairs(tokenizer, variable: str, pool: _Split, n: int, split: str, rng: random.Random) -> list[Example]:
    """io_position: training mixes the four pattern pairs; validation and test hold flips, and test
    also as many non-flips (kind isolate). io_name: n pairs."""
    if variable == "io_name":
        return [_name_pair(tokenizer, pool, rng) for _ in range(n)]
    patterns = ALL_PAIRS if split == "train" else FLIP_PAIRS
    pairs = [_position_pair(tokenizer, pool, rng, *patterns[i % len(patterns)]) for i in range(n)]
    rng.shuffle(pairs)
    return pairs + (_isolate_pairs(tokenizer, pool, rng, n) if split == "test" else [])


def single_token_words(tokenizer, words: tuple[str, ...]) -> list[str]:
    """The words that are one token with their leading space, in their original order."""
    return [w for w in words if single_token_id(tokenizer, " " + w) is not None]


def _cut(items: list, what: str, minimum: int, train_fraction: float = TRAIN_FRACTION, held_out: str = "test") -> tuple[list, list]:
    """Split a shuffled list ~train_fraction / rest, each side holding at least `minimum` items."""
    if len(items) < 2 * minimum:
        raise DasError(
            f"dataset: only {len(items)} {what} are single tokens in this tokenizer for training; "
            f"need at least {2 * minimum} to split off {held_out}"
        )
    k = min(max(round(len(items) * train_fraction), minimum), len(items) - minimum)
    return items[:k], items[k:]


def _splits(tokenizer, variable: str, rng: random.Random, with_val: bool) -> dict[str, _Split]:
    """Disjoint templates, places and objects; names disjoint (io_position) or a shared pool (io_name).

    Test takes ~30% of each pool; with a validation split, ~20% of the rest goes to validation, so the
    test pools are the same with or without one."""
    templates = [(f"t{i:02d}", t) for i, t in enumerate(TEMPLATES)]
    names = single_token_words(tokenizer, NAMES)
    places = single_token_words(tokenizer, PLACES)
    objects = single_token_words(tokenizer, OBJECTS)
    if len(names) < MIN_NAMES:
        raise DasError(
            f"dataset: only {len(names)} names are single tokens in this tokenizer; need at least {MIN_NAMES}"
        )
    for pool in (templates, names, places, objects):
        rng.shuffle(pool)
    cut = {"templates": templates, "places": places, "objects": objects}
    if variable == "io_position":
        cut["names"] = names
    parts: dict[str, dict[str, list]] = {"train": {}, "val": {}, "test": {}}
    for what, pool in cut.items():
        minimum = 4 if what == "names" else 1  # a pair draws four distinct names
        parts["train"][what], parts["test"][what] = _cut(pool, what, minimum)
        if with_val:
            parts["train"][what], parts["val"][what] = _cut(parts["train"][what], what, minimum, VAL_TRAIN_FRACTION, "validation")
    shared_names = sorted(names[:IO_NAME_POOL])
    return {
        split: _Split(part["templates"], part.get("names", shared_names), part["places"], part["objects"])
        for split, part in parts.items() if part
    }


def _fill(template: str, io: str, s: str, abb: bool, place: str, obj: str) -> str:
    """The prompt with IO and S in the ABB (IO first) or BAB (S first) slots."""
    first, second = (io, s) if abb else (s, io)
    return template.format(name1=first, name2=second, S=s, place=place, object=obj)


def _positions(tokenizer, prompt: str, io: str, s: str, group: str) -> dict[str, int]:
    """Token indices of io, s1, s2, name1, name2 and last, found by the names' token ids."""
    ids = encode(tokenizer, prompt)
    io_id, s_id = single_token_id(tokenizer, " " + io), single_token_id(tokenizer, " " + s)
    io_hits = [i for i, t in enumerate(ids) if t == io_id]
    s_hits = [i for i, t in enumerate(ids) if t == s_id]
    if len(io_hits) != 1 or len(s_hits) != 2:
        raise DasError(f"dataset: template {group}: expected IO once and S twice in {prompt!r}")
    (io_pos,), (s1, s2) = io_hits, s_hits
    if not (min(io_pos, s1) < max(io_pos, s1) < s2):
        raise DasError(f"dataset: template {group}: names are out of order in {prompt!r}")
    return {"io": io_pos, "s1": s1, "s2": s2, "name1": min(io_pos, s1), "name2": max(io_pos, s1),
            "last": len(ids) - 1}


def _position_pair(tokenizer, split: _Split, rng: random.Random, base_abb: bool, source_abb: bool) -> Example:
    """An io_position pair with the given patterns; the label follows where the source puts S."""
    group, template = rng.choice(split.templates)
    place, obj = rng.choice(split.places), rng.choice(split.objects)
    a, b, c, d = rng.sample(split.names, 4)  # base (IO, S) = (a, b); source (IO, S) = (c, d)
    base = _fill(template, a, b, base_abb, place, obj)
    source = _fill(template, c, d, source_abb, place, obj)
    label = a if base_abb == source_abb else b
    return Example(
        base=base, source=source, label=" " + label, base_label=" " + a, source_label=" " + c,
        base_positions=_positions(tokenizer, base, a, b, group),
        source_positions=_positions(tokenizer, source, c, d, group),
        group=group, kind="cause",
        base_value=_slot(base_abb), source_value=_slot(source_abb),
    )


def _isolate_pairs(tokenizer, split: _Split, rng: random.Random, n: int) -> list[Example]:
    """Non-flip test pairs (both prompts put S in the same slot): the edit should leave the base's
    own answer, so they score what a subspace breaks beside what it swaps (kind `isolate`).

    Drawn after the flip pairs, from the same split, so the flip pairs are those a run without them gets."""
    same = ((True, True), (False, False))
    pairs = [replace(_position_pair(tokenizer, split, rng, *same[i % 2]), kind="isolate") for i in range(n)]
    rng.shuffle(pairs)
    return pairs


def _slot(abb: bool) -> str:
    """The io_position variable's value: IO in the first name slot (ABB) or the second (BAB)."""
    return "first" if abb else "second"


def _name_pair(tokenizer, split: _Split, rng: random.Random) -> Example:
    """An io_name pair: source has two new names; the label is the source's IO."""
    group, template = rng.choice(split.templates)
    place, obj = rng.choice(split.places), rng.choice(split.objects)
    a, b, c, d = rng.sample(split.names, 4)
    base = _fill(template, a, b, rng.random() < 0.5, place, obj)
    source = _fill(template, c, d, rng.random() < 0.5, place, obj)
    return Example(
        base=base, source=source, label=" " + c, base_label=" " + a, source_label=" " + c,
        base_positions=_positions(tokenizer, base, a, b, group),
        source_positions=_positions(tokenizer, source, c, d, group),
        group=group, kind="cause",
    )


def _check_group_lengths(tokenizer, examples: list[Example]) -> None:
    """Every prompt of one template (base and source alike) must have the same token length."""
    lengths: dict[str, int] = {}
    for ex in examples:
        for prompt in (ex.base, ex.source):
            n = len(encode(tokenizer, prompt))  # tokenized again: positions alone would not catch it
            if lengths.setdefault(ex.group, n) != n:
                raise DasError(
                    f"dataset: template {ex.group} gives prompts of different token lengths "
                    f"({lengths[ex.group]} and {n}); its names, places or objects do not tokenize alike"
                )
