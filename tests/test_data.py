"""Tokenising pairs: groups by length, single-token labels, position resolution and its errors."""

import pytest
import torch

from das_cli.data import batches, resolve_positions, tokenize_pairs
from das_cli.errors import DasError
from das_cli.examples import Example
from das_cli.models import embedded_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


def example(base="When Mary and John went out, John gave it to", label=" Mary", **kw):
    return Example(base=base, source=base.replace("Mary", "Anna"), label=label, base_label=" Mary", **kw)


def test_groups_by_length_and_labels_are_token_ids(tokenizer):
    pairs = tokenize_pairs(tokenizer, [example(), example("When Mary and John went to the park, John gave it to")], "train")
    assert len(pairs.groups) == 2 and len(pairs) == 2
    group = pairs.groups[0]
    assert tokenizer.decode(group.labels[0]) == " Mary"
    assert int(group.base_positions["last"][0]) == group.base_ids.shape[1] - 1


def test_label_that_is_not_one_token_is_a_clear_error(tokenizer):
    with pytest.raises(DasError, match=r"label ' Maryanne-Louise' in the test split is not one token"):
        tokenize_pairs(tokenizer, [example(label=" Maryanne-Louise")], "test")


def test_positions_ints_names_and_errors(tokenizer):
    ex = example(base_positions={"io": 1}, source_positions={"io": 1})
    group = tokenize_pairs(tokenizer, [ex], "train").groups[0]
    length = group.base_ids.shape[1]
    assert resolve_positions(group, (-1, "io", 0), "base").tolist() == [[length - 1, 1, 0]]
    with pytest.raises(DasError, match="outside a base prompt"):
        resolve_positions(group, (length,), "base")
    with pytest.raises(DasError, match="unknown position 's9'; valid names: io, last"):
        resolve_positions(group, ("s9",), "base")
    with pytest.raises(DasError, match="names one token twice"):
        resolve_positions(group, ("last", -1), "source")


def test_batches_cover_every_row_once_and_shuffle_deterministically():
    chunks = batches([5, 3], 2, torch.Generator().manual_seed(0))
    seen = sorted((g, int(i)) for g, rows in chunks for i in rows)
    assert seen == [(0, i) for i in range(5)] + [(1, i) for i in range(3)]
    again = batches([5, 3], 2, torch.Generator().manual_seed(0))
    assert [(g, r.tolist()) for g, r in chunks] == [(g, r.tolist()) for g, r in again]
