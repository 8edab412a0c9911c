"""Training: the one loop that fits interventions on the counterfactual loss. A lone cell is a bundle of one.

Each cell has its own batches (drawn from its own seed), its own Adam and its own learning-rate schedule;
one forward and one backward per step serve every cell still training (`StepEngine.losses`), and the
step's loss is the sum of the cells' mean losses, so each cell's gradient is what it would get alone.
Checkpointing and the progress bar are callbacks around the step, not code inside it. Each cell keeps its
training curve (per step: the cross-entropy, the method's penalty and the learning rate), checkpointed with
its state, so a resumed cell continues its curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .data import Batch, batches, to_device
from .engines import Engine
from .folder import Checkpoint
from .interrupts import WholeSteps, stops_the_job
from .interventions import Intervention


@dataclass
class Curve:
    """A cell's training curve: per step (step, epoch, cross-entropy, penalty, learning rate), and with
    eval.every_epoch per epoch ended (epoch, validation IIA, validation loss)."""

    steps: list[tuple] = field(default_factory=list)
    validation: list[tuple] = field(default_factory=list)


@dataclass
class Fit:
    loss: float  # mean train cross-entropy over the last epoch (NaN when nothing was trained)
    steps: int
    penalty: float = math.nan  # mean of the intervention's extra loss term over the last epoch (0 if it has none)
    curve: Curve = field(default_factory=Curve)
    paused: bool = False  # stopped at `until` before the schedule's end (successive halving's rung); checkpointed


@dataclass
class Member:
    """One cell of a training: its intervention, seed and checkpoint."""

    intervention: Intervention
    seed: int
    checkpoint: Checkpoint | None = None
    track: object | None = None  # the cell's trackers (trackers.CellTrack): its curve after every step, as it trains


class StepEngine(Protocol):
    """What the loop trains through: every live cell's loss from one forward, and the engine without the cells
    that left."""

    lm: object
    groups: list

    def losses(self, batches_: list[Batch], interventions: list[Intervention]) -> Tensor: ...

    def keeping(self, cells: list[int]) -> "StepEngine":
        """The engine of these cells (indices into the cells it was made with)."""


class OneCell:
    """A lone cell's engine (fast, reference, or any with `loss`) as a bundle of one."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.lm, self.groups = engine, engine.lm, engine.groups

    def losses(self, batches_: list[Batch], interventions: list[Intervention]) -> Tensor:
        return self.engine.loss(batches_[0], interventions[0]).reshape(1)

    def keeping(self, cells: list[int]) -> "OneCell":
        return self


def fit(
    engine: Engine,
    intervention: Intervention,
    epochs: int,
    lr: float,
    batch_size: int,
    lr_end_factor: float,
    seed: int,
    progress: bool = True,
    checkpoint: Checkpoint | None = None,
    validate: Validate | None = None,
    track: object | None = None,
    until: int | None = None,
) -> Fit:
    """One cell's training: `fit_cells` of a bundle of one (a loss that turns NaN raises FloatingPointError).

    The intervention is in train mode while fitting and left in eval mode (e.g. a hard mask). Nothing is
    trained (loss NaN, 0 steps) for an intervention that is not trainable or with 0 epochs."""
    intervention.eval()
    if not intervention.trainable or epochs == 0:
        return Fit(loss=math.nan, steps=0)
    (result,) = fit_cells(OneCell(engine), [Member(intervention, seed, checkpoint, track)], epochs, lr, batch_size, lr_end_factor, progress,
                          validate, until)
    if isinstance(result, BaseException):
        raise result
    return result


