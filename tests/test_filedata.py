"""dataset=file: JSONL, CSV and Parquet read to the same pairs; markers and indices resolved by hand-checked
token positions; every malformed row named by its line; the shipped example files load and run end to end."""

import copy
import csv
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli
from omegaconf import OmegaConf

from das_cli.errors import DasError
from das_cli.examples import Example
from das_cli.filedata import load_file_dataset
from das_cli.models import embedded_tokenizer

# SmolLM2 tokens: Paris0 is1 a2 city3 in4 the5 country6 of7 | To0 kyo1 is2 a3 city4 in5 the6 country7 of8
#                 Rome0 is1 a2 city3 on4 the5 continent6 of7 | L0 agos1 is2 a3 city4 in5 the6 country7 of8
PARIS, TOKYO = "Paris is a city in the country of", "Tokyo is a city in the country of"
ROME, LAGOS = "Rome is a city on the continent of", "Lagos is a city in the country of"
ROWS = [
    {"base": PARIS, "source": TOKYO, "label": " Japan", "base_label": " France", "kind": "cause", "split": "train",
     "base_value": "France", "source_value": "Japan", "base_positions.city": "Paris", "source_positions.city": "Tokyo",
     "positions.noun": "city", "positions.third": -3},
    {"base": ROME, "source": LAGOS, "label": " Europe", "base_label": " Europe", "kind": "isolate", "split": "test",
     "base_positions.city": "Rome", "source_positions.city": "Lagos", "positions.noun": "city", "positions.third": -3},
]
EXPECTED = (
    [Example(PARIS, TOKYO, " Japan", " France", {"city": 0, "noun": 3, "third": 5}, {"city": 1, "noun": 4, "third": 6},
             kind="cause", base_value="France", source_value="Japan")],
    [Example(ROME, LAGOS, " Europe", " Europe", {"city": 0, "noun": 3, "third": 5}, {"city": 1, "noun": 4, "third": 6},
             kind="isolate")],
)


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


def load_splits(tokenizer, path, **options):
    return load_file_dataset(OmegaConf.create({"name": "file", "path": str(path), **options}), tokenizer)


def load(tokenizer, path, **options):
    """(train, test), no validation split unless asked for."""
    splits = load_splits(tokenizer, path, **{"val_fraction": 0.0, **options})
    assert options.get("val_fraction") or not splits.val
    return splits.train, splits.test


