"""Flags shared by every command: typed flag values, the one-line parse errors, the model flags and CKPT.

Flag types (`positive_int`, `nonneg_int`, `seed_int`, `finite_float`, `positive_float`, `nonneg_float`,
`probability`, `device`) check a value when it is parsed; `Parser` turns every parse error into one line
naming the flag ("--seq-len must be a positive integer, got 0") and exit status 2.
Each model flag maps one to one onto a GPTConfig field (MODEL_FLAGS); all default to None here, so a command
can tell which ones the user set (`overrides_from_args`). `--data` names the text file a checkpoint's
measurement batches come from; `--tokens`, `--tokenizer` and `--job-config` (SOURCE_FLAGS) say which tokens
measure a checkpoint and how a torchtitan run was configured (see models.checkpoint.open_model).
"""

import argparse
import os
import re

from hessian_tools.schema import MAX_SEED, Float, Int, SchemaError, Spec
from models.config import ARCHS, NORM_BACKENDS

DEVICES = "cpu, cuda, cuda:N or auto"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `PROG: error: FLAG must be ..., got VALUE`, exit status 2.
    Flags are never abbreviated (`lr-sweep --lr 0.1` is an unknown flag, not `--lrs`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message):
        m = re.match(r"argument (\S+?)(?:/\S+)?: (must .*)$", message)
        if m:
            message = f"{m.group(1)} {m.group(2)}"
        self.exit(2, f"{self.prog}: error: {message}\n")


def flag_type(parse, spec: Spec, name: str):
    """An argparse type: `parse(text)` (int or float) checked against `spec` (hessian_tools.schema)."""

    def convert(text: str):
        try:
            return spec.check(parse(text), "")
        except (ValueError, OverflowError, SchemaError):
            raise argparse.ArgumentTypeError(f"must be {spec.expected}, got {text}") from None

    convert.__name__ = name
    return convert


positive_int = flag_type(int, Int(low=1), "positive_int")
nonneg_int = flag_type(int, Int(low=0), "nonneg_int")
seed_int = flag_type(int, Int(low=0, high=MAX_SEED), "seed_int")
finite_float = flag_type(float, Float(), "finite_float")
positive_float = flag_type(float, Float(low=0, low_open=True), "positive_float")
nonneg_float = flag_type(float, Float(low=0), "nonneg_float")
probability = flag_type(float, Float(low=0, high=1, low_open=True, high_open=True), "probability")


def at_least(low: int):
    """An argparse type: an integer >= low."""
    return flag_type(int, Int(low=low), f"int_at_least_{low}")


