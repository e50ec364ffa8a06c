"""Opening any supported checkpoint: `open_model`, the `Checkpoint` it returns, and `load_checkpoint`.

Sources, tried in this order on a path:
  toolkit      a checkpoint directory (meta.json), or a run directory (its latest ckpt_NNNNNNN/);
  DCP          a torch.distributed.checkpoint directory (.metadata; torchtitan's step-N/), or a folder of
               step-N/ directories (the latest, as torchtitan resumes);
  Hugging Face a model directory (config.json): GPT2LMHeadModel, LlamaForCausalLM;
  file         a reference / torchtitan state dict (.pt, .pth via torch.load(weights_only=True), or
               .safetensors) or a nanoGPT ckpt.pt.
A foreign checkpoint's config comes from its shapes, what it records, a torchtitan job config and the user's
overrides (models.checkpoint.state_dict); its measurement tokens from models.tokens.
"""

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from hessian_tools.errors import UserError
from hessian_tools.footprint import model_bytes, require_memory
from hessian_tools.paths import input_dir, input_file, is_directory
from hessian_tools.schema import check
from models import data as data_mod
from models.checkpoint.dcp import is_dcp, read_dcp, step_dirs
from models.checkpoint.files import read_safetensors, read_torch
from models.checkpoint.hf import is_hf, read_hf
from models.checkpoint.nanogpt import ADAM_FIELDS, is_nanogpt, read_nanogpt
from models.checkpoint.native import FORMAT, is_native, list_checkpoints, read_native, read_optimizer_state
from models.checkpoint.state_dict import check_state, clean, complete_tied_head, resolve_config, rope_table
from models.config import GPTConfig
from models.gpt import build_model
from models.job_config import read_job_config
from models.schemas import ADAM_SETTINGS, plain
from models.tokens import (TOKEN_FLAG, TOKENIZER_FLAG, TokenOptions, TokenStream, char_stream, token_file_stream,
                           tokenizer_stream)

SOURCE_OPTIONS = ("tokens", "tokenizer", "data", "job_config")


