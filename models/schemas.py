"""One typed schema per kind of file the toolkit reads (hessian_tools.schema), applied where the file is read.

  META          a toolkit checkpoint's meta.json (model_config = GPTConfig's fields, data, tokenizer, train_config)
  TRAIN_CONFIG  RUN_DIR/train_config.json and meta.json's train_config (models.train_config.TrainConfig's fields)
  STATUS        RUN_DIR/status.json;  METRICS_LINE / SHARPNESS_LINE  a loss / sharpness line of RUN_DIR/metrics.jsonl
  NANOGPT       a nanoGPT ckpt.pt (model_args, iter_num, config);  HF_LLAMA / HF_GPT2  a Hugging Face config.json
  JOB_CONFIG    a torchtitan job config (TOML);  ADAM_SETTINGS  one parameter's AdamW hyperparameters (any source)
`read_json(path, schema, what)` reads a JSON file (a regular, readable file; UTF-8; JSON) and checks it; every
failure is one line naming the file, the field and the expected type.
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch

from hessian_tools.errors import UserError
from hessian_tools.paths import input_file, os_error
from hessian_tools.schema import (Bool, Float, Int, ListOf, MapOf, Nullable, Obj, SchemaError, Spec, Str,
                                  check, dataclass_schema, describe)
from models.config import FIELDS as MODEL_FIELDS
from models.config import POSITIVE, POSITIVE_FLOAT, GPTConfig
from models.data import DATA_FIELDS, DataSpec
from models.train_config import TrainConfig

TOOLKIT_FORMAT = "hessian-tools-checkpoint"
SEED, FRACTION = DATA_FIELDS["seed"], DATA_FIELDS["heldout_fraction"]
NON_NEGATIVE = Float(low=0)

MODEL_CONFIG = dataclass_schema(GPTConfig, **MODEL_FIELDS)
DATA = dataclass_schema(DataSpec, **DATA_FIELDS)
TOKENIZER = Obj({"kind": Str(("char",)), "chars": Str(nonempty=True)})

_TRAIN_RANGES = {**MODEL_FIELDS, "data": Nullable(Str(nonempty=True)), "heldout_fraction": FRACTION,
                 "batch_size": POSITIVE, "steps": POSITIVE, "lr": POSITIVE_FLOAT, "warmup": Int(low=0),
                 "weight_decay": NON_NEGATIVE, "grad_clip": NON_NEGATIVE, "diverge_factor": POSITIVE_FLOAT,
                 "seed": SEED, "save_every": Int(low=0), "device": Str(nonempty=True)}
_TRAIN_NAMES = {f.name for f in dataclasses.fields(TrainConfig)}
# TrainConfig's own fields (a field added there is checked by its annotation until it gets a range here)
TRAIN_CONFIG = dataclass_schema(TrainConfig, **{k: v for k, v in _TRAIN_RANGES.items() if k in _TRAIN_NAMES})

META = Obj({"format": Str((TOOLKIT_FORMAT,)), "version": Str(), "step": Int(low=0), "model_config": MODEL_CONFIG,
            "data": DATA, "tokenizer": TOKENIZER, "train_config": TRAIN_CONFIG, "seed": SEED,
            "initial_loss": Float(), "sampler": Str()},
           optional=("version", "data", "tokenizer", "train_config", "seed", "initial_loss", "sampler"), extra=True)

STATUS = Obj({"status": Str(("completed", "diverged", "interrupted")), "step": Int(low=0), "reason": Nullable(Str()),
              "resume_from": Int(low=0)}, optional=("reason", "resume_from"), extra=True)
# a line without "kind" is a loss line (runs written before tracking)
METRICS_LINE = Obj({"kind": Str(("loss",)), "step": POSITIVE, "loss": Float(), "lr": NON_NEGATIVE,
                    "grad_norm": NON_NEGATIVE, "act_rms": MapOf(NON_NEGATIVE), "tokens_per_s": NON_NEGATIVE},
                   optional=("kind", "lr", "grad_norm", "act_rms", "tokens_per_s"), extra=True)
SHARPNESS_LINE = Obj({"kind": Str(("sharpness",)), "step": Int(low=0), "measure": Str(nonempty=True),
                      "value": Nullable(Float()), "interval": Nullable(ListOf(Nullable(Float()), 2)),
                      "status": Str(nonempty=True)}, optional=("interval",), extra=True)

NANOGPT_ARGS = Obj({"n_layer": POSITIVE, "n_head": POSITIVE, "n_embd": POSITIVE, "block_size": POSITIVE,
                    "vocab_size": POSITIVE, "bias": Bool(), "dropout": MODEL_FIELDS["dropout"]},
                   optional=("bias", "dropout"), extra=True)
NANOGPT = Obj({"model": MapOf(), "model_args": NANOGPT_ARGS, "iter_num": Int(low=0),
               "config": Obj({"learning_rate": POSITIVE_FLOAT}, optional=("learning_rate",), extra=True),
               "optimizer": MapOf()}, optional=("iter_num", "config", "optimizer"), extra=True)

_ROPE = Nullable(Obj({"rope_theta": POSITIVE_FLOAT, "rope_type": Str(), "type": Str()},
                     optional=("rope_theta", "rope_type", "type"), extra=True))
HF_LLAMA = Obj({"vocab_size": POSITIVE, "hidden_size": POSITIVE, "num_hidden_layers": POSITIVE,
                "num_attention_heads": POSITIVE, "num_key_value_heads": Nullable(POSITIVE),
                "intermediate_size": POSITIVE, "max_position_embeddings": POSITIVE, "rms_norm_eps": NON_NEGATIVE,
                "tie_word_embeddings": Bool(), "rope_theta": POSITIVE_FLOAT, "head_dim": Nullable(POSITIVE),
                "hidden_act": Str(), "attention_bias": Bool(), "mlp_bias": Bool(), "rope_scaling": _ROPE,
                "rope_parameters": _ROPE},
               optional=("num_key_value_heads", "tie_word_embeddings", "rope_theta", "head_dim", "hidden_act",
                         "attention_bias", "mlp_bias", "rope_scaling", "rope_parameters"), extra=True)
HF_GPT2 = Obj({"vocab_size": POSITIVE, "n_embd": POSITIVE, "n_layer": POSITIVE, "n_head": POSITIVE,
               "n_positions": POSITIVE, "layer_norm_epsilon": NON_NEGATIVE, "n_inner": Nullable(POSITIVE),
               "activation_function": Str(), "scale_attn_weights": Bool(), "scale_attn_by_inverse_layer_idx": Bool(),
               "tie_word_embeddings": Bool()},
              optional=("n_inner", "activation_function", "scale_attn_weights",
                        "scale_attn_by_inverse_layer_idx", "tie_word_embeddings"), extra=True)

JOB_CONFIG = Obj({"model": Obj({"name": Str(), "flavor": Str(), "norm_type": Str(), "tokenizer_path": Str()},
                               optional=("norm_type", "tokenizer_path"), extra=True),
                  "training": Obj({"seq_len": POSITIVE}, optional=("seq_len",), extra=True),
                  "optimizer": Obj({"lr": POSITIVE_FLOAT}, optional=("lr",), extra=True)},
                 optional=("training", "optimizer"), extra=True)

ADAM_SETTINGS = Obj({"lr": NON_NEGATIVE, "betas": ListOf(Float(low=0, high=1, high_open=True), 2),
                     "eps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE},
                    optional=("lr", "betas", "eps", "weight_decay"), extra=True)


def plain(value):
    """One-element tensors as Python numbers, in lists, tuples and dicts too (what a saved setting may hold)."""
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def read_json(path, schema: Spec, what: str):
    """The JSON value of file `path`, checked against `schema`; one-line UserError for anything else."""
    path = input_file(path, what)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise os_error(exc, path, f"read the {what}") from None
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: the {what} is not UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: the {what} is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    return check(value, schema, str(path))


def read_meta(path) -> dict:
    """A toolkit checkpoint's meta.json, checked (META; data needs its tokenizer)."""
    meta = read_json(path, META, "checkpoint record meta.json")
    if "data" in meta and "tokenizer" not in meta:
        raise SchemaError("tokenizer", "the character tokenizer of the run's data (recorded with data)", None,
                          str(path))
    return meta


def check_metrics_line(line) -> dict:
    """One line of RUN_DIR/metrics.jsonl checked against its kind's schema (METRICS_LINE, SHARPNESS_LINE)."""
    kinds = {"loss": METRICS_LINE, "sharpness": SHARPNESS_LINE}
    kind = line.get("kind", "loss") if isinstance(line, dict) else "loss"
    if kind not in kinds:
        raise SchemaError("kind", "one of 'loss', 'sharpness'", describe(kind))
    return check(line, kinds[kind])


def check_step(value, where: str, field: str = "step") -> int:
    """A step count from a tensor or number: a finite non-negative integer value (e.g. 20.0 is 20)."""
    value = plain(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaError(field, "a non-negative integer", describe(value), where)
    return value
