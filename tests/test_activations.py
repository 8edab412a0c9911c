"""The activation store: a chunk of sites is read in one forward per batch of each split and side, each
site's tensors equal a read of that site alone, the budget cuts the chunks, each site is handed out once,
and the base runs record the first chunk's base-prompt tensors (the same bits as a later read)."""

import pytest
import torch
from test_engines import random_pairs
from omegaconf import OmegaConf
from pathlib import Path

import das_cli.activations as activations
from das_cli.activations import ActivationStore, read_bases, read_prompts
from das_cli.models import load_model
from das_cli.sites import read_site, resolve_site

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
def forwards(lm):
    """The model's forwards, one entry (its batch's rows) per forward."""
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(len(kwargs["input_ids"])), with_kwargs=True)
    yield calls
    handle.remove()


def sites_of(lm, forwards=None):
    """Four sites of four streams (resolving a site probes the model: those forwards are not counted)."""
    sites = [resolve_site(lm, "block_output", 1), resolve_site(lm, "mlp_activation", 3), resolve_site(lm, "block_input", 0),
             resolve_site(lm, "head_value_output", 2, (1,))]
    if forwards is not None:
        forwards.clear()
    return sites


def test_one_chunk_is_one_forward_per_batch_and_equals_each_site_alone(lm, pairs, forwards):
    sites = sites_of(lm, forwards)
    store = ActivationStore(lm, pairs, BATCH)
    store.plan(sites)
    got = [store.take(site) for site in reversed(sites)][::-1]  # any order: the chunk is read at the first need
    # 3 splits' sources + 2 splits' bases (train, test), 2 groups each, 2 batches per group: 20 forwards for all sites
    assert len(forwards) == 20
    forwards.clear()
    for site, tensors in zip(sites, got):
        assert tensors.source.keys() == {"train", "val", "test"} and tensors.base.keys() == {"train", "test"}
        for name, split in pairs.items():
            for mine, alone in zip(tensors.source[name], read_prompts(lm, [site], split, BATCH)[0]):
                torch.testing.assert_close(mine, alone, rtol=0, atol=0)
        for name in ("train", "test"):
            for group, mine, alone in zip(pairs[name].groups, tensors.base[name], read_bases(lm, [site], pairs[name], BATCH)[0]):
                torch.testing.assert_close(mine, alone, rtol=0, atol=0)
                torch.testing.assert_close(mine, read_site(lm, site, group.base_ids), rtol=1e-5, atol=1e-5)
    last_block = []
    handle = lm.block(lm.n_layers - 1).register_forward_pre_hook(lambda *args: last_block.append(1))
    try:
        alone = read_bases(lm, [sites[2]], pairs["test"], BATCH)  # block_input at layer 0: each forward stops there
    finally:
        handle.remove()
    assert last_block == [] and alone[0][0].shape[:2] == pairs["test"].groups[0].base_ids.shape


def test_the_budget_cuts_the_chunks(lm, pairs, forwards, monkeypatch):
    sites = sites_of(lm, forwards)
    tokens = sum(g.source_ids.numel() for p in pairs.values() for g in p.groups)
    tokens += sum(g.base_ids.numel() for name in ("train", "test") for g in pairs[name].groups)
    width = lm.model.config.hidden_size
    monkeypatch.setattr(activations, "BUDGET_BYTES", 2 * tokens * width * 4)  # two residual-wide sites per chunk
    store = ActivationStore(lm, pairs, BATCH)
    store.plan(sites)
    assert [[s.stream for s in chunk] for chunk in store.upcoming] == [["block_output"], ["mlp_activation"],
                                                                        ["block_input", "head_value_output"]]
    store.take(sites[0])
    assert len(forwards) == 20 and len(store.upcoming) == 2


def test_a_site_is_handed_out_once_and_read_alone_when_asked_again(lm, pairs, forwards):
    sites = sites_of(lm, forwards)
    store = ActivationStore(lm, pairs, BATCH)
    store.plan(sites)
    first = store.take(sites[1])
    again = store.take(sites[1])  # not kept: read again, on its own
    assert len(forwards) == 20 + 20
    torch.testing.assert_close(first.source["val"][1], again.source["val"][1], rtol=0, atol=0)
    assert len(store.ready) == len(sites) - 1


def test_the_base_runs_record_the_first_chunk_as_a_later_read_would(lm, pairs, forwards, monkeypatch):
    sites = sites_of(lm, forwards)
    tokens = sum(g.source_ids.numel() for p in pairs.values() for g in p.groups)
    tokens += sum(g.base_ids.numel() for name in ("train", "test") for g in pairs[name].groups)
    monkeypatch.setattr(activations, "BUDGET_BYTES", 2 * tokens * lm.model.config.hidden_size * 4)
    store = ActivationStore(lm, pairs, BATCH)
    store.plan(sites)  # chunks: [block_output L1], [mlp_activation L3], [block_input L0, head_value_output L2]
    [resolve_site(lm, "block_input", layer) for layer in range(4)]  # the residuals' sites, probed once
    forwards.clear()
    runs = store.base_runs(layers=(0, 1, 2, 3), keep_prefix=True)
    assert runs.keys() == {"train", "val", "test"} and all(run.sites is None for run in runs.values())
    assert len(forwards) == 3 * 2 * 2  # the base runs of three splits: two groups of two batches each
    forwards.clear()
    recorded = store.take(sites[0])
    assert len(forwards) == 3 * 2 * 2  # its sources only: its base tensors came with the base runs
    forwards.clear()
    read = store.take(sites[1])
    assert len(forwards) == 3 * 2 * 2 + 2 * 2 * 2  # sources, then the train and test bases
    for site, tensors in ((sites[0], recorded), (sites[1], read)):
        for name in ("train", "test"):
            for mine, alone in zip(tensors.base[name], read_bases(lm, [site], pairs[name], BATCH)[0]):
                torch.testing.assert_close(mine, alone, rtol=0, atol=0)
    store.plan(sites[2:])  # a new plan forgets what was recorded for sites outside it
    assert store.recorded == {}


def test_without_caches_only_the_test_split_has_a_base_run(lm, pairs, forwards):
    store = ActivationStore(lm, pairs, BATCH)
    store.plan(sites_of(lm, forwards))
    runs = store.base_runs(layers=(), keep_prefix=False)
    assert runs.keys() == {"test"} and runs["test"].prefixes is None and store.recorded == {}
