"""dbm: a differentiable binary mask over neurons, the localist baseline of MIB (arXiv 2504.13151).   h = b + m ⊙ (s − b)"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING
from torch import Tensor, nn

from das_cli.errors import DasError

from .base import Intervention, NoOptions, as_saved, check_shapes, register


@dataclass
class DbmOptions(NoOptions):
    temperature_start: float = MISSING
    temperature_end: float = MISSING
    l1_weight: float = MISSING


@register
class DBMIntervention(Intervention):
    """Differentiable binary mask over neurons (the MIB localist baseline; De Cao et al.): h = b + m ⊙ (s − b).

    m = σ(l / T) per neuron in train mode; in eval mode the hard mask m = [l > 0]. Logits start
    at 0 (m = ½, no neuron favoured) so a neuron is kept only if training pushes its logit up.
    T falls log-linearly (geometrically) from temperature_start to temperature_end with
    `set_progress`: a linear schedule from 1 to 0.01 would stay above 0.5 for half of training
    and only sharpen the mask in the last steps. The loss adds l1_weight · mean(m).
    """

    name = "dbm"
    Options = DbmOptions
    trainable = True

    def __init__(self, n: int, temperature_start: float = 1.0, temperature_end: float = 0.01, l1_weight: float = 1e-2):
        super().__init__()
        for key, value in [("temperature_start", temperature_start), ("temperature_end", temperature_end)]:
            if not value > 0:
                raise DasError(f"intervention.{key}={value}: must be > 0")
        if not l1_weight >= 0:
            raise DasError(f"intervention.l1_weight={l1_weight}: must be >= 0")
        self.n = n
        self.temperature_start, self.temperature_end = float(temperature_start), float(temperature_end)
        # The penalty is at most l1_weight nats (mean(m) ≤ 1): 0.01 is far below the loss a useful
        # neuron saves (chance-level CE on a binary variable is 0.69), so it does not trade IIA for
        # sparsity; it turns off the neurons whose swap does not change the loss.
        self.l1_weight = float(l1_weight)
        self.logits = nn.Parameter(torch.zeros(n))
        self.register_buffer("temperature", torch.tensor(self.temperature_start))

    def soft_mask(self) -> Tensor:
        return torch.sigmoid(self.logits / self.temperature)

    def hard_mask(self) -> Tensor:
        return (self.logits > 0).float()

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        check_shapes(base, source, self.n)
        if not self.training:  # an exact neuron swap, like vanilla with `neurons`
            return torch.where(self.logits > 0, source.to(base.dtype), base)
        b, s = base.float(), source.float()
        return (b + self.soft_mask() * (s - b)).to(base.dtype)

    def set_progress(self, fraction: float) -> None:
        f = min(max(float(fraction), 0.0), 1.0)
        self.temperature.fill_(self.temperature_start * (self.temperature_end / self.temperature_start) ** f)

    def extra_loss(self) -> Tensor:
        return self.l1_weight * self.soft_mask().mean()

    def learned_dim(self) -> int:
        """Neurons the hard mask keeps (0 when none is)."""
        return int((self.logits > 0).sum())

    def gain(self) -> float:
        return 1.0 if self.learned_dim() else 0.0

    def edit_directions(self) -> Tensor:
        return torch.nonzero(self.logits.detach() > 0).flatten()

    def saved(self) -> dict[str, Tensor]:
        return {"mask": as_saved(self.hard_mask()), "logits": as_saved(self.logits)}

    def load(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.logits.copy_(tensors["logits"])
