"""Flags shared by every command that builds or loads a model: the model shape flags of `train` and CKPT.

Each model flag maps one to one onto a GPTConfig field (MODEL_FLAGS); all default to None here, so a command
can tell which ones the user set (`overrides_from_args`). `--data` names the text file a checkpoint's
measurement batches come from.
"""

from models.config import ARCHS, NORM_BACKENDS

# GPTConfig field -> (flag, type, help)
MODEL_FLAGS = {
    "arch": ("--arch", str, f"architecture: {', '.join(ARCHS)}"),
    "dim": ("--dim", int, "model width"),
    "n_layers": ("--layers", int, "number of blocks"),
    "n_heads": ("--heads", int, "attention heads"),
    "seq_len": ("--seq-len", int, "context length (RoPE / position table size)"),
    "ffn_hidden": ("--ffn-hidden", int, "feed-forward width (0 = the family default)"),
    "rope_theta": ("--rope-theta", float, "RoPE base (Llama family)"),
    "norm_eps": ("--norm-eps", float, "epsilon of every norm"),
    "norm_backend": ("--norm-backend", str, f"norm implementation: {', '.join(NORM_BACKENDS)}"),
}
DATA_FLAG = "--data"


def flag_for(field: str) -> str:
    """The command-line flag that sets a GPTConfig field (or `data`)."""
    return DATA_FLAG if field == "data" else MODEL_FLAGS[field][0]


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


def overrides_from_args(args) -> dict:
    """{GPTConfig field or "data": value} for the model flags the user set."""
    fields = [*MODEL_FLAGS, "data"]
    return {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}


def add_checkpoint_argument(parser):
    """The positional CKPT: a toolkit checkpoint dir, a run dir (its latest checkpoint), a reference
    state dict (.pt/.pth/.safetensors) or a nanoGPT ckpt.pt."""
    parser.add_argument(
        "checkpoint", metavar="CKPT",
        help="checkpoint dir, run dir (= its latest checkpoint), reference state dict or nanoGPT ckpt.pt",
    )
