"""Interventions: how the source vector replaces part of the base vector at a site.

Every intervention maps flat vectors `base`, `source` of shape [..., n] (n = width of the
site; several positions or heads are concatenated) to the intervened vector of the same
shape. Inputs may be bfloat16; the maths runs in float32 (the parameters are float32) and
the result comes back in the input dtype.

    vanilla         h = s                          (or s on the listed neurons, b elsewhere)
    das             h = b + (s - b) W Wᵀ           W: n × k, orthonormal columns (optionally the first k of a rotation)
    boundless_das   h = b + (m ⊙ (s - b) R) Rᵀ     R: n × n rotation, m: soft mask from β, T
    mean_diff, pca, h = b + (s - b) W Wᵀ           W estimated from training activations (directions.py), or random
      probe, random
    dbm             h = b + m ⊙ (s - b)            m: per-neuron sigmoid mask (hard 0/1 in eval mode)
    oblique_das     h = b + P (s - b)              P = A (BᵀA)⁻¹ Bᵀ: read basis B, write basis A, idempotent, ‖P‖₂ ≤ max_gain

DAS: Geiger et al. 2023, arXiv 2303.02536. Boundless DAS: Wu et al. 2023, arXiv 2305.08809. dbm: the
mask baseline of MIB, arXiv 2504.13151. mean_diff, pca, probe, random: the baselines of CausalGym,
arXiv 2402.12560. oblique_das relaxes DAS's orthogonal projection to an oblique one.

Every intervention also reports the map it applies in evaluation mode, h = b + M (s − b):
`gain()` is ‖M‖₂ and `edit_directions()` spans the directions M writes (scores.py reads both).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from das_cli import directions
from das_cli.errors import DasError, choices_error

ORTHOGONAL_MAPS = ("cayley", "householder", "matrix_exp")


def project_swap(base: Tensor, source: Tensor, basis: Tensor) -> Tensor:
    """Replace the part of `base` in span(basis) by that of `source`: (I − P) b + P s, P = W Wᵀ.

    `basis` is n × k with orthonormal columns; no n × n matrix is formed.
    """
    return base + ((source - base) @ basis) @ basis.T


@dataclass
class SiteActivations:
    """The unedited site vectors of the training prompts at a cell, for interventions estimated from data.

    Rows are every train base prompt, then every train source prompt, at the cell's positions
    (several positions concatenated, as the intervention sees them). `classes[i]` indexes
    `names`, the variable's value on that prompt (IOI io_position: "first" / "second"; by
    default the prompt's own answer); -1 where the value is unknown.
    """

    values: Tensor  # [N, n] float32
    classes: Tensor  # [N] int64
    names: list[str]


class Intervention(nn.Module):
    """Base class. Subclasses implement `forward` and `learned_dim`; the rest has defaults.

    `trainable`: fitted by gradient descent on the counterfactual loss (`fit` in train.py).
    `needs_activations`: estimated from training activations instead; the sweep calls
    `fit_activations` once before training and evaluation.
    `needs_model`: estimated from the model itself at the cell's site (sparse_basis.py); the sweep calls
    `fit_model` once before training, which returns extra columns for the cell's row.
    """

    trainable: bool = False
    needs_activations: bool = False
    needs_model: bool = False

    def fit_activations(self, acts: SiteActivations) -> None:
        """Estimate the intervention from the training prompts' site vectors (only if `needs_activations`)."""

    def fit_model(self, lm, site, pairs, position: tuple, seed: int) -> dict:
        """Estimate the intervention from the model at `site` on the training pairs (only if `needs_model`)."""
        return {}

    def plot(self, directory) -> None:
        """Figures of what was learned, into the cell's folder (when output.plots); none by default."""

    def forward(self, base: Tensor, source: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict]:
        """Parameter groups for torch.optim.Adam (empty when there is nothing to train)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr}] if params else []

    def extra_loss(self) -> Tensor:
        """A term added to the cross-entropy loss (zero unless the method has a penalty)."""
        return torch.zeros((), device=self._device())

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1]; schedules (e.g. a temperature) follow it."""

    def learned_dim(self) -> int:
        """Rank of the swapped subspace."""
        raise NotImplementedError

    def state_for_saving(self) -> dict[str, Tensor]:
        """Contiguous float32 CPU tensors for a safetensors file."""
        return {}

    def gain(self) -> float:
        """‖M‖₂ of the map M applied in evaluation mode, h = b + M (s − b): 1 for an orthogonal projection."""
        return 1.0

    def edit_directions(self) -> Tensor:
        """The directions M writes: n × r orthonormal columns, or a 1-D int64 tensor of coordinates."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")


def _check_dim(dim: int, n: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= n:
        raise DasError(f"intervention.dim={dim}: must be between 1 and {n} (the site width)")


def _check_shapes(base: Tensor, source: Tensor, n: int) -> None:
    if base.shape != source.shape or base.shape[-1] != n:
        raise ValueError(f"base {tuple(base.shape)} and source {tuple(source.shape)} must both be [..., {n}]")


def _saved(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


class OrthonormalColumns(nn.Module):
    """An n × k matrix with orthonormal columns (`.weight`), kept so by `parametrizations.orthogonal`.

    Thin matrices (k < n) use Householder reflectors without the "trivialization" base:
    with it, torch stores an n × n base matrix even for a single column. Square ones use
    torch's default (matrix exponential with trivialization). Initial value: the QR-orthonormalised
    random normal matrix `nn.init.orthogonal_` gives, so it is fixed by torch.manual_seed.
    Assigning `.weight = Q` (Q with orthonormal columns) sets the matrix to Q.
    """

    def __init__(self, n: int, k: int, orthogonal_map: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(n, k)))
        chosen = orthogonal_map or ("matrix_exp" if n == k else "householder")
        # matrix_exp / cayley build an n × n matrix anyway and can only be assigned with trivialization.
        orthogonal(self, "weight", orthogonal_map=chosen, use_trivialization=chosen != "householder")


class VanillaIntervention(Intervention):
    """Copy the source vector (or only the listed neurons) into the base; nothing is trained."""

    trainable = False

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
        _check_shapes(base, source, self.n)
        if self.mask is None:
            return source.to(base.dtype, copy=True)
        return torch.where(self.mask, source.to(base.dtype), base)

    def learned_dim(self) -> int:
        return self.n if self.neurons is None else len(self.neurons)

    def edit_directions(self) -> Tensor:
        return torch.arange(self.n) if self.neurons is None else torch.tensor(self.neurons)


class DASIntervention(Intervention):
    """Low-rank DAS: swap the k-dimensional subspace span(W) of base for that of source.

    By default W is an n × k matrix kept orthonormal by itself (no n × n matrix exists).
    `full_rotation=True` instead learns a full n × n rotation R and uses its first k columns,
    as pyvene's RotatedSpaceIntervention does: the same forward for the same W, but a
    different parametrisation, so training can take another path (and costs n² parameters).
    """

    trainable = True

    def __init__(self, n: int, dim: int, orthogonal_map: str | None = None, full_rotation: bool = False):
        super().__init__()
        _check_dim(dim, n)
        if orthogonal_map is not None and orthogonal_map not in ORTHOGONAL_MAPS:
            raise choices_error("intervention.orthogonal_map", orthogonal_map, ORTHOGONAL_MAPS)
        if not isinstance(full_rotation, bool):
            raise DasError(f"intervention.full_rotation={full_rotation}: must be true or false")
        self.n, self.dim, self.full_rotation = n, dim, full_rotation
        self.basis = OrthonormalColumns(n, n if full_rotation else dim, orthogonal_map)

    @property
    def W(self) -> Tensor:
        return self.basis.weight[:, : self.dim]

    def set_basis(self, W: Tensor) -> None:
        """Load a given n × k matrix with orthonormal columns (e.g. a saved basis).

        With a full rotation, W is completed to an n × n orthogonal matrix whose first k columns are W.
        """
        W = W.to(self.basis.weight.device, torch.float32)
        self.basis.weight = _complete_rotation(W) if self.full_rotation else W

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        _check_shapes(base, source, self.n)
        return project_swap(base.float(), source.float(), self.W).to(base.dtype)

    def learned_dim(self) -> int:
        return self.dim

    def edit_directions(self) -> Tensor:
        return self.W.detach()

    def state_for_saving(self) -> dict[str, Tensor]:
        return {"basis": _saved(self.W)}


def _complete_rotation(W: Tensor) -> Tensor:
    """An n × n orthogonal matrix whose first k columns are W (W: n × k, orthonormal columns).

    QR of [W | I] gives Q with Q[:, :k] = W up to column signs; putting W back keeps Q orthogonal.
    """
    n, k = W.shape
    Q = torch.linalg.qr(torch.cat([W, torch.eye(n, dtype=W.dtype, device=W.device)], dim=1)).Q
    Q[:, :k] = W
    return Q


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

    trainable = True
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
        _check_shapes(base, source, self.n)
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

    def state_for_saving(self) -> dict[str, Tensor]:
        R = self.R
        return {
            "rotation": _saved(R),
            "boundary": _saved(self.beta()).reshape(1),
            "basis": _saved(R[:, : self.learned_dim()]),
        }


class FixedSubspaceIntervention(Intervention):
    """Swap a k-dimensional subspace that is set once rather than trained: h = b + (s − b) W Wᵀ.

    Subclasses set W (`basis`, a buffer, so it follows `.to(device)`) at construction or in
    `fit_activations`. Until then `forward` refuses to run: a zero basis would silently return
    the base vector and report an IIA for a subspace that was never estimated.
    """

    trainable = False
    method = ""  # the name in INTERVENTIONS, for messages

    def __init__(self, n: int, dim: int = 1):
        super().__init__()
        _check_dim(dim, n)
        self.n, self.dim = n, dim
        self.register_buffer("basis", torch.zeros(n, dim))
        self.estimated = False

    def set_basis(self, W: Tensor) -> None:
        """Use the n × k matrix W (orthonormal columns) from now on, on the module's device."""
        self.basis = W.to(self.basis.device, torch.float32).contiguous()
        self.estimated = True

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        if not self.estimated:
            raise RuntimeError(
                f"intervention={self.method}: its directions are estimated from the training activations; "
                "call fit_activations before using it"
            )
        _check_shapes(base, source, self.n)
        return project_swap(base.float(), source.float(), self.basis).to(base.dtype)

    def learned_dim(self) -> int:
        return self.dim

    def edit_directions(self) -> Tensor:
        return self.basis

    def state_for_saving(self) -> dict[str, Tensor]:
        return {"basis": _saved(self.basis)}

    def _values(self, acts: SiteActivations) -> Tensor:
        """The activations as float32 on the module's device (the sweep may hand them over on the CPU)."""
        return acts.values.to(self.basis.device, torch.float32)

    def _labelled(self, acts: SiteActivations) -> tuple[Tensor, Tensor]:
        """Rows whose variable value is known, with labels renumbered 0..C-1 over the values present.

        Checks that there are two values at least and that `dim` ≤ C − 1, the rank of C centred class vectors.
        """
        known = acts.classes >= 0
        present, labels = torch.unique(acts.classes[known], return_inverse=True)
        names = [acts.names[i] for i in present.tolist()]
        if len(names) < 2:
            raise DasError(
                f"intervention={self.method} needs at least two values of the variable among the training prompts; "
                f"found {len(names)}{' (' + ', '.join(names) + ')' if names else ''}"
            )
        if self.dim > len(names) - 1:
            raise DasError(
                f"intervention.dim={self.dim}: intervention={self.method} gives at most {len(names) - 1} direction(s) "
                f"from {len(names)} values of the variable ({', '.join(names)})"
            )
        return self._values(acts)[known.to(self.basis.device)], labels.to(self.basis.device)


