"""DAS finds a planted variable, and patching an unrelated direction does nothing.

A one-layer GPT-2 is wired by hand: attention and MLP write nothing, so the residual stream at
the last token is that token's embedding e_t = c_t * u + noise_t, with c_t = +1 or -1 and u a
fixed unit direction. The unembedding reads only u: the model answers A when c = +1, else B.
The counterfactual label of a (base, source) pair is A or B by the source's c. So the variable
lives in exactly one direction of block_output at layer 0, last position.
"""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from das_cli.data import PairGroup, PairSet
from das_cli.engines import make_engine, prepare
from das_cli.interventions import build_intervention
from das_cli.models import FAMILIES, LoadedModel
from das_cli.sites import resolve_site
from das_cli.activations import base_prefixes, read_bases, read_prompts
from das_cli.metrics import evaluate
from das_cli.train import fit

D, N_INPUT, A, B = 16, 32, 32, 33


def planted_model() -> tuple[LoadedModel, torch.Tensor]:
    config = GPT2Config(
        vocab_size=34, n_positions=8, n_embd=D, n_layer=1, n_head=2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    u = torch.zeros(D)
    u[0], u[1] = 2**-0.5, -(2**-0.5)  # zero mean, so LayerNorm keeps it
    noise = torch.randn(N_INPUT, D, generator=g)
    noise[:, :2] = 0
    noise[:, 2:] -= noise[:, 2:].mean(dim=1, keepdim=True)
    sign = torch.tensor([1.0 if t % 2 == 0 else -1.0 for t in range(N_INPUT)])
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wte.weight[:N_INPUT] = 3 * sign[:, None] * u + noise
        model.transformer.wpe.weight.zero_()
        for proj in (model.transformer.h[0].attn.c_proj, model.transformer.h[0].mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[A], model.lm_head.weight[B] = 20 * u, -20 * u
    return LoadedModel(model=model, tokenizer=None, family=FAMILIES["gpt2"], name="planted"), u


def pairs(n: int, flips_only: bool, seed: int) -> PairSet:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, N_INPUT, (n, 3), generator=g)
    source = torch.randint(0, N_INPUT, (n, 3), generator=g)
    if flips_only:  # source's last token has the other parity: "no effect" scores 0
        source[:, -1] = (source[:, -1] // 2) * 2 + 1 - base[:, -1] % 2
    label = torch.where(source[:, -1] % 2 == 0, A, B)
    base_label = torch.where(base[:, -1] % 2 == 0, A, B)
    last = torch.full((n,), 2)
    group = PairGroup(base, source, label, base_label, {"last": last}, {"last": last}, ["cause"] * n)
    return PairSet([group])


def iia_after_training(intervention_name: str, engine: str, **options) -> float:
    lm, _ = planted_model()
    site = resolve_site(lm, "block_output", 0)
    train, test = pairs(200, False, 0), pairs(100, True, 1)
    groups = {}
    for name, ps in (("train", train), ("test", test)):
        groups[name] = prepare(ps, ("last",), read_prompts(lm, [site], ps, 50)[0], lm.device, base_prefixes(lm, ps, 50))
    torch.manual_seed(0)
    intervention = build_intervention(intervention_name, D, **options)
    fit(make_engine(engine, lm, site, groups["train"]), intervention, 20, 0.05, 20, 0.1, seed=0, progress=False)
    iia, _ = evaluate(make_engine(engine, lm, site, groups["test"]), intervention, 50)
    return iia


def test_model_reads_the_planted_direction():
    lm, _ = planted_model()
    ids = torch.tensor([[0, 1, 2], [0, 1, 3]])
    top = lm.model(input_ids=ids).logits[:, -1].argmax(-1)
    assert top.tolist() == [A, B]


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_das_finds_the_planted_direction(engine):
    assert iia_after_training("das", engine, dim=1) >= 0.95


def test_patching_an_unrelated_direction_does_nothing():
    assert iia_after_training("vanilla", "fast", neurons=list(range(2, D))) <= 0.05


def test_full_vector_patch_moves_the_variable():
    assert iia_after_training("vanilla", "fast") == 1.0


def estimated(name: str, **options):
    """An estimated baseline fitted on the planted model's training activations (classes: the answer, A or B)."""
    from das_cli.interventions import SiteActivations

    lm, u = planted_model()
    site = resolve_site(lm, "block_output", 0)
    train, test = pairs(200, False, 0), pairs(100, True, 1)
    base_acts = read_bases(lm, [site], train, 50)[0][0][:, -1]
    source_acts = read_prompts(lm, [site], train, 50)[0][0][:, -1]
    group = train.groups[0]
    classes = torch.cat([(group.base_labels == B).long(), (group.labels == B).long()])
    torch.manual_seed(0)
    intervention = build_intervention(name, D, **options)
    intervention.fit_activations(SiteActivations(torch.cat([base_acts, source_acts]), classes, ["A", "B"]))
    groups = prepare(test, ("last",), read_prompts(lm, [site], test, 50)[0], lm.device, base_prefixes(lm, test, 50))
    iia, _ = evaluate(make_engine("fast", lm, site, groups), intervention, 50)
    return intervention, u, iia


@pytest.mark.parametrize("name", ["mean_diff", "pca", "probe"])
def test_estimated_baselines_find_the_planted_direction(name):
    intervention, u, iia = estimated(name)
    basis = intervention.saved()["basis"]
    assert abs(float(basis[:, 0] @ u)) > 0.95  # 16 distinct tokens per class: the class means keep some noise
    assert iia >= 0.95


def test_a_random_direction_mostly_misses_it():
    _, _, iia = estimated("random")
    assert iia <= 0.5
