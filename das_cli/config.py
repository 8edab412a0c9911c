"""The config contract: where conf/ lives, composing it, and validating it with one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .engines import ENGINES
from .errors import DasError
from .interventions import INTERVENTIONS as INTERVENTION_TYPES
from .sites import HEAD_STREAMS, STREAMS

ILLUSION_STREAMS = ("mlp_activation", "attention_value_output", "head_attention_value_output")

INTERVENTIONS = tuple(INTERVENTION_TYPES)
DATASETS = ("ioi", "file")


def conf_dir() -> Path:
    """The repo's top-level conf/ in a checkout, else the copy shipped inside the wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").exists():
            return candidate
    raise DasError(f"config: no conf/config.yaml next to {package}")


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


CONFIG_GROUPS = ("model", "dataset", "intervention")


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 20
    lr_end_factor: float = 0.1
    engine: str = "fast"


@dataclass
class EvalConfig:
    batch_size: int = 100


@dataclass
class OutputConfig:
    save_subspaces: bool = True
    plots: bool = True


@dataclass
class AnalysisConfig:
    illusion: bool = False  # IIA of the rowspace and nullspace parts of each mlp_activation / attention_value_output subspace


@dataclass
class SweepConfig:
    """Sharding: this job runs shard `shard` of `num_shards` (whole sites round-robin; see grid.shard_cells)."""

    shard: int = 0
    num_shards: int = 1


