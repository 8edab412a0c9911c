"""The config contract: where conf/ lives, the schema of every key, composing it, and validating it with one-line errors.

Every default lives in conf/*.yaml; the dataclasses below hold types only (MISSING: the YAML gives the value; None: an
optional key that is not set). This module imports neither torch nor transformers, so `das-cli --help` stays fast;
all checks here run before the model loads.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import grid
from .errors import ConfigWarning, DasError, shown
from .examples import FILTERS, KINDS
from .ioi import VARIABLES
from .names import CONTROLS, ENGINES

CONFIG_GROUPS = ("model", "dataset", "intervention")
LIST_GROUPS = ("logger",)  # groups that take several choices at once: logger=[tensorboard,mlflow] (trackers.py)
SECTION_GROUPS = ("search",)  # groups whose choices share one schema, a section of RunSchema: search=full
GROUPS = CONFIG_GROUPS + LIST_GROUPS + SECTION_GROUPS  # every `key=choice` that picks a conf/<key>/<choice>.yaml
SEARCHES = ("full", "halving")  # search=...: how the grid's cells are trained (conf/search/)
MODES = ("run", "plan")


# ---- the schema: one dataclass per group option set ----

@dataclass
class ModelSchema:
    name: str = MISSING
    name_or_path: Optional[str] = None  # a hub id or local folder; loaded instead of `embedded` / `random_init`
    embedded: Optional[bool] = None
    random_init: Optional[Dict[str, Any]] = None  # transformers config keys of a randomly initialised model
    init_seed: Optional[int] = None


@dataclass
class IoiDataset:
    name: str = MISSING
    variable: str = MISSING
    n_train: int = MISSING
    n_val: int = MISSING
    n_test: int = MISSING
    seed: int = MISSING
    filter: str = MISSING


@dataclass
class FileDataset:
    name: str = MISSING
    path: str = MISSING
    test_fraction: float = MISSING
    seed: int = MISSING
    val_fraction: float = MISSING
    train_kinds: List[str] = MISSING
    variable: str = MISSING
    filter: str = MISSING


DATASETS: dict[str, type] = {"ioi": IoiDataset, "file": FileDataset}


def group_schemas(group: str) -> dict[str | None, type]:
    """The schema of each choice of a config group (None: one schema for every choice). An intervention's is its
    method's `Options` (interventions/<name>.py), so that package (and torch) is imported only when one is asked for."""
    if group == "intervention":
        from .interventions import REGISTRY

        return {name: cls.Options for name, cls in REGISTRY.items()}
    return {"model": {None: ModelSchema}, "dataset": DATASETS}.get(group, {})



@dataclass
class TrainConfig:
    epochs: int = MISSING
    lr: float = MISSING
    batch_size: int = MISSING
    lr_end_factor: float = MISSING
    engine: str = MISSING
    cells_per_step: Any = MISSING  # "auto" or an int >= 1 (checked by validate)


@dataclass
class EvalConfig:
    batch_size: int = MISSING
    every_epoch: bool = MISSING  # validation IIA and loss at each epoch's end, into each cell's curve.csv


@dataclass
class OutputConfig:
    save_subspaces: bool = MISSING
    plots: bool = MISSING


@dataclass
class AnalysisConfig:
    illusion: bool = MISSING  # IIA of the rowspace and nullspace parts of each mlp_activation / attention_value_output subspace
    control: str = MISSING  # none | random_model | shuffled_labels: each cell trained and scored again under it (controls.py)
    control_seed: int = MISSING  # the control's random weights or label permutation


@dataclass
class SweepConfig:
    """Sharding: this job runs shard `shard` of `num_shards` (whole sites round-robin; see grid.shard_cells)."""

    shard: int = MISSING
    num_shards: int = MISSING


@dataclass
class SearchConfig:
    """How the grid's cells are searched (conf/search/<name>.yaml)."""

    name: str = MISSING
    prescan: bool = MISSING  # every cell's first-order score before training (prescan.py)
    eta: Optional[int] = None  # halving: keep the top 1/eta of the cells at each rung (halving.py)
    min_epochs: Optional[int] = None  # halving: the first rung's epochs
    prescan_keep: Optional[float] = None  # halving: the prescan's top fraction of the cells starts (1: all)


