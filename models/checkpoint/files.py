"""Safe readers for tensor files: safetensors, and torch.load with weights_only=True (never arbitrary pickles).

Every failure is a UserError of one line naming the file.
"""

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hessian_tools.errors import UserError
from hessian_tools.paths import input_file


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def read_safetensors(file: Path) -> dict:
    input_file(file, "weights file")  # a FIFO would block the reader
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{file}: cannot read it (truncated or corrupt?): {first_line(exc)}") from None


def read_torch(file, what: str = "file"):
    """torch.load(weights_only=True) of a file path or a seekable binary stream (`what` names it in errors)."""
    if isinstance(file, (str, Path)):
        input_file(file, "checkpoint file")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise UserError(f"{what}: holds pickled objects beyond tensors and plain containers, which are never "
                            "unpickled here (weights_only=True); re-save it as a plain state dict or as "
                            "safetensors (a torchtitan run: open its DCP step-N/ directory itself)") from None
        raise UserError(f"{what}: cannot read it (truncated or corrupt): {first_line(exc)}") from None
    except Exception as exc:  # torch raises many types for truncated/corrupt files
        raise UserError(f"{what}: cannot read it (truncated, corrupt or not a torch.save file): "
                        f"{first_line(exc)}") from None


def read_weights(file: Path) -> dict:
    """A state dict from .safetensors or a torch.save file (weights only)."""
    return read_safetensors(file) if file.suffix == ".safetensors" else read_torch(file, str(file))
