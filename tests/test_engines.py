"""The fast engine (cached base prefix, forward from the earliest intervened position) gives the
same logits, gradients and training run as the reference engine (full forward with a hook), with
one-token labels and with labels of several tokens (teacher-forced after the prompt)."""

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import TINY

from das_cli.data import PairGroup, PairSet, batches, to_device
from das_cli import activations as activations_module
from das_cli import forward as forward_module
from das_cli.activations import base_run
from das_cli.names import ENGINES
from das_cli.engines import CellGroup, FastEngine, ReferenceEngine, make_engine, prepare
from das_cli.interventions import build_intervention
from das_cli.models import load_model
from das_cli.sites import HEAD_STREAMS, STREAMS, head_counts, read_site, resolve_site
from das_cli.metrics import evaluate
from das_cli.train import fit

CONF = Path(__file__).parents[1] / "conf" / "model"
MODELS = ("tiny_gpt2", "tiny_llama")
ATOL = 1e-4
G = 4  # rows per group
LENGTHS = (9, 6)  # base prompt length of each group (two groups: the engines index groups)
SOURCE_LENGTHS = (7, 8)
LAYER = 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=MODELS)
def lm(request):
    return load_model(OmegaConf.load(CONF / f"{request.param}.yaml"), "cpu", "float32")


def base_prefixes(lm, pairs, batch_size):
    return base_run(lm, pairs, batch_size, keep_prefix=True).prefixes


def answers(gen: torch.Generator, widths: tuple[int, ...] | None) -> torch.Tensor:
    """Random answers, one per row: [G] one token each (widths None), else [G, max(widths)] with row i's
    answer `widths[i]` tokens long and -1 after it."""
    if widths is None:
        return torch.randint(0, 1000, (G,), generator=gen)
    labels = torch.randint(0, 1000, (G, max(widths)), generator=gen)
    for i, width in enumerate(widths):
        labels[i, width:] = -1
    return labels


MULTI = (1, 3, 2, 3)  # label widths per row: one-token and multi-token answers in one group


def random_pairs(seed: int = 0, widths: tuple[int, ...] | None = None) -> PairSet:
    """Two groups of random prompts; a named position `s1` that varies by row on both sides."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for t, s in zip(LENGTHS, SOURCE_LENGTHS):
        groups.append(
            PairGroup(
                base_ids=torch.randint(0, 1000, (G, t), generator=gen),
                source_ids=torch.randint(0, 1000, (G, s), generator=gen),
                labels=answers(gen, widths),
                base_labels=torch.randint(0, 1000, (G,), generator=gen),
                base_positions={"s1": torch.tensor([1, 3, 2, t - 2]), "last": torch.full((G,), t - 1)},
                source_positions={"s1": torch.tensor([4, 1, s - 2, 2]), "last": torch.full((G,), s - 1)},
            )
        )
    return PairSet(groups=groups)


@pytest.fixture(scope="module")
def pairs():
    return random_pairs()


SKIP_LAYERS = (0, 1, 3)


@pytest.fixture(scope="module")
def base(lm, pairs):
    # 3 does not divide 4: the parts get concatenated
    return base_run(lm, pairs, batch_size=3, keep_prefix=True, layers=SKIP_LAYERS)


@pytest.fixture(scope="module")
def prefixes(base):
    return base.prefixes


@pytest.fixture(scope="module", params=["skip_blocks", "all_blocks"])
def residuals(request, base):
    """With the cached residual the fast engine skips the blocks before the site; without, it runs them."""
    return base.residuals if request.param == "skip_blocks" else None


def heads_for(lm, stream):
    if stream not in HEAD_STREAMS:
        return None
    # tiny_llama has 2 key/value heads (GQA), 4 query heads
    return (1,) if stream in ("head_key_output", "head_value_output") else (0, 2)


def site_of(lm, stream, layer=LAYER):
    return resolve_site(lm, stream, layer, heads_for(lm, stream))


# position choices, per group of length t: [G, P] token indices
POSITIONS = {
    "first": lambda t: torch.zeros(G, 1, dtype=torch.long),
    "middle": lambda t: torch.full((G, 1), t // 2),
    "last": lambda t: torch.full((G, 1), t - 1),
    "middle+last": lambda t: torch.tensor([[t // 2, t - 1]] * G),
    "per_row": lambda t: torch.tensor([[t - 1], [1], [t // 2], [t - 2]]),
    # the earliest position sits in the second column, and row 0's pair is not sorted
    "per_row_pair": lambda t: torch.tensor([[t - 1, 1], [3, t - 1], [2, t - 3], [t - 2, 3]]),
}


def hand_groups(lm, site, pairs, prefixes, position: str, seed: int = 0, residuals=None, own_labels=False) -> list[CellGroup]:
    """Cells of `pairs` with random source values; random one-token labels, or the pairs' own (`own_labels`:
    the labels the base run fed, which the cached residual of fed positions was computed with)."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g, (group, prefix) in enumerate(zip(pairs.groups, prefixes)):
        positions = POSITIONS[position](group.base_ids.shape[1])
        groups.append(
            CellGroup(
                base_ids=group.base_ids,
                base_positions=positions,
                source_values=torch.randn(G, positions.shape[1] * site.width, generator=gen),
                labels=group.labels if own_labels else torch.randint(0, 1000, (G,), generator=gen),
                prefix=prefix,
                residual=residuals[g][site.layer] if residuals else None,
            )
        )
    return groups


