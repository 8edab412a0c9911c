"""`model.name_or_path=` with a broken folder or an unreachable hub id: one line naming the key,
the folder and what is wrong, never a traceback. The folders are tiny random models saved with
save_pretrained, then damaged."""

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import TINY, run_cli

from das_cli.errors import DasError
from das_cli.models import FAMILIES, load_model

CONF = Path(__file__).parents[1] / "conf" / "model"


def saved(model_name: str, folder: Path, tokenizer: bool = True) -> Path:
    lm = load_model(OmegaConf.load(CONF / f"{model_name}.yaml"), "cpu", "float32")
    lm.model.save_pretrained(folder)
    if tokenizer:
        lm.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return saved("tiny_llama", tmp_path_factory.mktemp("models") / "good")


def copy_of(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "model"))


def load(path: Path | str):
    return load_model(OmegaConf.create({"name": "folder", "name_or_path": str(path)}), "cpu", "float32")


def error_of(path: Path | str) -> str:
    with pytest.raises(DasError) as caught:
        load(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"model.name_or_path={path}: ")
    return message


def test_a_saved_folder_loads(good):
    lm = load(good)
    assert lm.family is FAMILIES["llama"] and lm.n_layers == 4
    assert len(lm.tokenizer("When Mary and John", add_special_tokens=False)["input_ids"]) == 4


def test_empty_folder(tmp_path):
    assert f"the folder {tmp_path} is empty" in error_of(tmp_path)


def test_folder_without_config(good, tmp_path):
    folder = copy_of(good, tmp_path)
    (folder / "config.json").unlink()
    assert f"the folder {folder} has no config.json" in error_of(folder)


def test_unknown_model_type_lists_the_supported_families(good, tmp_path):
    folder = copy_of(good, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba9"}))
    message = error_of(folder)
    assert f"config.json in the folder {folder} has model_type 'mamba9'" in message
    assert message.endswith(f"supported families: {', '.join(FAMILIES)}")


def test_truncated_weights(good, tmp_path):
    folder = copy_of(good, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert f"model.safetensors in the folder {folder} is truncated or damaged" in error_of(folder)


def test_folder_without_weights(good, tmp_path):
    folder = copy_of(good, tmp_path)
    (folder / "model.safetensors").unlink()
    assert f"the folder {folder} has no weights" in error_of(folder)


@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_llama"])
def test_folder_without_tokenizer_files(model_name, tmp_path):
    """Without them transformers builds an empty GPT-2 tokenizer (IOI then fails far from the cause)
    or raises about a missing backend (Llama)."""
    folder = saved(model_name, tmp_path / "model", tokenizer=False)
    assert f"the folder {folder} has no tokenizer files" in error_of(folder)


def test_a_tokenizer_with_no_vocabulary_is_refused(good, tmp_path):
    folder = copy_of(good, tmp_path)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"], tokenizer["model"]["merges"] = {}, []
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert "the tokenizer is empty" in error_of(folder)


def test_missing_folder_that_cannot_be_a_hub_id(tmp_path):
    assert "no such folder" in error_of(tmp_path / "missing")


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("das-cli: error: model.name_or_path="), result.stderr
    return lines[0]


@pytest.mark.slow
def test_cli_broken_folder_is_one_line(good, tmp_path):
    folder = copy_of(good, tmp_path)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    result = run_cli(["model=gpt2", f"model.name_or_path={folder}", "layers=[0]", *TINY, f"hydra.run.dir={tmp_path / 'out'}"])
    assert "model.safetensors" in one_line_error(result)


@pytest.mark.slow
def test_cli_unreachable_hub_id_is_one_line(tmp_path):
    """Without internet the hub retries for about 25 s, quietly; with it the id does not exist. Either way: one line."""
    result = args = ["model=gpt2", "model.name_or_path=nonexistent-org/nonexistent-model", "layers=[0]", *TINY]
    result = run_cli([*args, f"hydra.run.dir={tmp_path}"])
    assert "nonexistent-org/nonexistent-model: not a local folder, and the model hub could not provide it" in one_line_error(result)
