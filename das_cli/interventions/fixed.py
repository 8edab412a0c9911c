"""fixed: a subspace given in a file or a das-cli cell folder, evaluated at every cell without training.   h = b + (s − b) W Wᵀ"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import Tensor

from das_cli.errors import DasError
from das_cli.folder import METRICS, SUBSPACE, sha256_of
from das_cli.subspace_files import load_directions

from .base import NoOptions, register
from .subspace import FixedSubspaceIntervention


@dataclass
class FixedOptions(NoOptions):
    path: Optional[str] = None  # a basis / mask file or a das-cli cell folder; required


@register
class FixedIntervention(FixedSubspaceIntervention):
    """A subspace given in a file (`path`: an n × k basis, a 0/1 mask of length n, or a das-cli cell folder);
    nothing is trained or estimated. A mask swaps its neurons; a basis is orthonormalised if it is not
    (subspace_files.load_directions)."""

    name = "fixed"
    Options = FixedOptions

    def __init__(self, n: int, path: str):
        basis = load_directions(path)
        if basis.shape[0] != n:
            raise DasError(f"intervention.path={path}: a subspace of width {basis.shape[0]} does not fit a site of width {n}")
        super().__init__(n, basis.shape[1])
        self.set_basis(basis)

    @classmethod
    def fixed_width(cls, options: dict) -> int | None:
        return load_directions(options["path"]).shape[0] if options.get("path") else None

    @classmethod
    def provenance(cls, options: dict) -> dict:
        """The file the subspace was read from and its sha256: a cell folder's subspace.safetensors, or its metrics.json
        where the method saves no tensor (vanilla's neurons are in its artefact record)."""
        path = Path(options["path"])
        file = (path / SUBSPACE if (path / SUBSPACE).exists() else path / METRICS) if path.is_dir() else path
        return {"subspace_file": str(file.resolve()), "subspace_sha256": sha256_of(file)}

    @classmethod
    def fingerprint(cls, options: dict) -> dict:
        """The subspace, not only its file name, decides the numbers."""
        basis: Tensor = load_directions(options["path"])
        return {"intervention_subspace": hashlib.sha256(f"{tuple(basis.shape)}".encode() + basis.numpy().tobytes()).hexdigest()}
