"""`dataset.filter`: keep only the pairs whose prompts the unedited model answers right, as MIB does.

`base` keeps a pair when the model's top-1 tokens on its base prompt are the base's own answer
(`base_label`, teacher-forced, every token); `both` also asks it of the source prompt and its own
answer (`source_label`). Every split is filtered, before any training or testing.
"""

from __future__ import annotations

import logging

import torch

from .data import grouped_order, tokenize_pairs
from .activations import base_run
from .errors import DasError, choices_error
from .examples import FILTERS, Example
from .models import LoadedModel

log = logging.getLogger(__name__)

# per filter: the (prompt, answer column) pairs a pair must be answered right on
SIDES = {"base": (("base", "base_label"),), "both": (("base", "base_label"), ("source", "source_label"))}


def filter_pairs(lm: LoadedModel, splits: dict[str, list[Example]], mode: str, batch_size: int) -> dict[str, list[Example]]:
    """The pairs of each split that `mode` keeps; logs how many per split; a split left empty is an error."""
    if mode == "none":
        return splits
    if mode not in FILTERS:
        raise choices_error("dataset.filter", mode, FILTERS)
    _check_answers_known(splits, mode)
    kept = {}
    for name, examples in splits.items():
        right = [True] * len(examples)
        for prompt, answer in SIDES[mode]:
            answers = answered(lm, [(getattr(e, prompt), getattr(e, answer)) for e in examples], batch_size)
            right = [a and b for a, b in zip(right, answers)]
        kept[name] = [e for e, ok in zip(examples, right) if ok]
        log.info("filter=%s kept %d of %d %s pairs", mode, len(kept[name]), len(examples), name)
        if not kept[name]:
            raise DasError(f"dataset.filter={mode}: the model answers none of the {len(examples)} {name} pairs right; "
                           f"no {name} pair is left (dataset.filter=none keeps every pair)")
    return kept


def answered(lm: LoadedModel, prompts: list[tuple[str, str]], batch_size: int) -> list[bool]:
    """Per (prompt, answer): the unedited model's top-1 token is the answer's at every one of its positions
    (teacher-forced), by `activations.base_run`; each distinct (prompt, answer) is run once."""
    unique = list(dict.fromkeys(prompts))
    examples = [Example(base=prompt, source=prompt, label=answer, base_label=answer) for prompt, answer in unique]
    pairs = tokenize_pairs(lm.tokenizer, examples, "filtered")
    correct = torch.cat(base_run(lm, pairs, batch_size, keep_prefix=False).correct(pairs)).tolist()
    right = {unique[i]: ok for i, ok in zip(grouped_order(lm.tokenizer, examples), correct)}
    return [right[p] for p in prompts]


def _check_answers_known(splits: dict[str, list[Example]], mode: str) -> None:
    for name, examples in splits.items():
        for _, answer in SIDES[mode]:
            lacking = sum(getattr(e, answer) is None for e in examples)
            if lacking:
                raise DasError(f"dataset.filter={mode}: needs every pair's {answer} (the answer the model must give "
                               f"unedited); {lacking} of the {len(examples)} {name} pairs have none")
