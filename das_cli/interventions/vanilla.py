"""vanilla: patch the whole vector, or only the listed neurons; nothing is trained.   h = s (or s on the neurons, b elsewhere)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import Tensor

from das_cli.errors import DasError

from .base import Intervention, NoOptions, check_shapes, register


@dataclass
class VanillaOptions(NoOptions):
    neurons: Optional[List[int]] = None


@register
class VanillaIntervention(Intervention):
    """Copy the source vector (or only the listed neurons) into the base; nothing is trained."""

    name = "vanilla"
    Options = VanillaOptions

    def __init__(self, n: int, neurons: list[int] | None = None):
        super().__init__()
        self.n = n
        if neurons is not None:
            if not neurons or any(not 0 <= int(i) < n for i in neurons):
                raise DasError(
                    f"intervention.neurons={list(neurons)}: must be a non-empty list of indices between 0 and {n - 1} (the site width is {n})"
                )
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.tensor([int(i) for i in neurons])] = True
            self.register_buffer("mask", mask, persistent=False)
        else:
            self.register_buffer("mask", None)
        self.neurons = None if neurons is None else sorted({int(i) for i in neurons})

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        check_shapes(base, source, self.n)
        if self.mask is None:
            return source.to(base.dtype, copy=True)
        return torch.where(self.mask, source.to(base.dtype), base)

    def learned_dim(self) -> int:
        return self.n if self.neurons is None else len(self.neurons)

    def edit_directions(self) -> Tensor:
        return torch.arange(self.n) if self.neurons is None else torch.tensor(self.neurons)