@dataclass
class RunSchema:
    """Types of every top-level key; group contents (model, dataset, intervention) are checked by their users."""

    model: Any = None
    dataset: Any = None
    intervention: Any = None
    stream: Any = "block_output"
    layers: Any = "all"
    positions: Any = field(default_factory=lambda: ["last"])
    heads: Any = None
    head_order: Any = None
    seed: int = 0
    seeds: Any = None
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config `das-cli <overrides>` would run, for notebooks and tests."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def typed(cfg: DictConfig) -> DictConfig:
    """Merge onto the schema: wrong types and unknown top-level keys become one-line errors."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    try:
        return OmegaConf.merge(OmegaConf.structured(RunSchema), plain)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "config"
        raise DasError(f"{key}: {str(e).splitlines()[0]}") from None


def validate(cfg: DictConfig) -> None:
    """Every check that needs no model; all problems are reported together on one line."""
    errors = []
    for stream in streams(cfg):
        if stream not in STREAMS:
            errors.append(f"stream={stream}: unknown stream; valid choices: {', '.join(STREAMS)}")
    if cfg.intervention.get("name") not in INTERVENTIONS:
        errors.append(f"intervention={cfg.intervention.get('name')}: valid choices: {', '.join(INTERVENTIONS)}")
    if cfg.dataset.get("name") not in DATASETS:
        errors.append(f"dataset={cfg.dataset.get('name')}: valid choices: {', '.join(DATASETS)}")
    elif cfg.dataset.name == "file" and OmegaConf.is_missing(cfg.dataset, "path"):
        errors.append("dataset.path: missing; give the pairs file, e.g. dataset.path=pairs.jsonl (JSONL, CSV or Parquet)")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        errors.append(f"device={cfg.device}: valid choices: auto, cpu, cuda (or cuda:N)")
    elif str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        errors.append(f"device={cfg.device}: CUDA is not available on this machine; valid choices here: auto, cpu")
    if cfg.dtype not in ("float32", "bfloat16"):
        errors.append(f"dtype={cfg.dtype}: valid choices: float32, bfloat16")
    for key in ("epochs", "batch_size"):
        if cfg.train[key] < (0 if key == "epochs" else 1):
            errors.append(f"train.{key}={cfg.train[key]}: must be {'>= 0' if key == 'epochs' else '>= 1'}")
    if cfg.train.lr <= 0:
        errors.append(f"train.lr={cfg.train.lr}: must be > 0")
    if cfg.train.engine not in ENGINES:
        errors.append(f"train.engine={cfg.train.engine}: valid choices: {', '.join(ENGINES)}")
    if cfg.eval.batch_size < 1:
        errors.append(f"eval.batch_size={cfg.eval.batch_size}: must be >= 1")
    errors += _grid_errors(cfg)
    errors += _seeds_errors(cfg.seeds)
    if cfg.analysis.illusion and not any(s in ILLUSION_STREAMS for s in streams(cfg)):
        errors.append(f"analysis.illusion=true: applies to the streams {', '.join(ILLUSION_STREAMS)}; stream={cfg.stream} has none")
    errors += shard_errors(cfg.sweep.shard, cfg.sweep.num_shards)
    if errors:
        raise DasError("; ".join(errors))


def shard_errors(shard: int, num_shards: int) -> list[str]:
    """`sweep.shard` must name one of the `sweep.num_shards` shards."""
    if num_shards < 1:
        return [f"sweep.num_shards={num_shards}: must be >= 1"]
    if not 0 <= shard < num_shards:
        return [f"sweep.shard={shard}: must be in 0..{num_shards - 1} (sweep.num_shards={num_shards})"]
    return []


def _grid_errors(cfg: DictConfig) -> list[str]:
    errors = []
    try:
        positions(cfg)
    except DasError as e:
        errors.append(str(e))
    if cfg.heads is not None and not any(s in HEAD_STREAMS for s in streams(cfg)):
        errors.append(f"heads: set, but no stream is head-level; head-level streams: {', '.join(HEAD_STREAMS)}")
    errors += _heads_errors(cfg)
    layers = cfg.layers
    if not (layers == "all" or isinstance(layers, int) or _is_list_of(layers, int)):
        errors.append(f"layers={layers}: must be a list of layer indices or 'all'")
    return errors


def _is_list_of(value: Any, kind: type) -> bool:
    return isinstance(value, (list, ListConfig)) and len(value) > 0 and all(isinstance(v, kind) for v in value)


def streams(cfg: DictConfig) -> list[str]:
    value = cfg.stream
    return [str(s) for s in value] if isinstance(value, (list, ListConfig)) else [str(value)]


def layers(cfg: DictConfig, n_layers: int) -> list[int]:
    """The layer list; every index checked against the model."""
    value = cfg.layers
    chosen = list(range(n_layers)) if value == "all" else [value] if isinstance(value, int) else list(value)
    bad = [layer for layer in chosen if not -n_layers <= layer < n_layers]
    if bad:
        raise DasError(f"layers: {bad} out of range for a {n_layers}-layer model; valid layers: 0..{n_layers - 1} or 'all'")
    return [layer % n_layers for layer in chosen]


def _position_item(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DasError(f"positions: {value!r} is neither a token index nor a position name")
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def positions(cfg: DictConfig) -> list[tuple[int | str, ...]]:
    """One tuple per cell; a nested list is one cell spanning several tokens (a joint subspace)."""
    value = cfg.positions
    items = list(value) if isinstance(value, (list, ListConfig)) else [value]
    if not items:
        raise DasError("positions: empty; give at least one position, e.g. positions=[last]")
    out = []
    for item in items:
        group = list(item) if isinstance(item, (list, ListConfig)) else [item]
        if not group:
            raise DasError("positions: an empty nested list; each cell needs at least one position")
        out.append(tuple(_position_item(v) for v in group))
    return out


HEAD_MODES = ("each", "leave_one_out", "cumulative")


def head_sets(cfg: DictConfig, n_heads: int, ranking: list[int] | None = None) -> list[tuple[int, ...] | None]:
    """The head sets of one head-level stream with `n_heads` heads, one per cell.

    null: all heads together; [0,3]: one set; [[0],[1,2]]: several sets; `each`: one cell per head;
    `leave_one_out`: all heads but one, for each head; `cumulative`: the first 1, 2, ... heads of
    `head_order` (a list, or `ranked` = by single-head IIA, passed here as `ranking`).
    """
    value = cfg.heads
    if value is None:
        return [None]
    if value == "each":
        return [(h,) for h in range(n_heads)]
    if value == "leave_one_out":
        return [tuple(x for x in range(n_heads) if x != h) for h in range(n_heads)]
    if value == "cumulative":
        order = ranking if cfg.head_order == "ranked" else list(cfg.head_order or range(n_heads))
        return [tuple(order[: i + 1]) for i in range(len(order))]
    items = list(value) if isinstance(value, (list, ListConfig)) else [value]
    if all(isinstance(v, int) for v in items):
        return [tuple(items)]
    return [tuple(v) if isinstance(v, (list, ListConfig)) else (v,) for v in items]


def _heads_errors(cfg: DictConfig) -> list[str]:
    value, order = cfg.heads, cfg.head_order
    errors = []
    if isinstance(value, str) and value not in HEAD_MODES:
        errors.append(f"heads={value}: valid choices: null, a list of heads, a list of lists, {', '.join(HEAD_MODES)}")
    if order is not None and value != "cumulative":
        errors.append(f"head_order: only used with heads=cumulative (heads={value})")
    if order is not None and order != "ranked" and not _is_list_of(order, int):
        errors.append(f"head_order={order}: valid choices: null, a list of heads, ranked")
    return errors


def _seeds_errors(value: Any) -> list[str]:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return []
    if _is_list_of(value, int) and len(set(value)) == len(value):
        return []
    return [f"seeds={value}: give a number of seeds (>= 1, counted up from `seed`) or a list of distinct integer seeds"]


def replicates(cfg: DictConfig) -> list[int | None]:
    """The seeds every cell runs with: [None] (just `seed`) unless `seeds` asks for several."""
    value = cfg.seeds
    if value is None:
        return [None]
    if isinstance(value, int):
        return list(range(int(cfg.seed), int(cfg.seed) + value))
    return [int(v) for v in value]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fingerprint(cfg: DictConfig) -> dict:
    """The config parts that change a cell's numbers; a resumed folder must match them."""
    keep = ("model", "dataset", "intervention", "train", "seed", "dtype", "analysis")
    return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in keep}