class MeanDiffIntervention(FixedSubspaceIntervention):
    """Difference of class means (two values of the variable), or the top-`dim` between-class directions."""

    method = "mean_diff"
    needs_activations = True

    def fit_activations(self, acts: SiteActivations) -> None:
        values, labels = self._labelled(acts)
        self.set_basis(directions.mean_diff_basis(values, labels, self.dim))


class PCAIntervention(FixedSubspaceIntervention):
    """Top-`dim` principal components of all training activations, whatever the variable's value."""

    method = "pca"
    needs_activations = True

    def fit_activations(self, acts: SiteActivations) -> None:
        values = self._values(acts)
        if self.dim > len(values) - 1:
            raise DasError(
                f"intervention.dim={self.dim}: intervention=pca gives at most {len(values) - 1} direction(s) "
                f"from {len(values)} training vectors"
            )
        self.set_basis(directions.pca_basis(values, self.dim))


class ProbeIntervention(FixedSubspaceIntervention):
    """Decision directions of a multinomial logistic probe for the variable (L2 weight `probe_l2`)."""

    method = "probe"
    needs_activations = True

    def __init__(self, n: int, dim: int = 1, probe_l2: float = 1e-3):
        super().__init__(n, dim)
        if not probe_l2 >= 0:
            raise DasError(f"intervention.probe_l2={probe_l2}: must be >= 0")
        self.probe_l2 = float(probe_l2)

    def fit_activations(self, acts: SiteActivations) -> None:
        values, labels = self._labelled(acts)
        self.set_basis(directions.probe_basis(values, labels, self.dim, self.probe_l2))


