"""`mode=plan`: a sweep's grid and its cost before anything is spent. The model's config and tokenizer are
read, never its weights; the pairs are built (before `dataset.filter`, which needs the model); nothing is
trained or written.

The estimate counts arithmetic and steps. A frozen block costs 2·P multiply-adds per token forward (P: its
weight count) plus attention over the context, and the backward pass to the activations about as much
again; a training step feeds `batch_size` pairs through the blocks from the cell's layer on, from the
earliest intervened token on (the fast engine), and reads the vocabulary at the answer; an evaluation is
the same forward over every pair of each split. The run also loads the model, reads every prompt once
(the base runs and the source activations) and pays a fixed cost per step and per cell. Seconds are
operations over a device's measured rate plus those fixed costs (`DEVICE_COSTS`, fitted to measured runs:
benchmarks/README.md). Peak memory is the weights, the fast engine's cached keys, values and residuals,
one step's activations and logits, and the process's own.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, open_dict

from . import config as C
from . import folder as layout
from .bundles import ACTIVATIONS_PER_TOKEN_BLOCK, cells_per_step, fed_tokens
from .datasets import build_pairs
from .errors import DasError
from .grid import Cell, expand_grid, shard_cells
from .interventions import method
from .models import ModelShape, load_shape
from .names import HEAD_STREAMS
from .sites import head_counts


@dataclass(frozen=True)
class DeviceCosts:
    operations_per_s: float  # multiply-adds per second the blocks and the readout reach (measured)
    step_s: float  # fixed cost of one training step (launches, the optimiser, Python)
    cell_s: float  # fixed cost of one cell (set-up, evaluation batches, writing)
    start_s: float  # importing, composing, loading a converted model
    process_bytes: int  # the process before the model: Python, torch, transformers
    calibrated: bool


# CPU: fitted (non-negative least squares) to six whole runs on a 2-core CPU, SmolLM2 and tiny models, 11 s to
# 128 s; each is then predicted within 18% (benchmarks/README.md: "mode=plan against measured runs"). No GPU run has
# been measured yet: the CUDA figures are a guess (a tenth of an H100's float32 peak) and the plan says so.
DEVICE_COSTS = {
    "cpu": DeviceCosts(operations_per_s=5.9e10, step_s=0.010, cell_s=0.05, start_s=13.0, process_bytes=700 << 20, calibrated=True),
    "cuda": DeviceCosts(operations_per_s=5e12, step_s=0.002, cell_s=0.2, start_s=12.0, process_bytes=1500 << 20, calibrated=False),
}
CONVERT_S = 25.0  # the embedded GGUF converted once into the cache


@dataclass
class Plan:
    frame: pd.DataFrame  # one row per kind of cell (stream, position, head-set size): cells, finished, seconds, peak bytes
    cells: list[Cell]
    finished: int
    seconds: float
    peak_bytes: int
    device: str
    notes: list[str]

    def text(self) -> str:
        costs = DEVICE_COSTS[self.device]
        lines = [f"plan: {len(self.cells)} cells, {self.finished} already finished in the folder, {len(self.cells) - self.finished} to run "
                 f"on {self.device}{'' if costs.calibrated else ' (uncalibrated: no run on this device measured yet)'}"]
        lines.append(self.frame.round({"seconds": 1}).to_string(index=False))
        lines.append(f"total: about {_duration(self.seconds)}, peak memory about {_size(self.peak_bytes)}")
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def make_plan(cfg: DictConfig, folder: Path | None) -> Plan:
    """The plan of the checked config `cfg` (run into `folder`, where finished cells are counted)."""
    device = str(C.pick_device(cfg.device).type)
    shape = load_shape(cfg.model, device, cfg.dtype)
    unfiltered = cfg.copy()
    with open_dict(unfiltered):
        unfiltered.dataset.filter = "none"
    pairs = build_pairs(unfiltered, shape)
    cells = expand_grid(cfg, shape)
    _check_widths(cfg, shape, cells)
    done = _finished(folder, cells)
    mine = shard_cells(cells, int(cfg.sweep.shard), int(cfg.sweep.num_shards))
    todo = [c for c in mine if c.id not in done]
    costs = DEVICE_COSTS[device]
    per_cell = {c: cell_cost(cfg, shape, pairs, c) for c in todo}
    size = cells_per_step(cfg, shape, todo, pairs["train"])
    kinds: dict[tuple, dict] = defaultdict(lambda: {"cells": 0, "finished": 0, "seconds": 0.0, "members": []})
    for cell in mine:
        kind = kinds[(cell.stream, cell.position_label, len(cell.heads or ()) or "")]
        kind["cells"] += 1
        kind["members"] += [cell] if cell in per_cell else []
        kind["finished"] += cell.id in done
        if cell in per_cell:
            operations, steps = per_cell[cell]
            kind["seconds"] += operations / costs.operations_per_s + steps * costs.step_s / size + costs.cell_s
    frame = pd.DataFrame([{"stream": s, "position": p, "heads": h, "cells": kind["cells"], "finished": kind["finished"],
                           "seconds": kind["seconds"], "peak": _size(peak_bytes(cfg, shape, pairs, kind["members"], size))}
                          for (s, p, h), kind in kinds.items()])
    reads = prompt_operations(shape, pairs, todo) / costs.operations_per_s if todo else 0.0
    runs = 1 if cfg.analysis.control == "none" else 2  # analysis.control: every cell trained and scored again
    share = _halving_share(cfg, len(todo))
    seconds = costs.start_s + (0 if shape.cached else CONVERT_S) + runs * (reads + share * float(frame["seconds"].sum()))
    peak = peak_bytes(cfg, shape, pairs, todo, size)
    notes = _notes(cfg, shape, cells, mine, seconds)
    return Plan(frame, mine, sum(c.id in done for c in mine), seconds, peak, device, notes)


# ---- operations ----

def block_weights(config) -> int:
    """Weights of one block's matrices (attention projections and the MLP); norms and biases aside."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    gated = config.model_type not in ("gpt2", "gpt_neox")
    return attention + hidden * _mlp_width(config) * (3 if gated else 2)