@dataclass
class Checkpoint:
    """A loaded model with what its source says about it. `model` is in eval mode on the requested device.

    meta: what the file records ("format", ...); settings_from: the job config and the explicit overrides that
    shaped the config; tokens: the user's token choices for measurement batches.
    """

    model: nn.Module
    config: GPTConfig
    step: int | None
    path: Path
    run_dir: Path | None
    meta: dict
    tokens: TokenOptions = TokenOptions()
    settings_from: dict = field(default_factory=dict)
    optimizer_reader: Callable | None = None  # () -> {param: {field: tensor}} of a foreign checkpoint
    adam_reader: Callable | None = None  # () -> {param: {lr, betas, eps, weight_decay}} of a foreign checkpoint

    @property
    def is_toolkit(self) -> bool:
        return self.meta.get("format") == FORMAT

    # ---- optimizer state

    def optimizer_state(self) -> dict:
        """{param name: {"exp_avg", "exp_avg_sq", "step"}}: AdamW's state, keyed by model.named_parameters()."""
        state = read_optimizer_state(self.path) if self.is_toolkit else None
        if state is None and self.optimizer_reader is not None:
            state = self.optimizer_reader()
        if not state:
            raise UserError(f"{self.path}: holds no optimizer state (toolkit checkpoints of `train` runs, full "
                            "torchtitan DCP checkpoints and nanoGPT ckpt.pt files do)")
        return state

    def adam_second_moments(self) -> dict:
        """{param name: exp_avg_sq tensor} (Adam's v, not bias-corrected; its step is in optimizer_state)."""
        return {name: s["exp_avg_sq"] for name, s in self.optimizer_state().items() if "exp_avg_sq" in s}

    def adam_settings(self) -> dict:
        """{param name: {"lr", "betas", "eps", "weight_decay"}}: the AdamW hyperparameters the optimizer held
        (a toolkit run: its train config, lr that of the checkpoint's last update)."""
        if self.is_toolkit and "train_config" in self.meta:
            from models.train import TrainConfig, lr_at, make_optimizer

            cfg = TrainConfig(**self.meta["train_config"])
            lr = lr_at(cfg, self.step - 1) if self.step else cfg.lr
            groups = make_optimizer(self.model, cfg).param_groups
            by_param = {id(p): {**{k: g[k] for k in ADAM_FIELDS}, "lr": lr} for g in groups for p in g["params"]}
            return {name: by_param[id(p)] for name, p in self.model.named_parameters()}
        settings = self.adam_reader() if self.adam_reader is not None else None
        if not settings:
            raise UserError(f"{self.path}: records no optimizer settings (lr, betas, eps)")
        return {name: check(plain(s), ADAM_SETTINGS, str(self.path), f"optimizer settings of {name}")
                for name, s in settings.items()}

    def peak_lr(self) -> float | None:
        """The schedule's peak learning rate, where the source records it (a toolkit run's train config, a
        torchtitan job config's [optimizer] lr, nanoGPT's config learning_rate), else None."""
        if self.is_toolkit and "train_config" in self.meta:
            return float(self.meta["train_config"]["lr"])
        job = self.settings_from.get("job_config") or {}
        return job.get("lr") or self.meta.get("learning_rate")

    def restore_optimizer(self, optimizer):
        """Load this checkpoint's AdamW state into `optimizer`, built over self.model's parameters."""
        state = self.optimizer_state()
        params = dict(self.model.named_parameters())
        for name, fields in state.items():
            if name not in params:
                raise UserError(f"{self.path}: optimizer state for unknown parameter {name!r}")
            p = params[name]
            optimizer.state[p] = {k: (v if k == "step" else v.to(p.device)) for k, v in fields.items()}

    # ---- measurement tokens

    def data_spec(self) -> tuple[data_mod.DataSpec, data_mod.CharTokenizer | None]:
        """The text of measurement batches and the run's character tokenizer: a toolkit run's own (with --data
        replacing its path), otherwise --data or the embedded corpus and no tokenizer."""
        if self.is_toolkit and "data" in self.meta:
            spec = data_mod.DataSpec(**self.meta["data"])
            if self.tokens.data is not None:
                spec = dataclasses.replace(spec, path=self.tokens.data)
            return spec, data_mod.CharTokenizer.from_dict(self.meta["tokenizer"])
        return data_mod.DataSpec(path=self.tokens.data), None

    @functools.cached_property
    def token_stream(self) -> TokenStream:
        """The measurement token stream (see models.tokens); a foreign checkpoint whose vocabulary is not the
        text's characters is refused without --tokens or --tokenizer."""
        if self.tokens.tokens is not None:
            return token_file_stream(self.tokens.tokens)
        spec, chars = self.data_spec()
        if self.tokens.tokenizer is not None:
            return tokenizer_stream(self.tokens.tokenizer, spec)
        splits = data_mod.load_splits(spec, chars)
        vocab = splits.tokenizer.vocab_size
        if chars is None and vocab != self.config.vocab_size:
            job = self.settings_from.get("job_config") or {}
            hint = f" (its job config names tokenizer_path {job['tokenizer_path']})" if job.get("tokenizer_path") \
                else ""
            raise UserError(f"{self.path}: the model's vocabulary ({self.config.vocab_size}) is not the {vocab} "
                            f"characters of {spec.name}: measure it on its own tokens with {TOKEN_FLAG} FILE (token "
                            f"ids, e.g. nanoGPT's val.bin) or {TOKENIZER_FLAG} FILE [--data TEXT]{hint}")
        return char_stream(spec, splits.heldout, vocab)

    def token_provenance(self) -> dict:
        """Where the measurement tokens come from: source kind, files and their SHA-256 (models.tokens)."""
        return self.token_stream.provenance

    def measurement_batches(self, n_batches: int, batch_size: int, seq_len: int | None = None, seed: int = 0):
        """[(idx, targets)] of int64 (batch_size, seq_len) CPU tensors: fixed windows of the token stream (a
        text's held-out split, or a whole token file), the same for every checkpoint measured with the same
        arguments. seq_len defaults to the training length a job config gives, else the model's context."""
        stream = self.token_stream
        stream.check_vocab(self.config.vocab_size, str(self.path))
        return stream.batches(n_batches, batch_size, self.measurement_seq_len(seq_len), seed)

    def measurement_seq_len(self, seq_len: int | None = None) -> int:
        """The length of measurement windows: seq_len, else the training length a job config gives, else the
        model's context; UserError beyond the context."""
        default = min(self.settings_from.get("training_seq_len") or self.config.seq_len, self.config.seq_len)
        seq_len = default if seq_len is None else seq_len
        if seq_len > self.config.seq_len:
            raise UserError(f"seq_len {seq_len} exceeds the model's context length {self.config.seq_len}")
        return seq_len