def write_jsonl(path, rows):
    """Rows are dicts (written as JSON) or raw strings (written as they are)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def nested(row):
    """The JSONL form with position objects: {"positions": {"noun": "city"}, ...}."""
    out = {}
    for key, value in row.items():
        group, dot, name = key.partition(".")
        if dot:
            out.setdefault(group, {})[name] = value
        else:
            out[key] = value
    return out


def write_csv(path, rows):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["jsonl_dotted", "jsonl_nested", "csv", "parquet"])
def test_every_format_reads_to_the_same_pairs(tokenizer, tmp_path, fmt):
    if fmt == "jsonl_dotted":
        path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    elif fmt == "jsonl_nested":
        path = write_jsonl(tmp_path / "pairs.json", [nested(r) for r in ROWS])
    elif fmt == "csv":
        path = write_csv(tmp_path / "pairs.csv", ROWS)
    else:
        path = tmp_path / "pairs.parquet"
        pd.DataFrame(ROWS).to_parquet(path)
    assert load(tokenizer, path) == EXPECTED


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_counterfactual_types_and_source_labels_are_read(tokenizer, tmp_path, fmt):
    rows = [{**r, "counterfactual": kind, "source_label": answer} for r, kind, answer in zip(ROWS, ["same answer", "other"], [" Japan", None])]
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, [{k: v for k, v in r.items() if v is not None} for r in rows])
    elif fmt == "csv":
        write_csv(path, rows)
    else:
        pd.DataFrame(rows).to_parquet(path)
    train, test = load(tokenizer, path)
    assert (train[0].counterfactual, train[0].source_label) == ("same answer", " Japan")
    assert (test[0].counterfactual, test[0].source_label) == ("other", None)


def test_one_sided_positions_override_shared_ones(tokenizer, tmp_path):
    row = {**ROWS[0], "positions.noun": "country", "source_positions.noun": 2}
    train, _ = load(tokenizer, write_jsonl(tmp_path / "p.jsonl", [row, ROWS[1]]))
    assert train[0].base_positions["noun"] == 6 and train[0].source_positions["noun"] == 2


def test_marker_indices_count_special_tokens(tokenizer, tmp_path):
    with_bos = copy.deepcopy(tokenizer)
    with_bos.add_bos_token = True
    assert with_bos(PARIS).input_ids[0] == with_bos.bos_token_id
    train, _ = load(with_bos, write_jsonl(tmp_path / "p.jsonl", ROWS))
    assert train[0].base_positions == {"city": 1, "noun": 4, "third": 6}


def test_markers_need_a_fast_tokenizer(tokenizer, tmp_path):
    class Slow:
        is_fast = False

        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs)

    with pytest.raises(DasError, match="line 1: .*markers? .*need a fast tokenizer"):
        load(Slow(), write_jsonl(tmp_path / "p.jsonl", ROWS))


def good(index=0, **changes):
    """A valid row with some fields changed (None: left out)."""
    row = {**ROWS[index], **changes}
    return {k: v for k, v in row.items() if v is not None}


ROW_ERRORS = {
    "missing field": ([good(), good(1, label=None)], r"line 2: missing required field label$"),
    "not json": ([good(), '{"base": "x",'], r"line 2: not valid JSON"),
    "not an object": ([good(), "[1, 2]"], r"line 2: expected a JSON object"),
    "not a string": ([good(), good(1, label=3)], r"line 2: label must be a string, got 3"),
    "unknown kind": ([good(), good(1, kind="causal")], r"line 2: kind 'causal' is not one of: cause, isolate"),
    "unknown split": ([good(), good(1, split="dev")], r"line 2: split 'dev' is not one of: train, val, test"),
    # "of" + "ten" is the one token " often" after the prompt: the label's own tokens never follow it there
    "label merges": ([good(), good(1, label="ten")], r"line 2: label 'ten' merges with the end of its prompt: prompt and answer "
                     r"tokenize together as \['Ġoften'\], not as the prompt's tokens then the answer's \['Ġof', 'ten'\]"),
    "base_label merges": ([good(), good(1, base_label="ficial")], r"line 2: base_label 'ficial' merges with the end of its prompt"),
    "marker missing": ([good(), good(1, **{"base_positions.city": "Berlin"})],
                       r"line 2: base_positions.city: marker 'Berlin' is not in the base prompt 'Rome is"),
    "index out of range": ([good(), good(1, **{"source_positions.third": 9})],
                           r"line 2: source_positions.third=9 is outside the source prompt of 9 tokens; valid: -9..8"),
    "one side only": ([good(), good(1, **{"base_positions.extra": 0})],
                      r"line 2: position 'extra' is given for the base \(base_positions.extra\) but not for the source"),
    "names differ": ([good(), good(1, **{"positions.third": None})],
                     r"line 2: position names differ from line 1's \['city', 'noun', 'third'\]: it lacks \['third'\]"),
    "unknown column": ([good(), good(1, lable=" Europe")], r"line 2: unknown column 'lable'; valid columns: base, source, label, "),
    "reserved name": ([good(**{"positions.last": 0})], r"line 1: positions.last: the position name 'last' is reserved"),
    "split on some rows": ([good(), good(1, split=None)], r"line 2: has no split, unlike line 1; give split on every row or on none"),
    "whitespace label": ([good(), good(1, label=" ")], r"line 2: label ' ' is only whitespace; give the answer's text"),
    "whitespace source_label": ([good(), good(1, source_label="\t ")], r"line 2: source_label '\\t ' is only whitespace"),
    "blank lines count": ([good(), "", good(1, label="ten")], r"line 3: label 'ten'"),
}


@pytest.mark.parametrize("case", ROW_ERRORS)
def test_bad_rows_are_named_by_line(tokenizer, tmp_path, case):
    rows, message = ROW_ERRORS[case]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DasError, match=f"^dataset.path={path} {message}") as error:
        load(tokenizer, path)
    assert "\n" not in str(error.value)


def test_csv_lines_count_the_header(tokenizer, tmp_path):
    with pytest.raises(DasError, match=r"pairs.csv line 3: label 'ten' merges with the end of its prompt"):
        load(tokenizer, write_csv(tmp_path / "pairs.csv", [good(), good(1, label="ten")]))


def test_labels_of_several_tokens_are_read(tokenizer, tmp_path):
    rows = [good(label=" New Zealand", base_label=" Saudi Arabia"), good(1, label=" New York")]
    train, test = load(tokenizer, write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert (train[0].label, train[0].base_label, test[0].label) == (" New Zealand", " Saudi Arabia", " New York")
    with pytest.raises(DasError, match=r"pairs.csv line 1: unknown column 'lable'"):
        load(tokenizer, write_csv(tmp_path / "pairs.csv", [good(lable="x")]))


def test_parquet_errors_name_the_row(tokenizer, tmp_path):
    path = tmp_path / "pairs.parquet"
    pd.DataFrame([good(), good(1, kind="causal")]).to_parquet(path)
    with pytest.raises(DasError, match=r"pairs.parquet row 2: kind 'causal'"):
        load(tokenizer, path)


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_empty_file(tokenizer, tmp_path, text):
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(DasError, match=f"^dataset.path={path}: the file has no rows$"):
        load(tokenizer, path)


def test_unreadable_files(tokenizer, tmp_path):
    (tmp_path / "pairs.jsonl").write_bytes(b'{"base": "caf\xe9"}\n')
    with pytest.raises(DasError, match=r"pairs.jsonl: not UTF-8 text"):
        load(tokenizer, tmp_path / "pairs.jsonl")
    (tmp_path / "pairs.parquet").write_text("base,source,label\n")
    with pytest.raises(DasError, match=r"pairs.parquet: not a readable Parquet file"):
        load(tokenizer, tmp_path / "pairs.parquet")


def test_a_split_without_rows(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [good(), good(1, split="train")])
    with pytest.raises(DasError, match="the test split has no rows"):
        load(tokenizer, path)


def test_path_errors(tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DasError, match=rf"dataset.path=nope.jsonl: no such file \(looked in {tmp_path} and in .*conf/examples\)"):
        load(tokenizer, "nope.jsonl")
    with pytest.raises(DasError, match=r"dataset.path=pairs.txt: unknown file type '.txt'; valid extensions: .jsonl, .json, .csv, .parquet"):
        load(tokenizer, "pairs.txt")
    with pytest.raises(DasError, match=r"^dataset.path: missing"):
        load_file_dataset(OmegaConf.create({"name": "file", "path": "???"}), tokenizer)


def test_relative_paths_are_found_in_the_working_directory(tokenizer, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    assert load(tokenizer, "pairs.jsonl") == EXPECTED


def test_seeded_split_when_no_row_has_one(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", city_rows(10, 1, split=None))
    train, test = load(tokenizer, path, seed=0)
    assert (len(train), len(test)) == (7, 3)
    assert load(tokenizer, path, seed=0) == (train, test)
    assert load(tokenizer, path, seed=1) != (train, test)
    assert len(load(tokenizer, path, test_fraction=0.5)[1]) == 5
    with pytest.raises(DasError, match=r"dataset.test_fraction=1.0: must be between 0 and 1"):
        load(tokenizer, path, test_fraction=1.0)


def city_rows(n_cities, per_city, **changes):
    """`per_city` rows sharing each base prompt (the city's), told apart by base_value."""
    cities = ["Paris", "Tokyo", "Rome", "Lagos", "Milan", "Delhi", "Cairo", "Lima", "Oslo", "Bern"][:n_cities]
    return [good(base=f"{c} is a city in the country of", base_value=f"{c}{k}", **{"base_positions.city": c}, **changes)
            for c in cities for k in range(per_city)]


def test_validation_rows_from_the_split_column(tokenizer, tmp_path):
    rows = [good(split="train"), good(1, split="val"), good(split="test", base_value="other")]
    splits = load_splits(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows))
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [1, 1, 1]
    assert splits.val[0].kind == "isolate"  # row 1 of ROWS