@dataclass
class CsvLogger:
    path: Optional[str] = MISSING


@dataclass
class TensorboardLogger:
    dir: Optional[str] = MISSING


@dataclass
class WandbLogger:
    project: str = MISSING
    entity: Optional[str] = MISSING
    mode: Optional[str] = MISSING
    dir: Optional[str] = MISSING


@dataclass
class MlflowLogger:
    tracking_uri: Optional[str] = MISSING
    experiment: Optional[str] = MISSING


@dataclass
class LoggerConfig:
    """The trackers conf/logger/*.yaml select (None: not selected); trackers.py runs them."""

    csv: Optional[CsvLogger] = None
    tensorboard: Optional[TensorboardLogger] = None
    wandb: Optional[WandbLogger] = None
    mlflow: Optional[MlflowLogger] = None


@dataclass
class RunSchema:
    """Every top-level key. Groups (Any here) are typed by group_schemas; grid keys (Any) are checked by `validate`."""

    model: Any = MISSING
    dataset: Any = MISSING
    intervention: Any = MISSING
    stream: Any = MISSING
    layers: Any = MISSING
    positions: Any = MISSING
    heads: Any = MISSING
    head_order: Any = MISSING
    seed: int = MISSING
    seeds: Any = MISSING
    device: str = MISSING
    dtype: str = MISSING
    progress: bool = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    from_run: Optional[str] = None  # a finished run folder: evaluate its saved cells, train nothing (transfer.py)
    mode: str = MISSING  # run | plan (plan.py: the grid and its cost, no weights read)


# ---- conf/ and composing ----

def conf_dir() -> Path:
    """The repo's top-level conf/ in a checkout, else the copy shipped inside the wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").exists():
            return candidate
    raise DasError(f"config: no conf/config.yaml next to {package}")


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config `das-cli <overrides>` would run, for notebooks and tests."""
    return compose_keys(list(overrides or []))[0]


def compose_keys(overrides: list[str]) -> tuple[DictConfig, list[str]]:
    """Hydra's composition of `overrides` (no hydra keys), and the overrides as composed: one composition
    unless a plain key is one the chosen preset leaves out (it is retried as `+key=`) or no key at all
    (the one-line unknown-key error of `check_override_keys`)."""
    try:
        return compose_checked(overrides), overrides
    except Exception:  # Hydra's error for an unknown key names neither the valid keys nor the group
        checked = check_override_keys(overrides)
        if checked == overrides:
            raise
        return compose_checked(checked), checked


