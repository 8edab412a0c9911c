"""boundless_das: Boundless DAS (Wu et al. 2023, arXiv 2305.08809).   h = b + (m ⊙ (s − b) R) Rᵀ, R: n × n rotation, m: soft mask from β, T"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING
from torch import Tensor, nn

from das_cli.errors import DasError

from .base import Intervention, NoOptions, OrthonormalColumns, as_saved, check_shapes, register


@dataclass
class BoundlessDasOptions(NoOptions):
    init_boundary: float = MISSING
    temperature_start: float = MISSING
    temperature_end: float = MISSING
    boundary_lr: float = MISSING
    boundary_loss_weight: float = MISSING


@register
class BoundlessDASIntervention(Intervention):
    """Boundless DAS (Wu et al. 2023): full rotation R and a learned soft boundary β on the rotated coords.

    In train mode rotated coordinate i is swapped with weight m_i = σ((i + ½)/T) · σ((β n − (i + ½))/T).
    We use coordinate centres i + ½ where pyvene uses i: as T → 0, coordinate i is swapped
    iff i + ½ < β n (with i, coordinate 0 would be stuck at m = ½ and the last one at m = σ(1/T)).
    T moves linearly from temperature_start to temperature_end with `set_progress`. Eval mode
    applies that limit, the hard mask [i + ½ < β n], whose size `learned_dim` reports (it can be 0):
    at T = 0.1 the soft mask is still not 0/1 (σ(5) = 0.993 on coordinate 0), so the map scored
    would not be the swap reported. With the hard mask β = 1 is an exact full swap.
    """

    name = "boundless_das"
    Options = BoundlessDasOptions
    trainable = True
    illusion_split = True
    BETA_MIN, BETA_MAX = 1e-3, 1.0

    def __init__(
        self,
        n: int,
        init_boundary: float = 0.5,
        temperature_start: float = 50.0,
        temperature_end: float = 0.1,
        boundary_lr: float = 1e-2,
        boundary_loss_weight: float = 1.0,
    ):
        super().__init__()
        if not self.BETA_MIN <= init_boundary <= self.BETA_MAX:
            raise DasError(f"intervention.init_boundary={init_boundary}: must be between {self.BETA_MIN} and {self.BETA_MAX}")
        for key, value in [("temperature_start", temperature_start), ("temperature_end", temperature_end), ("boundary_lr", boundary_lr)]:
            if not value > 0:
                raise DasError(f"intervention.{key}={value}: must be > 0")
        if not boundary_loss_weight >= 0:
            raise DasError(f"intervention.boundary_loss_weight={boundary_loss_weight}: must be >= 0")
        self.n = n
        self.temperature_start, self.temperature_end = float(temperature_start), float(temperature_end)
        self.boundary_lr, self.boundary_loss_weight = float(boundary_lr), float(boundary_loss_weight)
        self.rotation = OrthonormalColumns(n, n)
        self.boundary = nn.Parameter(torch.tensor([float(init_boundary)]))
        self.register_buffer("temperature", torch.tensor(self.temperature_start))
        self.register_buffer("centres", torch.arange(n, dtype=torch.float32) + 0.5, persistent=False)

    @property
    def R(self) -> Tensor:
        return self.rotation.weight

    def set_rotation(self, R: Tensor) -> None:
        """Load a given n × n orthogonal matrix."""
        self.rotation.weight = R.to(self.R.device, torch.float32)

    def beta(self) -> Tensor:
        """β clamped to [1e-3, 1]. Straight-through: the gradient passes even when clamped, so β can come back."""
        raw = self.boundary
        return raw + (raw.clamp(self.BETA_MIN, self.BETA_MAX) - raw).detach()

    def mask(self) -> Tensor:
        """The soft mask at the current temperature (used in train mode)."""
        T, i = self.temperature, self.centres
        return torch.sigmoid(i / T) * torch.sigmoid((self.beta() * self.n - i) / T)

    def hard_mask(self) -> Tensor:
        """The T → 0 limit of the mask, [i + ½ < β n] (used in eval mode)."""
        return (self.centres < self.beta().detach() * self.n).float()

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        check_shapes(base, source, self.n)
        b, s, R = base.float(), source.float(), self.R
        m = self.mask() if self.training else self.hard_mask()
        # == ((1 - m) ⊙ bR + m ⊙ sR) Rᵀ, since R Rᵀ = I; this form returns b exactly when s == b.
        return (b + ((s - b) @ R * m) @ R.T).to(base.dtype)

    def set_progress(self, fraction: float) -> None:
        f = min(max(float(fraction), 0.0), 1.0)
        self.temperature.fill_(self.temperature_start + f * (self.temperature_end - self.temperature_start))

    def extra_loss(self) -> Tensor:
        return self.boundary_loss_weight * self.beta().sum()

    def param_groups(self, lr: float) -> list[dict]:
        rotation = [p for p in self.rotation.parameters() if p.requires_grad]
        return [{"params": rotation, "lr": lr}, {"params": [self.boundary], "lr": self.boundary_lr}]

    def learned_dim(self) -> int:
        """Coordinates the hard mask swaps (0 when β n ≤ ½)."""
        return int(self.hard_mask().sum())

    def gain(self) -> float:
        return 1.0 if self.learned_dim() else 0.0

    def edit_directions(self) -> Tensor:
        return self.R.detach()[:, : self.learned_dim()]

    def saved(self) -> dict[str, Tensor]:
        R = self.R
        return {
            "rotation": as_saved(R),
            "boundary": as_saved(self.beta()).reshape(1),
            "basis": as_saved(R[:, : self.learned_dim()]),
        }

    def load(self, tensors: dict[str, Tensor]) -> None:
        self.set_rotation(tensors["rotation"])
        with torch.no_grad():
            self.boundary.copy_(tensors["boundary"].reshape(1))
