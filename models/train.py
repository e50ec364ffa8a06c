"""Training runs: AdamW with warm-up and linear decay, checkpoints, metrics, resume, divergence detection.

Recipe: AdamW, betas (0.9, 0.95), eps 1e-8; lr rises linearly over `warmup` steps to `lr`, then falls
linearly to 0 at `steps`; gradients clipped to global norm `grad_clip` (0 = no clipping). Weight decay
applies to the weights of linear maps only; embeddings (including the GPT-2 LM head, tied to `wte`), norm
gains and biases are not decayed.

Steps count optimizer updates. Update s (0-based) uses training batch s, drawn with a generator seeded by
(seed, s) (see models.data), and training runs use no dropout: the weights, AdamW state and step in a
checkpoint are all a resumed run needs to repeat exactly what the uninterrupted run would have done.
The metrics line {"step": n, ...} (n = 1..steps) holds the loss of batch n - 1 before the n-th update, that
update's lr and pre-clip gradient norm, the RMS of the residual stream after each block ("act_rms":
{block name: value}, from the same forward pass) and "tokens_per_s" (wall clock of the step).

A run diverges when a loss or gradient norm is not finite, or a loss exceeds `diverge_factor` times the
first step's loss; the run then stops and RUN_DIR/status.json says {"status": "diverged", ...}.
"""

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from hessian_tools.errors import UserError
from models.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from models.data import load_splits, training_batch
from models.gpt import build_model, next_token_loss
from models.sites import blocks
from models.train_config import TrainConfig

CONFIG_FILE, METRICS_FILE, STATUS_FILE = "train_config.json", "metrics.jsonl", "status.json"
# Settings that may differ between the start and the resumption of one run.
RESUMABLE_DIFFERENCES = ("device", "norm_backend")


@dataclass(frozen=True)
class TrainResult:
    status: str  # "completed" or "diverged"
    step: int  # last completed update
    run_dir: Path
    reason: str | None = None


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of update `step` (0-based): linear warm-up to cfg.lr, then linear decay to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * (cfg.steps - step) / max(1, cfg.steps - cfg.warmup)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on linear-map weights only (see module docstring)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    return resolved


def _write_json(path: Path, record: dict):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    """Complete metrics lines (a line cut short by a kill is dropped)."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return lines


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig):
    """Create RUN_DIR, or check that an existing one holds this same run; returns the recorded status."""
    config_file = run_dir / CONFIG_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file, not a run directory; choose a new or empty --out")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not config_file.is_file():
            raise UserError(f"{run_dir}: not empty and not a training run; choose a new or empty --out")
        recorded = json.loads(config_file.read_text())
        mine = cfg.to_dict()
        diffs = [f"{k}: {recorded.get(k)!r} there, {mine[k]!r} now" for k in mine
                 if k not in RESUMABLE_DIFFERENCES and recorded.get(k) != mine[k]]
        if diffs:
            raise UserError(f"{run_dir} holds a run with different settings ({'; '.join(diffs[:3])}); "
                            "choose another --out or the same settings to resume")
        status_file = run_dir / STATUS_FILE
        return json.loads(status_file.read_text()) if status_file.is_file() else None
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(config_file, cfg.to_dict())
    return None


def train(cfg: TrainConfig, run_dir, progress: bool = True) -> TrainResult:
    """Run (or resume, or just report) the training run `cfg` in `run_dir`.

    A finished run (status completed or diverged) is returned as recorded; otherwise training resumes from
    the latest checkpoint (metrics after it are dropped and rewritten) or starts at step 0.
    """
    run_dir = Path(run_dir)
    recorded = _prepare_run_dir(run_dir, cfg)
    if recorded and recorded.get("status") in ("completed", "diverged"):
        return TrainResult(recorded["status"], recorded["step"], run_dir, recorded.get("reason"))
    device = resolve_device(cfg.device)
    spec = cfg.data_spec()
    splits = load_splits(spec)
    for leftover in run_dir.glob(".tmp_ckpt_*"):  # a save cut short by a kill
        shutil.rmtree(leftover, ignore_errors=True)
    found = list_checkpoints(run_dir)
    if found:
        ckpt = load_checkpoint(found[-1], {"norm_backend": cfg.norm_backend}, device=device)
        model, start, initial_loss = ckpt.model, ckpt.step, ckpt.meta["initial_loss"]
        optimizer = make_optimizer(model, cfg)
        ckpt.restore_optimizer(optimizer)
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model_config(splits.tokenizer.vocab_size)).to(device)
        optimizer = make_optimizer(model, cfg)
        start, initial_loss = 0, None
    metrics_file = run_dir / METRICS_FILE
    kept = [m for m in read_metrics(metrics_file) if m["step"] <= start]
    metrics_file.write_text("".join(json.dumps(m) + "\n" for m in kept))
    meta = {"train_config": cfg.to_dict(), "data": spec.to_dict(), "tokenizer": splits.tokenizer.to_dict(),
            "seed": cfg.seed, "sampler": "batch of step s drawn with seed (seed, s)"}

    acts = {}
    hooks = [block.register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o.detach()))
             for name, block in blocks(model).items()]
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, file=sys.stderr, disable=not progress, desc=cfg.arch, unit="step")
    status, reason, step = "completed", None, start
    try:
        with open(metrics_file, "a") as log:
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                idx, targets = (t.to(device) for t in training_batch(splits, spec, step, cfg.batch_size, cfg.seq_len))
                loss = next_token_loss(model, (idx, targets))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip).item()
                loss_value = loss.item()
                if initial_loss is None:
                    initial_loss = loss_value
                reason = _divergence(loss_value, grad_norm, initial_loss, cfg.diverge_factor)
                if reason:
                    status = "diverged"
                    break
                lr = lr_at(cfg, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
                record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                          "act_rms": {k: v.float().pow(2).mean().sqrt().item() for k, v in acts.items()},
                          "tokens_per_s": idx.numel() / seconds}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}")
                done = step + 1
                if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
                    os.fsync(log.fileno())
                    save_checkpoint(run_dir, done, model, optimizer, {**meta, "initial_loss": initial_loss})
                step = done
    except KeyboardInterrupt:
        _write_json(run_dir / STATUS_FILE, {"status": "interrupted", "step": step})
        raise
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
    record = {"status": status, "step": step}
    if reason:
        record["reason"] = reason
    _write_json(run_dir / STATUS_FILE, record)
    return TrainResult(status, step, run_dir, reason)


def _divergence(loss: float, grad_norm: float, initial_loss: float, factor: float) -> str | None:
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    if loss > factor * initial_loss:
        return f"loss {loss:.4g} exceeds {factor:g} x the initial loss {initial_loss:.4g}"
    return None