class RandomIntervention(FixedSubspaceIntervention):
    """`dim` random orthonormal directions, drawn at construction from torch's global RNG.

    Needs no activations: under the sweep's per-cell torch.manual_seed it is reproducible.
    """

    method = "random"

    def __init__(self, n: int, dim: int = 1):
        super().__init__(n, dim)
        self.set_basis(directions.random_basis(n, dim))


class DBMIntervention(Intervention):
    """Differentiable binary mask over neurons (the MIB localist baseline; De Cao et al.): h = b + m ⊙ (s − b).

    m = σ(l / T) per neuron in train mode; in eval mode the hard mask m = [l > 0]. Logits start
    at 0 (m = ½, no neuron favoured) so a neuron is kept only if training pushes its logit up.
    T falls log-linearly (geometrically) from temperature_start to temperature_end with
    `set_progress`: a linear schedule from 1 to 0.01 would stay above 0.5 for half of training
    and only sharpen the mask in the last steps. The loss adds l1_weight · mean(m).
    """

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
        _check_shapes(base, source, self.n)
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

    def state_for_saving(self) -> dict[str, Tensor]:
        return {"mask": _saved(self.hard_mask()), "logits": _saved(self.logits)}


class ObliqueDASIntervention(Intervention):
    """Oblique ("stretch") DAS: read the source along B, write along A, with a bounded gain.

    h = b + P (s − b), P = A (BᵀA)⁻¹ Bᵀ. P is idempotent (P² = P) but not symmetric, so the
    subspace written, span(A), may differ from the one read, span(B): Bᵀ h = Bᵀ s and h − b ∈ span(A).
    ‖P‖₂ = 1 / cos θ, θ the largest principal angle between span(A) and span(B), so a free A, B
    can make the edit arbitrarily large (a steering vector, not an interchange).

    Parametrisation: Q = orthonormalised read basis (`read_basis`, QR), N = (I − QQᵀ) X the
    write offset (`write_offset`, X starts at 0), A = Q + N. Every A with BᵀA invertible spans
    the same subspace as one such Q + N, and then P = (Q + N) Qᵀ, so PᵀP = Q (I + NᵀN) Qᵀ and
    ‖P‖₂ = √(1 + ‖N‖₂²). Scaling N down to ‖N‖₂ ≤ √(max_gain² − 1) in the forward keeps
    ‖P‖₂ ≤ max_gain at every step, without an inverse. Starts as the orthogonal projection of DAS.
    """

    trainable = True

    def __init__(self, n: int, dim: int = 1, max_gain: float = 2.0):
        super().__init__()
        _check_dim(dim, n)
        if isinstance(max_gain, bool) or not isinstance(max_gain, (int, float)) or not max_gain >= 1:
            raise DasError(f"intervention.max_gain={max_gain}: must be a number >= 1 (the largest allowed ‖P‖₂; 1 is orthogonal DAS)")
        self.n, self.dim, self.max_gain = n, dim, float(max_gain)
        self.read_basis = nn.Parameter(nn.init.orthogonal_(torch.empty(n, dim)))  # B
        self.write_offset = nn.Parameter(torch.zeros(n, dim))  # X

    def _read(self) -> Tensor:
        return torch.linalg.qr(self.read_basis).Q

    def _offset(self, Q: Tensor) -> Tensor:
        """N = (I − QQᵀ) X, scaled down to spectral norm √(max_gain² − 1) when it is larger."""
        N = self.write_offset - Q @ (Q.T @ self.write_offset)
        bound_sq = self.max_gain**2 - 1.0
        if bound_sq == math.inf:
            return N
        if bound_sq == 0.0:
            return torch.zeros_like(N)
        # σ_max² from the k × k Gram matrix; eigenvalues alone have gradients even when repeated.
        norm_sq = torch.linalg.eigvalsh(N.T @ N)[-1]
        return N * torch.sqrt(bound_sq / norm_sq.clamp_min(bound_sq))

    @property
    def write_basis(self) -> Tensor:
        """A = Q + N (n × k), the basis the edit writes along."""
        Q = self._read()
        return Q + self._offset(Q)

    def projection(self) -> Tensor:
        """P = A (BᵀA)⁻¹ Bᵀ = (Q + N) Qᵀ as an n × n matrix (for inspection; `forward` never forms it)."""
        Q = self._read()
        return (Q + self._offset(Q)) @ Q.T

    def forward(self, base: Tensor, source: Tensor) -> Tensor:
        _check_shapes(base, source, self.n)
        b, s = base.float(), source.float()
        Q = self._read()
        return (b + ((s - b) @ Q) @ (Q + self._offset(Q)).T).to(base.dtype)

    def learned_dim(self) -> int:
        return self.dim

    def gain(self) -> float:
        Q = self._read()
        N = self._offset(Q).detach()
        return math.sqrt(1.0 + float(torch.linalg.matrix_norm(N, ord=2)) ** 2)

    def edit_directions(self) -> Tensor:
        return torch.linalg.qr(self.write_basis.detach()).Q

    def state_for_saving(self) -> dict[str, Tensor]:
        return {
            "read_basis": _saved(self._read()),
            "write_basis": _saved(self.write_basis),
            "basis": _saved(self.edit_directions()),
        }