def compose_checked(overrides: list[str]) -> DictConfig:
    """Hydra's composition of overrides already passed through `check_override_keys`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def checked(cfg: DictConfig) -> DictConfig:
    """The composed config typed against the schema and validated: every problem found before a model loads,
    all on one line. Done once per run (by the CLI before Hydra starts the job, else by `sweep.run`)."""
    cfg = typed(cfg)
    validate(cfg)
    return cfg


def check_override_keys(overrides: list[str]) -> list[str]:
    """Unknown keys in `key=value` overrides become one-line errors with a "did you mean"; a group key the
    schema knows but the chosen preset leaves out (model.name_or_path with the embedded model) is added (`+key=`)."""
    plain = [o for o in overrides if _plain_key(o) is not None]
    if not plain:
        return overrides
    selections = [o for o in overrides if _plain_key(o) is None and not o.startswith(("hydra.", "hydra/"))]
    try:
        composed = compose_checked(selections)
    except Exception:  # a bad group choice or grammar: the full composition reports it
        return overrides
    return [_checked_key(o, composed) if o in plain else o for o in overrides]


def _plain_key(override: str) -> str | None:
    """The dotted key of a plain `a.b=value` override; None for group choices, +/~ edits and hydra keys."""
    key = override.partition("=")[0]
    if "=" not in override or key.startswith(("+", "~", "hydra.", "hydra/")) or key in GROUPS or "/" in key:
        return None
    return key if re.fullmatch(r"[\w.]+", key) else None


def _checked_key(override: str, composed: DictConfig) -> str:
    key = _plain_key(override)
    parts = key.split(".")
    node: Any = composed
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return override  # e.g. layers.x=1: Hydra reports it
        if part not in node.keys():  # keys(): `in` is False for a MISSING value such as dataset.path
            where = ".".join(parts[:depth])
            schema = _schema_at(composed, where)
            optional = [f.name for f in fields(schema)] if schema else []
            if depth == 1 and part in optional:
                return "+" + override
            error = unknown_key(key, sorted(set(node.keys()) | set(optional)), _group_label(composed, where))
            raise DasError(str(error) + _other_choice(where, part)) if where in SECTION_GROUPS else error
        if OmegaConf.is_missing(node, part):
            return override
        node = node[part]
    return override


def _other_choice(group: str, key: str) -> str:
    """"; it belongs to search=halving" when another choice of a section group has the key."""
    owners = [name for name in group_choices(group) if key in OmegaConf.load(conf_dir() / group / f"{name}.yaml")]
    return f"; {group}.{key} belongs to {', '.join(f'{group}={name}' for name in owners)}" if owners else ""


def _schema_at(cfg: DictConfig, where: str) -> type | None:
    """The schema of a group node (model, dataset, intervention), chosen by its name."""
    if where not in CONFIG_GROUPS:
        return None
    schemas = group_schemas(where)
    return schemas.get(None) or schemas.get(cfg[where].get("name"))


def _group_label(cfg: DictConfig, where: str) -> str:
    return f" of {where}={cfg[where].get('name')}" if where in CONFIG_GROUPS else f" in {where}" if where else ""


def unknown_key(key: str, valid: list[str], where: str = "") -> DasError:
    last = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(last, valid, n=1)
    hint = f"; did you mean {key[: len(key) - len(last)]}{close[0]}?" if close else ""
    return DasError(f"{key}: unknown key{where}; valid keys: {', '.join(valid)}{hint}")


# ---- types ----

def typed(cfg: DictConfig) -> DictConfig:
    """The config checked against the schema: wrong types and unknown keys become one-line errors.

    Group nodes keep exactly the keys they were given (a key's type may be converted, e.g. lr=1 -> 1.0)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    groups = {g: plain.pop(g, None) for g in CONFIG_GROUPS}
    out = _merge(RunSchema, plain, "")
    for group, value in groups.items():
        out[group] = _typed_group(group, value)
    missing = sorted(OmegaConf.missing_keys(out) - {"dataset.path"})  # validate explains dataset.path
    if missing:
        raise DasError(f"{missing[0]}: missing; give it a value, e.g. {missing[0]}=...")
    return out


def _typed_group(group: str, value: Any) -> DictConfig:
    if not isinstance(value, dict):
        raise DasError(f"{group}={shown(value)}: choose a {group}; valid choices: {', '.join(group_choices(group))}")
    schemas = group_schemas(group)
    schema = schemas.get(None) or schemas.get(value.get("name"))
    if schema is None:
        raise DasError(f"{group}={value.get('name')}: valid choices: {', '.join(schemas)}")
    merged = OmegaConf.to_container(_merge(schema, value, group))
    return OmegaConf.create({k: merged[k] for k in value})


def _merge(schema: type, plain: dict, prefix: str) -> DictConfig:
    _check_booleans(schema, plain, prefix)
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), plain)
    except OmegaConfBaseException as e:
        raise _schema_error(schema, plain, prefix, str(e.full_key or e.key or "")) from None


def _check_booleans(schema: type, plain: dict, prefix: str) -> None:
    """OmegaConf would read 3 or "yes" as true; a boolean key takes only true or false."""
    for name, tp in get_type_hints(schema).items():
        key, value = f"{prefix}.{name}" if prefix else name, plain.get(name) if isinstance(plain, dict) else None
        if is_dataclass(tp):
            _check_booleans(tp, value, key)
        elif tp in (bool, Optional[bool]) and value is not None and not isinstance(value, bool):
            raise DasError(f"{key}={shown(value)}: must be {_kind(tp)}")


