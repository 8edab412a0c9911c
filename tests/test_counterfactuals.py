"""Counterfactual types (IIA as the mean over types, per-type columns, the interval of the mean), IIA over
the pairs whose base answer is right, and dataset.filter: hand-computed on fixed logits, and end to end on
tiny_gpt2, where whole-vector patching at the last layer's last token makes the edited answer the source
prompt's own top-1 token, which the tests compute with a plain forward of their own."""

import json
import math

import pandas as pd
import pytest
import torch
from conftest import TINY, run_cli
from omegaconf import OmegaConf

from das_cli.config import conf_dir
from das_cli.errors import DasError
from das_cli.examples import Example, check_counterfactual_names, counterfactual_suffix
from das_cli.filedata import load_file_dataset
from das_cli.filters import filter_pairs
from das_cli.ioi import make_ioi
from das_cli.models import load_model
from das_cli.results import format_summary, results_frame
from das_cli.scores import mean_proportion_interval
from das_cli.metrics import Evaluation, evaluate_kinds

pytestmark = pytest.mark.usefixtures("one_thread")

WRONG = " Japan"  # an answer the random tiny model never gives to these prompts (checked)
PATCH_LAST_LAYER = ["model=tiny_gpt2", "intervention=vanilla", "stream=block_output", "layers=[3]", "positions=[last]",
                    "progress=false", "output.plots=false"]


def prompt(city: str) -> str:
    return f"{city} is a city in the country of"


@pytest.fixture(scope="module")
def lm():
    return load_model(OmegaConf.load(conf_dir() / "model" / "tiny_gpt2.yaml"), "cpu", "float32")


@pytest.fixture(scope="module")
def top1(lm):
    """city -> the tiny model's top-1 next token after prompt(city), as text, by a plain forward."""
    out = {}
    for city in ["Paris", "Tokyo", "Rome", "Lagos", "Berlin", "Madrid", "Cairo", "Lima", "Oslo", "Delhi", "Seoul", "Dublin"]:
        ids = torch.tensor([lm.tokenizer(prompt(city)).input_ids])
        with torch.no_grad():
            out[city] = lm.tokenizer.decode([int(lm.model(input_ids=ids).logits[0, -1].argmax())])
        assert out[city] != WRONG
    return out


def row(base, source, label, split, cf, base_label=None, source_label=None):
    cells = {"base": prompt(base), "source": prompt(source), "label": label, "split": split, "counterfactual": cf,
             "base_label": base_label, "source_label": source_label}
    return {k: v for k, v in cells.items() if v is not None}


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory, top1):
    """Test: type "same country" has 3 pairs, the first two hits, the third a miss; type "other-city" has
    1 pair, a hit. Base answers right on pairs 1 and 3 (of "same country") only. Validation: "same country"
    1 pair, a hit; "other-city" 2 pairs, one hit. Training: 2 pairs. Every base answer of train and
    validation is right; sources answer right but on test pair 3."""
    t = top1
    rows = [
        row("Paris", "Tokyo", t["Tokyo"], "test", "same country", t["Paris"], t["Tokyo"]),
        row("Rome", "Lagos", t["Lagos"], "test", "same country", WRONG, t["Lagos"]),
        row("Berlin", "Dublin", WRONG, "test", "same country", t["Berlin"], WRONG),
        row("Madrid", "Cairo", t["Cairo"], "test", "other-city", WRONG, t["Cairo"]),
        row("Lima", "Oslo", t["Oslo"], "val", "same country", t["Lima"], t["Oslo"]),
        row("Delhi", "Seoul", t["Seoul"], "val", "other-city", t["Delhi"], t["Seoul"]),
        row("Seoul", "Delhi", WRONG, "val", "other-city", t["Seoul"], t["Delhi"]),
        row("Oslo", "Lima", t["Lima"], "train", "same country", t["Oslo"], t["Lima"]),
        row("Cairo", "Madrid", t["Madrid"], "train", "other-city", t["Cairo"], t["Madrid"]),
    ]
    path = tmp_path_factory.mktemp("typed") / "typed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Engine:
    """Fixed logits per pair (vocabulary of 2: the label is token 0), one group."""

    def __init__(self, hits: list[bool], kinds: list[str], types: list[str]):
        self.all_logits = torch.tensor([[1.0, 0.0] if hit else [0.0, 1.0] for hit in hits])
        self.groups = [type("Group", (), {"kinds": kinds, "counterfactuals": types, "__len__": lambda s: len(hits)})()]
        self.lm = type("LM", (), {"device": torch.device("cpu")})()

    def logits(self, batch, intervention):
        return torch.cat([self.all_logits[rows] for _, rows in batch])

    def labels(self, batch):
        return torch.zeros(sum(len(rows) for _, rows in batch), dtype=torch.long)