def orthonormal(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=gen))[0]


def das_swap(W: torch.Tensor):
    """DAS with a fixed basis: (base values, source values) -> edited values."""
    return lambda b, s: b + ((s - b) @ W) @ W.T


def unedited_last_logits(lm, ids):
    """[B, 1, vocab]: the engines' shape for one-token answers."""
    with torch.no_grad():
        return lm.model(input_ids=ids, logits_to_keep=1).logits.float()


# --- the prefix cache ------------------------------------------------------------------------


def test_base_prefixes_shapes(lm, pairs, prefixes):
    n_kv, head_dim = head_counts(lm, "key_output")
    assert len(prefixes) == len(pairs.groups)
    for group, prefix in zip(pairs.groups, prefixes):
        assert len(prefix) == lm.n_layers
        t = group.base_ids.shape[1]
        for keys, values in prefix:
            assert keys.shape == values.shape == (G, n_kv, t - 1, head_dim)
            assert not keys.requires_grad
    # batching does not change the prefix
    one_batch = base_prefixes(lm, pairs, batch_size=100)
    for a, b in zip(prefixes, one_batch):
        for (ka, va), (kb, vb) in zip(a, b):
            torch.testing.assert_close(ka, kb, atol=1e-6, rtol=0)
            torch.testing.assert_close(va, vb, atol=1e-6, rtol=0)


def test_base_run_cache_stores_nothing(lm, pairs):
    """The base run's cache hands each layer's keys and values on (from layer 2 on) and keeps none itself."""
    group = pairs.groups[0]
    kept: dict = {}
    cache = activations_module._RecordingCache(2, kept, slice(1, 3), G)
    with torch.no_grad():
        lm.model(input_ids=group.base_ids[1:3], **forward_module.cache_arguments(lm.model, cache))
    assert all(cache.get_seq_length(layer) == 0 for layer in range(lm.n_layers))
    assert sorted(kept) == [("kv", 2, 0), ("kv", 2, 1), ("kv", 3, 0), ("kv", 3, 1)]
    t = group.base_ids.shape[1]
    assert kept["kv", 3, 0].shape[0] == G and kept["kv", 3, 0].shape[2] == t - 1


def test_base_run_predictions_and_accuracy(lm, pairs):
    plain = activations_module.base_run(lm, pairs, batch_size=3, keep_prefix=False)
    assert plain.prefixes is None
    kept = activations_module.base_run(lm, pairs, batch_size=3, keep_prefix=True)
    for group, p, q in zip(pairs.groups, plain.predictions, kept.predictions):
        expected = unedited_last_logits(lm, group.base_ids).argmax(-1)
        assert torch.equal(p, expected) and torch.equal(q, expected)
    # base labels: right on rows 0 and 2 of the first group only
    relabelled = PairSet(groups=[])
    for i, (group, p) in enumerate(zip(pairs.groups, plain.predictions)):
        p = p[:, 0]
        base_labels = (p + 1) % 1000
        if i == 0:
            base_labels[[0, 2]] = p[[0, 2]]
        relabelled.groups.append(PairGroup(**{**group.__dict__, "base_labels": base_labels}))
    assert plain.accuracy(relabelled) == pytest.approx(2 / len(pairs))


