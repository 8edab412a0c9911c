"""Interventions: how the source vector replaces part of the base vector at a site, one module per method.

    vanilla         h = s                          (or s on the listed neurons, b elsewhere)
    das             h = b + (s - b) W Wᵀ           W: n × k, orthonormal columns (optionally the first k of a rotation)
    boundless_das   h = b + (m ⊙ (s - b) R) Rᵀ     R: n × n rotation, m: soft mask from β, T
    mean_diff, pca, h = b + (s - b) W Wᵀ           W estimated from training activations (directions.py), or random
      probe, random
    dbm             h = b + m ⊙ (s - b)            m: per-neuron sigmoid mask (hard 0/1 in eval mode)
    oblique_das     h = b + P (s - b)              P = A (BᵀA)⁻¹ Bᵀ: read basis B, write basis A, idempotent, ‖P‖₂ ≤ max_gain
    fixed           h = b + (s - b) W Wᵀ           W given in a file or a cell folder
    sparse_basis    h = b + Rᵀ (m ⊙ R (s − b))     R: the site's sparse-Jacobian rotation, m: dbm's mask

DAS: Geiger et al. 2023, arXiv 2303.02536. Boundless DAS: Wu et al. 2023, arXiv 2305.08809. dbm: the
mask baseline of MIB, arXiv 2504.13151. mean_diff, pca, probe, random: the baselines of CausalGym,
arXiv 2402.12560. oblique_das relaxes DAS's orthogonal projection to an oblique one. sparse_basis:
Baker 2022 (LessWrong), "Taking the parameters which seem to matter and rotating them until they don't".

Everything else (config, artefacts, from_run, fixed) asks the registry (`REGISTRY`, `method`), never a name.
Adding a method is one module here, its line below, its conf/intervention/<name>.yaml, its docs row and
its case in the registry test.
"""

from .base import (
    REGISTRY,
    Intervention,
    OrthonormalColumns,
    SiteActivations,
    build_intervention,
    load_intervention,
    method,
    project_swap,
    register,
)
from .subspace import FixedSubspaceIntervention
from .vanilla import VanillaIntervention
from .das import ORTHOGONAL_MAPS, DASIntervention
from .boundless_das import BoundlessDASIntervention
from .mean_diff import MeanDiffIntervention
from .pca import PCAIntervention
from .probe import ProbeIntervention
from .random import RandomIntervention
from .dbm import DBMIntervention
from .oblique_das import ObliqueDASIntervention
from .fixed import FixedIntervention
from .sparse_basis import SparseBasisIntervention

INTERVENTIONS = REGISTRY  # the name the tests and notebooks have used

__all__ = [
    "REGISTRY", "INTERVENTIONS", "Intervention", "OrthonormalColumns", "SiteActivations", "build_intervention",
    "load_intervention", "method", "project_swap", "register", "FixedSubspaceIntervention", "VanillaIntervention",
    "ORTHOGONAL_MAPS", "DASIntervention", "BoundlessDASIntervention", "MeanDiffIntervention", "PCAIntervention",
    "ProbeIntervention", "RandomIntervention", "DBMIntervention", "ObliqueDASIntervention", "FixedIntervention",
    "SparseBasisIntervention",
]