def _schema_error(schema: type, plain: dict, prefix: str, full_key: str) -> DasError:
    """`key=value: must be <type>`, or the unknown key with the valid keys at its level."""
    parts = [p for p in re.sub(r"\[\d+\]", "", full_key).split(".") if p]
    node_type, value, path = schema, plain, [prefix] if prefix else []
    for part in parts:
        hints = get_type_hints(node_type)
        path.append(part)
        if part not in hints:
            where = f" of {prefix}={plain.get('name')}" if prefix and len(path) == 2 else ""
            return unknown_key(".".join(path), sorted(hints), where)
        value = value.get(part) if isinstance(value, dict) else None
        if not is_dataclass(hints[part]):
            return DasError(f"{'.'.join(path)}={shown(value)}: must be {_kind(hints[part])}")
        node_type = hints[part]
    return DasError(f"{'.'.join(path) or 'config'}: does not fit the schema")


_KINDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "booleans"),
          str: ("a string", "strings"), dict: ("a mapping", "mappings"), Any: ("a value", "values")}


def _kind(tp: Any, plural: bool = False) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)][0]
        return f"{_kind(inner, plural)} or null"
    if origin in (list, List):
        return f"a list of {_kind(args[0], True)}"
    return _KINDS.get(origin or tp, ("a value", "values"))[plural]


# ---- values ----

def validate(cfg: DictConfig) -> None:
    """Every check that needs no model; all problems are reported together on one line."""
    errors = grid.errors(cfg) + _model_errors(cfg.model) + _dataset_errors(cfg.dataset) + _intervention_errors(cfg.intervention)
    errors += _run_errors(cfg)
    if errors:
        raise DasError("; ".join(errors))


def _run_errors(cfg: DictConfig) -> list[str]:
    errors = []
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        errors.append(f"device={cfg.device}: valid choices: auto, cpu, cuda (or cuda:N)")
    elif str(cfg.device).startswith("cuda") and not _cuda_available():
        errors.append(f"device={cfg.device}: CUDA is not available on this machine; valid choices here: auto, cpu")
    if cfg.mode not in MODES:
        errors.append(f"mode={cfg.mode}: valid choices: {', '.join(MODES)}")
    mode = cfg.logger.wandb.mode if cfg.logger.wandb is not None else None
    if mode not in (None, "online", "offline", "disabled"):
        errors.append(f"logger.wandb.mode={mode}: valid choices: online, offline, disabled, null")
    if cfg.dtype not in ("float32", "bfloat16"):
        errors.append(f"dtype={cfg.dtype}: valid choices: float32, bfloat16")
    t = cfg.train
    errors += _at_least("train.epochs", t.epochs, 0) + _at_least("train.batch_size", t.batch_size, 1)
    errors += _at_least("eval.batch_size", cfg.eval.batch_size, 1)
    if not (math.isfinite(t.lr) and t.lr > 0):
        errors.append(f"train.lr={t.lr}: must be a finite number > 0")
    if not 0 <= t.lr_end_factor <= 1:
        errors.append(f"train.lr_end_factor={t.lr_end_factor}: must be between 0 and 1 (the final learning rate is lr x lr_end_factor)")
    if t.engine not in ENGINES:
        errors.append(f"train.engine={t.engine}: valid choices: {', '.join(ENGINES)}")
    if cfg.search.name not in SEARCHES:
        errors.append(f"search.name={cfg.search.name}: valid choices: {', '.join(SEARCHES)} (choose with search=...)")
    if cfg.search.prescan and cfg.get("from_run"):
        errors.append("search.prescan=true: a from_run evaluation trains nothing to rank; use search.prescan=false")
    if cfg.search.name == "halving":
        errors += _halving_errors(cfg)
    if cfg.analysis.control not in CONTROLS:
        errors.append(f"analysis.control={cfg.analysis.control}: valid choices: {', '.join(CONTROLS)}")
    elif cfg.analysis.control != "none" and cfg.get("from_run"):
        errors.append(f"analysis.control={cfg.analysis.control}: a from_run evaluation trains nothing to control; use analysis.control=none")
    if t.cells_per_step != "auto" and (isinstance(t.cells_per_step, bool) or not isinstance(t.cells_per_step, int) or t.cells_per_step < 1):
        errors.append(f"train.cells_per_step={shown(t.cells_per_step)}: valid choices: auto, or a whole number >= 1")
    elif t.engine == "reference" and t.cells_per_step not in ("auto", 1):
        warnings.warn(f"train.cells_per_step={t.cells_per_step} has no effect with train.engine=reference, which trains "
                      "one cell at a time (bundles are the fast engine's)", ConfigWarning)
    return errors


