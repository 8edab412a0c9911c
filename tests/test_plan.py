"""mode=plan: the grid, the finished cells and the estimated cost, from the model's config alone."""

import pytest
from conftest import TINY, run_cli

import das_cli
from das_cli import plan as P
from das_cli.errors import DasError
from das_cli.models import load_shape

GRID = ["model=tiny_llama", "layers=all", "positions=[s2,io,last]"] + TINY


def shape(name: str):
    return load_shape(das_cli.compose([f"model={name}"]).model, "cpu", "float32")


def test_block_weights_by_hand():
    # tiny_llama: hidden 64, 4 heads of 16 (2 key/value heads), gated MLP of 128
    assert P.block_weights(shape("tiny_llama").config) == 64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128
    gpt2 = shape("tiny_gpt2").config  # no gate, no grouped keys: 4 h² + 2 h · inner
    inner = gpt2.n_inner or 4 * gpt2.hidden_size
    assert P.block_weights(gpt2) == 4 * gpt2.hidden_size**2 + 2 * gpt2.hidden_size * inner


def test_forward_operations_by_hand():
    config = shape("tiny_llama").config
    per_token = P.block_weights(config) + 2 * 10 * 64
    assert P.forward_operations(config, tokens=3, context=10, blocks=2, answers=5) == 3 * 2 * per_token + 5 * 64 * config.vocab_size


def test_stream_widths_from_the_config():
    tiny = shape("tiny_llama")
    assert P.stream_width(tiny, "block_output", None) == 64 and P.stream_width(tiny, "mlp_activation", None) == 128
    assert P.stream_width(tiny, "key_output", None) == 2 * 16 and P.stream_width(tiny, "query_output", None) == 4 * 16
    assert P.stream_width(tiny, "head_value_output", (0,)) == 16 and P.stream_width(tiny, "head_query_output", None) == 64


def no_weights(monkeypatch):
    """Any attempt to build or load a model fails the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("mode=plan read model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)


def test_the_plan_counts_the_grid_and_the_finished_cells_without_weights(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    das_cli.run(das_cli.compose(GRID[:1] + ["layers=[0,1]", "positions=[last]"] + TINY), folder)  # 2 of the 12 cells
    no_weights(monkeypatch)
    plan = P.make_plan(das_cli.config.checked(das_cli.compose(GRID)), folder)
    assert len(plan.cells) == 12 and plan.finished == 2
    assert plan.frame["cells"].sum() == 12 and plan.frame["finished"].sum() == 2
    assert set(plan.frame["position"]) == {"s2", "io", "last"}
    assert plan.seconds > P.DEVICE_COSTS["cpu"].start_s and plan.peak_bytes > P.DEVICE_COSTS["cpu"].process_bytes
    text = plan.text()
    assert text.startswith("plan: 12 cells, 2 already finished in the folder, 10 to run on cpu") and "hydra.launcher.timeout_min=" in text
    fresh = P.make_plan(das_cli.config.checked(das_cli.compose(GRID)), tmp_path / "none")
    assert fresh.finished == 0 and fresh.seconds > plan.seconds  # the finished cells cost nothing


def test_more_epochs_and_deeper_layers_cost_what_they_should():
    def seconds(extra):
        return P.make_plan(das_cli.config.checked(das_cli.compose(GRID + extra)), None).frame["seconds"].sum()

    assert seconds(["train.epochs=4"]) > seconds(["train.epochs=2"]) > seconds(["train.epochs=1"])
    assert seconds(["layers=[0]"]) > seconds(["layers=[3]"])  # a cell at layer 0 runs every block


def test_a_shard_plans_its_own_cells_and_suggests_a_time_limit():
    plan = P.make_plan(das_cli.config.checked(das_cli.compose(GRID + ["sweep.num_shards=4", "sweep.shard=1"])), None)
    assert len(plan.cells) == 3 and "shard 1 of 4: 3 of 12 cells" in plan.text()
    assert P.suggested_minutes(30) == 10 and P.suggested_minutes(3000) == 100


def test_a_control_counts_every_cell_twice_and_the_random_copy_of_the_weights():
    def plan(*extra):
        return P.make_plan(das_cli.config.checked(das_cli.compose(GRID + list(extra))), None)

    plain, shuffled, random = plan(), plan("analysis.control=shuffled_labels"), plan("analysis.control=random_model")
    start = P.DEVICE_COSTS["cpu"].start_s
    assert shuffled.seconds - start == pytest.approx(2 * (plain.seconds - start))
    assert shuffled.peak_bytes == plain.peak_bytes < random.peak_bytes
    assert any("trained and scored twice" in note for note in random.notes)


def test_a_dim_wider_than_a_cell_is_an_error_before_any_weight():
    with pytest.raises(DasError, match=r"intervention.dim=65: must be between 1 and 64 \(the width of cell block_output__L00__Ps2\)"):
        P.make_plan(das_cli.config.checked(das_cli.compose(GRID + ["intervention.dim=65"])), None)


def test_the_notebook_run_returns_the_plan(tmp_path):
    frame = das_cli.run(das_cli.compose(GRID + ["mode=plan"]), tmp_path / "nb")
    assert frame["cells"].sum() == 12 and not (tmp_path / "nb" / "cells").exists()


@pytest.mark.slow
def test_mode_plan_on_the_command_line(tmp_path):
    result = run_cli(["mode=plan", "layers=all", "positions=[s2,io,last]", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("plan: 90 cells, 0 already finished in the folder, 90 to run on cpu"), result.stdout
    assert not (tmp_path / "run").exists()  # nothing written: no folder, no Hydra files
    many = run_cli(["-m", "mode=plan", "layers=[0,1]", f"hydra.sweep.dir={tmp_path / 'multi'}"])
    assert many.returncode == 2 and many.stderr.strip().startswith("das-cli: error: mode=plan: plans one run; drop -m")
    bad = run_cli(["mode=dry", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert bad.returncode == 2 and "mode=dry: valid choices: run, plan" in bad.stderr