@pytest.mark.parametrize("position", list(POSITIONS))
def test_identity_swap_equals_unedited_model(lm, pairs, prefixes, position):
    """With a swap that changes nothing, both engines give the unedited model's last logits."""
    site = site_of(lm, "block_output")
    groups = hand_groups(lm, site, pairs, prefixes, position)
    rows = torch.tensor([2, 0, 3])
    for engine in (ReferenceEngine(lm, site, groups), FastEngine(lm, site, groups)):
        for g, group in enumerate(groups):
            expected = unedited_last_logits(lm, group.base_ids[rows])
            with torch.no_grad():
                got = engine.logits([(g, rows)], lambda b, s: b)
            assert got.dtype == torch.float32 and got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_fast_engine_starts(lm, pairs, prefixes):
    site = site_of(lm, "block_input")
    for position, expected in [("first", [0, 0]), ("last", [8, 5]), ("middle+last", [4, 3]), ("per_row", [1, 1]), ("per_row_pair", [1, 1])]:
        engine = FastEngine(lm, site, hand_groups(lm, site, pairs, prefixes, position))
        assert engine.starts == expected, position


def test_base_run_residuals_are_the_block_inputs(lm, pairs, base):
    """The kept residuals are the swept blocks' inputs (the model's hidden_states[layer]), and only theirs."""
    for group, residuals in zip(pairs.groups, base.residuals):
        with torch.no_grad():
            hidden = lm.model(input_ids=group.base_ids, output_hidden_states=True).hidden_states
        assert sorted(residuals) == list(SKIP_LAYERS)
        for layer, residual in residuals.items():
            torch.testing.assert_close(residual, hidden[layer], atol=1e-6, rtol=0)


def test_make_engine(lm, pairs, prefixes):
    site = site_of(lm, "block_input")
    groups = hand_groups(lm, site, pairs, prefixes, "last")
    assert set(ENGINES) == {"fast", "reference"}
    assert type(make_engine("fast", lm, site, groups)) is FastEngine
    assert type(make_engine("reference", lm, site, groups)) is ReferenceEngine


# --- logits and gradients match, every stream and position -----------------------------------


def compare_engines(lm, site, groups, rows, seed=0):
    W0 = orthonormal(groups[0].source_values.shape[1], 2, seed)  # P positions: P * width columns
    results = {}
    for cls in (ReferenceEngine, FastEngine):
        engine = cls(lm, site, groups)
        out = []
        for g, group in enumerate(groups):
            W = W0.clone().requires_grad_(True)
            with torch.no_grad():
                logits = engine.logits([(g, rows)], das_swap(W))
            loss = engine.loss([(g, rows)], das_swap(W))  # the fast one reads logits once
            torch.testing.assert_close(loss.detach(), F.cross_entropy(logits[:, 0], group.labels[rows, 0]), atol=ATOL, rtol=0)
            (grad,) = torch.autograd.grad(loss, W)
            out.append((logits, grad))
        results[cls.__name__] = out
    for g, ((ref_logits, ref_grad), (fast_logits, fast_grad)) in enumerate(
        zip(results["ReferenceEngine"], results["FastEngine"])
    ):
        assert fast_logits.shape == (len(rows), 1, lm.model.config.vocab_size)
        torch.testing.assert_close(fast_logits, ref_logits, atol=ATOL, rtol=0, msg=lambda m: f"group {g} logits: {m}")
        torch.testing.assert_close(fast_grad, ref_grad, atol=ATOL, rtol=0, msg=lambda m: f"group {g} grad: {m}")
    return results


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("stream", STREAMS)
def test_fast_equals_reference(lm, pairs, prefixes, residuals, stream, position):
    site = site_of(lm, stream)
    groups = hand_groups(lm, site, pairs, prefixes, position, residuals=residuals)
    results = compare_engines(lm, site, groups, rows=torch.tensor([2, 0]))
    ref_logits, ref_grad = results["ReferenceEngine"][0]
    change = (ref_logits - unedited_last_logits(lm, groups[0].base_ids[torch.tensor([2, 0])])).abs().amax()
    if "query" in stream and position == "first":
        # token 0 attends only to itself (softmax over one key is 1): its query has no effect
        assert change < 1e-6
        assert ref_grad.abs().amax() < 1e-6
    else:
        # the intervention really does something at this site (else the comparison is vacuous)
        assert change > 1e-6
        assert ref_grad.abs().amax() > 0