def test_splits_keep_a_base_prompt_together(tokenizer, tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", city_rows(10, 3, split=None))
    for seed in range(5):
        splits = load_splits(tokenizer, path, seed=seed, test_fraction=0.3, val_fraction=0.25)
        bases = [{e.base for e in part} for part in (splits.train, splits.val, splits.test)]
        assert all(not (a & b) for i, a in enumerate(bases) for b in bases[i + 1:])
        assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 6, 9)  # 9 of 30 rows, 6 of the other 21 (rounded up to whole cities)
    assert capsys.readouterr().err == ""


def test_group_column_decides_what_stays_together(tokenizer, tmp_path):
    rows = [{**row, "group": row["base"][:4] if i % 2 else "even"} for i, row in enumerate(city_rows(10, 2, split=None))]
    splits = load_splits(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), test_fraction=0.3, val_fraction=0.0)
    groups = [{e.group for e in part} for part in (splits.train, splits.test)]
    assert not groups[0] & groups[1] and "even" in groups[0] | groups[1]


def test_validation_is_cut_from_training_rows_when_the_file_has_none(tokenizer, tmp_path):
    rows = city_rows(10, 2, split="train") + [good(split="test", base="Kyiv is a city in the country of", **{"base_positions.city": "Kyiv"})]
    splits = load_splits(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), val_fraction=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 1)
    assert not {e.base for e in splits.train} & {e.base for e in splits.val}
    with pytest.raises(DasError, match=r"^dataset.val_fraction=1.0: must be at least 0 and below 1$"):
        load_splits(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), val_fraction=1.0)


