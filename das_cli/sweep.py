"""The sweep: expand the grid, run every cell not already on disk, write the tables.

`run(cfg, output_dir)` reads top to bottom: load model -> build data -> expand grid ->
for each cell fit and evaluate -> write results. A finished cell is written atomically the
moment it ends (cells/<cell-id>/metrics.json + subspace.safetensors); rerunning into the same
folder skips finished cells.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import config as C
from .data import PairSet, position_label, resolve_positions, tokenize_pairs
from .errors import DasError
from .files import atomic_write, atomic_write_json
from .interventions import build_intervention
from .ioi import make_ioi
from .models import LoadedModel, load_model
from .results import format_summary, write_results
from .sites import HEAD_STREAMS, Site, read_site, resolve_site
from .engines import BaseRun, base_run, make_engine
from .train import evaluate, fit, prepare

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    stream: str
    layer: int
    position: tuple[int | str, ...]
    heads: tuple[int, ...] | None

    @property
    def position_label(self) -> str:
        return position_label(self.position)

    @property
    def heads_label(self) -> str:
        return "" if self.heads is None else "+".join(map(str, self.heads))

    @property
    def id(self) -> str:
        heads = f"__H{self.heads_label}" if self.heads is not None else ""
        return f"{self.stream}__L{self.layer:02d}__P{self.position_label}{heads}"

    def seed(self, run_seed: int) -> int:
        """Derived from the run seed and the cell alone: a cell's result does not depend on what ran before."""
        digest = hashlib.sha256(f"{run_seed}|{self.id}".encode()).digest()
        return int.from_bytes(digest[:4], "little")


def expand_grid(cfg: DictConfig, n_layers: int) -> list[Cell]:
    """stream x layer x head set x position, in that nesting order."""
    head_sets = C.head_sets(cfg)
    return [
        Cell(stream, layer, position, heads if stream in HEAD_STREAMS else None)
        for stream in C.streams(cfg)
        for layer in C.layers(cfg, n_layers)
        for heads in (head_sets if stream in HEAD_STREAMS else [None])
        for position in C.positions(cfg)
    ]


def build_pairs(cfg: DictConfig, lm: LoadedModel) -> tuple[PairSet, PairSet]:
    ds = cfg.dataset
    train, test = make_ioi(lm.tokenizer, ds.variable, int(ds.n_train), int(ds.n_test), int(ds.seed))
    return tokenize_pairs(lm.tokenizer, train, "train"), tokenize_pairs(lm.tokenizer, test, "test")


def check_positions(cells: list[Cell], *pair_sets: PairSet) -> None:
    """Fail before any training if some position does not exist in some prompt."""
    for position in dict.fromkeys(c.position for c in cells):
        for pairs in pair_sets:
            for group in pairs.groups:
                resolve_positions(group, position, "base")
                resolve_positions(group, position, "source")


def check_intervention(cfg: DictConfig, cells: list[Cell], sites: dict) -> None:
    """`intervention.dim` / `neurons` must fit every cell's width (site width x number of positions)."""
    options = OmegaConf.to_container(cfg.intervention)
    for cell in cells:
        width = sites[(cell.stream, cell.layer, cell.heads)].width * len(cell.position)
        dim = options.get("dim")
        if dim is not None and not 1 <= int(dim) <= width:
            raise DasError(f"intervention.dim={dim}: must be between 1 and {width} (the width of cell {cell.id})")
        neurons = options.get("neurons") or []
        if any(not 0 <= int(n) < width for n in neurons):
            raise DasError(f"intervention.neurons: indices must be in 0..{width - 1} (the width of cell {cell.id})")


