"""Foreign state dicts (reference / torchtitan, nanoGPT, converted Hugging Face): clean-up, the model config
from tensor shapes and what the source records, and the check that a state dict fits the configured model.

Precedence of settings: inferred from shapes < recorded by the source (nanoGPT model_args, config.json) <
a torchtitan job config < the user's explicit overrides.
"""

import re

import torch
from torch import nn

from hessian_tools.cli.common import flag_for
from hessian_tools.errors import UserError
from models.config import GPT2_FAMILY, LLAMA_FAMILY, GPTConfig
from models.foreign_names import (ARCH_SIGNATURES, DROPPED_SUFFIXES, LLAMA_SHAPE_KEYS, STRIPPED_INFIXES,
                                  STRIPPED_PREFIXES)

NEEDED = {"n_heads": "how many attention heads it has", "seq_len": "its context length",
          "rope_theta": "its RoPE base"}


def clean_name(key: str) -> str:
    for prefix in STRIPPED_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    for infix in STRIPPED_INFIXES:
        key = key.replace(infix, "")
    return key


def clean(state: dict) -> dict:
    """Tensors only, wrapper prefixes removed, foreign buffers (RoPE table, causal mask) dropped."""
    return {clean_name(k): v for k, v in state.items() if torch.is_tensor(v) and not k.endswith(DROPPED_SUFFIXES)}


def rope_table(state: dict):
    """The torchtitan RoPE buffer `freqs_cis` of a raw state dict, or None."""
    return next((v for k, v in state.items() if k.endswith("freqs_cis") and torch.is_tensor(v)), None)


def infer_arch(keys, file) -> str:
    for arch, needles in ARCH_SIGNATURES:
        if all(any(n in k for k in keys) for n in needles):
            return arch
    sample = ", ".join(sorted(keys)[:4])
    raise UserError(f"{file}: unsupported format: keys match no known architecture (first keys: {sample})")


def _first_shape(state: dict, names) -> tuple | None:
    return next((tuple(state[n].shape) for n in names if n in state), None)


def infer_settings(state: dict, freqs, file) -> dict:
    """GPTConfig settings readable off the tensors: the architecture, widths, depth, and from the RoPE table
    `freqs` (complex (positions, head_dim / 2), if saved) the head size, context length and RoPE base."""
    keys = set(state)
    inferred: dict = {"arch": infer_arch(keys, file)}
    layers = [int(m.group(1)) for k in keys if (m := re.match(r"(?:layers|transformer\.h)\.(\d+)\.", k))]
    inferred["n_layers"] = max(layers) + 1 if layers else 0
    if inferred["arch"] in LLAMA_FAMILY:
        inferred["vocab_size"], inferred["dim"] = _first_shape(state, ["tok_embeddings.weight"]) or (0, 0)
        ffn = _first_shape(state, LLAMA_SHAPE_KEYS["gate"])
        head_dim = None
        if torch.is_tensor(freqs) and freqs.is_complex() and freqs.dim() == 2 and freqs.shape[0] > 1:
            head_dim = 2 * freqs.shape[1]
            inferred["seq_len"] = freqs.shape[0]
            step_angle = torch.angle(freqs[1, 1].to(torch.complex128)).item() if freqs.shape[1] > 1 else 0.0
            if step_angle > 0:  # angle of pair 1 at position 1 = theta^(-2 / head_dim)
                inferred["rope_theta"] = float(f"{step_angle ** (-head_dim / 2):.4g}")
        q_norm = _first_shape(state, LLAMA_SHAPE_KEYS["q_norm"])
        if q_norm:
            # the reference's preqknorm normalizes q as a whole (size = the query map's width); per head otherwise
            whole = q_norm[0] == inferred["dim"] and head_dim != q_norm[0]
            inferred["qk_norm_scope"] = "all" if whole else "head"
            head_dim = head_dim or (None if whole else q_norm[0])
        if head_dim and inferred["dim"] % head_dim == 0:
            inferred["n_heads"] = inferred["dim"] // head_dim
    else:
        inferred["vocab_size"], inferred["dim"] = _first_shape(state, ["transformer.wte.weight"]) or (0, 0)
        inferred["seq_len"] = (_first_shape(state, ["transformer.wpe.weight"]) or (0,))[0]
        ffn = _first_shape(state, ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.lin.weight"])
        inferred["bias"] = "transformer.ln_f.bias" in keys
    if ffn:
        inferred["ffn_hidden"] = ffn[0]
    return inferred


def resolve_config(state: dict, freqs, recorded: dict, job, overrides: dict, file) -> GPTConfig:
    """The GPTConfig of a foreign state dict (see the module docstring for the precedence). `job` is a
    models.job_config.JobConfig or None."""
    inferred = infer_settings(state, freqs, file)
    inferred_arch = inferred["arch"]
    job_settings = job.settings if job is not None else {}
    for source, arch in (("its job config's [model] name", job_settings.get("arch")),
                         ("--arch", overrides.get("arch"))):
        if arch is not None and arch != inferred_arch:
            raise UserError(f"{file}: its keys are those of {inferred_arch}, not of {source} {arch}")
    settings = {**inferred, **recorded, **job_settings, **overrides}
    if settings["arch"] in LLAMA_FAMILY and "n_kv_heads" not in settings and settings.get("n_heads"):
        k_rows = _first_shape(state, LLAMA_SHAPE_KEYS["k"])
        if k_rows and settings["dim"] % settings["n_heads"] == 0:
            settings["n_kv_heads"] = max(1, k_rows[0] // (settings["dim"] // settings["n_heads"]))
    needed = ["n_heads", "seq_len"] + (["rope_theta"] if settings["arch"] in LLAMA_FAMILY else [])
    for field in needed:
        if field not in settings:
            hint = " or --job-config FILE.toml (the run's torchtitan config)" if settings["arch"] in LLAMA_FAMILY \
                else ""
            raise UserError(f"{file}: the checkpoint does not say {NEEDED[field]}: pass {flag_for(field)}{hint}")
    return GPTConfig(**settings)


def complete_tied_head(state: dict, config: GPTConfig) -> dict:
    """Restore a tied LM head that a deduplicating saver kept under the embedding's name only."""
    if config.arch in GPT2_FAMILY and "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state = {**state, "lm_head.weight": state["transformer.wte.weight"]}
    if config.tie_embeddings and "output.weight" not in state and "tok_embeddings.weight" in state:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    return state


def check_state(state: dict, model: nn.Module, file, hint: str = ""):
    """UserError unless `state` has exactly the model's keys and shapes, with finite values."""
    expected = model.state_dict()
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise UserError(f"{file}: unknown keys {unknown[:3]}{' ...' if len(unknown) > 3 else ''} "
                        f"for {model.config.arch}; is --arch right?{hint}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{file}: missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}{hint}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"{file}: wrong shape for {key}: the file has {tuple(tensor.shape)}, the "
                            f"configured model needs {tuple(expected[key].shape)}{hint}")
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            raise UserError(f"{file}: tensor {key} holds {str(tensor.dtype).removeprefix('torch.')} values; weights "
                            "must be real floating point (float16, bfloat16, float32 or float64)")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{file}: tensor {key} holds NaN or inf values")