def test_given_splits_that_share_a_base_prompt_are_named(tokenizer, tmp_path, capsys):
    rows = [good(split="train"), good(split="test", base_value="again")]
    load_splits(tokenizer, write_jsonl(tmp_path / "p.jsonl", rows), val_fraction=0.0)
    err = capsys.readouterr().err
    assert err.startswith("das-cli: warning: dataset.path=") and "1 base prompts appear in more than one split" in err
    assert err.count("\n") == 1


def test_shipped_ravel_cities(tokenizer):
    train, test = load(tokenizer, "ravel_cities.csv")
    assert (len(train), len(test)) == (56, 24)
    for part in (train, test):
        assert {e.kind for e in part} == {"cause", "isolate"}
        assert all(e.kind == "cause" or e.label == e.base_label for e in part)  # isolate: the base's own answer
    cities = [{e.base.split(" is ")[0] for e in part} for part in (train, test)]
    assert not cities[0] & cities[1]
    paris = next(e for e in train if e.base.startswith("Paris is a city in the country"))
    assert paris.base_positions["city"] == 0 and paris.base_label == " France"


def test_shipped_ioi_pairs(tokenizer):
    train, test = load(tokenizer, "ioi_pairs.jsonl")
    assert (len(train), len(test)) == (42, 18)
    for e in train + test:
        ids = tokenizer(e.base).input_ids
        assert ids[e.base_positions["s1"]] == ids[e.base_positions["s2"]]  # S is named twice
        assert e.base_value in ("first", "second") and e.base_label.strip() in e.base


