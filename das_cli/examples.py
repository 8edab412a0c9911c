"""The unit of data every dataset produces: one (base, source) pair with its counterfactual label."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import DasError


@dataclass(frozen=True)
class Example:
    """One interchange-intervention pair.

    Positions are token indices (0-based, non-negative) into `encode(tokenizer, prompt)`,
    keyed by name (IOI: io, s1, s2, name1, name2, last). `group` names where a pair comes
    from (IOI: the template); batching groups pairs by base-prompt length (data.tokenize_pairs).

    `kind` is "cause" (the label is what the source's value of the variable calls for) or
    "isolate" (the label is the base's own answer, which the edit must leave alone).
    `base_value` / `source_value` name the variable's value on each prompt (IOI io_position:
    "first" / "second"); class-based baselines (mean difference, probe) group activations by
    them. When not given they default to the base label and the label of a cause pair.

    `counterfactual` names the pair's counterfactual type (free text, "" when not given): IIA is
    then the mean over types (metrics.Evaluation). `source_label` is the source prompt's own answer
    (None: unknown); `dataset.filter=both` keeps pairs whose source the model answers right.
    """

    base: str
    source: str
    label: str  # counterfactual answer token text, with its leading space, e.g. " Mary"
    base_label: str | None = None  # the answer the base prompt itself calls for (None: unknown)
    base_positions: dict[str, int] = field(default_factory=dict)
    source_positions: dict[str, int] = field(default_factory=dict)
    group: str = ""
    kind: str = "cause"
    base_value: str | None = None
    source_value: str | None = None
    counterfactual: str = ""
    source_label: str | None = None

    @property
    def base_class(self) -> str | None:
        return self.base_value if self.base_value is not None else self.base_label

    @property
    def source_class(self) -> str | None:
        if self.source_value is not None:
            return self.source_value
        return self.label if self.kind == "cause" else None


KINDS = ("cause", "isolate")
FILTERS = ("none", "base", "both")  # dataset.filter: keep every pair, those whose base / base and source the model answers right
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Splits:
    """A dataset's pairs per split. `val` (validation) may be empty: then no split is held out for
    choosing cells, and the choices fall back to training IIA (never test)."""

    train: list[Example]
    val: list[Example]
    test: list[Example]

    def items(self) -> list[tuple[str, list[Example]]]:
        """(name, pairs) of every split that has pairs, in SPLITS order."""
        return [(name, getattr(self, name)) for name in SPLITS if getattr(self, name)]


def counterfactual_suffix(name: str) -> str:
    """A counterfactual type as a column suffix (`iia_cf_<suffix>`): runs of other characters than
    letters, digits and `_` become one `_`, and none lead or trail ("same answer" -> "same_answer")."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")


def check_counterfactual_names(names) -> None:
    """Every counterfactual type must give a suffix of its own, and a non-empty one."""
    by_suffix: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        suffix = counterfactual_suffix(name)
        if not suffix:
            raise DasError(f"dataset: counterfactual {name!r} has no letter or digit to name its column iia_cf_<type>; rename it")
        by_suffix.setdefault(suffix, []).append(name)
    for suffix, clash in by_suffix.items():
        if len(clash) > 1:
            raise DasError(f"dataset: counterfactual types {' and '.join(map(repr, clash))} both name the column iia_cf_{suffix}; rename one")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt exactly as the model will see it (special tokens included)."""
    return list(tokenizer(text).input_ids)


def single_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` if it is exactly one token when it follows other text, else None."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None
