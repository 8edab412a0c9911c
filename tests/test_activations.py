"""The activation store: a chunk of sites is read in one forward per batch of each split and side, each
site's tensors equal a read of that site alone, the budget cuts the chunks, and each site is handed out once."""

import pytest
import torch
from test_engines import random_pairs
from omegaconf import OmegaConf
from pathlib import Path

import das_cli.activations as activations
from das_cli.activations import ActivationStore, read_prompts
from das_cli.models import load_model
from das_cli.sites import resolve_site

pytestmark = pytest.mark.usefixtures("one_thread")
CONF = Path(__file__).parents[1] / "conf" / "model"
BATCH = 3  # random_pairs has two groups of four pairs: two batches per group


@pytest.fixture(scope="module")
def lm():
    return load_model(OmegaConf.load(CONF / "tiny_llama.yaml"), "cpu", "float32")


@pytest.fixture(scope="module")
def pairs():
    return {"train": random_pairs(seed=1), "val": random_pairs(seed=2), "test": random_pairs(seed=3)}


@pytest.fixture
def forwards(monkeypatch):
    """The number of forwards the store runs."""
    calls = []
    real = activations.read_sites

    def counted(lm, sites, ids):
        calls.append(len(sites))
        return real(lm, sites, ids)

    monkeypatch.setattr(activations, "read_sites", counted)
    return calls


def sites_of(lm):
    return [resolve_site(lm, "block_output", 1), resolve_site(lm, "mlp_activation", 3), resolve_site(lm, "block_input", 0),
            resolve_site(lm, "head_value_output", 2, (1,))]


def test_one_chunk_is_one_forward_per_batch_and_equals_each_site_alone(lm, pairs, forwards):
    sites = sites_of(lm)
    store = ActivationStore(lm, pairs, BATCH)
    store.plan(sites)
    got = [store.take(site) for site in reversed(sites)][::-1]  # any order: the chunk is read at the first need
    # 3 splits' sources + 2 splits' bases (train, test), 2 groups each, 2 batches per group: 20 forwards for all sites
    assert forwards == [len(sites)] * 20
    for site, tensors in zip(sites, got):
        assert tensors.source.keys() == {"train", "val", "test"} and tensors.base.keys() == {"train", "test"}
        for name, split in pairs.items():
            for mine, alone in zip(tensors.source[name], read_prompts(lm, [site], split, 4)[0]):
                torch.testing.assert_close(mine, alone, rtol=0, atol=0)
        for name in ("train", "test"):
            for mine, alone in zip(tensors.base[name], read_prompts(lm, [site], pairs[name], 4, side="base")[0]):
                torch.testing.assert_close(mine, alone, rtol=0, atol=0)


def test_the_budget_cuts_the_chunks(lm, pairs, forwards, monkeypatch):
    sites = sites_of(lm)
    tokens = sum(g.source_ids.numel() for p in pairs.values() for g in p.groups)
    tokens += sum(g.base_ids.numel() for name in ("train", "test") for g in pairs[name].groups)
    width = lm.model.config.hidden_size
    monkeypatch.setattr(activations, "BUDGET_BYTES", 2 * tokens * width * 4)  # two residual-wide sites per chunk
    store = ActivationStore(lm, pairs, BATCH)
    store.plan(sites)
    assert [[s.stream for s in chunk] for chunk in store.upcoming] == [["block_output"], ["mlp_activation"],
                                                                        ["block_input", "head_value_output"]]
    store.take(sites[0])
    assert forwards == [1] * 20 and len(store.upcoming) == 2


def test_a_site_is_handed_out_once_and_read_alone_when_asked_again(lm, pairs, forwards):
    sites = sites_of(lm)
    store = ActivationStore(lm, pairs, BATCH)
    store.plan(sites)
    first = store.take(sites[1])
    again = store.take(sites[1])  # not kept: read again, on its own
    assert forwards == [len(sites)] * 20 + [1] * 20
    torch.testing.assert_close(first.source["val"][1], again.source["val"][1], rtol=0, atol=0)
    assert len(store.ready) == len(sites) - 1
