"""The toolkit's own checkpoint format.

RUN_DIR/ckpt_{step:07d}/ holds
  model.safetensors      the model's state dict (tied weights stored under both names),
  optimizer.safetensors  AdamW state: "{param}.exp_avg", "{param}.exp_avg_sq", "{param}.step",
  meta.json              {"format", "version", "step", "model_config", ...caller's meta: data spec,
                          tokenizer, train config, seed, initial loss}.
A checkpoint is written into a hidden temporary directory, fsynced, then renamed into place, so every
`ckpt_*` directory is complete.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from hessian_tools import __version__
from hessian_tools.cli.common import flag_for
from hessian_tools.errors import UserError
from hessian_tools.paths import fsync_dir, is_directory, is_regular, os_error
from models.checkpoint.files import read_safetensors
from models.config import GPTConfig
from models.schemas import TOOLKIT_FORMAT as FORMAT
from models.schemas import read_meta

CKPT_RE = re.compile(r"^ckpt_(\d{7})$")
# Settings a toolkit checkpoint may be loaded with differently from how it was trained.
FREE_OVERRIDES = ("norm_backend", "dropout")


def _fsync_file(path: Path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _plain(tensors: dict) -> dict:
    """Detached, contiguous CPU copies (safetensors refuses shared storage, e.g. tied weights)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def save_checkpoint(run_dir, step: int, model: nn.Module, optimizer, meta: dict) -> Path:
    """Write RUN_DIR/ckpt_{step:07d}/ atomically and return its path; an existing one is replaced.

    `optimizer` is a torch.optim.AdamW over model.named_parameters() (or None); `meta` must be JSON-able.
    A write that fails (a full disk, an I/O error) removes what it began and raises a one-line UserError; the
    run's other checkpoints are untouched.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt_{step:07d}"
    tmp = run_dir / f".tmp_ckpt_{step:07d}_{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_checkpoint(tmp, step, model, optimizer, meta)
        if final.exists():
            old = run_dir / f".old_ckpt_{step:07d}_{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        fsync_dir(run_dir)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(exc, final, "write the checkpoint") from None
    return final


def _write_checkpoint(tmp: Path, step: int, model: nn.Module, optimizer, meta: dict):
    """The files of one checkpoint in directory `tmp`, fsynced."""
    save_file(_plain(model.state_dict()), tmp / "model.safetensors")
    if optimizer is not None:
        state = {}
        for name, p in model.named_parameters():
            for key, value in optimizer.state.get(p, {}).items():
                state[f"{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(float(value))
        save_file(_plain(state), tmp / "optimizer.safetensors")
    record = {"format": FORMAT, "version": __version__, "step": step, "model_config": model.config.to_dict(), **meta}
    (tmp / "meta.json").write_text(json.dumps(record, indent=1))
    for f in tmp.iterdir():
        _fsync_file(f)
    fsync_dir(tmp)


def list_checkpoints(run_dir) -> list[Path]:
    """The complete checkpoints of a run directory, sorted by step."""
    run_dir = Path(run_dir)
    if not is_directory(run_dir):
        return []
    found = [p for p in run_dir.iterdir() if CKPT_RE.match(p.name) and is_regular(p / "meta.json")]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def is_native(path: Path) -> bool:
    return is_directory(path) and is_regular(path / "meta.json")


def read_native(path: Path, overrides: dict):
    """(config, state dict, meta, step) of a toolkit checkpoint directory. overrides may change only
    FREE_OVERRIDES; any other must agree with the recorded config."""
    meta = read_meta(path / "meta.json")
    settings, step = dict(meta["model_config"]), meta["step"]
    for key, value in overrides.items():
        if key not in FREE_OVERRIDES and key in settings and settings[key] != value:
            raise UserError(f"{path}: the checkpoint records {key}={settings[key]!r}; "
                            f"{flag_for(key)} {value} contradicts it (drop the flag)")
        settings[key] = value
    config = GPTConfig.from_dict(settings)
    model_file = path / "model.safetensors"
    if not os.path.lexists(model_file):
        raise UserError(f"{path}: missing model.safetensors")
    return config, read_safetensors(model_file), meta, step


def read_optimizer_state(path: Path) -> dict | None:
    """{param name: {"exp_avg", "exp_avg_sq", "step"}} from optimizer.safetensors, or None without one."""
    file = path / "optimizer.safetensors"
    if not os.path.lexists(file):
        return None
    state: dict = {}
    for key, value in read_safetensors(file).items():
        name, _, field = key.rpartition(".")
        state.setdefault(name, {})[field] = value
    return state
