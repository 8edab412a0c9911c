"""File-backed datasets (`dataset=file dataset.path=...`): one (base, source) pair per row.

A JSONL (or `.json`: JSON lines or one array of objects), CSV or Parquet file holds the prompts, the counterfactual label and named positions
(docs/data.md, "File datasets", has the column table). Files are written by hand or by other tools, so
every problem is reported on one line naming the file and the line (or Parquet row) it is on:
"label merges with its prompt" alone is useless in a file of a thousand rows.

Positions are given per prompt as token indices or as marker substrings (the token holding the
marker's last character) and are resolved here, once, into indices of `encode(tokenizer, prompt)`.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config import conf_dir
from .errors import DasError
from .data import answer_tokens
from .examples import KINDS, SPLITS, Example, Splits, check_counterfactual_names, encode

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
REQUIRED = ("base", "source", "label")
TEXT_COLUMNS = REQUIRED + ("base_label", "source_label", "kind", "split", "group", "base_value", "source_value", "counterfactual")
POSITION_GROUPS = ("positions", "base_positions", "source_positions")
RESERVED = "last"  # data.py adds every prompt's last token under this name
VALID_COLUMNS = ", ".join(TEXT_COLUMNS + tuple(f"{g}.<name>" for g in POSITION_GROUPS))


@dataclass(frozen=True)
class Row:
    """One row as read: where it is, for errors, and its given cells (positions as `group.name`)."""

    path: Path
    where: str  # "line 7" (JSONL, CSV) or "row 7" (Parquet)
    cells: dict[str, Any]

    def error(self, message: str) -> DasError:
        return DasError(f"dataset.path={self.path} {self.where}: {message}")


@dataclass(frozen=True)
class Parsed:
    """A row turned into a pair, with the split it asked for (None: not given)."""

    row: Row
    example: Example
    split: str | None


def load_file_dataset(ds: DictConfig, tokenizer) -> Splits:
    """Train, validation and test pairs from `ds.path`, in file order (see `_assign_splits`)."""
    if OmegaConf.is_missing(ds, "path"):
        raise DasError("dataset.path: missing; give the pairs file, e.g. dataset.path=pairs.jsonl (JSONL, CSV or Parquet)")
    path = resolve_path(str(ds.path))
    try:
        rows = list(read_rows(path))
    except UnicodeDecodeError as e:
        raise DasError(f"dataset.path={path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not rows:
        raise DasError(f"dataset.path={path}: the file has no rows")
    parsed = [parse_row(row, tokenizer) for row in rows]
    _check_same_positions(parsed)
    _check_counterfactuals(parsed)
    splits = _assign_splits(parsed, float(ds.get("test_fraction", 0.3)), float(ds.get("val_fraction", 0.2)), int(ds.get("seed", 0)))
    for name in ("train", "test"):
        if name not in splits:
            raise DasError(f"dataset.path={path}: the {name} split has no rows ({len(parsed)} rows in all); give some rows split={name}")
    _warn_shared_groups(path, parsed, splits)
    return Splits(**{name: [parsed[i].example for i in sorted(splits.get(name, ()))] for name in SPLITS})


def resolve_path(value: str) -> Path:
    """`value` as given (absolute or relative to the working directory), else among the shipped examples."""
    given = Path(value).expanduser()
    if given.suffix.lower() not in EXTENSIONS:
        raise DasError(f"dataset.path={value}: unknown file type {given.suffix or '(none)'!r}; valid extensions: {', '.join(EXTENSIONS)}")
    if given.is_file():
        return given.resolve()
    examples = conf_dir() / "examples"
    if not given.is_absolute() and (examples / given).is_file():
        return examples / given
    places = str(given) if given.is_absolute() else f"{Path.cwd()} and in {examples}"
    raise DasError(f"dataset.path={value}: no such file (looked in {places})")


def read_rows(path: Path) -> Iterator[Row]:
    """The file's rows, by extension; blank lines are skipped but counted."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix == ".json" and _starts_with_array(path):
        return _json_array_rows(path)
    return _jsonl_rows(path)


def _starts_with_array(path: Path) -> bool:
    with path.open(encoding="utf-8-sig") as f:
        for line in f:
            if line.strip():
                return line.lstrip().startswith("[")
    return False


