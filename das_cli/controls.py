"""Controls: what a method scores where there is nothing to find (`analysis.control`).

Each cell of the sweep is trained and scored a second time under the control, into <run>/control/ (its
own cells, resumable like the run's), and the run's row gains `iia_control` (with its Wilson interval)
and `selectivity` = iia − iia_control:

- `random_model`: the same cell on a copy of the model with every weight drawn again from the
  architecture's initialisation (seed `analysis.control_seed`), the tokenizer and the pairs unchanged.
  An alignment map expressive enough reaches high IIA on such a model too (Sutter et al., 2025), so IIA
  there measures the map, not the model.
- `shuffled_labels`: the same model, the counterfactual labels of the training pairs permuted among
  them (seed `analysis.control_seed`); validation and test pairs keep their true labels. A method
  that still scores on the test pairs learns the task, not the variable: the control task of Hewitt
  and Liang (2019).

`selectivity`'s 95% interval combines the two Wilson intervals by Newcombe's method for a difference
of proportions (1998, method 10); it treats the two scores as independent, which for the same test
pairs errs on the wide side when their outcomes are positively correlated.
"""

from __future__ import annotations

import math

import torch

from .data import PairSet
from .models import LoadedModel

CONTROL_COLUMNS = ("iia_control", "iia_control_lo", "iia_control_hi", "selectivity", "selectivity_lo", "selectivity_hi")


def control_model(lm: LoadedModel, seed: int) -> LoadedModel:
    """A copy of `lm`'s architecture with freshly initialised weights (transformers' own initialisation)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(lm.config, dtype=lm.dtype)
    model.to(lm.device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=lm.tokenizer, family=lm.family, name=lm.name)


def shuffled_labels(pairs: PairSet, seed: int) -> PairSet:
    """`pairs` with their counterfactual labels permuted among all pairs (every group's labels share one width)."""
    labels = torch.cat([g.labels if g.labels.dim() == 2 else g.labels[:, None] for g in pairs.groups])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    permuted = labels[order].split(pairs.sizes)
    groups = [_with_labels(g, p if g.labels.dim() == 2 else p[:, 0]) for g, p in zip(pairs.groups, permuted)]
    return PairSet(groups=groups, before_filter=pairs.before_filter)


def _with_labels(group, labels):
    from dataclasses import replace

    return replace(group, labels=labels.clone())


def control_data(control: str, seed: int, lm: LoadedModel, pairs: dict[str, PairSet]) -> tuple[LoadedModel, dict[str, PairSet]]:
    """The model and pairs the control trains and scores the cells on."""
    if control == "random_model":
        return control_model(lm, seed), pairs
    return lm, {**pairs, "train": shuffled_labels(pairs["train"], seed)}


def control_columns(row: dict, control_row: dict | None) -> dict:
    """The run's row's control columns from the control's row of the same cell (empty when it has none yet)."""
    if control_row is None or not _finite(control_row.get("iia")):
        return {}
    iia, lo, hi = (float(row.get(k, math.nan)) for k in ("iia", "iia_lo", "iia_hi"))
    c, c_lo, c_hi = (float(control_row[k]) for k in ("iia", "iia_lo", "iia_hi"))
    low, high = difference_interval((iia, lo, hi), (c, c_lo, c_hi))
    return {"iia_control": c, "iia_control_lo": c_lo, "iia_control_hi": c_hi,
            "selectivity": iia - c, "selectivity_lo": low, "selectivity_hi": high}


def difference_interval(first: tuple[float, float, float], second: tuple[float, float, float]) -> tuple[float, float]:
    """Newcombe's interval for p₁ − p₂ from each proportion's (estimate, low, high) interval."""
    (p1, l1, u1), (p2, l2, u2) = first, second
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
