"""Tokenising pairs: groups by length, labels of one or several tokens, position resolution and its errors."""

import pytest
import torch

from das_cli.data import batches, resolve_positions, to_device, tokenize_pairs
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


def test_labels_are_padded_to_the_splits_longest(tokenizer):
    pairs = tokenize_pairs(tokenizer, [example(), example("When Mary and John went to the park, John gave it to", label=" New Zealand")], "test")
    ids = tokenizer(" New Zealand", add_special_tokens=False).input_ids
    assert len(ids) == 2 and [g.labels.tolist() for g in pairs.groups] == [[[tokenizer(" Mary").input_ids[0], -1]], [ids]]
    assert all(g.base_labels.shape == (1, 1) for g in pairs.groups)


def test_label_that_merges_with_its_prompt_is_a_clear_error(tokenizer):
    with pytest.raises(DasError, match=r"label 'ten' in the test split merges with the end of its prompt"):
        tokenize_pairs(tokenizer, [example(base="It happens of", label="ten")], "test")


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
    plan = batches([5, 3], 2, torch.Generator().manual_seed(0))
    seen = sorted((g, int(i)) for batch in plan for g, rows in batch for i in rows)
    assert seen == [(0, i) for i in range(5)] + [(1, i) for i in range(3)]
    again = batches([5, 3], 2, torch.Generator().manual_seed(0))
    assert [[(g, r.tolist()) for g, r in b] for b in plan] == [[(g, r.tolist()) for g, r in b] for b in again]


def test_batches_are_full_and_span_groups_in_order():
    """Batches cut across groups (sorted by length): all full but the last, each piece one group."""
    plan = batches([5, 3, 1], 4)
    assert [[(g, r.tolist()) for g, r in b] for b in plan] == [
        [(0, [0, 1, 2, 3])],
        [(0, [4]), (1, [0, 1, 2])],
        [(2, [0])],
    ]
    shuffled = batches([5, 3, 1, 7], 4, torch.Generator().manual_seed(3))
    assert sorted(sum(len(r) for _, r in b) for b in shuffled) == [4, 4, 4, 4]
    for batch in shuffled:
        groups = [g for g, _ in batch]
        assert groups == sorted(set(groups))  # consecutive groups, each once
    assert batches([], 4) == []


def test_pairs_group_by_base_length_and_padded_sources_read_exactly(tokenizer, one_thread):
    from omegaconf import OmegaConf

    from das_cli.config import conf_dir
    from das_cli.models import load_model
    from das_cli.sites import resolve_site
    from das_cli.activations import read_prompts

    base = "Paris is a city in the country of"
    sources = ["Rome is a city in the country of", "Ouagadougou is a city in the country of"]
    examples = [Example(base=base, source=s, label=" Japan", source_positions={"city": i + 1}) for i, s in enumerate(sources)]
    pairs = tokenize_pairs(tokenizer, examples, "train")
    (group,) = pairs.groups  # one base length: one group, though the sources differ in length
    lengths = [len(tokenizer(s).input_ids) for s in sources]
    assert group.source_lengths.tolist() == lengths and group.source_ids.shape[1] == max(lengths)
    assert resolve_positions(group, ("last", -2), "source").tolist() == [[n - 1, n - 2] for n in lengths]
    lm = load_model(OmegaConf.load(conf_dir() / "model" / "tiny_llama.yaml"), "cpu", "float32")
    site = resolve_site(lm, "block_output", 2)
    padded = read_prompts(lm, [site], pairs, 8)[0][0]
    for row, source in enumerate(sources):
        alone = read_prompts(lm, [site], tokenize_pairs(tokenizer, [examples[row]], "train"), 8)[0][0][0]
        n = lengths[row]
        assert torch.allclose(padded[row, :n], alone[:n], atol=1e-5)  # padding after the prompt changes nothing


def test_to_device_keeps_the_plan():
    plan = batches([5, 3], 3, torch.Generator().manual_seed(1))
    assert to_device(plan, torch.device("cpu")) is plan
    moved = to_device(plan, torch.device("meta"))  # any non-CPU device: one copy, same structure
    assert [[(g, len(r)) for g, r in b] for b in moved] == [[(g, len(r)) for g, r in b] for b in plan]
    assert all(r.device.type == "meta" for b in moved for _, r in b)