def evaluation(hits, kinds, types, base_right=None) -> Evaluation:
    correct = [torch.tensor(base_right)] if base_right is not None else None
    return evaluate_kinds(Engine(hits, kinds, types), None, batch_size=3, base_correct=correct)


def test_iia_is_the_mean_over_types_of_the_cause_pairs():
    # cause pairs: type a 2 of 3 right, type b 0 of 1; isolate pairs (types ignored): 1 of 2
    result = evaluation([True, True, False, False, True, False], ["cause"] * 4 + ["isolate"] * 2, ["a", "a", "a", "b", "a", "b"])
    scores = result.scores()
    assert scores["iia"] == pytest.approx((2 / 3 + 0) / 2)  # the pooled pairs would give 2 / 4
    assert (scores["iia_cf_a"], scores["n_cf_a"], scores["iia_cf_b"], scores["n_cf_b"]) == (pytest.approx(2 / 3), 3, 0.0, 1)
    assert scores["iia_cause"] == scores["iia"] and scores["iia_isolate"] == 0.5
    assert scores["iia_mean"] == pytest.approx((1 / 3 + 0.5) / 2)


def test_one_type_or_none_changes_nothing():
    hits, kinds = [True, False, False, True], ["cause"] * 4
    untyped, one_type = evaluation(hits, kinds, ["", "", "", ""]), evaluation(hits, kinds, ["x"] * 4)
    assert untyped.scores() == {"iia": 0.5}  # no column: no per-type columns
    assert one_type.scores() == {"iia": 0.5, "iia_cf_x": 0.5, "n_cf_x": 4}
    assert untyped.graded_scores()["iia_lo"] == one_type.graded_scores()["iia_lo"]  # Wilson's interval of 2 / 4


def test_interval_of_the_mean_over_types_by_hand():
    # Price & Bonett with T = 2: each type gets 1 hit and 2 pairs added: 4/5 and 1/3, over 5 and 3 pairs;
    # centre 0.566667, standard error sqrt(0.8 * 0.2 / 5 + (1/3) * (2/3) / 3) / 2 = 0.162845, z = 1.959964
    lo, hi = mean_proportion_interval([(3, 3), (0, 1)])
    assert (lo, hi) == (pytest.approx(0.247497, abs=1e-5), pytest.approx(0.885837, abs=1e-5))
    assert mean_proportion_interval([(0, 5), (0, 5)])[1] > 0  # a plain Wald interval would be [0, 0]
    assert all(math.isnan(v) for v in mean_proportion_interval([(0, 0)]))
    graded = evaluation([True, True, True, False], ["cause"] * 4, ["a", "a", "a", "b"]).graded_scores()
    assert (graded["iia_lo"], graded["iia_hi"]) == (pytest.approx(lo), pytest.approx(hi))


def test_iia_over_the_pairs_whose_base_answer_is_right():
    hits, kinds, types = [True, False, True, True], ["cause"] * 4, ["a", "a", "b", "b"]
    scores = evaluation(hits, kinds, types, base_right=[True, True, False, True]).scores()
    assert (scores["iia_base_correct"], scores["n_base_correct"]) == (pytest.approx((1 / 2 + 1) / 2), 3)
    none_right = evaluation(hits, kinds, types, base_right=[False] * 4).scores()
    assert math.isnan(none_right["iia_base_correct"]) and none_right["n_base_correct"] == 0
    assert "iia_base_correct" not in evaluation(hits, kinds, types).scores()  # not asked (validation, training)


