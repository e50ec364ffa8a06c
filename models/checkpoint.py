"""Checkpoints: the toolkit's own format, and loading of reference-implementation and nanoGPT state dicts.

Toolkit format: RUN_DIR/ckpt_{step:07d}/ holding
  model.safetensors      the model's state dict (tied weights stored under both names),
  optimizer.safetensors  AdamW state: "{param}.exp_avg", "{param}.exp_avg_sq", "{param}.step",
  meta.json              {"format", "version", "step", "model_config", ...caller's meta: data spec,
                          tokenizer, train config, seed, initial loss}.
A checkpoint is written into a hidden temporary directory, fsynced, then renamed into place, so every
`ckpt_*` directory is complete. Foreign files are read with safetensors or `torch.load(weights_only=True)`.
"""

import dataclasses
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hessian_tools import __version__
from hessian_tools.cli.common import flag_for
from hessian_tools.errors import UserError
from models import data as data_mod
from models.config import GPT2_FAMILY, LLAMA_FAMILY, GPTConfig
from models.foreign_names import ARCH_SIGNATURES, DROPPED_SUFFIXES, NANOGPT_MODEL_ARGS, STRIPPED_PREFIXES
from models.gpt import build_model

FORMAT = "hessian-tools-checkpoint"
CKPT_RE = re.compile(r"^ckpt_(\d{7})$")
# Settings a toolkit checkpoint may be loaded with differently from how it was trained.
FREE_OVERRIDES = ("norm_backend", "dropout")


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _plain(tensors: dict) -> dict:
    """Detached, contiguous CPU copies (safetensors refuses shared storage, e.g. tied weights)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def save_checkpoint(run_dir, step: int, model: nn.Module, optimizer, meta: dict) -> Path:
    """Write RUN_DIR/ckpt_{step:07d}/ atomically and return its path; an existing one is replaced.

    `optimizer` is a torch.optim.AdamW over model.named_parameters() (or None); `meta` must be JSON-able.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"ckpt_{step:07d}"
    tmp = run_dir / f".tmp_ckpt_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
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
    _fsync_dir(tmp)
    if final.exists():
        old = run_dir / f".old_ckpt_{step:07d}_{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(run_dir)
    return final