def _halving_errors(cfg: DictConfig) -> list[str]:
    s, errors = cfg.search, []
    if s.eta is None or s.eta < 2:
        errors.append(f"search.eta={s.eta}: must be a whole number >= 2 (the top 1/eta of the cells go on at each rung)")
    if s.min_epochs is None or not 1 <= s.min_epochs <= cfg.train.epochs:
        errors.append(f"search.min_epochs={s.min_epochs}: must be between 1 and train.epochs={cfg.train.epochs}")
    if s.prescan_keep is None or not 0 < s.prescan_keep <= 1:
        errors.append(f"search.prescan_keep={s.prescan_keep}: must be above 0 and at most 1 (the prescan's top fraction that starts)")
    elif s.prescan_keep < 1 and not s.prescan:
        errors.append(f"search.prescan_keep={s.prescan_keep}: needs the prescan's scores; add search.prescan=true")
    if cfg.get("from_run"):
        errors.append("search=halving: a from_run evaluation trains nothing; use search=full")
    elif not _trainable(cfg.intervention.name):
        errors.append(f"search=halving: intervention={cfg.intervention.name} is estimated, not trained: nothing to stop "
                      "early; use search=full")
    if cfg.heads == "cumulative" and cfg.head_order == "ranked":
        errors.append("search=halving: head_order=ranked ranks heads by fully trained single-head cells; use search=full")
    return errors


def _trainable(name: str) -> bool:
    from .interventions import REGISTRY  # torch: only when a run asks for halving

    return name not in REGISTRY or bool(REGISTRY[name].trainable)


def _cuda_available() -> bool:
    import torch  # only when a run asks for CUDA

    return torch.cuda.is_available()


def _at_least(key: str, value: int, low: int) -> list[str]:
    return [] if value >= low else [f"{key}={value}: must be >= {low}"]


def _model_errors(model: DictConfig) -> list[str]:
    if model.get("name_or_path") or model.get("embedded") or model.get("random_init"):
        return []
    return [f"model={model.get('name')}: set one of model.name_or_path, model.embedded or model.random_init"]


def _dataset_errors(ds: DictConfig) -> list[str]:
    errors = [] if ds.filter in FILTERS else [f"dataset.filter={ds.filter}: not a valid choice; valid choices: {', '.join(FILTERS)}"]
    if ds.name == "ioi":
        errors += _at_least("dataset.n_train", ds.n_train, 1) + _at_least("dataset.n_test", ds.n_test, 1)
        errors += _at_least("dataset.n_val", ds.n_val, 0)
        if ds.variable not in VARIABLES:
            errors.append(f"dataset.variable={ds.variable}: valid choices: {', '.join(VARIABLES)}")
        return errors
    if OmegaConf.is_missing(ds, "path"):
        errors.append("dataset.path: missing; give the pairs file, e.g. dataset.path=pairs.jsonl (JSONL, CSV or Parquet)")
    if not 0 < ds.test_fraction < 1:
        errors.append(f"dataset.test_fraction={ds.test_fraction}: must be between 0 and 1 (exclusive)")
    if not 0 <= ds.val_fraction < 1:
        errors.append(f"dataset.val_fraction={ds.val_fraction}: must be at least 0 and below 1")
    bad = [k for k in ds.train_kinds if k not in KINDS]
    if bad or not ds.train_kinds:
        errors.append(f"dataset.train_kinds={shown(ds.train_kinds)}: give a non-empty list of kinds; valid kinds: {', '.join(KINDS)}")
    return errors