def _resolve(path: Path) -> Path:
    if not os.path.lexists(path):
        raise UserError(f"{path}: no such checkpoint file or directory")
    if not is_directory(path):
        return input_file(path, "checkpoint file")  # a FIFO or device is refused before it is opened
    input_dir(path, "checkpoint directory")
    if not (is_native(path) or is_dcp(path) or is_hf(path)):
        found = list_checkpoints(path) or step_dirs(path)
        if not found:
            raise UserError(f"{path}: holds no checkpoint (no ckpt_NNNNNNN/ with a meta.json, no DCP .metadata or "
                            "step-N/ directory, no Hugging Face config.json)")
        return input_dir(found[-1], "checkpoint directory")
    return path


def _read_file(path: Path):
    """(raw state, recorded settings, meta, optimizer reader, Adam reader) of a state-dict or nanoGPT file."""
    if path.suffix == ".safetensors":
        return read_safetensors(path), {}, {"format": "state_dict"}, None, None
    obj = read_torch(path, str(path))
    if is_nanogpt(obj):
        raw, recorded, meta, moments, settings = read_nanogpt(obj, path)
        return raw, recorded, meta, moments and (lambda: moments), settings and (lambda: settings)
    if isinstance(obj, dict) and obj and all(hasattr(v, "shape") for v in obj.values()):
        return obj, {}, {"format": "state_dict"}, None, None
    raise UserError(f"{path}: unsupported format: expected a state dict of tensors or a nanoGPT checkpoint (a dict "
                    "with 'model' and 'model_args')")


def open_model(source, *, tokens=None, tokenizer=None, data=None, job_config=None, device="cpu",
               **overrides) -> Checkpoint:
    """Open a checkpoint of any supported kind (see the module docstring) and choose its measurement tokens.

    tokens: a nanoGPT .bin or .npy token file; tokenizer: a tokenizer.json or SentencePiece .model applied to
    `data` (a text file; None = the embedded corpus); neither: a character tokenizer on `data`. job_config: a
    torchtitan TOML job config of a foreign Llama-family checkpoint. overrides: GPTConfig fields (the CLI's
    model flags) completing or overriding what the source says (a toolkit checkpoint accepts only norm_backend
    and dropout changes); they are recorded in settings_from.
    Returns a Checkpoint: .model (eval mode, on `device`), .config, .measurement_batches(n_batches,
    batch_size, seq_len=None, seed=0), .token_provenance(), .optimizer_state(), .adam_settings().
    """
    options = TokenOptions(tokens, tokenizer, data)
    job = read_job_config(job_config) if job_config is not None else None
    path = _resolve(Path(source))
    settings_from = {"overrides": dict(overrides)}
    opt_reader = adam_reader = None
    if is_native(path):
        if job is not None:
            raise UserError(f"{path}: a toolkit checkpoint records its config; drop --job-config")
        config, state, meta, step = read_native(path, overrides)
        file, run_dir, hint = path / "model.safetensors", path.parent, ""
    else:
        if is_dcp(path):
            raw, meta, opt_reader, adam_reader, step = read_dcp(path)
            recorded = {}
        elif is_hf(path):
            raw, recorded, meta = read_hf(path)
            step = None
        else:
            raw, recorded, meta, opt_reader, adam_reader = _read_file(path)
            step = meta.get("step")
        state = clean(raw)
        config = resolve_config(state, rope_table(raw), recorded, job, overrides, path)
        state = complete_tied_head(state, config)
        file, run_dir, hint = path, None, ""
        if job is not None:
            settings_from.update(job_config=job.provenance(), training_seq_len=job.training_seq_len)
            hint = f" (the job config {job.path} says {job.model_name} {job.flavor}: is it this run's?)"
    require_memory({"parameters": model_bytes(config)}, f"{path}: the model ({config.n_layers} layers, dim "
                   f"{config.dim}, vocab {config.vocab_size})", device)
    with torch.device("meta"):  # keys, shapes and dtypes checked before the model is allocated
        skeleton = build_model(config)
    check_state(state, skeleton, file, hint)
    model = build_model(config)
    model.load_state_dict(state)
    model.to(device).eval()
    return Checkpoint(model, config, step, path, run_dir, meta, options, settings_from, opt_reader, adam_reader)


def load_checkpoint(path, overrides: dict | None = None, device="cpu") -> Checkpoint:
    """open_model with the CLI's overrides dict: GPTConfig fields plus "tokens", "tokenizer", "data" and
    "job_config"."""
    overrides = dict(overrides or {})
    sources = {k: overrides.pop(k) for k in SOURCE_OPTIONS if k in overrides}
    return open_model(path, device=device, **sources, **overrides)