@pytest.mark.parametrize("layer", [0, 3])
@pytest.mark.parametrize("stream", ["block_input", "block_output", "head_key_output", "mlp_activation"])
def test_fast_equals_reference_other_layers(lm, pairs, prefixes, residuals, stream, layer):
    site = site_of(lm, stream, layer)
    for position in ("middle", "per_row_pair"):
        groups = hand_groups(lm, site, pairs, prefixes, position, seed=layer, residuals=residuals)
        compare_engines(lm, site, groups, rows=torch.tensor([1, 3, 0]), seed=layer)


# --- batches spanning groups of different lengths -----------------------------------------------

MIXED = [(0, torch.tensor([2, 0])), (1, torch.tensor([3, 1, 0]))]  # rows of the 9-token and the 6-token group
# joined into one left-padded forward when the earliest intervened column (padded) follows the 3 pad columns
JOINED = {"first": False, "middle": True, "last": True, "middle+last": True, "per_row": False, "per_row_pair": False}


@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("stream", STREAMS)
def test_mixed_length_batch_equals_reference(lm, pairs, prefixes, residuals, stream, position):
    site = site_of(lm, stream)
    groups = hand_groups(lm, site, pairs, prefixes, position, residuals=residuals)
    fast, reference = FastEngine(lm, site, groups), ReferenceEngine(lm, site, groups)
    assert fast.joinable(MIXED) is JOINED[position]
    calls = []
    hook = lm.model.base_model.register_forward_pre_hook(lambda *_: calls.append(1))
    W0 = orthonormal(groups[0].source_values.shape[1], 2)
    out = {}
    try:
        for engine in (reference, fast):
            W = W0.clone().requires_grad_(True)
            calls.clear()
            with torch.no_grad():
                logits = engine.logits(MIXED, das_swap(W))
            forwards = len(calls)
            loss = engine.loss(MIXED, das_swap(W))
            out[engine] = (logits, loss.detach(), torch.autograd.grad(loss, W)[0], forwards)
    finally:
        hook.remove()
    assert out[fast][3] == (1 if JOINED[position] else 2) and out[reference][3] == 2
    for name, got, expected in zip(("logits", "loss", "grad"), out[fast][:3], out[reference][:3]):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    assert torch.equal(fast.labels(MIXED), torch.cat([groups[0].labels[MIXED[0][1]], groups[1].labels[MIXED[1][1]]]))


# --- labels of several tokens ------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_pairs():
    return random_pairs(seed=3, widths=MULTI)


@pytest.fixture(scope="module")
def multi_base(lm, multi_pairs):
    return base_run(lm, multi_pairs, batch_size=3, keep_prefix=True, layers=SKIP_LAYERS)


MULTI_STREAMS = ["block_input", "block_output", "attention_value_output", "head_key_output", "value_output", "mlp_activation"]


