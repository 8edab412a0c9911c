"""What every intervention is: the base class, its capabilities, the registry, building and loading.

An intervention maps flat vectors `base`, `source` of shape [..., n] (n = width of the site; several
positions or heads are concatenated) to the intervened vector of the same shape. Inputs may be
bfloat16; the maths runs in float32 (the parameters are float32) and the result comes back in the
input dtype. Each method is one module of this package: an `Intervention` subclass registered with
`@register`, with its `name`, its typed `Options` (the keys of conf/intervention/<name>.yaml, which
holds their defaults), its capabilities and a symmetric `saved()` / `load()`.

Every intervention also reports the map it applies in evaluation mode, h = b + M (s − b):
`gain()` is ‖M‖₂ and `edit_directions()` spans the directions M writes (scores.py reads both).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from omegaconf import MISSING
from torch import Tensor, nn
from torch.nn.utils.parametrizations import orthogonal

from das_cli.errors import DasError, choices_error, non_finite


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


@dataclass
class NoOptions:
    """The typed options of a method (besides `name`): fields of its `Options` dataclass. MISSING: the YAML
    gives the value; None: an optional key that is not set."""

    name: str = MISSING


@dataclass
class DimOptions(NoOptions):
    dim: int = MISSING


class Intervention(nn.Module):
    """Base class. Subclasses implement `forward`, `learned_dim`, `edit_directions` and `load`; the rest has defaults.

    Capabilities (class attributes; a loaded, frozen intervention turns the first three off):
    `trainable`: fitted by gradient descent on the counterfactual loss (train.py).
    `needs_activations`: estimated from training activations instead; the sweep calls `fit_activations`
    once before training and evaluation.
    `needs_model`: estimated from the model itself at the cell's site; the sweep calls `fit_model` once
    before training, which returns extra columns for the cell's row.
    `subspace`: the edit swaps the span of `edit_directions()` (a basis or coordinates), so that span can be
    evaluated on its own (intervention=fixed takes it from a cell folder).
    `illusion_split`: the edit is an orthogonal swap of an orthonormal `saved()["basis"]`, which the illusion
    check splits into its rowspace and nullspace parts.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    trainable: bool = False
    needs_activations: bool = False
    needs_model: bool = False
    subspace: ClassVar[bool] = True
    illusion_split: ClassVar[bool] = False

    def fit_activations(self, acts: SiteActivations) -> None:
        """Estimate the intervention from the training prompts' site vectors (only if `needs_activations`)."""

    def fit_model(self, lm, site, pairs, position: tuple, seed: int) -> dict:
        """Estimate the intervention from the model at `site` on the training pairs (only if `needs_model`)."""
        return {}

    def freeze(self) -> "Intervention":
        """Neither trained nor estimated from now on (an intervention loaded from a finished cell)."""
        self.trainable = self.needs_activations = self.needs_model = False
        return self

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

    def saved(self) -> dict[str, Tensor]:
        """What `load` needs to give back the same edit: contiguous float32 CPU tensors for a safetensors file."""
        return {}

    def load(self, tensors: dict[str, Tensor]) -> None:
        """Set the intervention to `tensors` (what `saved()` returned); a missing tensor raises KeyError."""

    def gain(self) -> float:
        """‖M‖₂ of the map M applied in evaluation mode, h = b + M (s − b): 1 for an orthogonal projection."""
        return 1.0

    def edit_directions(self) -> Tensor:
        """The directions M writes: n × r orthonormal columns, or a 1-D int64 tensor of coordinates."""
        raise NotImplementedError

    @classmethod
    def fixed_width(cls, options: dict) -> int | None:
        """The one site width the options fit (a given subspace's), None when any width does."""
        return None

    @classmethod
    def fingerprint(cls, options: dict) -> dict:
        """What decides the numbers besides the options themselves (a given subspace's content)."""
        return {}

    @classmethod
    def provenance(cls, options: dict) -> dict:
        """Columns of every row naming where a given subspace came from (its file and the file's sha256)."""
        return {}

    def _device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")


REGISTRY: dict[str, type[Intervention]] = {}


def register(cls: type[Intervention]) -> type[Intervention]:
    """Add a method to the registry under its `name`; its `Options` must name its constructor's arguments."""
    arguments = set(inspect.signature(cls).parameters) - {"n"}
    options = {f.name for f in fields(cls.Options)} - {"name"}
    if not cls.name or arguments != options:
        raise TypeError(f"{cls.__name__}: a name and Options fields equal to the constructor's arguments "
                        f"({sorted(arguments)} vs {sorted(options)})")
    REGISTRY[cls.name] = cls
    return cls


def method(name: str) -> type[Intervention]:
    if name not in REGISTRY:
        raise choices_error("intervention", name, sorted(REGISTRY))
    return REGISTRY[name]


def build_intervention(name: str, n: int, **options) -> Intervention:
    """Build the intervention `name` for a site of width n; `options` are its constructor arguments (None = default)."""
    cls = method(name)
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


def load_intervention(name: str, n: int, options: dict, tensors: dict[str, Tensor], where: object = "") -> Intervention:
    """The intervention `name` of a site of width n, set to saved `tensors`, frozen and in eval mode; a tensor
    the method needs and `tensors` lacks is an error naming it (never a re-fit)."""
    bad = non_finite(tensors)
    if bad:
        raise DasError(f"{where}: the saved tensor '{bad[0]}' holds NaN or Inf values; train the cell again")
    other = [(key, t) for key, t in tensors.items() if t.dtype != torch.float32]
    if other:  # das-cli saves float32 (as_saved): another type is a file written by something else
        key, t = other[0]
        raise DasError(f"{where}: the saved tensor '{key}' is {str(t.dtype).removeprefix('torch.')}, not the float32 das-cli saves")
    module = build_intervention(name, n, **options)
    try:
        module.load(tensors)
    except KeyError as e:
        raise DasError(f"{where}: the saved tensors lack {e}, which intervention={name} needs") from None
    except (ValueError, RuntimeError) as e:  # a tensor of another shape than the method's on this site
        shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in tensors.items())
        raise DasError(f"{where}: the saved tensors ({shapes}) do not fit intervention={name} on a site of width {n} "
                       f"({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None
    return module.freeze().eval()


# ---- pieces several methods share ----

def check_dim(dim: int, n: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= n:
        raise DasError(f"intervention.dim={dim}: must be between 1 and {n} (the site width)")


def check_shapes(base: Tensor, source: Tensor, n: int) -> None:
    if base.shape != source.shape or base.shape[-1] != n:
        raise ValueError(f"base {tuple(base.shape)} and source {tuple(source.shape)} must both be [..., {n}]")


def as_saved(t: Tensor) -> Tensor:
    """A tensor as a safetensors file stores it: detached, float32, on the CPU, contiguous."""
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