class FixedIntervention(FixedSubspaceIntervention):
    """A subspace given in a file (`path`: an n × k basis, a 0/1 mask of length n, or a das-cli cell folder);
    nothing is trained or estimated. A mask swaps its neurons; a basis is orthonormalised if it is not
    (artefacts.load_directions)."""

    method = "fixed"

    def __init__(self, n: int, path: str):
        from .artefacts import load_directions

        basis = load_directions(path)
        if basis.shape[0] != n:
            raise DasError(f"intervention.path={path}: a subspace of width {basis.shape[0]} does not fit a site of width {n}")
        super().__init__(n, basis.shape[1])
        self.set_basis(basis)


INTERVENTIONS: dict[str, type[Intervention]] = {
    "vanilla": VanillaIntervention,
    "das": DASIntervention,
    "boundless_das": BoundlessDASIntervention,
    "mean_diff": MeanDiffIntervention,
    "pca": PCAIntervention,
    "probe": ProbeIntervention,
    "random": RandomIntervention,
    "dbm": DBMIntervention,
    "oblique_das": ObliqueDASIntervention,
    "fixed": FixedIntervention,
}
# sparse_basis.py subclasses DBMIntervention and adds itself to INTERVENTIONS when imported.
from das_cli import sparse_basis as _sparse_basis  # noqa: E402,F401


def build_intervention(name: str, n: int, **options) -> Intervention:
    """Build the intervention `name` for a site of width n; `options` are its constructor arguments (None = default)."""
    if name not in INTERVENTIONS:
        raise choices_error("intervention", name, sorted(INTERVENTIONS))
    cls = INTERVENTIONS[name]
    params = {key: p for key, p in inspect.signature(cls).parameters.items() if key != "n"}
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in params:
            raise DasError(
                f"intervention.{key}: not an option of intervention={name}; valid options: {', '.join(sorted(params)) or '(none)'}"
            )
    for key, p in params.items():
        if p.default is inspect.Parameter.empty and key not in given:
            raise DasError(f"intervention.{key}: required for intervention={name}")
    return cls(n, **given)