def list_checkpoints(run_dir) -> list[Path]:
    """The complete checkpoints of a run directory, sorted by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if CKPT_RE.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


@dataclass
class Checkpoint:
    """A loaded model with what its file says about it. `model` is in eval mode on the requested device."""

    model: nn.Module
    config: GPTConfig
    step: int | None
    path: Path
    run_dir: Path | None
    meta: dict
    data_override: str | None = None

    @property
    def is_toolkit(self) -> bool:
        return self.meta.get("format") == FORMAT

    def optimizer_state(self) -> dict:
        """{param name: {"exp_avg", "exp_avg_sq", "step"}} from optimizer.safetensors."""
        file = self.path / "optimizer.safetensors" if self.is_toolkit else None
        if file is None or not file.is_file():
            raise UserError(f"{self.path}: holds no optimizer state (only toolkit checkpoints of `train` runs do)")
        tensors = _read_safetensors(file)
        state: dict = {}
        for key, value in tensors.items():
            name, _, field = key.rpartition(".")
            state.setdefault(name, {})[field] = value
        return state

    def adam_second_moments(self) -> dict:
        """{param name: exp_avg_sq tensor} (Adam's v, not bias-corrected; its step is in optimizer_state)."""
        return {name: s["exp_avg_sq"] for name, s in self.optimizer_state().items() if "exp_avg_sq" in s}

    def restore_optimizer(self, optimizer):
        """Load this checkpoint's AdamW state into `optimizer`, built over self.model's parameters."""
        state = self.optimizer_state()
        params = dict(self.model.named_parameters())
        for name, fields in state.items():
            if name not in params:
                raise UserError(f"{self.path}: optimizer state for unknown parameter {name!r}")
            p = params[name]
            optimizer.state[p] = {k: (v if k == "step" else v.to(p.device)) for k, v in fields.items()}

    def data_spec(self) -> tuple[data_mod.DataSpec, data_mod.CharTokenizer | None]:
        """The run's data spec and tokenizer; foreign checkpoints get the embedded corpus (or --data)."""
        if self.is_toolkit and "data" in self.meta:
            spec = data_mod.DataSpec(**self.meta["data"])
            if self.data_override is not None:
                spec = dataclasses.replace(spec, path=self.data_override)
            return spec, data_mod.CharTokenizer.from_dict(self.meta["tokenizer"])
        spec = data_mod.DataSpec(path=self.data_override)
        chars = data_mod.load_splits(spec).tokenizer.vocab_size
        if chars > self.config.vocab_size:
            raise UserError(
                f"{self.path}: the model's vocabulary ({self.config.vocab_size}) is smaller than the "
                f"{chars} characters of {spec.name}; pass {flag_for('data')} FILE with the text it was trained on"
            )
        return spec, None

    def measurement_batches(self, n_batches: int, batch_size: int, seq_len: int | None = None, seed: int = 0):
        """[(idx, targets)] of int64 (batch_size, seq_len) CPU tensors: fixed held-out batches of the run's data
        (see models.data.measurement_batches); seq_len defaults to the model's context length."""
        spec, tokenizer = self.data_spec()
        seq_len = self.config.seq_len if seq_len is None else seq_len
        if seq_len > self.config.seq_len:
            raise UserError(f"seq_len {seq_len} exceeds the model's context length {self.config.seq_len}")
        return data_mod.measurement_batches(spec, n_batches, batch_size, seq_len, seed, tokenizer)


def _read_safetensors(file: Path) -> dict:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{file}: cannot read it (truncated or corrupt?): {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _read_torch(file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise UserError(f"{file}: holds pickled objects beyond tensors and plain containers, which are never "
                            "unpickled here (weights_only=True); re-save it as a plain state dict or as "
                            "safetensors") from None
        raise UserError(f"{file}: cannot read it (truncated or corrupt): {_first_line(exc)}") from None
    except Exception as exc:  # torch raises many types for truncated/corrupt files
        raise UserError(f"{file}: cannot read it (truncated, corrupt or not a torch.save file): "
                        f"{_first_line(exc)}") from None


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint file or directory")
    if path.is_dir() and not (path / "meta.json").is_file():
        found = list_checkpoints(path)
        if not found:
            raise UserError(f"{path}: holds no checkpoint (no ckpt_NNNNNNN/ directory with a meta.json)")
        return found[-1]
    return path


def _strip(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.endswith(DROPPED_SUFFIXES):
            continue
        out[key] = value
    return out


def _infer_arch(keys, file: Path) -> str:
    for arch, needles in ARCH_SIGNATURES:
        if all(any(n in k for k in keys) for n in needles):
            return arch
    sample = ", ".join(sorted(keys)[:4])
    raise UserError(f"{file}: unsupported format: keys match no known architecture (first keys: {sample})")


def _foreign_config(state: dict, freqs, fixed: dict, overrides: dict, file: Path) -> GPTConfig:
    """GPTConfig from tensor shapes (and the RoPE table `freqs`, complex (seq_len, head_dim / 2), if saved),
    then what the file records (`fixed`), then the user's overrides."""
    keys = set(state)
    arch = _infer_arch(keys, file)
    if overrides.get("arch", arch) != arch:
        raise UserError(f"{file}: its keys are those of {arch}, not of --arch {overrides['arch']}")
    shape = lambda key: tuple(state[key].shape) if key in state else None  # noqa: E731
    inferred: dict = {"arch": arch}
    layers = [int(m.group(1)) for k in keys if (m := re.match(r"(?:layers|transformer\.h)\.(\d+)\.", k))]
    inferred["n_layers"] = max(layers) + 1 if layers else 0
    if arch in LLAMA_FAMILY:
        inferred["vocab_size"], inferred["dim"] = shape("tok_embeddings.weight") or (0, 0)
        ffn = shape("layers.0.feed_forward.w1.weight") or shape("layers.0.feed_forward.sn1.lin.weight")
        head_dim = None
        if shape("layers.0.attention.q_norm.weight"):
            head_dim = shape("layers.0.attention.q_norm.weight")[0]
        if torch.is_tensor(freqs) and freqs.is_complex() and freqs.dim() == 2 and freqs.shape[0] > 1:
            head_dim = head_dim or 2 * freqs.shape[1]
            inferred["seq_len"] = freqs.shape[0]
            step_angle = torch.angle(freqs[1, 1].to(torch.complex128)).item() if freqs.shape[1] > 1 else 0.0
            if step_angle > 0:  # angle of pair 1 at position 1 = theta^(-2 / head_dim)
                inferred["rope_theta"] = float(f"{step_angle ** (-head_dim / 2):.4g}")
        if head_dim and inferred["dim"] % head_dim == 0:
            inferred["n_heads"] = inferred["dim"] // head_dim
    else:
        inferred["vocab_size"], inferred["dim"] = shape("transformer.wte.weight") or (0, 0)
        inferred["seq_len"] = (shape("transformer.wpe.weight") or (0,))[0]
        ffn = shape("transformer.h.0.mlp.c_fc.weight") or shape("transformer.h.0.mlp.c_fc.lin.weight")
        inferred["bias"] = "transformer.ln_f.bias" in keys
    if ffn:
        inferred["ffn_hidden"] = ffn[0]
    settings = {**inferred, **fixed, **{k: v for k, v in overrides.items() if k != "data"}}
    needed = ["n_heads", "seq_len"] + (["rope_theta"] if arch in LLAMA_FAMILY else [])
    for field in needed:
        if field not in settings:
            what = {"n_heads": "how many attention heads it has", "seq_len": "its context length",
                    "rope_theta": "its RoPE base"}[field]
            raise UserError(f"{file}: the checkpoint does not say {what}: pass {flag_for(field)}")
    return GPTConfig(**settings)


def _read_foreign(file: Path, overrides: dict):
    """(config, state dict, meta) of a reference state dict or a nanoGPT ckpt.pt."""
    if file.suffix == ".safetensors":
        raw, fixed, meta = _read_safetensors(file), {}, {"format": "state_dict"}
    else:
        obj = _read_torch(file)
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and isinstance(obj.get("model_args"), dict):
            args = obj["model_args"]
            fixed = {NANOGPT_MODEL_ARGS[k]: v for k, v in args.items() if k in NANOGPT_MODEL_ARGS}
            raw, meta = obj["model"], {"format": "nanogpt", "model_args": args}
            if "iter_num" in obj:
                meta["step"] = int(obj["iter_num"])
        elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
            raw, fixed, meta = obj, {}, {"format": "state_dict"}
        else:
            raise UserError(f"{file}: unsupported format: expected a state dict of tensors or a nanoGPT "
                            "checkpoint (a dict with 'model' and 'model_args')")
    raw = {k: v for k, v in raw.items() if torch.is_tensor(v)}
    state = _strip(raw)
    freqs = next((v for k, v in raw.items() if k.endswith("freqs_cis")), None)
    config = _foreign_config(state, freqs, fixed, overrides, file)
    if config.arch in GPT2_FAMILY and "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied; deduplicating savers keep one name
    return config, state, meta


def _check_state(state: dict, model: nn.Module, file: Path):
    expected = model.state_dict()
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise UserError(f"{file}: unknown keys {unknown[:3]}{' ...' if len(unknown) > 3 else ''} "
                        f"for {model.config.arch}; is --arch right?")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{file}: missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(f"{file}: wrong shape for {key}: the file has {tuple(tensor.shape)}, the "
                            f"configured model needs {tuple(expected[key].shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{file}: tensor {key} holds NaN or inf values")


def load_checkpoint(path, overrides: dict | None = None, device="cpu") -> Checkpoint:
    """Load a toolkit checkpoint dir, a run dir (its latest checkpoint), a reference-implementation state
    dict (.pt/.pth via torch.load(weights_only=True), or .safetensors) or a nanoGPT ckpt.pt.

    overrides: {GPTConfig field: value} (plus "data": a text file for measurement batches) from the model
    flags; they complete what a foreign file cannot say. A toolkit checkpoint accepts only norm_backend and
    dropout changes; any other override must agree with the recorded config.
    """
    overrides = dict(overrides or {})
    data_override = overrides.pop("data", None)
    path = _resolve(Path(path))
    if path.is_dir():
        meta_file = path / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
            settings = dict(meta["model_config"])
            step = int(meta["step"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{meta_file}: not a valid checkpoint record ({_first_line(exc)})") from None
        for key, value in overrides.items():
            if key not in FREE_OVERRIDES and key in settings and settings[key] != value:
                raise UserError(f"{path}: the checkpoint records {key}={settings[key]!r}; "
                                f"{flag_for(key)} {value} contradicts it (drop the flag)")
            settings[key] = value
        config = GPTConfig.from_dict(settings)
        model_file = path / "model.safetensors"
        if not model_file.is_file():
            raise UserError(f"{path}: missing model.safetensors")
        state, file, run_dir = _read_safetensors(model_file), model_file, path.parent
    else:
        config, state, meta = _read_foreign(path, overrides)
        step, file, run_dir = meta.get("step"), path, None
    model = build_model(config)
    _check_state(state, model, file)
    model.load_state_dict(state)
    model.to(device).eval()
    return Checkpoint(model, config, step, path, run_dir, meta, data_override)
