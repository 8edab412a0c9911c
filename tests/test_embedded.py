"""Two cells on the embedded SmolLM2-135M: the real loading path (GGUF -> cached checkpoint) end to end."""

import pandas as pd
import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow  # end to end: subprocesses, a wheel, the embedded model


def test_two_cells_on_the_embedded_model(tmp_path):
    args = [
        "layers=[14,24]", "positions=[last]", "dataset.n_train=40", "dataset.n_test=40",
        "train.epochs=2", "progress=false", f"hydra.run.dir={tmp_path}",
    ]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "iia.csv")
    assert list(table["layer"]) == [14, 24]
    assert (table["model"] == "smollm2_135m").all() and (table["width"] == 576).all()
    # The real model solves IOI: a random network would be near 0.
    assert table["base_accuracy"].iloc[0] >= 0.7
    assert table["iia"].between(0, 1).all() and table["steps"].gt(0).all()
    assert (tmp_path / "heatmap_block_output.png").exists()
