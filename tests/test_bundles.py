"""Bundles (train.cells_per_step): several cells in one step of the fast engine give each cell the loss,
the gradient and the training run it gets alone, to rounding; a NaN cell leaves its bundle; a stop of the
job checkpoints every cell of the bundle; the CLI's tables agree with cells_per_step=1."""

import math
import signal

import pandas as pd
import pytest
import torch
from conftest import TINY, run_cli
from test_engines import G, base_prefixes, hand_groups, random_pairs  # noqa: F401  (fixtures below)
from test_engines import lm  # noqa: F401  (the tiny models, module-scoped)

from das_cli import bundles
from das_cli.bundles import BundleEngine, evaluate_bundle, fed_tokens
from das_cli.train import Member, fit_cells as fit_bundle
from das_cli.data import batches
from das_cli.activations import base_run
from das_cli.engines import FastEngine
from das_cli.interventions import build_intervention
from das_cli.sites import resolve_site
from das_cli.metrics import evaluate_kinds
from das_cli.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = (0, 1, 3)
# (stream, layer, position): several streams, layers and positions in one bundle
JOINABLE = [("block_output", 1, "last"), ("mlp_activation", 3, "middle"), ("block_input", 3, "per_row"),
            ("attention_output", 1, "middle+last"), ("block_output", 3, "last")]
# from layer 0: the embeddings' forward, later cells' rows replaced by their cached residual as they enter
FROM_ZERO = [("block_output", 0, "last"), ("mlp_activation", 3, "middle"), ("attention_output", 1, "middle+last")]
# a cell at the first token: its rows cannot share a left-padded forward with the other group's, so cell by cell
SPLIT = JOINABLE[:2] + [("block_output", 1, "first")]


@pytest.fixture(scope="module")
def pairs():
    return random_pairs(seed=3)


@pytest.fixture(scope="module")
def base(lm, pairs):
    return base_run(lm, pairs, batch_size=3, keep_prefix=True, layers=LAYERS)


def cells(lm, pairs, base, specs, seed=0):
    """Per spec: its fast engine over the pairs and a fresh DAS intervention (dim 2)."""
    out = []
    for k, (stream, layer, position) in enumerate(specs):
        site = resolve_site(lm, stream, layer)
        groups = hand_groups(lm, site, pairs, base.prefixes, position, seed=seed + k, residuals=base.residuals)
        torch.manual_seed(seed + k)
        intervention = build_intervention("das", groups[0].source_values.shape[1], dim=2)
        out.append((FastEngine(lm, site, groups), intervention))
    return out


def bundle_of(lm, base, engines):
    return BundleEngine(lm, engines)


@pytest.mark.parametrize("specs", [JOINABLE, FROM_ZERO, SPLIT], ids=["one-forward", "from-layer-0", "cell-by-cell"])
def test_bundle_gives_each_cell_its_own_loss_and_gradient(lm, pairs, base, specs):
    members = cells(lm, pairs, base, specs)
    plans = [batches([G, G], 3, torch.Generator().manual_seed(k))[0] for k in range(len(members))]
    alone = []
    for (engine, intervention), batch in zip(members, plans):
        intervention.zero_grad()
        loss = engine.loss(batch, intervention)
        loss.backward()
        alone.append((loss.detach(), [p.grad.clone() for p in intervention.parameters()]))
        intervention.zero_grad()
    bundle = bundle_of(lm, base, [e for e, _ in members])
    losses = bundle.losses(plans, [v for _, v in members])
    losses.sum().backward()
    for (engine, intervention), (loss, grads), together in zip(members, alone, losses):
        torch.testing.assert_close(together.detach(), loss, atol=1e-5, rtol=1e-5)
        for p, g in zip(intervention.parameters(), grads):
            torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_a_bundle_trains_each_cell_as_alone(lm, pairs, base):
    alone = cells(lm, pairs, base, JOINABLE)
    fits = [fit(engine, v, epochs=2, lr=0.05, batch_size=3, lr_end_factor=0.5, seed=10 + k, progress=False)
            for k, (engine, v) in enumerate(alone)]
    together = cells(lm, pairs, base, JOINABLE)
    members = [Member(v, 10 + k) for k, (_, v) in enumerate(together)]
    results = fit_bundle(bundle_of(lm, base, [e for e, _ in together]), members, 2, 0.05, 3, 0.5, progress=False)
    for (_, a), (_, b), fa, fb in zip(alone, together, fits, results):
        assert fb.steps == fa.steps == 2 * math.ceil(2 * G / 3)
        assert abs(fb.loss - fa.loss) < 1e-4
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-4)
        assert not b.training  # left in eval mode, as fit leaves it


