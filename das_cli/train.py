"""One grid cell: train an intervention on train pairs, then measure IIA on held-out pairs."""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .data import PairSet, batches, resolve_positions
from .interventions import Intervention
from .engines import CellGroup, ReferenceEngine
from .sites import gather


def prepare(
    pairs: PairSet,
    position: tuple,
    source_acts: list[Tensor],
    device: torch.device,
    prefixes: list | None = None,
    residuals: list[Tensor] | None = None,
) -> list[CellGroup]:
    """Per group: base ids and positions, and the source's site vector gathered at its positions.

    `source_acts[g]` is the site's tensor for every source prompt of group g at every position,
    [G, S, C] (read once per stream and layer, shared by all position cells of that layer).
    """
    out = []
    for g, (group, acts) in enumerate(zip(pairs.groups, source_acts)):
        source_pos = resolve_positions(group, position, "source").to(acts.device)
        every_column = torch.arange(acts.shape[-1], device=acts.device)
        out.append(
            CellGroup(
                base_ids=group.base_ids.to(device),
                base_positions=resolve_positions(group, position, "base").to(device),
                source_values=gather(acts, source_pos, every_column).to(device),
                labels=group.labels.to(device),
                prefix=prefixes[g] if prefixes else None,
                residual=residuals[g] if residuals else None,
            )
        )
    return out


@dataclass
class Fit:
    loss: float  # mean train loss over the last epoch (NaN when nothing was trained)
    steps: int


def fit(
    engine: ReferenceEngine,
    intervention: Intervention,
    epochs: int,
    lr: float,
    batch_size: int,
    lr_end_factor: float,
    seed: int,
    progress: bool = True,
) -> Fit:
    """Adam on the intervention's parameters only; CE on the counterfactual label token."""
    if not intervention.trainable or epochs == 0:
        return Fit(loss=math.nan, steps=0)
    generator = torch.Generator().manual_seed(seed)
    sizes = [len(group) for group in engine.groups]
    steps_per_epoch = len(batches(sizes, batch_size))
    total = max(1, epochs * steps_per_epoch)
    optimizer = torch.optim.Adam(intervention.param_groups(lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 + (lr_end_factor - 1) * min(s / total, 1.0))
    bar = tqdm(total=total, desc="steps", leave=False, disable=not progress, mininterval=1.0)
    step, epoch_losses = 0, []
    for _ in range(epochs):
        epoch_losses = []
        for g, rows in batches(sizes, batch_size, generator):
            intervention.set_progress(step / total)
            source = engine.groups[g].source_values[rows.to(engine.groups[g].source_values.device)]
            logits = engine.logits(g, rows, lambda base: intervention(base, source))
            loss = F.cross_entropy(logits, engine.groups[g].labels[rows]) + intervention.extra_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_losses.append(loss.detach())
            step += 1
            bar.update()
    bar.close()
    intervention.set_progress(1.0)
    return Fit(loss=float(torch.stack(epoch_losses).mean()), steps=step)


@torch.no_grad()
def evaluate(engine: ReferenceEngine, intervention: Intervention, batch_size: int) -> tuple[float, float]:
    """(IIA, mean CE): top-1 of the intervened model equals the counterfactual label."""
    correct, loss_sum, n = 0, 0.0, 0
    for g, rows in batches([len(group) for group in engine.groups], batch_size):
        source = engine.groups[g].source_values[rows.to(engine.groups[g].source_values.device)]
        logits = engine.logits(g, rows, lambda base: intervention(base, source))
        labels = engine.groups[g].labels[rows]
        correct += int((logits.argmax(-1) == labels).sum())
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        n += len(rows)
    return correct / max(n, 1), loss_sum / max(n, 1)
