"""The dataset registry: each `dataset.name` (conf/dataset/*.yaml) and how its pairs are made, then the
pairs of every split as the sweep uses them (filtered, tokenised)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

from .data import PairSet, tokenize_pairs
from .errors import DasError
from .examples import Splits
from .filters import filter_pairs
from .models import LoadedModel


def _ioi_splits(ds: DictConfig, tokenizer) -> Splits:
    from .ioi import make_ioi

    return make_ioi(tokenizer, ds.variable, int(ds.n_train), int(ds.n_test), int(ds.seed), int(ds.n_val))


def _file_splits(ds: DictConfig, tokenizer) -> Splits:
    from .filedata import load_file_dataset

    return load_file_dataset(ds, tokenizer)


def _file_path(ds: DictConfig) -> Path:
    from .filedata import resolve_path

    return resolve_path(str(ds.path))


@dataclass(frozen=True)
class Dataset:
    """How a dataset makes its splits, which kinds of pair it trains on, and the file its pairs come from."""

    splits: Callable[[DictConfig, object], Splits]
    train_kinds: Callable[[DictConfig], list[str]]
    source_file: Callable[[DictConfig], Path | None]


DATASETS: dict[str, Dataset] = {
    "ioi": Dataset(_ioi_splits, lambda ds: ["cause"], lambda ds: None),  # IOI's training pairs are flips
    "file": Dataset(_file_splits, lambda ds: list(ds.train_kinds), _file_path),
}


def build_pairs(cfg: DictConfig, lm: LoadedModel) -> dict[str, PairSet]:
    """The pairs of each split ("train", "test", and "val" where the dataset holds one); training keeps
    the kinds the dataset trains on (`dataset.train_kinds` for files), validation and test keep every kind."""
    ds = cfg.dataset
    dataset = DATASETS[ds.name]
    splits = dataset.splits(ds, lm.tokenizer)
    kinds = dataset.train_kinds(ds)
    examples = dict(splits.items())
    examples["train"] = [e for e in splits.train if e.kind in kinds]
    for name in ("train", "test"):
        if not examples.get(name):
            raise DasError(f"dataset: the {name} split has no pairs (dataset.train_kinds={kinds})")
    kept = filter_pairs(lm, examples, str(ds.filter), int(cfg.eval.batch_size))
    pairs = {name: tokenize_pairs(lm.tokenizer, part, name) for name, part in kept.items()}
    if ds.filter != "none":
        for name, part in pairs.items():
            part.before_filter = len(examples[name])
    return pairs


def source_file(ds: DictConfig) -> Path | None:
    """The file the pairs are read from (its content is part of the run's fingerprint), None for generated data."""
    return DATASETS[ds.name].source_file(ds)