@pytest.mark.parametrize("specs", [JOINABLE, FROM_ZERO, SPLIT], ids=["one-forward", "from-layer-0", "cell-by-cell"])
@pytest.mark.parametrize("rows", [1024, 2 * 3], ids=["one-step", "two-cells-per-step"])
def test_bundled_evaluation_gives_each_cell_its_lone_evaluation(lm, pairs, base, specs, rows, monkeypatch):
    monkeypatch.setattr(bundles, "EVAL_ROWS", {"cpu": rows, "cuda": rows})
    members = cells(lm, pairs, base, specs)
    base_labels = [torch.randint(0, 1000, (G, 1), generator=torch.Generator().manual_seed(g)) for g in range(2)]
    base_correct = [torch.tensor([True, False, True, True]), torch.tensor([False, True, True, False])]
    for labels, correct in [(None, None), (base_labels, base_correct)]:
        alone = [evaluate_kinds(e, v, 3, labels, correct) for e, v in members]
        together = evaluate_bundle([e for e, _ in members], [v for _, v in members], 3, labels, correct)
        for a, b in zip(alone, together):
            assert (b.hits, b.counts, b.types, b.base_correct) == (a.hits, a.counts, a.types, a.base_correct)
            assert b.loss == pytest.approx(a.loss, abs=1e-5)
            for score, value in a.graded_scores().items():
                assert b.graded_scores()[score] == pytest.approx(value, abs=1e-5, nan_ok=True)


class Diverging(torch.nn.Module):
    """Wraps an intervention; from its `after`-th call on, its edits are NaN."""

    def __init__(self, inner, after: int):
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0
        self.trainable = True

    def forward(self, base, source):
        self.calls += 1
        out = self.inner(base, source)
        return out * float("nan") if self.calls > self.after else out

    def param_groups(self, lr):
        return self.inner.param_groups(lr)

    def extra_loss(self):
        return self.inner.extra_loss()

    def set_progress(self, fraction):
        self.inner.set_progress(fraction)


def test_a_cell_whose_loss_turns_nan_leaves_the_bundle(lm, pairs, base):
    alone = cells(lm, pairs, base, JOINABLE[:3])
    fits = [fit(engine, v, epochs=2, lr=0.05, batch_size=3, lr_end_factor=0.5, seed=k, progress=False)
            for k, (engine, v) in enumerate(alone)]
    together = cells(lm, pairs, base, JOINABLE[:3])
    interventions = [v for _, v in together]
    interventions[0] = Diverging(interventions[0], after=2)  # block_output at the last token: the loss turns NaN
    results = fit_bundle(bundle_of(lm, base, [e for e, _ in together]), [Member(v, k) for k, v in enumerate(interventions)],
                         2, 0.05, 3, 0.5, progress=False)
    assert isinstance(results[0], FloatingPointError) and "NaN" in str(results[0])
    for k in (1, 2):
        assert abs(results[k].loss - fits[k].loss) < 1e-4


class Recorder:
    def __init__(self):
        self.saved = None

    def load(self, total):  # nothing to resume from
        return None

    def save(self, state, step, total):
        self.saved = (state, step, total)

    def hold(self, state, step, total):
        self.held = (state(), step, total)


class Stopping(Diverging):
    """Raises KeyboardInterrupt (Ctrl-C, or SIGTERM as das-cli turns it) in the step after its first `after`."""

    def set_progress(self, fraction):
        self.calls += 1  # once per step
        self.inner.set_progress(fraction)

    def forward(self, base, source):
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.inner(base, source)


def test_a_stop_checkpoints_every_cell_of_the_bundle(lm, pairs, base):
    together = cells(lm, pairs, base, JOINABLE[:3])
    interventions = [v for _, v in together]
    interventions[2] = Stopping(interventions[2], after=2)
    members = [Member(v, k, Recorder()) for k, v in enumerate(interventions)]
    with pytest.raises(KeyboardInterrupt):
        fit_bundle(bundle_of(lm, base, [e for e, _ in together]), members, 2, 0.05, 3, 0.5, progress=False)
    total = 2 * math.ceil(2 * G / 3)
    for member in members:
        state, step, steps = member.checkpoint.saved
        assert (step, steps) == (2, total) and len(state["losses"]) == 2


class SignalledAt(Diverging):
    """In the step after its first `after`, SIGTERM arrives (its handler returns); its edits stay as they are."""

    def set_progress(self, fraction):
        self.calls += 1  # once per step
        self.inner.set_progress(fraction)

    def forward(self, base, source):
        if self.calls == self.after + 1:
            signal.raise_signal(signal.SIGTERM)
        return self.inner(base, source)