@pytest.mark.parametrize("skip", [True, False], ids=["skip_blocks", "all_blocks"])
@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("stream", MULTI_STREAMS)
def test_multi_token_labels_fast_equals_reference(lm, multi_pairs, multi_base, stream, position, skip):
    """Labels of 1 to 3 tokens in one batch, teacher-forced: both engines give the same logits at every
    answer position, loss and gradient, for rows of one prompt length and for a batch of two lengths."""
    site = site_of(lm, stream)
    residuals = multi_base.residuals if skip else None
    groups = hand_groups(lm, site, multi_pairs, multi_base.prefixes, position, residuals=residuals, own_labels=True)
    fast, reference = FastEngine(lm, site, groups), ReferenceEngine(lm, site, groups)
    W0 = orthonormal(groups[0].source_values.shape[1], 2)
    for batch in ([(0, torch.tensor([1, 0, 3]))], MIXED):
        out = {}
        for engine in (reference, fast):
            W = W0.clone().requires_grad_(True)
            with torch.no_grad():
                logits = engine.logits(batch, das_swap(W))
            loss = engine.loss(batch, das_swap(W))
            out[engine] = (logits, loss.detach(), torch.autograd.grad(loss, W)[0])
        assert out[fast][0].shape == (sum(len(rows) for _, rows in batch), max(MULTI), lm.model.config.vocab_size)
        for name, got, expected in zip(("logits", "loss", "grad"), out[fast], out[reference]):
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
        assert out[reference][2].abs().amax() > 0  # the edit reaches the loss


def test_fed_labels_leave_the_cached_prefix_alone(lm, multi_pairs, multi_base):
    """The base run behind the fast engine feeds the labels after the prompt: the prompt's keys and values
    are those of the prompt alone, and the residual holds one more position per fed token."""
    single = PairSet(groups=[PairGroup(**{**g.__dict__, "labels": g.labels[:, 0]}) for g in multi_pairs.groups])
    plain = base_run(lm, single, batch_size=3, keep_prefix=True, layers=SKIP_LAYERS)
    for group, multi_prefix, prefix, multi_residual, residual in zip(
        multi_pairs.groups, multi_base.prefixes, plain.prefixes, multi_base.residuals, plain.residuals
    ):
        for layer, (a, b) in enumerate(zip(multi_prefix, prefix)):
            if layer >= min(SKIP_LAYERS):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        t = group.base_ids.shape[1]
        for layer in SKIP_LAYERS:
            assert multi_residual[layer].shape[1] == t + max(MULTI) - 1
            torch.testing.assert_close(multi_residual[layer][:, :t], residual[layer], atol=1e-6, rtol=0)


def test_fast_engine_without_prefix_falls_back(lm, pairs, prefixes):
    site = site_of(lm, "mlp_output")
    groups = hand_groups(lm, site, pairs, prefixes, "middle+last")
    bare = [CellGroup(g.base_ids, g.base_positions, g.source_values, g.labels, prefix=None) for g in groups]
    rows = torch.tensor([3, 1])
    W = orthonormal(2 * site.width, 2)
    with torch.no_grad():
        for g in range(len(groups)):
            torch.testing.assert_close(
                FastEngine(lm, site, bare).logits([(g, rows)], das_swap(W)),
                FastEngine(lm, site, groups).logits([(g, rows)], das_swap(W)),
                atol=ATOL,
                rtol=0,
            )


# --- a short training run is the same with either engine -------------------------------------


TRAIN_CASES = [
    ("block_output", ("s1",)),
    ("head_value_output", (3, "last")),
    ("attention_output", ("last",)),
    ("mlp_activation", ("s1", "last")),
]


