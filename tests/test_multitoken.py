"""Labels of several tokens: the teacher-forced loss, the all-tokens IIA rule, p_label and logit_diff on
such labels, base accuracy, and a CLI run on the shipped multi-token file.

The planted model is a one-layer GPT-2 wired by hand so that its next token is the current token + 1
(attention and MLP write nothing, no position embeddings): greedy decoding after a prompt ending in
token t gives t+1, t+2, ..., and with the label teacher-forced the answer at each label position is
the previous label token + 1. Every expected number is computed from the model's one-token outputs.
"""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import run_cli

from das_cli.data import PairGroup, PairSet
from das_cli.activations import base_run
from das_cli.names import ENGINES
from das_cli.engines import make_engine, prepare
from das_cli.models import FAMILIES, LoadedModel, load_model
from das_cli.sites import gather, hooked, read_site, resolve_site, scatter
from das_cli.activations import read_prompts
from das_cli.metrics import evaluate_kinds

CONF = Path(__file__).parents[1] / "conf" / "model"
V = 16  # vocabulary of the planted model
pytestmark = pytest.mark.usefixtures("one_thread")


def next_token_model() -> LoadedModel:
    config = GPT2Config(vocab_size=V, n_positions=16, n_embd=V, n_layer=1, n_head=2, tie_word_embeddings=False,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval().requires_grad_(False)
    with torch.no_grad():
        model.transformer.wte.weight.copy_(4 * torch.eye(V))
        model.transformer.wpe.weight.zero_()
        for proj in (model.transformer.h[0].attn.c_proj, model.transformer.h[0].mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        model.lm_head.weight.copy_(torch.eye(V).roll(1, dims=0))  # row t+1 reads coordinate t
    return LoadedModel(model=model, tokenizer=None, family=FAMILIES["gpt2"], name="next_token")


@pytest.fixture(scope="module")
def planted():
    return next_token_model()


def one_token_logits(lm: LoadedModel, token: int) -> torch.Tensor:
    """The planted model's next-token logits after `token` (they depend on that token alone)."""
    return lm.model(input_ids=torch.tensor([[token]])).logits[0, -1]


def test_the_planted_model_counts_up(planted):
    out = planted.model(input_ids=torch.tensor([[3, 9, 4, 5]])).logits[0].argmax(-1)
    assert out.tolist() == [4, 10, 5, 6]


def padded(rows: list[list[int]], width: int) -> torch.Tensor:
    return torch.tensor([row + [-1] * (width - len(row)) for row in rows])


# (base prompt, source prompt, label, base label); the edit (a full swap at the last prompt token) makes
# the model answer source's last token + 1, then count up from each teacher-forced label token.
PAIRS = [
    ([1, 2, 3], [4, 5, 6], [7, 8], [4, 5]),  # right; base answer known, other first token
    ([2, 2, 9], [1, 1, 2], [3, 6], [10]),  # first token right, second wrong: a miss
    ([5, 1, 0], [3, 3, 3], [4], []),  # one token, right
    ([6, 7, 8, 1], [2, 9, 9, 4], [5, 6, 7], []),  # three tokens, right
    ([3, 2, 1, 9], [1, 2, 3, 9], [10, 13], [10, 11]),  # " South Korea" vs " South Africa": same first token, second wrong
    ([1, 1, 1, 2], [0, 0, 5, 8], [9, 10], [3, 5]),  # right; the base answer's second token is wrong (base accuracy)
]
RIGHT = [True, False, True, True, False, True]


def planted_pairs() -> PairSet:
    groups = []
    for members in (PAIRS[:3], PAIRS[3:]):  # two prompt lengths, one label width for the split
        base, source, label, base_label = zip(*members)
        n = len(members)
        groups.append(PairGroup(
            base_ids=torch.tensor(base), source_ids=torch.tensor(source), labels=padded(list(label), 3),
            base_labels=padded(list(base_label), 2), base_positions={"last": torch.full((n,), len(base[0]) - 1)},
            source_positions={"last": torch.full((n,), len(source[0]) - 1)}, kinds=["cause"] * n,
        ))
    return PairSet(groups)


def planted_engine(lm: LoadedModel, name: str, pairs: PairSet):
    site = resolve_site(lm, "block_output", 0)
    base = base_run(lm, pairs, batch_size=2, keep_prefix=True, layers=(0,))
    residuals = [per_layer[0] for per_layer in base.residuals]
    groups = prepare(pairs, ("last",), read_prompts(lm, [site], pairs, 4)[0], lm.device, base.prefixes, residuals)
    return make_engine(name, lm, site, groups)


def swap(base, source):
    return source


@pytest.mark.parametrize("engine", ENGINES)
def test_a_pair_is_right_only_when_every_label_token_is(planted, engine):
    pairs = planted_pairs()
    result = evaluate_kinds(planted_engine(planted, engine, pairs), swap, batch_size=4,
                            base_labels=[g.base_labels for g in pairs.groups])
    assert result.counts == {"cause": 6} and result.hits == {"cause": sum(RIGHT)}  # 4 of 6
    # p_label: the product of the teacher-forced probabilities, from the model's one-token outputs
    expected_p, expected_diff = [], []
    for base, source, label, base_label in PAIRS:
        previous = [source[-1]] + label[:-1]  # the edited last token reads as the source's
        p = math.prod(float(torch.softmax(one_token_logits(planted, t), -1)[y]) for t, y in zip(previous, label))
        expected_p.append(p)
        if base_label and base_label[0] != label[0]:
            logits = one_token_logits(planted, source[-1])
            expected_diff.append(float(logits[label[0]] - logits[base_label[0]]))
    assert len(expected_diff) == 3  # pairs 0, 1 and 5; pair 4 shares its first token with the base answer
    scores = result.graded_scores()
    assert scores["p_label"] == pytest.approx(sum(expected_p) / 6, rel=1e-5)
    assert scores["logit_diff"] == pytest.approx(sum(expected_diff) / 3, rel=1e-5)


def test_logit_diff_is_nan_when_every_base_answer_starts_like_its_label(planted):
    pairs = planted_pairs()
    same_start = [g.labels[:, :1].clone() for g in pairs.groups]  # base answers: the labels' first tokens
    result = evaluate_kinds(planted_engine(planted, "fast", pairs), swap, batch_size=4, base_labels=same_start)
    assert math.isnan(result.graded_scores()["logit_diff"])


def test_base_accuracy_teacher_forces_the_base_label(planted):
    """Base answers known on pairs 0, 1, 4, 5; the model gets every token of the first three, and only the
    first token of pair 5's."""
    pairs = planted_pairs()
    for keep in (False, True):
        run = base_run(planted, pairs, batch_size=2, keep_prefix=keep, layers=(0,) if keep else ())
        assert run.accuracy(pairs) == pytest.approx(3 / 4)
        assert [p.shape for p in run.predictions] == [(3, 2), (3, 2)]


# --- the loss, by hand, on a tiny random model ------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_loss_is_the_teacher_forced_cross_entropy(engine):
    """Per pair: run the edited model on prompt + label[:-1], take the cross-entropy at the prompt's last
    position and at each fed token, average over the label's tokens; then average over pairs."""
    lm = load_model(OmegaConf.load(CONF / "tiny_llama.yaml"), "cpu", "float32")
    gen = torch.Generator().manual_seed(0)
    t, widths = 7, [1, 3, 2, 3]
    labels = torch.randint(0, 1000, (4, 3), generator=gen)
    for i, width in enumerate(widths):
        labels[i, width:] = -1
    pairs = PairSet([PairGroup(
        base_ids=torch.randint(0, 1000, (4, t), generator=gen), source_ids=torch.randint(0, 1000, (4, t), generator=gen),
        labels=labels, base_labels=torch.full((4, 1), -1), base_positions={"last": torch.full((4,), t - 1)},
        source_positions={"last": torch.full((4,), t - 1)},
    )])
    site = resolve_site(lm, "block_output", 1)
    base = base_run(lm, pairs, batch_size=4, keep_prefix=True, layers=(1,))
    source_acts = [read_site(lm, site, g.source_ids) for g in pairs.groups]
    groups = prepare(pairs, (3,), source_acts, lm.device, base.prefixes, [r[1] for r in base.residuals])
    W = torch.linalg.qr(torch.randn(site.width, 2, generator=gen))[0]

    def das(b, s):
        return b + ((s - b) @ W) @ W.T

    loss = make_engine(engine, lm, site, groups).loss([(0, torch.arange(4))], das)
    group, per_pair, first_only = pairs.groups[0], [], []
    for i, width in enumerate(widths):
        ids = torch.cat([group.base_ids[i], labels[i, : width - 1]])[None]
        source = groups[0].source_values[i : i + 1]
        position = torch.tensor([[3]])
        edit = lambda h: scatter(h, position, site.columns, das(gather(h, position, site.columns), source))  # noqa: E731
        with torch.no_grad(), hooked(site, edit):
            logits = lm.model(input_ids=ids).logits[0]
        per_pair.append(F.cross_entropy(logits[t - 1 : t - 1 + width], labels[i, :width]))
        first_only.append(F.cross_entropy(logits[t - 1], labels[i, 0]))
    expected = torch.stack(per_pair).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=0)
    assert abs(float(expected) - float(torch.stack(first_only).mean())) > 1e-3  # the later tokens count


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_runs_the_shipped_multi_token_dataset(tmp_path):
    """The shipped countries file (labels of 1 to 3 tokens) on a tiny model: both engines give one row
    with the same numbers."""
    args = ["dataset=countries_multitoken", "model=tiny_llama", "layers=[1]", "positions=[city]",
            "train.epochs=2", "train.batch_size=8", "progress=false"]
    rows = {}
    for engine in ENGINES:
        result = run_cli(args + [f"train.engine={engine}", f"hydra.run.dir={tmp_path / engine}"])
        assert result.returncode == 0, result.stderr[-2000:]
        rows[engine] = pd.read_csv(tmp_path / engine / "iia.csv").set_index("position")
    fast, reference = rows["fast"], rows["reference"]
    assert list(fast.index) == ["city"]
    assert [fast[c].tolist() for c in ("n_train", "n_val", "n_test")] == [[42], [12], [36]]
    for column in ("iia", "p_label", "loss", "test_loss", "base_accuracy", "logit_diff"):
        assert fast[column].tolist() == pytest.approx(reference[column].tolist(), abs=1e-4, nan_ok=True), column
    assert (fast["steps"] == 2 * 6).all() and (fast["test_loss"] > 0).all()
