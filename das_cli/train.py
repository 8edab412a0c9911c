"""One grid cell: train an intervention on train pairs, then measure IIA on held-out pairs."""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .data import PairSet, batches, resolve_positions, to_device
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
                kinds=group.kinds or None,
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
    """Adam on the intervention's parameters only; CE on the counterfactual label token.

    The intervention is in train mode while fitting and left in eval mode (e.g. a hard mask).
    """
    intervention.eval()
    if not intervention.trainable or epochs == 0:
        return Fit(loss=math.nan, steps=0)
    intervention.train()
    generator = torch.Generator().manual_seed(seed)
    sizes = [len(group) for group in engine.groups]
    plan = [to_device(batches(sizes, batch_size, generator), engine.lm.device) for _ in range(epochs)]
    total = max(1, sum(len(epoch) for epoch in plan))
    optimizer = torch.optim.Adam(intervention.param_groups(lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 + (lr_end_factor - 1) * min(s / total, 1.0))
    bar = tqdm(total=total, desc="steps", leave=False, disable=not progress, mininterval=1.0)
    step, epoch_losses = 0, []
    for epoch in plan:
        epoch_losses = []
        for batch in epoch:
            intervention.set_progress(step / total)
            loss = engine.loss(batch, intervention) + intervention.extra_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_losses.append(loss.detach())
            step += 1
            bar.update()
    bar.close()
    intervention.set_progress(1.0)
    intervention.eval()
    return Fit(loss=float(torch.stack(epoch_losses).mean()), steps=step)


@dataclass
class Evaluation:
    """Accuracy of the intervened model's top-1 token against the pairs' labels, per kind of pair."""

    hits: dict[str, int]
    counts: dict[str, int]
    loss: float  # mean CE over all pairs

    def iia(self, kind: str | None = None) -> float:
        """IIA over the pairs of one kind, or over all pairs (NaN when there are none)."""
        kinds = [kind] if kind else list(self.counts)
        n = sum(self.counts.get(k, 0) for k in kinds)
        return sum(self.hits.get(k, 0) for k in kinds) / n if n else math.nan

    def scores(self) -> dict[str, float]:
        """`iia`: cause pairs (all pairs if there are none). With isolate pairs too, RAVEL's scores:
        `iia_cause`, `iia_isolate` and `iia_mean` (their mean, "disentangle")."""
        main = self.iia("cause") if "cause" in self.counts else self.iia()
        if len(self.counts) < 2:
            return {"iia": main}
        per_kind = {f"iia_{k}": self.iia(k) for k in sorted(self.counts, key=lambda k: (k != "cause", k))}
        return {"iia": main, **per_kind, "iia_mean": sum(per_kind.values()) / len(per_kind)}


@torch.no_grad()
def evaluate_kinds(engine: ReferenceEngine, intervention, batch_size: int) -> Evaluation:
    """Per kind of pair: how often the intervened model's top-1 token equals the pair's label."""
    hits: dict[str, int] = {}
    counts: dict[str, int] = {}
    loss_sum, n = 0.0, 0
    for batch in to_device(batches([len(group) for group in engine.groups], batch_size), engine.lm.device):
        logits = engine.logits(batch, intervention)
        labels = engine.labels(batch)
        correct = (logits.argmax(-1) == labels).tolist()
        kinds = [engine.groups[g].kinds[i] if engine.groups[g].kinds else "cause" for g, rows in batch for i in rows.tolist()]
        for kind, ok in zip(kinds, correct):
            hits[kind] = hits.get(kind, 0) + int(ok)
            counts[kind] = counts.get(kind, 0) + 1
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        n += len(labels)
    return Evaluation(hits, counts, loss_sum / max(n, 1))


def evaluate(engine: ReferenceEngine, intervention, batch_size: int) -> tuple[float, float]:
    """(IIA over all pairs, mean CE): top-1 of the intervened model equals the pair's label."""
    result = evaluate_kinds(engine, intervention, batch_size)
    return result.iia(), result.loss