@pytest.mark.parametrize("widths", [None, MULTI], ids=["one_token", "multi_token"])
@pytest.mark.parametrize("stream,position", TRAIN_CASES)
def test_training_is_engine_independent(lm, stream, position, widths):
    pairs = random_pairs(seed=1, widths=widths)
    # labels (their first tokens): the base's own prediction on half the rows, the source's on the other
    # half, so one-token IIA is neither 0 nor 1 by construction
    for group in pairs.groups:
        base_pred = unedited_last_logits(lm, group.base_ids)[:, 0].argmax(-1)
        source_pred = unedited_last_logits(lm, group.source_ids)[:, 0].argmax(-1)
        first = torch.where(torch.arange(G) % 2 == 0, base_pred, source_pred)
        if widths is None:
            group.labels = first
        else:
            group.labels[:, 0] = first
    site = site_of(lm, stream)
    source_acts = [read_site(lm, site, group.source_ids) for group in pairs.groups]
    prefixes = base_prefixes(lm, pairs, batch_size=4)
    outcomes = {}
    for name in ENGINES:
        groups = prepare(pairs, position, source_acts, lm.device, prefixes if name == "fast" else None)
        engine = make_engine(name, lm, site, groups)
        torch.manual_seed(123)
        width = groups[0].source_values.shape[1]  # P positions concatenated
        assert width == len(position) * site.width
        intervention = build_intervention("das", width, dim=1)
        result = fit(engine, intervention, epochs=2, lr=0.05, batch_size=3, lr_end_factor=0.5, seed=7, progress=False)
        iia, loss = evaluate(engine, intervention, batch_size=3)
        outcomes[name] = (result, iia, loss, intervention.W.detach().clone())
    (fit_f, iia_f, loss_f, W_f), (fit_r, iia_r, loss_r, W_r) = outcomes["fast"], outcomes["reference"]
    assert fit_f.steps == fit_r.steps == 2 * 3  # 8 rows in batches of 3 (one spans both groups), 3 per epoch
    assert fit_f.loss == pytest.approx(fit_r.loss, abs=1e-4)
    assert iia_f == iia_r
    assert loss_f == pytest.approx(loss_r, abs=1e-4)
    torch.testing.assert_close(W_f, W_r, atol=1e-4, rtol=0)
    # training moved the basis away from its initial value
    torch.manual_seed(123)
    W0 = build_intervention("das", len(position) * site.width, dim=1).W.detach()
    assert (W_f - W0).abs().amax() > 1e-3


def test_prepare_gathers_source_values(lm):
    pairs = random_pairs(seed=2)
    site = site_of(lm, "head_query_output")
    source_acts = [read_site(lm, site, group.source_ids) for group in pairs.groups]
    groups = prepare(pairs, ("s1", -1), source_acts, lm.device)
    for group, cell, acts in zip(pairs.groups, groups, source_acts):
        t, s = group.base_ids.shape[1], group.source_ids.shape[1]
        expected_pos = torch.stack([group.base_positions["s1"], torch.full((G,), t - 1)], dim=1)
        assert torch.equal(cell.base_positions, expected_pos)
        src_pos = torch.stack([group.source_positions["s1"], torch.full((G,), s - 1)], dim=1)
        expected = torch.stack([torch.cat([acts[i, src_pos[i, 0]], acts[i, src_pos[i, 1]]]) for i in range(G)])
        torch.testing.assert_close(cell.source_values, expected, atol=0, rtol=0)
        assert cell.source_values.shape == (G, 2 * site.width)
        assert cell.prefix is None


def test_skipped_blocks_do_no_work(lm, pairs, base):
    """With the cached residual, blocks before the site are never entered by the fast engine."""
    site = site_of(lm, "block_output", 3)
    groups = hand_groups(lm, site, pairs, base.prefixes, "last", residuals=base.residuals)
    entered = []
    attention = [lm.block(i).get_submodule(lm.family.attention) for i in range(4)]
    handles = [m.register_forward_pre_hook(lambda m, a, i=i: entered.append(i)) for i, m in enumerate(attention)]
    try:
        FastEngine(lm, site, groups).logits([(0, torch.tensor([0, 1]))], lambda b, s: b)
    finally:
        for h in handles:
            h.remove()
    assert entered == [3]
    for block in (lm.block(i) for i in range(4)):
        assert "forward" not in vars(block)  # the class's forward is back


# --- the cached prefix reaches the model --------------------------------------------------


def test_fast_engine_feeds_only_the_suffix_over_its_cache(lm, pairs, prefixes, monkeypatch):
    """The suffix forward gets the cache it was built for: it embeds only the tokens from the
    earliest intervened position on, and the model appends their keys to the prefix's."""
    site = site_of(lm, "block_output")
    groups = hand_groups(lm, site, pairs, prefixes, "middle")
    engine = FastEngine(lm, site, groups)
    made = []
    build = forward_module.prefix_cache
    monkeypatch.setattr(forward_module, "prefix_cache", lambda *args: made.append(build(*args)) or made[-1])
    fed = []
    embeddings = lm.model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda module, inputs, output: fed.append(inputs[0].shape[1]))
    try:
        with torch.no_grad():
            engine.logits([(0, torch.arange(G))], lambda b, s: b)
    finally:
        handle.remove()
    t, start = LENGTHS[0], engine.starts[0]
    assert start > 0 and fed == [t - start]
    assert len(made) == 1 and made[0].get_seq_length(LAYER) == t