class GridAction(argparse.Action):
    """--grid LO HI N: finite LO < HI and an integer N >= 2, checked when parsed; stored as (lo, hi, n)."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            lo, hi, n = float(values[0]), float(values[1]), float(values[2])
        except ValueError:
            raise argparse.ArgumentError(self, f"must be three numbers LO HI N, got {' '.join(values)}") from None
        if not (lo < hi and hi - lo < float("inf")):
            raise argparse.ArgumentError(self, f"must be finite LO < HI, got {values[0]} {values[1]}")
        if not (n.is_integer() and n >= 2):
            raise argparse.ArgumentError(self, f"must end in an integer N >= 2 (grid points), got {values[2]}")
        setattr(namespace, self.dest, (lo, hi, int(n)))


def device(text: str) -> str:
    """An argparse type: cpu, cuda, cuda:N or auto (whether CUDA is there is checked when it is used)."""
    if re.fullmatch(r"cpu|auto|cuda(:\d+)?", text):
        return text
    why = {"meta": "meta tensors hold no data", "mps": "the Apple GPU backend is not supported (no double backward "
           "tested there)"}.get(text.split(":")[0], "unknown device")
    raise argparse.ArgumentTypeError(f"must be {DEVICES}, got {text} ({why})")


def require_torchrun(flag: str = "--distributed"):
    """UserError unless the process was started by torchrun (its environment variables are set)."""
    from hessian_tools.errors import UserError

    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise UserError(f"{flag} runs under torchrun (torchrun --nproc_per_node N -m hessian_tools ...), but "
                        f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; drop {flag} to run "
                        "in one process")


# GPTConfig field -> (flag, type, help)
MODEL_FLAGS = {
    "arch": ("--arch", str, f"architecture: {', '.join(ARCHS)}"),
    "dim": ("--dim", positive_int, "model width"),
    "n_layers": ("--layers", positive_int, "number of blocks"),
    "n_heads": ("--heads", positive_int, "attention heads"),
    "n_kv_heads": ("--kv-heads", nonneg_int,
                   "key/value heads of grouped-query attention (Llama family; default = heads)"),
    "seq_len": ("--seq-len", positive_int, "context length (RoPE / position table size)"),
    "ffn_hidden": ("--ffn-hidden", nonneg_int, "feed-forward width (0 = the family default)"),
    "ffn_dim_multiplier": ("--ffn-multiplier", positive_float,
                           "Llama FFN width multiplier (torchtitan's ffn_dim_multiplier)"),
    "multiple_of": ("--multiple-of", positive_int, "Llama FFN width rounded up to a multiple of this (default 32)"),
    "rope_theta": ("--rope-theta", positive_float, "RoPE base (Llama family)"),
    "norm_eps": ("--norm-eps", nonneg_float, "epsilon of every norm"),
    "norm_backend": ("--norm-backend", str, f"norm implementation: {', '.join(NORM_BACKENDS)}"),
}
DATA_FLAG = "--data"
# open_model option -> (flag, metavar, help)
SOURCE_FLAGS = {
    "tokens": ("--tokens", "FILE", "measure on these token ids: nanoGPT's uint16 .bin (e.g. val.bin, used whole) "
                                   "or a 1-D .npy integer array"),
    "tokenizer": ("--tokenizer", "FILE", "measure on --data TEXT (default: the embedded corpus) tokenized by this "
                                         "Hugging Face tokenizer.json or SentencePiece .model"),
    "job_config": ("--job-config", "FILE.toml", "the torchtitan job config of a reference run: [model] name, flavor "
                                                "and norm_type give the model's shape"),
}


def flag_for(field: str) -> str:
    """The command-line flag that sets a GPTConfig field (or an open_model option such as `data`)."""
    if field == "data":
        return DATA_FLAG
    if field in SOURCE_FLAGS:
        return SOURCE_FLAGS[field][0]
    return MODEL_FLAGS[field][0] if field in MODEL_FLAGS else f"{field}=VALUE (open_model)"


def add_model_flags(parser, skip=()):
    """Register the model shape flags (and --data), all defaulting to None.

    `skip` names fields to leave out, for a command whose own flag of that name means something else.
    """
    group = parser.add_argument_group("model settings (override or complete what a checkpoint records)")
    for field, (flag, type_, help_) in MODEL_FLAGS.items():
        if field in skip:
            continue
        choices = ARCHS if field == "arch" else NORM_BACKENDS if field == "norm_backend" else None
        group.add_argument(flag, dest=field, type=type_, default=None, choices=choices, help=help_)
    if "data" not in skip:
        group.add_argument(DATA_FLAG, dest="data", default=None, metavar="FILE",
                           help="UTF-8 text file (default: the embedded pydoc corpus)")


def add_source_flags(parser, skip=()):
    """Register --tokens, --tokenizer and --job-config (all default None)."""
    group = parser.add_argument_group("measurement tokens and foreign runs")
    for option, (flag, metavar, help_) in SOURCE_FLAGS.items():
        if option not in skip:
            group.add_argument(flag, dest=option, default=None, metavar=metavar, help=help_)


def overrides_from_args(args) -> dict:
    """{GPTConfig field, or "data" / "tokens" / "tokenizer" / "job_config": value} for the flags the user set."""
    fields = [*MODEL_FLAGS, "data", *SOURCE_FLAGS]
    return {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}


def open_from_args(args):
    """The checkpoint CKPT with the model and source flags the user set (models.checkpoint.open_model)."""
    from models.checkpoint import load_checkpoint

    return load_checkpoint(args.checkpoint, overrides_from_args(args))


def add_checkpoint_argument(parser):
    """The positional CKPT (a toolkit checkpoint or run dir, a torchtitan DCP dir, a Hugging Face dir, a
    reference state dict or a nanoGPT ckpt.pt) and the source flags."""
    parser.add_argument(
        "checkpoint", metavar="CKPT",
        help="checkpoint dir, run dir (= its latest checkpoint), torchtitan DCP dir (step-N/ or their folder), "
             "Hugging Face model dir, reference state dict (.pt/.pth/.safetensors) or nanoGPT ckpt.pt",
    )
    add_source_flags(parser)