def check_resume(folder: Path, cfg: DictConfig) -> None:
    """A folder holds cells of one configuration only; refuse to mix in incomparable ones."""
    path = folder / "run.json"
    current = json.loads(json.dumps(C.fingerprint(cfg), default=str))
    if path.exists():
        previous = json.loads(path.read_text())["fingerprint"]
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise DasError(
                f"output folder {folder} holds cells from another configuration (changed: {', '.join(changed)}); "
                "choose a new folder with hydra.run.dir=..."
            )
    else:
        atomic_write_json(path, {"fingerprint": current})


@torch.no_grad()
def read_sources(lm: LoadedModel, site: Site, pairs: PairSet, batch_size: int) -> list[torch.Tensor]:
    """The site's tensor on every source prompt, [G, S, C] per group, kept on the model's device."""
    out = []
    for group in pairs.groups:
        ids = group.source_ids.to(lm.device)
        out.append(torch.cat([read_site(lm, site, ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)]))
    return out


def cell_row(cell: Cell, folder: Path) -> dict | None:
    """The finished row of a cell, if it is on disk and did not fail."""
    path = folder / "cells" / cell.id / "metrics.json"
    if not path.exists():
        return None
    row = json.loads(path.read_text())
    return None if row.get("error") else row


@dataclass
class Sweep:
    """What every cell of one run shares: the model, the pairs, the unedited base runs, the folder."""

    cfg: DictConfig
    lm: LoadedModel
    folder: Path
    pairs: dict[str, PairSet]  # "train", "test"
    base: dict[str, BaseRun]
    accuracy: float  # base accuracy on the test prompts

    def run_site(self, site: Site, cells: list[Cell]) -> list[dict]:
        """All cells of one site; the sources' site tensors are read once for all of them."""
        done = {cell: cell_row(cell, self.folder) for cell in cells}
        if all(done.values()):
            return list(done.values())
        batch = int(self.cfg.eval.batch_size)
        sources = {name: read_sources(self.lm, site, pairs, batch) for name, pairs in self.pairs.items()}
        return [done[cell] or self.run_and_save(cell, site, sources) for cell in cells]

    def run_and_save(self, cell: Cell, site: Site, sources: dict) -> dict:
        try:
            row, tensors = self.run_cell(cell, site, sources)
        except (RuntimeError, FloatingPointError, ValueError) as e:
            log.error("cell %s failed: %s", cell.id, e)
            row, tensors = _failed_row(cell, self.cfg, str(e).splitlines()[0]), {}
            row.update(base_accuracy=self.accuracy, model=self.lm.name)
        save_cell(self.folder, cell, row, tensors, bool(self.cfg.output.save_subspaces))
        return row

    def engine(self, split: str, cell: Cell, site: Site, sources: dict):
        base = self.base.get(split)
        prefixes = base.prefixes if base else None
        residuals = [per_layer[cell.layer] for per_layer in base.residuals] if base and base.residuals else None
        groups = prepare(self.pairs[split], cell.position, sources[split], self.lm.device, prefixes, residuals)
        return make_engine(self.cfg.train.engine, self.lm, site, groups)

    def run_cell(self, cell: Cell, site: Site, sources: dict) -> tuple[dict, dict]:
        """Train and evaluate one cell; returns its table row and its learned tensors."""
        cfg, start = self.cfg, time.perf_counter()
        seed = cell.seed(int(cfg.seed))
        torch.manual_seed(seed)
        train, test = self.engine("train", cell, site, sources), self.engine("test", cell, site, sources)
        width = train.groups[0].source_values.shape[1]
        options = {k: v for k, v in OmegaConf.to_container(cfg.intervention).items() if k != "name"}
        intervention = build_intervention(cfg.intervention.name, width, **options).to(self.lm.device)
        t = cfg.train
        result = fit(train, intervention, int(t.epochs), float(t.lr), int(t.batch_size), float(t.lr_end_factor), seed, bool(cfg.progress))
        if math.isnan(result.loss) and result.steps:
            raise FloatingPointError("training loss became NaN")
        train_iia, _ = evaluate(train, intervention, int(cfg.eval.batch_size))
        iia, test_loss = evaluate(test, intervention, int(cfg.eval.batch_size))
        row = {
            "stream": cell.stream, "layer": cell.layer, "position": cell.position_label, "heads": cell.heads_label,
            "intervention": cfg.intervention.name, "dim": intervention.learned_dim(), "seed": int(cfg.seed),
            "iia": iia, "train_iia": train_iia, "loss": result.loss, "base_accuracy": self.accuracy,
            "n_train": len(self.pairs["train"]), "n_test": len(self.pairs["test"]),
            "seconds": time.perf_counter() - start, "test_loss": test_loss, "width": width, "steps": result.steps,
            "cell": cell.id, "cell_seed": seed, "model": self.lm.name, "engine": cfg.train.engine,
        }
        return row, intervention.state_for_saving()


