"""Several seeds per cell: the seed list, per-seed cells, mean and spread tables, resume when seeds are added."""

import json
import math

import pandas as pd
import pytest
from conftest import TINY, run_cli
from omegaconf import OmegaConf

from das_cli import config as C
from das_cli import grid
from das_cli.errors import DasError
from das_cli.results import pivot, results_frame, seed_spread, write_results
from das_cli.metrics import Evaluation


def cfg(**values):
    return OmegaConf.merge(C.typed(C.compose(["model=tiny_gpt2"])), values)


def test_seed_lists():
    assert grid.replicates(cfg(seeds=None)) == [None]
    assert grid.replicates(cfg(seed=5, seeds=3)) == [5, 6, 7]
    assert grid.replicates(cfg(seeds=[4, 0])) == [4, 0]


@pytest.mark.parametrize("bad", [0, [1, 1], "many", [0.5]])
def test_bad_seeds_are_a_clear_error(bad):
    with pytest.raises(DasError, match="seeds="):
        C.validate(cfg(seeds=bad))


def rows(values: dict[int, list[float]]) -> list[dict]:
    return [
        {"stream": "block_output", "layer": layer, "position": "last", "heads": "", "seed": seed, "iia": iia}
        for layer, per_seed in values.items() for seed, iia in enumerate(per_seed)
    ]


def test_spread_mean_and_std_by_hand(tmp_path):
    frame = results_frame(rows({0: [0.2, 0.4, 0.9], 1: [0.5, 0.5, 0.5]}))
    spread = seed_spread(frame).set_index("layer")
    assert spread.loc[0, "n_seeds"] == 3 and spread.loc[0, "iia_mean"] == pytest.approx(0.5)
    assert spread.loc[0, "iia_std"] == pytest.approx(math.sqrt(((0.3 ** 2) + (0.1 ** 2) + (0.4 ** 2)) / 2))
    assert spread.loc[1, "iia_std"] == 0 and spread.loc[0, "iia_min"] == 0.2 and spread.loc[0, "iia_max"] == 0.9
    assert pivot(frame)["block_output", ""].loc[0, "last"] == pytest.approx(0.5)
    assert pivot(frame, agg="std")["block_output", ""].loc[0, "last"] == pytest.approx(spread.loc[0, "iia_std"])
    write_results(rows({0: [0.2, 0.4, 0.9], 1: [0.5, 0.5, 0.5]}), tmp_path)
    assert (tmp_path / "iia_seeds.csv").exists() and (tmp_path / "pivot_block_output_std.csv").exists()
    assert (tmp_path / "heatmap_block_output.png").read_bytes()[:4] == b"\x89PNG"


def test_one_seed_per_cell_has_no_spread_table(tmp_path):
    assert seed_spread(results_frame(rows({0: [0.3], 1: [0.4]}))) is None
    write_results(rows({0: [0.3], 1: [0.4]}), tmp_path)
    assert not (tmp_path / "iia_seeds.csv").exists()


def test_isolation_scores_by_hand():
    only_cause = Evaluation(hits={"cause": 3}, counts={"cause": 4}, loss=0.0)
    assert only_cause.scores() == {"iia": 0.75}
    both = Evaluation(hits={"cause": 3, "isolate": 1}, counts={"cause": 4, "isolate": 4}, loss=0.0)
    assert both.scores() == {"iia": 0.75, "iia_cause": 0.75, "iia_isolate": 0.25, "iia_mean": 0.5}
    assert both.iia() == 0.5


@pytest.mark.slow
def test_seeds_end_to_end_and_resume_when_seeds_are_added(tmp_path):
    out = tmp_path / "run"
    grid = ["model=tiny_llama", "layers=[1]", "positions=[last]"] + TINY + [f"hydra.run.dir={out}"]
    first = run_cli(grid + ["seeds=[0,1]"])
    assert first.returncode == 0, first.stderr
    table = pd.read_csv(out / "iia.csv")
    assert sorted(table["seed"]) == [0, 1] and table["cell_seed"].nunique() == 2
    # seed 0 has the id `seed=0` alone gives it: one cell per seed, however the seed was asked for
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["block_output__L01__Plast", "block_output__L01__Plast__S1"]
    assert "mean of 2 seeds" in first.stdout
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/metrics.json")}
    second = run_cli(grid + ["seeds=[0,1,2]"])
    assert second.returncode == 0, second.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the two finished seeds were not rerun
    table = pd.read_csv(out / "iia.csv")
    assert sorted(table["seed"]) == [0, 1, 2]
    assert json.loads((out / "cells" / "block_output__L01__Plast__S2" / "metrics.json").read_text())["seed"] == 2
    assert pd.read_csv(out / "iia_seeds.csv")["n_seeds"].tolist() == [3]