def _intervention_errors(options: DictConfig) -> list[str]:
    """Ranges every site shares; the intervention's own constructor then checks the rest (and dim against the width)."""
    errors = [f"intervention.{k}={v}: must be a finite number" for k, v in options.items()
              if isinstance(v, float) and not math.isfinite(v)]
    if options.get("dim") is not None and options.dim < 1:
        errors.append(f"intervention.dim={options.dim}: must be >= 1")
    neurons = options.get("neurons")
    if neurons is not None and (not neurons or min(neurons) < 0):
        errors.append(f"intervention.neurons={shown(neurons)}: must be null or a non-empty list of indices >= 0")
    if errors:
        return errors
    return _constructor_errors(options)


def _constructor_errors(options: DictConfig) -> list[str]:
    """Build the intervention once on a site just wide enough, so its own checks run before the model loads."""
    from .interventions import build_intervention, method  # torch: only when a run is checked, never for --help

    values = {k: v for k, v in OmegaConf.to_container(options).items() if k != "name"}
    # The site's width is not known yet: build on the narrowest site the options allow, dim and neurons shrunk to
    # fit one coordinate (checked against every cell's width once the model is known: checks.check_intervention),
    # so that no option makes this check allocate (a dim of 100000 would ask for a 100000 x 100000 rotation).
    values.update({k: 1 for k in ("dim",) if values.get(k) is not None})
    values.update({k: [0] for k in ("neurons",) if values.get(k) is not None})
    width = 1
    try:
        width = method(options.name).fixed_width(values) or width  # a given subspace decides the width
        build_intervention(options.name, width, **values)
    except DasError as e:
        return [str(e)]
    return []


def intervention_options(cfg: DictConfig) -> dict:
    """The intervention's options as its constructor takes them (every key of the group but `name`)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.intervention, resolve=True).items() if k != "name"}


def pick_device(name: str):
    """The torch.device `device=` names (auto: CUDA when there is one)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fingerprint(cfg: DictConfig) -> dict:
    """The config parts that change a cell's numbers; a resumed folder must match them."""
    keep = ("model", "dataset", "intervention", "train", "seed", "dtype", "analysis", "search")
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in keep}
    parts["train"].pop("cells_per_step", None)  # a bundle changes a cell's numbers in the last bits only (docs/internals.md: Bundles)
    return _without_unused(parts)


def _without_unused(parts: dict) -> dict:
    """Keys that change no number of the run leave the fingerprint, so folders from before they existed resume:
    the control's seed without a control, dbm's Jacobian options for a basis other than sparse_jacobian,
    dbm's basis when it is the neurons (the only basis before bases existed), das's random start, the prescan
    (it scores cells, it changes none), and the search when it is full (every cell trained for the whole schedule)."""
    search = {k: v for k, v in parts["search"].items() if k != "prescan"}  # the prescan's scores change no cell
    parts["search"] = search
    if search.get("name", "full") == "full":  # the only search before searches existed
        parts.pop("search")
    if parts["analysis"].get("control", "none") == "none":
        parts["analysis"] = {k: v for k, v in parts["analysis"].items() if k not in ("control", "control_seed")}
    intervention = parts["intervention"]
    if intervention.get("basis", "sparse_jacobian") != "sparse_jacobian":
        intervention = {k: v for k, v in intervention.items() if not k.startswith("jacobian_")}
    if intervention.get("init") == "random":  # the only start before init existed
        intervention = {k: v for k, v in intervention.items() if k != "init"}
    if intervention.get("basis") == "neurons":
        intervention = {k: v for k, v in intervention.items() if k != "basis"}
    parts["intervention"] = intervention
    return parts