def _mlp_width(config) -> int:
    return getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size


def forward_operations(config, tokens: float, context: float, blocks: int, answers: float) -> float:
    """Multiply-adds of a forward of `tokens` tokens (attending to `context` each) through `blocks` blocks, and
    the vocabulary read at `answers` positions."""
    per_token = block_weights(config) + 2 * context * config.hidden_size
    return tokens * blocks * per_token + answers * config.hidden_size * config.vocab_size


def cell_cost(cfg: DictConfig, shape: ModelShape, pairs: dict, cell: Cell) -> tuple[float, int]:
    """(multiply-adds, training steps) of one cell: its training (forward and backward) and its evaluations."""
    config, blocks = shape.config, shape.n_layers - cell.layer
    fed = fed_tokens(pairs["train"], cell.position)
    context = _prompt_length(pairs["train"]) + fed
    answers = _answer_width(pairs["train"])
    steps = int(cfg.train.epochs) * sum(math.ceil(n / int(cfg.train.batch_size)) for n in pairs["train"].sizes)
    trains = method(cfg.intervention.name).trainable and int(cfg.train.epochs) > 0 and not cfg.get("from_run")
    training = 2 * steps * forward_operations(config, int(cfg.train.batch_size) * fed, context, blocks, int(cfg.train.batch_size) * answers)
    evaluation = sum(forward_operations(config, len(split) * fed_tokens(split, cell.position), context, blocks, len(split) * answers)
                     for split in pairs.values())
    return (training if trains else 0.0) + evaluation, (steps if trains else 0)


def prompt_operations(shape: ModelShape, pairs: dict, cells: list[Cell]) -> float:
    """The run's reads of every prompt: the base runs (every block, every split) and the sources up to the
    deepest pending layer."""
    deepest = max(c.layer for c in cells) + 1
    total = 0.0
    for split in pairs.values():
        tokens = len(split) * _prompt_length(split)
        total += forward_operations(shape.config, tokens, _prompt_length(split), shape.n_layers, len(split))
        total += forward_operations(shape.config, tokens, _prompt_length(split), deepest, 0)
    return total


def peak_bytes(cfg: DictConfig, shape: ModelShape, pairs: dict, cells: list[Cell], size: int) -> int:
    """Weights, the fast engine's caches (keys and values of every block, residuals of the pending layers),
    the widest step's activations and logits, and the process."""
    config, element = shape.config, shape.dtype.itemsize
    weights = (shape.n_layers * block_weights(config) + 2 * config.vocab_size * config.hidden_size) * element
    weights *= 2 if cfg.analysis.control == "random_model" else 1  # the re-drawn copy beside the model
    kv_heads, head_dim = head_counts(shape, "key_output")
    kv = kv_heads * head_dim
    prompts = sum(len(split) * (_prompt_length(split) + _answer_width(split)) for split in pairs.values())
    layers = len({c.layer for c in cells})
    caches = prompts * (2 * kv * shape.n_layers + config.hidden_size * layers) * element if cfg.train.engine == "fast" else 0
    batch = int(cfg.train.batch_size) * size
    fed = max((fed_tokens(pairs["train"], c.position) for c in cells), default=0)
    blocks = shape.n_layers - min((c.layer for c in cells), default=shape.n_layers)
    step = batch * fed * blocks * config.hidden_size * ACTIVATIONS_PER_TOKEN_BLOCK * element
    logits = 3 * batch * _answer_width(pairs["train"]) * config.vocab_size * 4
    return int(DEVICE_COSTS[shape.device.type].process_bytes + weights + caches + step + logits)