@pytest.mark.slow
def test_cli_runs_the_shipped_ravel_dataset(tmp_path):
    args = ["dataset=ravel_cities", "positions=[city]", "model=tiny_llama", "layers=[1]", "train.epochs=1", "progress=false"]
    result = run_cli(args + [f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(tmp_path / "iia.csv").iloc[0]
    assert row["position"] == "city" and (row["n_train"], row["n_test"]) == (21, 24)  # train_kinds=[cause]: isolate rows only test; 11 rows validate


@pytest.mark.slow
def test_cli_names_the_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [good(), good(1, label="ten")])
    args = ["dataset=file", f"dataset.path={path}", "model=tiny_llama", "layers=[1]", "progress=false"]
    result = run_cli(args + [f"hydra.run.dir={tmp_path / 'out'}"])
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [f"das-cli: error: dataset.path={path} line 2: label 'ten' merges with the end of its prompt: prompt and answer "
                      "tokenize together as ['Ġoften'], not as the prompt's tokens then the answer's ['Ġof', 'ten']; "
                      "start it at a token boundary (e.g. with a leading space)"]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_isolation_scores_with_an_estimated_baseline(tmp_path):
    args = ["dataset=ravel_cities", "dataset.train_kinds=[cause,isolate]", "intervention=mean_diff", "positions=[city]",
            "model=tiny_llama", "layers=[1]", "progress=false"]
    result = run_cli(args + [f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(tmp_path / "iia.csv").iloc[0]
    assert row["n_train"] == 45 and row["steps"] == 0  # both kinds train (11 of the 56 training rows validate); nothing is trained by gradient
    assert row["iia"] == row["iia_cause"] and row["iia_mean"] == pytest.approx((row["iia_cause"] + row["iia_isolate"]) / 2)
    assert (tmp_path / "pivot_block_output_iia_mean.csv").exists() and "at this cell: iia_isolate" in result.stdout
    assert row["n_val"] == 11 and 0 <= row["iia_val"] <= 1 and "(chosen on validation IIA" in result.stdout


SHIPPED = Path(__file__).resolve().parents[1] / "conf" / "examples"
OPTIONAL_COLUMNS = ["base_label", "source_label", "kind", "split", "group", "base_value", "source_value", "counterfactual",
                    "positions"]


def every_column_file(path, drop: list[str]) -> None:
    """24 IOI pairs with every optional column filled, less those in `drop` ("positions": both position groups)."""
    rows = [json.loads(line) for line in open(SHIPPED / "ioi_pairs.jsonl")][:24]
    for k, row in enumerate(rows):
        row.update(source_label=" " + row["source_positions"]["io"], kind="cause", group=f"g{k // 2}",
                   counterfactual="swap" if k % 2 else "rename")
        row["split"] = "test" if k % 3 == 0 else "train"
        for column in drop:
            for key in (("base_positions", "source_positions") if column == "positions" else (column,)):
                row.pop(key, None)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("drop", [[c] for c in OPTIONAL_COLUMNS] + [OPTIONAL_COLUMNS], ids=lambda d: "-".join(d) if len(d) == 1 else "all")
def test_a_run_needs_no_optional_column(drop, tmp_path):
    """A file of base, source and label alone (and any optional column left out) runs to a finished cell;
    the scores that need the base prompt's own answer are empty (NaN), never a crash or a made-up number."""
    import math

    import das_cli

    path = tmp_path / "pairs.jsonl"
    every_column_file(path, drop)
    cfg = das_cli.compose(["model=tiny_llama", "dataset=file", f"dataset.path={path}", "layers=[1]", "positions=[last]",
                           "train.epochs=1", "train.batch_size=8", "progress=false", "output.plots=false"])
    row = das_cli.run(cfg, tmp_path / "run").iloc[0]
    assert "error" not in row or not isinstance(row["error"], str), row.get("error")
    assert 0 <= row["iia"] <= 1 and math.isfinite(row["loss"])
    if "base_label" in drop:
        assert math.isnan(row["base_accuracy"]) and math.isnan(row["logit_diff"])
    else:
        assert 0 <= row["base_accuracy"] <= 1