def test_cache_keyword_follows_the_forward_signature():
    class Renamed(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=None): ...

    class Older(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=None): ...

    assert forward_module.cache_arguments(Renamed(), None) == {"cache": None, "use_cache": False}
    assert forward_module.cache_arguments(Older(), "kv") == {"past_key_values": "kv", "use_cache": True}


@pytest.mark.parametrize("engine", ENGINES)
def test_running_a_cell_warns_nothing_deprecated(engine, tmp_path):
    """A whole one-cell sweep on a tiny model: no FutureWarning or DeprecationWarning from any library."""
    from das_cli import config, sweep

    overrides = ["model=tiny_llama", "layers=[1]", "positions=[last]", f"train.engine={engine}", *TINY]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = sweep.run(config.compose(overrides), tmp_path)
    assert len(frame) == 1
    deprecations = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecations == []


# --- CUDA ------------------------------------------------------------------------------------


def last_token_engine(device: str) -> FastEngine:
    """The fast engine of a last-token block_output cell of tiny_llama on `device`, over two prompt lengths."""
    lm = load_model(OmegaConf.load(CONF / "tiny_llama.yaml"), device, "float32")
    pairs = random_pairs(seed=1)  # two prompt lengths: batches of 3 join them
    site = site_of(lm, "block_output")
    source_acts = [read_site(lm, site, group.source_ids.to(lm.device)) for group in pairs.groups]
    base = base_run(lm, pairs, batch_size=4, keep_prefix=True, layers=(site.layer,))
    residuals = [per_layer[site.layer] for per_layer in base.residuals]
    return make_engine("fast", lm, site, prepare(pairs, ("last",), source_acts, lm.device, base.prefixes, residuals))


def train_last_token_cell(device: str) -> tuple[float, torch.Tensor, float]:
    """A short fast-engine fit on tiny_llama on `device`: (last epoch's loss, learned basis, IIA)."""
    engine = last_token_engine(device)
    lm, site = engine.lm, engine.site
    torch.manual_seed(123)
    intervention = build_intervention("das", site.width, dim=1).to(lm.device)
    result = fit(engine, intervention, epochs=2, lr=0.05, batch_size=3, lr_end_factor=0.5, seed=7, progress=False)
    iia, _ = evaluate(engine, intervention, batch_size=3)
    return result.loss, intervention.W.detach().cpu(), iia


@pytest.mark.gpu
def test_fast_training_on_cuda_matches_cpu():
    cpu, cuda = train_last_token_cell("cpu"), train_last_token_cell("cuda")
    assert cuda[0] == pytest.approx(cpu[0], abs=1e-4)
    torch.testing.assert_close(cuda[1], cpu[1], atol=1e-4, rtol=0)
    assert cuda[2] == cpu[2]


@pytest.mark.gpu
def test_fast_training_steps_do_not_wait_for_the_host():
    """A fast-engine step on CUDA (mixed lengths joined, loss, backward, Adam) never synchronises."""
    engine = last_token_engine("cuda")
    lm = engine.lm
    intervention = build_intervention("das", engine.site.width, dim=1).to(lm.device)
    optimizer = torch.optim.Adam(intervention.param_groups(0.01))
    plan = to_device(batches([len(group) for group in engine.groups], 3, torch.Generator().manual_seed(0)), lm.device)
    assert any(len(batch) > 1 for batch in plan)  # a joined step is among them
    try:
        for i, batch in enumerate(plan):
            # the first step initialises state lazily (Adam's, the parametrisation's); the rest must not wait
            torch.cuda.set_sync_debug_mode("error" if i else "default")
            loss = engine.loss(batch, intervention)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