def test_mib_summary_reads_the_mean_over_types():
    """Two types of 3 and 1 pairs; per cell (layer, position): hits of type a, of type b."""
    cells = {(0, "x"): (3, 0), (0, "y"): (1, 1), (1, "x"): (0, 1), (1, "y"): (2, 0)}
    rows = []
    for (layer, position), (a, b) in cells.items():
        result = Evaluation({"cause": a + b}, {"cause": 4}, 0.0, types={"cause": {"a": [a, 3], "b": [b, 1]}})
        rows.append({"stream": "block_output", "layer": layer, "position": position, "intervention": "das",
                     "train_iia": 0.5, **result.scores()})
    frame = results_frame(rows)
    assert frame["iia"].tolist() == pytest.approx([0.5, 2 / 3, 0.5, 1 / 3])  # means over types, pooled: .75 .5 .25 .5
    # per layer the max over positions: 2/3 and 1/2; their mean 0.583 (the pooled pairs would give 0.625)
    assert "mean over layers of the max over positions: 0.58" in format_summary(frame)


def test_type_names_become_column_suffixes():
    assert counterfactual_suffix("same country") == "same_country"
    assert counterfactual_suffix(" other-city! ") == "other_city"
    with pytest.raises(DasError, match=r"^dataset: counterfactual types 'a b' and 'a-b' both name the column iia_cf_a_b; rename one$"):
        check_counterfactual_names(["a b", "a-b", "c"])
    with pytest.raises(DasError, match=r"counterfactual '\?\?' has no letter or digit"):
        check_counterfactual_names(["??"])


def test_file_types_on_every_row_or_none(lm, tmp_path, top1):
    rows = [row("Paris", "Tokyo", " x", "train", "same"), row("Rome", "Lagos", " x", "test", None)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    with pytest.raises(DasError, match=r"line 2: has no counterfactual, unlike line 1; give counterfactual on every row or on none$"):
        load_file_dataset(OmegaConf.create({"name": "file", "path": str(path)}), lm.tokenizer)
    rows[1]["counterfactual"] = "same!"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DasError, match="'same' and 'same!' both name the column iia_cf_same"):
        load_file_dataset(OmegaConf.create({"name": "file", "path": str(path)}), lm.tokenizer)


def test_source_label_is_checked_against_the_source_prompt(lm, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"base": "It is", "source": "It happens of", "label": " x", "source_label": "ten"}) + "\n")
    with pytest.raises(DasError, match=r"line 1: source_label 'ten' merges with the end of its prompt"):
        load_file_dataset(OmegaConf.create({"name": "file", "path": str(path)}), lm.tokenizer)


def test_filter_keeps_the_pairs_the_model_answers(lm, typed_file):
    splits = load_file_dataset(OmegaConf.create({"name": "file", "path": str(typed_file), "val_fraction": 0.0}), lm.tokenizer)
    examples = {"train": splits.train, "val": splits.val, "test": splits.test}
    assert filter_pairs(lm, examples, "none", 4) is examples
    base = filter_pairs(lm, examples, "base", 4)
    assert [e.base for e in base["test"]] == [prompt("Paris"), prompt("Berlin")]
    assert len(base["val"]) == 3 and len(base["train"]) == 2
    both = filter_pairs(lm, examples, "both", 4)
    assert [e.base for e in both["test"]] == [prompt("Paris")]  # Berlin's pair says its source answers WRONG; the model does not


def test_filter_errors(lm):
    wrong = Example(base=prompt("Paris"), source=prompt("Tokyo"), label=" x", base_label=WRONG)
    with pytest.raises(DasError, match=r"^dataset.filter=base: the model answers none of the 1 test pairs right; no test pair is left"):
        filter_pairs(lm, {"test": [wrong]}, "base", 4)
    with pytest.raises(DasError, match=r"^dataset.filter=both: needs every pair's source_label .*; 1 of the 1 test pairs have none$"):
        filter_pairs(lm, {"test": [wrong]}, "both", 4)
    unknown = Example(base=prompt("Paris"), source=prompt("Tokyo"), label=" x")
    with pytest.raises(DasError, match=r"^dataset.filter=base: needs every pair's base_label"):
        filter_pairs(lm, {"test": [unknown]}, "base", 4)