def _prompt_length(split) -> int:
    return max(group.base_ids.shape[1] for group in split.groups)


def _answer_width(split) -> int:
    return max(group.labels.shape[1] if group.labels.dim() > 1 else 1 for group in split.groups)


# ---- checks and notes ----

def _check_widths(cfg: DictConfig, shape: ModelShape, cells: list[Cell]) -> None:
    """`intervention.dim` against each cell's width, from the config alone (the run checks it again on the sites)."""
    dim = C.intervention_options(cfg).get("dim")
    if not isinstance(dim, int):
        return
    for cell in cells:
        width = stream_width(shape, cell.stream, cell.heads) * len(cell.position)
        if dim > width:
            raise DasError(f"intervention.dim={dim}: must be between 1 and {width} (the width of cell {cell.id})")


def stream_width(shape: ModelShape, stream: str, heads: tuple[int, ...] | None) -> int:
    """The width of a stream's vector at one position, from the model's config."""
    config, hidden = shape.config, shape.config.hidden_size
    if stream == "mlp_activation":
        return _mlp_width(config)
    base = HEAD_STREAMS.get(stream, stream)
    if base in ("attention_value_output", "query_output", "key_output", "value_output"):
        n_heads, head_dim = head_counts(shape, base)
        return (len(heads) if stream in HEAD_STREAMS and heads is not None else n_heads) * head_dim
    return hidden


def _finished(folder: Path | None, cells: list[Cell]) -> set[str]:
    """Ids of the grid's cells finished without error in `folder` (their configuration is checked when the run starts)."""
    if folder is None or not Path(folder).is_dir():
        return set()
    wanted = {c.id for c in cells}
    return {cell_id for cell_id in layout.cell_ids(folder) if cell_id in wanted
            and (stored := layout.read_cell(folder, cell_id, verify=False)) is not None and not stored.damaged and not stored.failed}


def _halving_share(cfg: DictConfig, cells: int) -> float:
    """search=halving: the share of the cell-epochs it trains (1 for a full sweep)."""
    if cfg.search.name != "halving" or not cells:
        return 1.0
    from .halving import epoch_share

    s = cfg.search
    return epoch_share(cells, int(cfg.train.epochs), int(s.eta), int(s.min_epochs), float(s.prescan_keep))


def _notes(cfg: DictConfig, shape: ModelShape, cells: list[Cell], mine: list[Cell], seconds: float) -> list[str]:
    notes = []
    if cfg.search.name == "halving":
        from .halving import cells_per_rung

        s = cfg.search
        rungs = cells_per_rung(len(mine), int(cfg.train.epochs), int(s.eta), int(s.min_epochs), float(s.prescan_keep))
        notes.append(f"search=halving: {' -> '.join(f'{n} cells to epoch {e}' for n, e in rungs)}, "
                     f"{_halving_share(cfg, len(mine)):.0%} of the cell-epochs; the total counts that share of the "
                     "table's seconds (which cells go on, and so their cost, is known only as they train)")
    if cfg.search.prescan:
        notes.append("search.prescan: one forward and backward pass over the training pairs per chunk of sites (not counted)")
    if cfg.dataset.filter != "none":
        notes.append(f"pair counts are before dataset.filter={cfg.dataset.filter} (it needs the model's answers)")
    if cfg.heads == "cumulative" and cfg.head_order == "ranked":
        notes.append("heads=cumulative head_order=ranked: the cumulative cells follow the single heads' results and are not counted")
    if not shape.cached:
        notes.append(f"the embedded model is converted once first (about {CONVERT_S:.0f} s, counted)")
    if cfg.analysis.control != "none":
        extra = "; a second copy of the weights (counted in the peak)" if cfg.analysis.control == "random_model" else ""
        notes.append(f"analysis.control={cfg.analysis.control}: every cell is trained and scored twice (counted; the table "
                     f"shows one run){extra}")
    shards = int(cfg.sweep.num_shards)
    if shards > 1:
        notes.append(f"shard {cfg.sweep.shard} of {shards}: {len(mine)} of {len(cells)} cells; "
                     f"with hydra/launcher=slurm give each job hydra.launcher.timeout_min={suggested_minutes(seconds)} "
                     "(twice this estimate, at least 10)")
    else:
        notes.append(f"as one SLURM job (hydra/launcher=slurm): hydra.launcher.timeout_min={suggested_minutes(seconds)} "
                     "(twice this estimate, at least 10); a sharded sweep: add sweep.num_shards=N to plan one job")
    return notes


def suggested_minutes(seconds: float) -> int:
    return max(10, math.ceil(2 * seconds / 60))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