def fit_cells(
    engine: StepEngine,
    members: list[Member],
    epochs: int,
    lr: float,
    batch_size: int,
    lr_end_factor: float,
    progress: bool = True,
    validate: Validate | None = None,
    until: int | None = None,
) -> list[Fit | Exception]:
    """Adam on each cell's intervention parameters only; CE on the counterfactual label's tokens. A cell whose
    loss turns NaN leaves with a FloatingPointError in its place; the others go on. With checkpoints, training
    resumes from the ones on disk (every cell from one step), and a stop of the job saves every cell still
    training at the last whole step (`Checkpoints`). `validate` (eval.every_epoch) scores the live cells at
    each epoch's end, in evaluation mode and without gradients, which changes nothing the training computes.
    `until` (a number of epochs, successive halving's rung): the cells stop at that epoch's end, their state
    checkpointed as a stop of the job would save it, and their Fits marked `paused`; a later fit resumes them
    from there along the same schedule (the learning rate decays over all `epochs`), so a cell paused and
    resumed ends where one trained straight through does."""
    device = engine.lm.device
    per_epoch = [batch_plan([len(group) for group in engine.groups], batch_size, epochs, m.seed, device) for m in members]
    plans = [[batch for epoch in plan for batch in epoch] for plan in per_epoch]
    epoch_starts = {sum(len(epoch) for epoch in per_epoch[0][:e]) for e in range(epochs)}
    n_steps, total = len(plans[0]), max(1, len(plans[0]))
    stop = n_steps if until is None or until >= epochs else sum(len(epoch) for epoch in per_epoch[0][:until])
    states = []
    for member in members:
        member.intervention.train()
        states.append(TrainingState(member.intervention, *optimiser(member.intervention, lr, lr_end_factor, total), device))
    checkpoints, whole_bundle = Checkpoints(members, states, n_steps), engine
    step = checkpoints.resume()
    per_epoch_steps = max(1, n_steps // max(epochs, 1))
    results: list[Fit | Exception | None] = [None] * len(members)
    live = list(range(len(members)))
    try:
        with WholeSteps() as whole, ProgressBar(total, step, len(members), progress) as bar:
            _validate_epoch(validate, members, states, live, step, per_epoch_steps)  # resumed at an epoch's end
            while step < stop and live:
                if step in epoch_starts:
                    for i in live:
                        states[i].losses, states[i].penalties = [], []
                for i in live:
                    members[i].intervention.set_progress(step / total)
                cross = engine.losses([plans[i][step] for i in live], [members[i].intervention for i in live])
                penalties = [members[i].intervention.extra_loss() for i in live]
                values = cross.detach().tolist()
                finite = [k for k, value in enumerate(values) if math.isfinite(value)]
                for k, i in enumerate(live):
                    if k not in finite:
                        results[i] = FloatingPointError("training loss became NaN")
                        members[i].intervention.eval()
                for i in live:
                    states[i].optimizer.zero_grad(set_to_none=True)
                if finite:
                    sum(cross[k] + penalties[k] for k in finite).backward()
                with whole.update():
                    for k in finite:
                        states[live[k]].update(cross[k], penalties[k], (step + 1, step // per_epoch_steps + 1, values[k]))
                    left = len(finite) < len(live)
                    live = [live[k] for k in finite]
                    step += 1
                    for i in live:
                        states[i].rng = rng_state(device)
                if whole.warned():
                    checkpoints.save(live, step)
                if left and live:  # the engine without the cells that left
                    engine = whole_bundle.keeping(live)
                _validate_epoch(validate, members, states, live, step, per_epoch_steps)
                for i in (i for i in live if members[i].track is not None):  # trackers: the curve so far
                    members[i].track.curve(states[i].curve, states[i].validation, per_epoch_steps)
                bar.step()
    except BaseException as stop:
        if stops_the_job(stop):
            checkpoints.save(live, step)
        raise
    paused = step < n_steps
    for i in live:
        members[i].intervention.set_progress(step / total if paused else 1.0)
        members[i].intervention.eval()
        results[i] = states[i].fit(step, paused)
    if paused:
        checkpoints.save(live, step)
    else:
        checkpoints.hold(live, step)
    return results  # type: ignore[return-value]


Validate = Callable[[list[int]], list[tuple[float, float]]]  # live cells -> (validation IIA, loss) of each


def _validate_epoch(validate: Validate | None, members: list[Member], states: list["TrainingState"], live: list[int],
                    step: int, per_epoch_steps: int) -> None:
    """At an epoch's end (and not yet scored: a resume may land there), each live cell's validation IIA and loss."""
    epoch = step // per_epoch_steps
    if validate is None or not live or step == 0 or step % per_epoch_steps:
        return
    pending = [i for i in live if len(states[i].validation) < epoch]
    if not pending:
        return
    for i in pending:
        members[i].intervention.eval()
    try:
        scores = validate(pending)
    finally:
        for i in pending:
            members[i].intervention.train()
    for i, (iia, loss) in zip(pending, scores):
        states[i].validation.append((epoch, float(iia), float(loss)))


class Checkpoints:
    """The training's checkpoint callbacks: resume from the cells' checkpoints, save every live cell's state
    (a stop of the job, or a stop signal it outlives), and hold the finished states until the cells are written
    (`Checkpoint.hold`)."""

    def __init__(self, members: list[Member], states: list["TrainingState"], total: int) -> None:
        self.members, self.states, self.total = members, states, total

    def resume(self) -> int:
        """The step every cell goes on from: its checkpoint's, or 0. Cells of one bundle start together."""
        steps = {state.resume(m.checkpoint.load(self.total)) if m.checkpoint else 0 for m, state in zip(self.members, self.states)}
        if len(steps) > 1:
            raise ValueError(f"the cells of one bundle resume from different steps ({sorted(steps)})")
        return steps.pop()

    def save(self, live: list[int], step: int) -> None:
        for i in live:
            if self.members[i].checkpoint is not None:
                self.members[i].checkpoint.save(self.states[i].saved(), step, self.total)

    def hold(self, live: list[int], step: int) -> None:
        for i in live:
            if self.members[i].checkpoint is not None:
                self.members[i].checkpoint.hold(self.states[i].saved, step, self.total)


class ProgressBar:
    """The training's progress bar (tqdm over the steps), as a callback of the loop: one tick per whole step."""

    def __init__(self, total: int, initial: int, cells: int, enabled: bool) -> None:
        desc = "steps" if cells == 1 else f"steps ({cells} cells)"
        self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, disable=not enabled, mininterval=1.0)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def step(self) -> None:
        self.bar.update()


def batch_plan(sizes: list[int], batch_size: int, epochs: int, seed: int, device: torch.device) -> list[list[Batch]]:
    """Per epoch, the batches a cell trains on: drawn in turn from one generator seeded with the cell's seed."""
    generator = torch.Generator().manual_seed(seed)
    return [to_device(batches(sizes, batch_size, generator), device) for _ in range(epochs)]


def optimiser(intervention: Intervention, lr: float, lr_end_factor: float, total: int) -> tuple:
    """Adam on the intervention's parameters, and its learning rate decaying linearly to lr x lr_end_factor
    over `total` steps."""
    optimizer = torch.optim.Adam(intervention.param_groups(lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 + (lr_end_factor - 1) * min(s / total, 1.0))
    return optimizer, schedule


class TrainingState:
    """What decides the rest of a fit at a step boundary: the intervention's parameters and buffers, the
    optimiser, the schedule, torch's random state, and the current epoch's losses so far (the Fit's
    loss is their epoch mean). The batch order is not saved: fit rebuilds it from the seed."""

    def __init__(self, intervention: Intervention, optimizer, schedule, device: torch.device) -> None:
        self.intervention, self.optimizer, self.schedule, self.device = intervention, optimizer, schedule, device
        self.losses: list[Tensor] = []
        self.penalties: list[Tensor] = []
        self.curve: list[tuple] = []
        self.validation: list[tuple] = []  # (epoch, validation IIA, loss) per epoch ended, with eval.every_epoch
        self.rng = rng_state(device)

    def update(self, loss: Tensor, penalty: Tensor, point: tuple[int, int, float]) -> None:
        """One optimiser and schedule step, and the step's loss and penalty recorded; `point` (step, epoch, loss
        as a number) goes on the curve with the penalty and the learning rate the step used."""
        rate = self.schedule.get_last_lr()[0]
        self.optimizer.step()
        self.schedule.step()
        self.losses.append(loss.detach())
        self.penalties.append(penalty.detach())
        self.curve.append((*point, float(penalty.detach()), float(rate)))

    def fit(self, steps: int, paused: bool = False) -> Fit:
        """The Fit of a finished (or `paused`) training: the last epoch's mean loss and penalty, and the curve."""
        return Fit(loss=float(torch.stack(self.losses).mean()), steps=steps, penalty=float(torch.stack(self.penalties).mean()),
                   curve=Curve(list(self.curve), list(self.validation)), paused=paused)

    def saved(self) -> dict:
        return {
            "intervention": self.intervention.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "rng": self.rng,
            "losses": [t.cpu() for t in self.losses], "penalties": [t.cpu() for t in self.penalties],
            "curve": list(self.curve), "validation": list(self.validation),
        }

    def resume(self, checkpoint: tuple[int, dict] | None) -> int:
        """The step to go on from: the checkpoint's (its state restored), or 0 without one."""
        if checkpoint is None:
            return 0
        step, saved = checkpoint
        self.intervention.load_state_dict(saved["intervention"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        set_rng_state(saved["rng"], self.device)
        self.rng = saved["rng"]
        self.losses = [t.to(self.device) for t in saved["losses"]]
        self.penalties = [t.to(self.device) for t in saved["penalties"]]
        self.curve = [tuple(point) for point in saved["curve"]]
        self.validation = [tuple(point) for point in saved.get("validation", [])]
        return step


def rng_state(device: torch.device) -> dict:
    """torch's random state (and the accelerator's, on one) at this moment."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
