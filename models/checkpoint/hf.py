"""Hugging Face model directories: config.json with model.safetensors (or a sharded index of them), or
pytorch_model.bin (read with weights_only=True).

GPT2LMHeadModel maps onto `gpt2`: nanoGPT's names, the Conv1D weights ((in, out) in the file) transposed,
GELU tanh-approximated when the config says gelu_new. LlamaForCausalLM maps onto `llama2`: torchtitan's
names, and q_proj / k_proj rows re-ordered. Hugging Face rotates the pairs (x_i, x_{i + head_dim/2}) of each
head (rotate-half RoPE; its conversion script permutes Meta's weights into that layout), the toolkit rotates
adjacent pairs (x_{2i}, x_{2i+1}) as torchtitan does: row i of a head goes to 2i, row i + head_dim/2 to 2i + 1.
The same permutation of q and k leaves every attention score, hence the logits, unchanged. The conversions
are linear maps of the tensors, so `to_toolkit` also carries a direction (e.g. an HVP probe) across.
"""

import os
import re
from pathlib import Path

import torch

from hessian_tools.errors import UserError
from hessian_tools.paths import is_directory, is_regular
from hessian_tools.schema import MapOf, Obj, Str, check
from models.checkpoint.files import read_weights
from models.foreign_names import HF_GPT2_CONFIG, HF_GPT2_CONV1D, HF_LLAMA_CONFIG, HF_LLAMA_NAMES
from models.schemas import HF_GPT2, HF_LLAMA, read_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


HF_CONFIG = Obj({"model_type": Str()}, optional=("model_type",), extra=True)
SHARD_INDEX = Obj({"weight_map": MapOf(Str(nonempty=True))}, extra=True)


def is_hf(path: Path) -> bool:
    return is_directory(path) and is_regular(path / "config.json")


def _config(path: Path) -> dict:
    return read_json(path / "config.json", HF_CONFIG, "Hugging Face config")


def _weights(path: Path) -> dict:
    for name in WEIGHT_FILES:
        file = path / name
        if not os.path.lexists(file):
            continue
        if not name.endswith(".index.json"):
            return read_weights(file)
        shards = sorted(set(read_json(file, SHARD_INDEX, "shard index")["weight_map"].values()))
        state = {}
        for shard in shards:
            if Path(shard).name != shard or not os.path.lexists(path / shard):
                raise UserError(f"{file}: names shard {shard!r}, which is not a file of {path}")
            state.update(read_weights(path / shard))
        return state
    raise UserError(f"{path}: has a config.json but no weights ({', '.join(WEIGHT_FILES)})")


def _settings(config: dict, table: dict) -> dict:
    """GPTConfig settings from a checked config (absent or null optional keys: untied, plain multi-head)."""
    return {field: config[key] for key, field in table.items() if config.get(key) is not None}


def _refuse(file, field, value, why):
    raise UserError(f"{file}: config.json has {field} = {value!r}, {why}")


def _rope_theta(config: dict, file) -> float:
    params = config.get("rope_parameters") or {}  # both checked by HF_LLAMA
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        _refuse(file, "rope type", kind, "but only plain RoPE (rope_type default) is implemented")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def llama_settings(config: dict, file) -> dict:
    config = check(config, HF_LLAMA, str(file))
    settings = {"arch": "llama2", **_settings(config, HF_LLAMA_CONFIG), "rope_theta": _rope_theta(config, file)}
    for field, wanted in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(field, wanted) != wanted:
            _refuse(file, field, config[field], f"the toolkit's llama2 has {wanted}")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * settings["n_heads"] != settings["dim"]:
        _refuse(file, "head_dim", head_dim, "but the toolkit needs head_dim = hidden_size / num_attention_heads")
    return settings


def gpt2_settings(config: dict, file) -> dict:
    config = check(config, HF_GPT2, str(file))
    settings = {"arch": "gpt2", **_settings(config, HF_GPT2_CONFIG), "bias": True}
    act = config.get("activation_function", "gelu_new")
    if act not in GELU:
        _refuse(file, "activation_function", act, f"not one of {', '.join(GELU)}")
    settings["gelu_approximate"] = GELU[act]
    if config.get("n_inner"):
        settings["ffn_hidden"] = config["n_inner"]
    for field, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("tie_word_embeddings", True)):
        if config.get(field, wanted) != wanted:
            _refuse(file, field, config[field], f"the toolkit's gpt2 has {wanted}")
    return settings


def _heads_to_adjacent_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (i, i + d/2) to adjacent pairs (2i, 2i + 1)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _llama_name(key: str) -> str | None:
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", key)
    template = f"model.layers.{{i}}.{m.group(2)}" if m else key
    name = HF_LLAMA_NAMES.get(template)
    return None if name is None else name.replace("{i}", m.group(1) if m else "")


def to_toolkit(state: dict, settings: dict) -> dict:
    """A Hugging Face state dict (or a direction over its parameters) in the toolkit's names and layout."""
    if settings["arch"] == "gpt2":
        out = {}
        for key, value in state.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers of older saves
            name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
            out[name] = value.t() if name.endswith(HF_GPT2_CONV1D) else value
        return out
    out = {}
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = _llama_name(key)
        if name is None:
            raise UserError(f"unexpected key {key!r} in a LlamaForCausalLM state dict")
        if name.endswith("attention.wq.weight"):
            value = _heads_to_adjacent_pairs(value, settings["n_heads"])
        elif name.endswith("attention.wk.weight"):
            value = _heads_to_adjacent_pairs(value, settings.get("n_kv_heads", settings["n_heads"]))
        out[name] = value
    return out


def read_hf(path: Path):
    """(state dict in the toolkit's names, recorded settings, meta) of a Hugging Face model directory."""
    config = _config(path)
    file = path / "config.json"
    model_type = config.get("model_type")
    if model_type == "llama":
        settings = llama_settings(config, file)
    elif model_type == "gpt2":
        settings = gpt2_settings(config, file)
    else:
        raise UserError(f"{file}: model_type {model_type!r} is not supported; Hugging Face directories of gpt2 "
                        "(GPT2LMHeadModel) and llama (LlamaForCausalLM) are")
    try:
        state = to_toolkit(_weights(path), settings)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    meta = {"format": "huggingface", "model_type": model_type, "architectures": config.get("architectures")}
    return state, settings, meta