def _json_array_rows(path: Path) -> Iterator[Row]:
    """A `.json` file holding one JSON array of objects, pretty-printed or not; each object's row is
    named by the line it starts on."""
    text = path.read_text(encoding="utf-8-sig")
    decoder = json.JSONDecoder()
    at = text.index("[") + 1
    while True:
        at = _skip_space(path, text, at)
        if text.startswith("]", at):
            break
        row = Row(path, f"line {text.count(chr(10), 0, at) + 1}", {})
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            raise Row(path, f"line {e.lineno}", {}).error(f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(value, dict):
            raise row.error(f'expected a JSON object {{"base": ..., "source": ..., "label": ...}}, got {type(value).__name__}')
        yield replace(row, cells=_flatten(row, value))
        at = _skip_space(path, text, at)
        if text.startswith(",", at):
            at += 1
        elif not text.startswith("]", at):
            where = Row(path, f"line {text.count(chr(10), 0, at) + 1}", {})
            raise where.error("not valid JSON (expected ',' or ']' after an object of the array)")
    rest = text[at + 1:]
    if rest.strip():
        extra = at + 1 + len(rest) - len(rest.lstrip())
        raise Row(path, f"line {text.count(chr(10), 0, extra) + 1}", {}).error("not valid JSON (text after the closing ']')")


def _skip_space(path: Path, text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    if at >= len(text):
        raise DasError(f"dataset.path={path} line {text.count(chr(10)) + 1}: not valid JSON (the array has no closing ']')")
    return at


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = Row(path, f"line {number}", {})
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise row.error(f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(value, dict):
                raise row.error(f'expected a JSON object {{"base": ..., "source": ..., "label": ...}}, got {type(value).__name__}')
            yield replace(row, cells=_flatten(row, value))


def _csv_rows(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        _check_columns(Row(path, "line 1", {}), header)
        start = reader.line_num + 1
        for cells in reader:
            row = Row(path, f"line {start}", {})
            start = reader.line_num + 1  # a quoted cell may span lines
            if not any(cells):
                continue
            if len(cells) != len(header):
                raise row.error(f"{len(cells)} cells, but the header (line 1) has {len(header)} columns")
            yield replace(row, cells={k: _csv_cell(k, v) for k, v in zip(header, cells) if v != ""})


def _csv_cell(column: str, value: str) -> str | int:
    """CSV has only text: an integer-looking position cell is a token index."""
    if column.partition(".")[0] in POSITION_GROUPS and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    return value


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pandas as pd

    try:
        records = pd.read_parquet(path).to_dict("records")
    except (OSError, ValueError) as e:  # pyarrow's errors for a file that is not Parquet
        raise DasError(f"dataset.path={path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    for number, record in enumerate(records, start=1):
        row = Row(path, f"row {number}", {})
        yield replace(row, cells=_flatten(row, record))


def _flatten(row: Row, record: dict[str, Any]) -> dict[str, Any]:
    """Given cells only (None, NaN and "" are "not given"); nested position objects become `group.name`."""
    cells = {}
    for key, value in record.items():
        if key in POSITION_GROUPS and isinstance(value, dict):
            cells.update({f"{key}.{name}": v for name, v in value.items() if not _blank(v)})
        elif key in POSITION_GROUPS and not _blank(value):
            raise row.error(f"{key} must be an object of name: token index or marker, got {value!r}")
        elif not _blank(value):
            cells[str(key)] = value
    return cells


def _blank(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _check_columns(row: Row, columns) -> None:
    unknown = [c for c in columns if c not in TEXT_COLUMNS and not _is_position_column(c)]
    if unknown:
        raise row.error(f"unknown column{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; valid columns: {VALID_COLUMNS}")
    repeated = sorted({c for c in columns if list(columns).count(c) > 1})
    if repeated:
        raise row.error(f"column {', '.join(map(repr, repeated))} given twice")


def _is_position_column(column: str) -> bool:
    group, dot, name = column.partition(".")
    return group in POSITION_GROUPS and bool(dot) and bool(name)


def parse_row(row: Row, tokenizer) -> Parsed:
    """Check one row and turn it into an Example with resolved positions."""
    _check_columns(row, row.cells)
    missing = [c for c in REQUIRED if c not in row.cells]
    if missing:
        raise row.error(f"missing required field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    text = {c: _text(row, c) for c in TEXT_COLUMNS if c in row.cells}
    kind, split = text.get("kind", "cause"), text.get("split")
    if kind not in KINDS:
        raise row.error(f"kind {kind!r} is not one of: {', '.join(KINDS)}")
    if split is not None and split not in SPLITS:
        raise row.error(f"split {split!r} is not one of: {', '.join(SPLITS)}")
    for column, prompt in (("label", "base"), ("base_label", "base"), ("source_label", "source")):
        if column in text:
            _check_answer(row, tokenizer, column, text[prompt], text[column])
    base_specs, source_specs = _position_specs(row)
    example = Example(
        base=text["base"], source=text["source"], label=text["label"], base_label=text.get("base_label"),
        base_positions=_resolve_side(row, tokenizer, text["base"], "base", base_specs),
        source_positions=_resolve_side(row, tokenizer, text["source"], "source", source_specs),
        kind=kind, base_value=text.get("base_value"), source_value=text.get("source_value"),
        group=text.get("group", ""), counterfactual=text.get("counterfactual", ""), source_label=text.get("source_label"),
    )
    return Parsed(row, example, split)


def _text(row: Row, column: str) -> str:
    value = row.cells[column]
    if not isinstance(value, str):
        raise row.error(f"{column} must be a string, got {value!r}")
    return value


def _check_answer(row: Row, tokenizer, column: str, prompt: str, text: str) -> None:
    """An answer may be several tokens, but they must be the ones the model sees after its prompt."""
    if text and not text.strip():
        raise row.error(f"{column} {text!r} is only whitespace; give the answer's text, e.g. ' Paris'")
    _, problem = answer_tokens(tokenizer, prompt, text)
    if problem:
        raise row.error(f"{column} {text!r} {problem}")


Spec = tuple[str, Any]  # (the column it came from, a token index or a marker)


def _position_specs(row: Row) -> tuple[dict[str, Spec], dict[str, Spec]]:
    """Per side, name -> spec: `positions.<name>` for both, overridden by `base_/source_positions.<name>`."""
    sides: dict[str, dict[str, Spec]] = {"base": {}, "source": {}}
    for group in POSITION_GROUPS:  # shared first, so a one-sided column overrides it
        for column, value in row.cells.items():
            prefix, _, name = column.partition(".")
            if prefix != group:
                continue
            if name == RESERVED:
                raise row.error(f"{column}: the position name {RESERVED!r} is reserved (every prompt's last token); use another name")
            for side in ("base", "source"):
                if group in ("positions", f"{side}_positions"):
                    sides[side][name] = (column, value)
    base, source = sides["base"], sides["source"]
    for name in sorted(base.keys() ^ source.keys()):
        given, lacking = ("base", "source") if name in base else ("source", "base")
        raise row.error(
            f"position {name!r} is given for the {given} ({given}_positions.{name}) but not for the {lacking}; "
            f"every name needs both sides (positions.{name} sets both)"
        )
    return base, source


def _resolve_side(row: Row, tokenizer, prompt: str, side: str, specs: dict[str, Spec]) -> dict[str, int]:
    """Token indices (non-negative) into `encode(tokenizer, prompt)` of one prompt's named positions."""
    ids = encode(tokenizer, prompt)
    offsets = None
    resolved = {}
    for name, (column, value) in specs.items():
        if isinstance(value, float) and value.is_integer():  # Parquet: an int column with gaps reads as float
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if not -len(ids) <= value < len(ids):
                raise row.error(f"{column}={value} is outside the {side} prompt of {len(ids)} tokens; valid: {-len(ids)}..{len(ids) - 1}")
            resolved[name] = value % len(ids)
        elif isinstance(value, str):
            offsets = offsets if offsets is not None else _offsets(row, tokenizer, prompt, ids)
            resolved[name] = _marker_index(row, column, value, prompt, side, offsets)
        else:
            raise row.error(f"{column} must be a token index or a marker string, got {value!r}")
    return resolved


def _offsets(row: Row, tokenizer, prompt: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of every token of `ids` (special tokens: empty spans)."""
    if not getattr(tokenizer, "is_fast", False):
        raise row.error(f"marker positions need a fast tokenizer (character offsets); {type(tokenizer).__name__} is not one; give token indices instead")
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    if list(encoded.input_ids) != ids:
        raise row.error(f"the tokenizer gives other tokens when asked for offsets; give token indices instead of markers for {prompt!r}")
    return [tuple(span) for span in encoded.offset_mapping]


def _marker_index(row: Row, column: str, marker: str, prompt: str, side: str, offsets: list[tuple[int, int]]) -> int:
    """The token holding the last character of the first occurrence of `marker`."""
    at = prompt.find(marker)
    if at < 0:
        raise row.error(f"{column}: marker {marker!r} is not in the {side} prompt {prompt!r}")
    char = at + len(marker) - 1
    for index, (start, end) in enumerate(offsets):
        if start <= char < end:
            return index
    raise row.error(f"{column}: no token of the {side} prompt covers the end of marker {marker!r}")


def _check_same_positions(parsed: list[Parsed]) -> None:
    """Every row must define the same position names, or some cells could not be resolved for some pairs."""
    first = parsed[0]
    names = set(first.example.base_positions)
    for p in parsed[1:]:
        mine = set(p.example.base_positions)
        if mine != names:
            extra, lacking = sorted(mine - names), sorted(names - mine)
            detail = "; ".join(([f"it adds {extra}"] if extra else []) + ([f"it lacks {lacking}"] if lacking else []))
            raise p.row.error(f"position names differ from {first.row.where}'s {sorted(names)}: {detail}; every row needs the same names")


def _check_counterfactuals(parsed: list[Parsed]) -> None:
    """A counterfactual type on every row or on none (a row without one would form a type of its own),
    and every type naming a column of its own."""
    typed = [bool(p.example.counterfactual) for p in parsed]
    if any(typed) and not all(typed):
        odd = next(p for p, t in zip(parsed, typed) if t != typed[0])
        has = "has a counterfactual" if odd.example.counterfactual else "has no counterfactual"
        raise odd.row.error(f"{has}, unlike {parsed[0].row.where}; give counterfactual on every row or on none")
    check_counterfactual_names(p.example.counterfactual for p in parsed if p.example.counterfactual)


def _assign_splits(parsed: list[Parsed], test_fraction: float, val_fraction: float, seed: int) -> dict[str, set[int]]:
    """Row indices per split. The file's split column decides where it is given (on every row or none);
    without it, whole groups (the `group` column, else the base prompt) go to test until `test_fraction`
    of the rows are there. Without validation rows, `val_fraction` of the training rows (whole groups
    again) become validation. A prompt (or group) therefore never lands in two splits we make."""
    given = [p.split is not None for p in parsed]
    if any(given) and not all(given):
        odd = next(p for p in parsed if (p.split is not None) != given[0])
        has = "has a split" if odd.split is not None else "has no split"
        raise odd.row.error(f"{has}, unlike {parsed[0].row.where}; give split on every row or on none")
    if not 0 <= val_fraction < 1:
        raise DasError(f"dataset.val_fraction={val_fraction}: must be at least 0 and below 1")
    rng = random.Random(seed)
    if all(given):
        splits = {name: {i for i, p in enumerate(parsed) if p.split == name} for name in SPLITS}
    else:
        if not 0 < test_fraction < 1:
            raise DasError(f"dataset.test_fraction={test_fraction}: must be between 0 and 1 (the file has no split column)")
        test = _take_groups(parsed, set(range(len(parsed))), round(len(parsed) * test_fraction), rng)
        splits = {"train": set(range(len(parsed))) - test, "val": set(), "test": test}
    if not splits["val"] and val_fraction > 0:
        splits["val"] = _take_groups(parsed, splits["train"], round(len(splits["train"]) * val_fraction), rng)
        splits["train"] -= splits["val"]
    return {name: rows for name, rows in splits.items() if rows}


def _group(p: Parsed) -> str:
    return p.example.group or p.example.base


def _take_groups(parsed: list[Parsed], rows: set[int], n: int, rng: random.Random) -> set[int]:
    """Whole groups of `rows`, in a seeded random order, until at least `n` rows are taken."""
    groups: dict[str, list[int]] = {}
    for i in sorted(rows):
        groups.setdefault(_group(parsed[i]), []).append(i)
    order = list(groups)
    rng.shuffle(order)
    taken: set[int] = set()
    for key in order:
        if len(taken) >= n:
            break
        taken.update(groups[key])
    return taken


def _warn_shared_groups(path: Path, parsed: list[Parsed], splits: dict[str, set[int]]) -> None:
    """The file's own splits may put one base prompt (or group) in two splits: say so, once."""
    where: dict[str, set[str]] = {}
    for name, rows in splits.items():
        for i in rows:
            where.setdefault(_group(parsed[i]), set()).add(name)
    shared = [key for key, names in where.items() if len(names) > 1]
    if shared:
        kind = "groups" if any(p.example.group for p in parsed) else "base prompts"
        print(f"das-cli: warning: dataset.path={path}: {len(shared)} {kind} appear in more than one split "
              f"(e.g. {shared[0]!r}); held-out scores then reuse prompts seen in training", file=sys.stderr)