def save_cell(folder: Path, cell: Cell, row: dict, tensors: dict, save_subspace: bool) -> None:
    cell_dir = folder / "cells" / cell.id
    if save_subspace and tensors:
        atomic_write(cell_dir / "subspace.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic_write_json(cell_dir / "metrics.json", row)


def _failed_row(cell: Cell, cfg: DictConfig, error: str) -> dict:
    return {
        "stream": cell.stream, "layer": cell.layer, "position": cell.position_label, "heads": cell.heads_label,
        "intervention": cfg.intervention.name, "seed": int(cfg.seed), "iia": math.nan, "cell": cell.id, "error": error,
    }


def run(cfg: DictConfig, output_dir: str | Path) -> pd.DataFrame:
    """Run the sweep `cfg` describes into `output_dir`; returns the IIA table (one row per cell)."""
    cfg = C.typed(cfg)
    C.validate(cfg)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lm = load_model(cfg.model, str(C.pick_device(cfg.device)), cfg.dtype)
    train, test = build_pairs(cfg, lm)
    cells = expand_grid(cfg, lm.n_layers)
    sites = {key: resolve_site(lm, *key) for key in dict.fromkeys(_site_key(c) for c in cells)}
    check_positions(cells, train, test)
    check_intervention(cfg, cells, sites)
    check_resume(folder, cfg)
    pending = [c for c in cells if cell_row(c, folder) is None]
    sweep = _start(cfg, lm, folder, train, test, layers=tuple(sorted({c.layer for c in pending})))
    log.info("model %s: %d layers; base accuracy on %d test prompts: %.3f", lm.name, lm.n_layers, len(test), sweep.accuracy)
    rows = []
    with tqdm(total=len(cells), desc="cells", disable=not cfg.progress) as bar:
        for key, site_cells in groupby(cells, key=_site_key):
            for row in sweep.run_site(sites[key], list(site_cells)):
                rows.append(row)
                bar.update()
                bar.set_postfix_str(f"{row['cell']} iia={row['iia']:.2f}")
    title = f"{lm.name} · {cfg.intervention.name} · {cfg.dataset.name} {cfg.dataset.get('variable', '')}".strip()
    frame = write_results(rows, folder, title, plots=bool(cfg.output.plots))
    print(format_summary(frame))
    print(f"results: {folder.resolve()}")
    return frame


def _site_key(cell: Cell) -> tuple:
    return (cell.stream, cell.layer, cell.heads)


def _start(cfg: DictConfig, lm: LoadedModel, folder: Path, train: PairSet, test: PairSet, layers: tuple[int, ...]) -> Sweep:
    """One forward over the base prompts: base accuracy, plus the fast engine's caches for pending layers."""
    keep = bool(layers) and cfg.train.engine == "fast"
    batch = int(cfg.eval.batch_size)
    base = {"test": base_run(lm, test, batch, keep, layers)}
    if keep:
        base["train"] = base_run(lm, train, batch, keep, layers)
    return Sweep(cfg, lm, folder, {"train": train, "test": test}, base, base["test"].accuracy(test))
