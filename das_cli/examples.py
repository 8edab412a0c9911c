"""The unit of data every dataset produces: one (base, source) pair with its counterfactual label."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One interchange-intervention pair.

    Positions are token indices (0-based, non-negative) into `encode(tokenizer, prompt)`,
    keyed by name (IOI: io, s1, s2, name1, name2, last). `group` ties together pairs whose
    base and source prompts have the same token length (IOI: the template), so they batch
    without padding.
    """

    base: str
    source: str
    label: str  # counterfactual answer token text, with its leading space, e.g. " Mary"
    base_label: str  # the answer the base prompt itself calls for
    base_positions: dict[str, int] = field(default_factory=dict)
    source_positions: dict[str, int] = field(default_factory=dict)
    group: str = ""
    kind: str = "cause"


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt exactly as the model will see it (special tokens included)."""
    return list(tokenizer(text).input_ids)


def single_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` if it is exactly one token when it follows other text, else None."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None
