"""torchtitan job configs (TOML): the model a SimpleGPT-reference run trained, as GPTConfig settings.

Read: [model] name, flavor, norm_type (and tokenizer_path), [training] seq_len, [optimizer] lr (the peak
learning rate of the schedule). The name and flavor pick a
row of models.flavors; vocab_size is not in the file (the reference takes it from its tokenizer) and comes
from the checkpoint's shapes. The RoPE table of the reference holds 2 * [training] seq_len positions, which
is the context length (GPTConfig.seq_len) recorded here; measurements default to [training] seq_len.
"""

import hashlib
from dataclasses import dataclass

from hessian_tools.errors import UserError
from hessian_tools.paths import input_file
from hessian_tools.schema import SchemaError, check
from models.config import llama_ffn_hidden
from models.flavors import MODEL_ARGS_DEFAULTS, REFERENCE_MODELS, flavor_table
from models.schemas import JOB_CONFIG

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

RMS_NORM_TYPES = ("rmsnorm", "fused_rmsnorm")  # both are RMSNorm with a weight; layernorm types have other keys
TORCHTITAN_SEQ_LEN = 2048  # torchtitan's default [training] seq_len


@dataclass(frozen=True)
class JobConfig:
    """What a job config says about the model. settings: GPTConfig fields (no vocab_size)."""

    path: str
    sha256: str
    model_name: str
    flavor: str
    settings: dict
    training_seq_len: int
    tokenizer_path: str | None
    lr: float | None

    def provenance(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "model_name": self.model_name, "flavor": self.flavor,
                "tokenizer_path": self.tokenizer_path, "lr": self.lr}


def _checked(data: dict, path) -> dict:
    """`data` checked against models.schemas.JOB_CONFIG, fields named as TOML does: [training] seq_len."""
    try:
        return check(data, JOB_CONFIG)
    except SchemaError as exc:
        table, _, key = exc.path.partition(".")
        field = f"[{table}] {key}" if key else f"[{table}]"
        raise UserError(f"{path}: {field} {'is missing; it must be' if exc.got is None else 'must be'} "
                        f"{exc.expected}{'' if exc.got is None else ', got ' + exc.got}") from None


def read_job_config(path) -> JobConfig:
    """Parse a torchtitan job config; UserError (one line, naming the field) for anything this cannot map."""
    path = input_file(path, "job config")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the job config ({exc.strerror or exc})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a valid TOML job config ({str(exc).splitlines()[0]})") from None
    data = _checked(data, path)
    model, training = data["model"], data.get("training", {})
    lr = data.get("optimizer", {}).get("lr")
    name, flavor = model["name"], model["flavor"]
    if name not in REFERENCE_MODELS:
        raise UserError(f"{path}: [model] name {name!r} is not a model of the SimpleGPT reference; known names: "
                        f"{', '.join(REFERENCE_MODELS)}")
    table = flavor_table(name)
    if flavor not in table:
        raise UserError(f"{path}: [model] flavor {flavor!r} is not a flavor of {name}; known flavors: "
                        f"{', '.join(table)}")
    norm_type = model.get("norm_type", "rmsnorm")
    if norm_type not in RMS_NORM_TYPES:
        raise UserError(f"{path}: [model] norm_type {norm_type!r} is not supported: the toolkit's Llama variants "
                        f"use RMSNorm ({' or '.join(RMS_NORM_TYPES)})")
    seq_len = training.get("seq_len", TORCHTITAN_SEQ_LEN)
    args = {**MODEL_ARGS_DEFAULTS, **table[flavor]}
    settings = {**REFERENCE_MODELS[name], "dim": args["dim"], "n_layers": args["n_layers"],
                "n_heads": args["n_heads"], "n_kv_heads": args["n_kv_heads"] or args["n_heads"],
                "multiple_of": args["multiple_of"], "ffn_dim_multiplier": args["ffn_dim_multiplier"],
                "ffn_hidden": llama_ffn_hidden(args["dim"], args["multiple_of"], args["ffn_dim_multiplier"]),
                "rope_theta": float(args["rope_theta"]), "norm_eps": args["norm_eps"], "seq_len": 2 * seq_len}
    return JobConfig(str(path), hashlib.sha256(raw).hexdigest(), name, flavor, settings, seq_len,
                     model.get("tokenizer_path"), None if lr is None else float(lr))