def test_a_stop_signal_the_job_outlives_checkpoints_the_bundle_and_training_goes_on(lm, pairs, base, ignored_sigterm):
    """As a plain scancel under submitit: SIGTERM, ignored; every cell is saved at the end of that step, and the
    bundle trains on to what it gives unsignalled."""
    plain = cells(lm, pairs, base, JOINABLE[:3])
    fits = fit_bundle(bundle_of(lm, base, [e for e, _ in plain]), [Member(v, k) for k, (_, v) in enumerate(plain)],
                      2, 0.05, 3, 0.5, progress=False)
    together = cells(lm, pairs, base, JOINABLE[:3])
    interventions = [v for _, v in together]
    interventions[1] = SignalledAt(interventions[1], after=2)
    members = [Member(v, k, Recorder()) for k, v in enumerate(interventions)]
    results = fit_bundle(bundle_of(lm, base, [e for e, _ in together]), members, 2, 0.05, 3, 0.5, progress=False)
    total = 2 * math.ceil(2 * G / 3)
    for member, a, b in zip(members, fits, results):
        state, step, steps = member.checkpoint.saved
        assert (step, steps) == (3, total) and len(state["losses"]) == 3
        assert (b.steps, b.loss) == (a.steps, a.loss)
        state, step, steps = member.checkpoint.held  # the finished state, kept until the cell is written
        assert step == steps == total and len(state["losses"]) == total // 2


def test_fed_tokens_counts_from_the_earliest_intervened_position():
    pairs = random_pairs(seed=1)
    assert fed_tokens(pairs, ("last",)) == 1
    # s1 sits at token 1 at the earliest in each group (lengths 9 and 6): 8 tokens fed from the longer one
    assert fed_tokens(pairs, ("s1",)) == 8


# --- the CLI ------------------------------------------------------------------------------------

GRID = ["model=tiny_llama", "stream=[block_output,mlp_activation]", "layers=[0,2]", "positions=[s2,last]", "seeds=2"]
NUMBERS = ["iia", "train_iia", "loss", "test_loss"]


def table(folder) -> pd.DataFrame:
    frame = pd.read_csv(folder / "iia.csv")
    return frame.set_index(["stream", "layer", "position", "seed"]).sort_index()


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory):
    out = tmp_path_factory.mktemp("alone")
    result = run_cli(GRID + TINY + ["train.epochs=3", "train.cells_per_step=1", f"hydra.run.dir={out}"])
    assert result.returncode == 0, result.stderr
    return table(out)


@pytest.mark.slow
@pytest.mark.parametrize("size", ["4", "auto"])
def test_bundled_sweep_matches_one_cell_at_a_time(one_at_a_time, tmp_path, size):
    result = run_cli(GRID + TINY + ["train.epochs=3", f"train.cells_per_step={size}", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr
    bundled = table(tmp_path)
    assert len(bundled) == len(one_at_a_time) == 16
    assert (bundled["iia"] - one_at_a_time["iia"]).abs().max() <= 0.01
    assert (bundled["loss"] - one_at_a_time["loss"]).abs().max() <= 1e-4
    assert (bundled["steps"] == one_at_a_time["steps"]).all()
    if size == "auto":
        return
    again = tmp_path / "again"
    assert run_cli(GRID + TINY + ["train.epochs=3", f"train.cells_per_step={size}", f"hydra.run.dir={again}"]).returncode == 0
    pd.testing.assert_frame_equal(table(again)[NUMBERS], bundled[NUMBERS], check_exact=True)  # the same command: the same table


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5", "true"])
def test_bad_cells_per_step_is_one_line(value, tmp_path):
    result = run_cli(["model=tiny_gpt2", "layers=[0]", f"train.cells_per_step={value}", f"hydra.run.dir={tmp_path}"] + TINY)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"train.cells_per_step={value}:" in lines[0] and "auto" in lines[0], result.stderr


def test_a_block_computes_only_the_rows_that_have_entered(lm, pairs, base):
    """Cells at layers 1 and 3: blocks 1 and 2 run the layer-1 cell's rows only, block 3 both cells'."""
    members = cells(lm, pairs, base, [("block_output", 3, "last"), ("block_output", 1, "last")])
    plans = [batches([G, G], 3, torch.Generator().manual_seed(k))[0] for k in range(2)]
    seen = {}
    attention = lm.family.attention
    handles = [lm.block(b).get_submodule(attention).register_forward_pre_hook(
        lambda module, args, kwargs, b=b: seen.__setitem__(b, (args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True) for b in range(lm.n_layers)]
    try:
        with torch.no_grad():
            bundle_of(lm, base, [e for e, _ in members]).losses(plans, [v for _, v in members])
    finally:
        for handle in handles:
            handle.remove()
    rows = [sum(len(r) for _, r in plan) for plan in plans]
    assert seen == {1: rows[1], 2: rows[1], 3: rows[0] + rows[1]}