def test_ioi_pairs_know_the_source_answer(lm):
    for e in make_ioi(lm.tokenizer, "io_position", 8, 4, 0).test:
        source_io = lm.tokenizer(e.source).input_ids[e.source_positions["io"]]
        assert lm.tokenizer.decode([source_io]) == e.source_label


@pytest.mark.slow
def test_cli_scores_per_type(typed_file, tmp_path):
    result = run_cli(["dataset=file", f"dataset.path={typed_file}", *PATCH_LAST_LAYER, f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(tmp_path / "iia.csv").iloc[0]
    assert (row["iia_cf_same_country"], row["n_cf_same_country"]) == (pytest.approx(2 / 3), 3)
    assert (row["iia_cf_other_city"], row["n_cf_other_city"]) == (1.0, 1)
    assert row["iia"] == pytest.approx((2 / 3 + 1) / 2) and row["n_test"] == 4
    assert (row["iia_lo"], row["iia_hi"]) == tuple(pytest.approx(v) for v in mean_proportion_interval([(2, 3), (1, 1)]))
    assert row["iia_val"] == pytest.approx((1 + 1 / 2) / 2)  # validation: the same mean over types
    assert (row["iia_base_correct"], row["n_base_correct"]) == (pytest.approx(1 / 2), 2)  # Paris (hit) and Berlin (miss)
    assert row["base_accuracy"] == 0.5 and "n_test_before_filter" not in row


@pytest.mark.slow
def test_cli_filter_base(typed_file, tmp_path):
    args = ["dataset=file", f"dataset.path={typed_file}", *PATCH_LAST_LAYER, f"hydra.run.dir={tmp_path}"]
    result = run_cli(args + ["dataset.filter=base"])
    assert result.returncode == 0, result.stderr
    log = result.stdout + result.stderr
    assert "filter=base kept 2 of 4 test pairs" in log and "filter=base kept 3 of 3 val pairs" in log
    row = pd.read_csv(tmp_path / "iia.csv").iloc[0]
    assert (row["n_test"], row["n_test_before_filter"], row["n_val"], row["n_train"]) == (2, 4, 3, 2)
    assert row["iia"] == 0.5 and row["iia_cf_same_country"] == 0.5 and "iia_cf_other_city" not in row  # Paris hit, Berlin miss
    assert row["base_accuracy"] == 1.0 and row["iia_base_correct"] == 0.5
    again = run_cli(args + ["dataset.filter=none"])  # the filter changes the pairs: the folder refuses the other setting
    assert again.returncode == 2 and "changed: dataset.filter" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_cli_ioi_has_no_types_and_a_bad_filter_is_named(tmp_path):
    result = run_cli(["model=tiny_gpt2", *TINY, "layers=[1]", "output.plots=false", f"hydra.run.dir={tmp_path / 'ioi'}"])
    assert result.returncode == 0, result.stderr
    row = pd.read_csv(tmp_path / "ioi" / "iia.csv").iloc[0]
    assert not [c for c in row.index if c.startswith(("iia_cf_", "n_cf_"))] and row["iia"] == row["iia_cause"]
    assert row["n_base_correct"] <= round(row["base_accuracy"] * row["n_test"])  # flips only; base_accuracy counts the non-flips too
    emptied = run_cli(["model=tiny_gpt2", *TINY, "layers=[1]", "dataset.filter=base", f"hydra.run.dir={tmp_path / 'emptied'}"])
    assert emptied.returncode == 2 and "Traceback" not in emptied.stderr  # the random model answers no IOI prompt right
    assert emptied.stderr.strip().splitlines()[-1].startswith("das-cli: error: dataset.filter=base: the model answers none of the 24 train pairs right")
    bad = run_cli(["model=tiny_gpt2", "dataset.filter=bogus", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == "das-cli: error: dataset.filter=bogus: not a valid choice; valid choices: none, base, both"
