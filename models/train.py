"""Training runs: AdamW or gradient descent, checkpoints, metrics, sharpness tracking, resume, divergence.

Recipe (optimizer "adamw"): AdamW, betas (0.9, 0.95), eps 1e-8; lr rises linearly over `warmup` steps to `lr`,
then falls linearly to 0 at `steps` (schedule "linear") or stays at `lr` ("constant"); gradients clipped to global
norm `grad_clip` (0 = no clipping). Weight decay applies to the weights of linear maps only; embeddings
(including the GPT-2 LM head, tied to `wte`), norm gains and biases are not decayed. Optimizer "sgd": plain
gradient descent theta <- theta - lr_t g (no momentum, no weight decay, no clipping unless grad_clip says).

Steps count optimizer updates. Update s (0-based) uses training batch s, drawn with a generator seeded by
(seed, s) (see models.data) from the training split, or from `train_subset` fixed sequences of it (all of them
when batch_size = train_subset: full-batch training); training runs use no dropout: the weights, optimizer
state and step in a checkpoint are all a resumed run needs to repeat exactly what the uninterrupted run did.

RUN_DIR/metrics.jsonl is an append-only log of two kinds of lines. {"kind": "loss", "step": n, ...} (n = 1..steps)
holds the loss of batch n - 1 before the n-th update, that update's lr and pre-clip gradient norm, the RMS of
the residual stream after each block ("act_rms": {block name: value}, from the same forward pass) and
"tokens_per_s" (wall clock of the step). With track_every > 0, {"kind": "sharpness", "step": s, ...} lines
(hessian_tools.tracking) measure the weights after s updates at s = 0, track_every, 2 track_every, ... and the
last step, on fixed batches: held-out ones (those of `hessian-tools spectrum --batches track_batches
--batch-size track_batch_size --seed 0`), or the whole training subset when there is one (the objective being
minimised). Each step's lines come before its checkpoint, and the tracker's warm-start vectors are saved with
it (RUN_DIR/tracking/), so a resumed run writes exactly the lines of an uninterrupted one. A resumed run drops
the lines after its checkpoint by writing the kept ones to a temporary file and renaming it over the log: a
kill at any moment leaves either the old log or the new one. Every line is checked against its kind's schema
(models.schemas); readers skip an invalid line (reporting it), and a resume keeps every valid line up to its
step and moves the invalid ones to RUN_DIR/metrics.jsonl.quarantine.jsonl (hessian_tools.results_io's format).

One process at a time: RUN_DIR/.train.lock is held (flock) while a run trains; a second `train` on the same
RUN_DIR stops with a one-line error. A run diverges when a loss or gradient norm is not finite, or a loss
exceeds `diverge_factor` times the first step's loss; the run then stops and RUN_DIR/status.json says
{"status": "diverged", ...}. An interrupt (Ctrl-C, or SIGTERM under `hessian-tools train`) stops it with
{"status": "interrupted", "step", "resume_from"}: the same command resumes it from its latest checkpoint.
"""

import fcntl
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from hessian_tools.errors import UserError
from hessian_tools.footprint import require_memory, training_bytes
from hessian_tools.paths import TEMPORARY_PREFIX, fsync_dir, os_error, output_dir
from hessian_tools.results_io import Scan, quarantine, quarantine_path, scan_bytes, warn
from models.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from models.checkpoint.files import read_safetensors
from models.checkpoint.native import CKPT_RE, _fsync_file, read_native
from models.data import fixed_windows, load_splits, measurement_batches, step_seed, training_batch
from models.gpt import build_model, next_token_loss
from models.schemas import STATUS, TRAIN_CONFIG, check_metrics_line, read_json
from models.sites import blocks
from models.train_config import TrainConfig, field_defaults

CONFIG_FILE, METRICS_FILE, STATUS_FILE, LOCK_FILE = "train_config.json", "metrics.jsonl", "status.json", ".train.lock"
TRACKING_DIR = "tracking"  # the sharpness tracker's warm-start vectors at each checkpoint: step_NNNNNNN.safetensors
# Settings that may differ between the start and the resumption of one run.
RESUMABLE_DIFFERENCES = ("device", "norm_backend")
# What a killed run leaves behind besides its results: temporary files and directories, the lock.
LEFTOVER_PREFIXES = (".tmp_ckpt_", ".old_ckpt_", TEMPORARY_PREFIX, f".{CONFIG_FILE}.", f".{METRICS_FILE}.",
                     f".{STATUS_FILE}.")


@dataclass(frozen=True)
class TrainResult:
    status: str  # "completed" or "diverged"
    step: int  # last completed update
    run_dir: Path
    reason: str | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the signal arrives so the run stops as it does on Ctrl-C (`terminate_as_interrupt`)."""


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of update `step` (0-based): linear warm-up to cfg.lr, then linear decay to 0 (or constant)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * (cfg.steps - step) / max(1, cfg.steps - cfg.warmup)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on linear-map weights only, or plain gradient descent (see module docstring)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.0, weight_decay=0.0)
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


def _replace_atomically(path: Path, write):
    """write(tmp) a sibling temporary file, fsync it, rename it over `path`: a kill leaves the old or the new."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _write_json(path: Path, record: dict):
    _replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))


def scan_metrics(path: Path) -> Scan:
    """The lines of metrics log `path` (absent: none), each checked against its kind's schema."""
    if not path.is_file():
        return Scan(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise os_error(exc, path, "read the metrics log") from None
    return scan_bytes(path, data, check_metrics_line, "metrics line")


def _skipped(scan: Scan, lines: list, done: str) -> str:
    first = lines[0]
    return (f"{scan.path}: {len(lines)} invalid line{'s' if len(lines) > 1 else ''} {done} (line {first.number} "
            f"is {first.reason})")


def read_metrics(path: Path, kind: str | None = "loss", report=warn) -> list[dict]:
    """The valid metrics lines of one kind ("loss", "sharpness"; None = all), in file order. A complete line
    that is not valid (not UTF-8, not JSON, not an object, a field of the wrong type) is skipped, and `report`ed
    in one line for all of them (None: silent); a last line cut short by a kill is dropped."""
    scan = scan_metrics(Path(path))
    if scan.broken and report is not None:
        report(_skipped(scan, scan.broken, "skipped"))
    return [m for m in scan.records if kind is None or m.get("kind", "loss") == kind]


def read_status(run_dir) -> dict | None:
    """RUN_DIR/status.json checked against STATUS (None when there is none yet)."""
    path = Path(run_dir) / STATUS_FILE
    return read_json(path, STATUS, "run status") if os.path.lexists(path) else None


def _settings_clash(recorded: dict, cfg: TrainConfig) -> list[str]:
    defaults, mine = field_defaults(), cfg.to_dict()
    return [f"{k}: {recorded.get(k, defaults[k])!r} there, {mine[k]!r} now" for k in mine
            if k not in RESUMABLE_DIFFERENCES and recorded.get(k, defaults[k]) != mine[k]]


def _recorded_config(run_dir: Path) -> dict:
    """RUN_DIR/train_config.json checked against TRAIN_CONFIG."""
    try:
        return read_json(run_dir / CONFIG_FILE, TRAIN_CONFIG, "training run's settings")
    except UserError as exc:
        raise UserError(f"{exc}; move the run directory aside or choose another --out") from None


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig):
    """Check that RUN_DIR (locked, existing) is new or holds this same run, clear what a killed process left,
    record the settings of a new run; returns the recorded status (None if none)."""
    config_file = run_dir / CONFIG_FILE
    if config_file.is_file():
        diffs = _settings_clash(_recorded_config(run_dir), cfg)
        if diffs:
            raise UserError(f"{run_dir} holds a run with different settings ({'; '.join(diffs[:3])}); "
                            "choose another --out or the same settings to resume")
        recorded = read_status(run_dir)
    else:
        others = [p.name for p in run_dir.iterdir() if p.name != LOCK_FILE and not p.name.startswith(LEFTOVER_PREFIXES)]
        if others:
            raise UserError(f"{run_dir}: not empty and not a training run (holds {others[0]}); choose a new or "
                            "empty --out")
        recorded = None
    leftovers = [*run_dir.iterdir(), *(run_dir / TRACKING_DIR).glob(".*.tmp")]
    for leftover in leftovers:  # a save or a rewrite cut short by a kill
        if leftover.name.startswith(LEFTOVER_PREFIXES) or leftover.parent.name == TRACKING_DIR:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    if not config_file.is_file():
        _write_json(config_file, cfg.to_dict())
    return recorded


def _lock(run_dir: Path) -> int:
    """Create RUN_DIR if needed and hold its lock (released when the returned descriptor is closed)."""
    output_dir(run_dir, "--out")  # exists or is made, no file in the way, writable
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"{run_dir}: another train process (pid {holder}) is running in this run directory; "
                        "wait for it to finish or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _kept(line: dict, start: int) -> bool:
    """Whether a metrics line survives a (re)start at update `start`: loss lines up to it; sharpness lines before
    it, and at it when it is a checkpoint (whose lines were written before it); at 0 they are redone."""
    if line.get("kind", "loss") == "loss":
        return line["step"] <= start
    return line["step"] < start or (start > 0 and line["step"] == start)


def _restart_metrics(metrics_file: Path, start: int):
    """Keep every valid metrics line that survives a (re)start at `start` (`_kept`), in order; copy the invalid
    ones to the quarantine file first (reported in one line), then rename the kept lines over the log."""
    scan = scan_metrics(metrics_file)
    invalid = scan.invalid()
    quarantine(metrics_file, invalid, "metrics log")
    kept = [m for m in scan.records if _kept(m, start)]
    _replace_atomically(metrics_file, lambda tmp: tmp.write_text("".join(json.dumps(m) + "\n" for m in kept)))
    if invalid:
        warn(_skipped(scan, invalid, f"moved to {quarantine_path(metrics_file)}"))


def _training_source(cfg: TrainConfig, splits, spec):
    """(step -> batch of that update, the training subset as one batch or None)."""
    if not cfg.train_subset:
        return (lambda step: training_batch(splits, spec, step, cfg.batch_size, cfg.seq_len)), None
    (idx, targets), = fixed_windows(splits.train, 1, cfg.train_subset, cfg.seq_len, cfg.seed, "training split",
                                    spec.name)
    if cfg.batch_size == cfg.train_subset:
        return (lambda step: (idx, targets)), (idx, targets)

    def draw(step):
        rows = torch.randperm(cfg.train_subset, generator=torch.Generator().manual_seed(step_seed(spec.seed, step)))
        rows = rows[: cfg.batch_size]
        return idx[rows], targets[rows]

    return draw, (idx, targets)


def _tracker(cfg: TrainConfig, spec, subset):
    """The run's SharpnessTracker (None without tracking): on the training subset, or fixed held-out batches."""
    if not cfg.track_every:
        return None
    from hessian_tools.tracking import SharpnessTracker, TrackSettings

    if subset is not None:
        batches = [subset]
        describe = {"batches": "training subset", "n_sequences": cfg.train_subset, "seq_len": cfg.seq_len}
    else:
        batches = measurement_batches(spec, cfg.track_batches, cfg.track_batch_size, cfg.seq_len, seed=0)
        describe = {"batches": "held-out", "n_batches": cfg.track_batches, "batch_size": cfg.track_batch_size,
                    "seq_len": cfg.seq_len, "seed": 0}
    settings = TrackSettings(cfg.track_every, cfg.track_tol, cfg.track_hvps, cfg.track_dtype)
    return SharpnessTracker(settings, batches, describe=describe)


def _vectors_file(run_dir: Path, step: int) -> Path:
    return run_dir / TRACKING_DIR / f"step_{step:07d}.safetensors"


def _save_vectors(run_dir: Path, step: int, vectors: dict):
    """The tracker's warm starts as they stand at checkpoint `step` (written before the checkpoint)."""
    path = _vectors_file(run_dir, step)
    path.parent.mkdir(exist_ok=True)
    _replace_atomically(path, lambda tmp: save_file({k: v.contiguous() for k, v in vectors.items()}, tmp))


def _prune_vectors(run_dir: Path, step: int):
    """Drop the warm starts of checkpoints before `step` (a run resumes from its latest checkpoint)."""
    for path in (run_dir / TRACKING_DIR).glob("step_*.safetensors"):
        if int(path.stem.removeprefix("step_")) < step:
            path.unlink()


def _block_hooks(model: nn.Module, acts: dict) -> list:
    return [block.register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o.detach()))
            for name, block in blocks(model).items()]


def train(cfg: TrainConfig, run_dir, progress: bool = True) -> TrainResult:
    """Run (or resume, or just report) the training run `cfg` in `run_dir`.

    A finished run (status completed or diverged) is returned as recorded; otherwise training resumes from
    the latest checkpoint (metrics lines after it are dropped and redone) or starts at step 0. A write the disk
    refuses (full, read-only) stops it with a UserError naming the step a rerun resumes from; the checkpoints
    written before are untouched.
    """
    run_dir = Path(run_dir)
    lock = _lock(run_dir)
    try:
        recorded = _prepare_run_dir(run_dir, cfg)
        if recorded and recorded.get("status") in ("completed", "diverged"):
            return TrainResult(recorded["status"], recorded["step"], run_dir, recorded.get("reason"))
        return _train(cfg, run_dir, progress)
    except (OSError, SafetensorError) as exc:  # metrics, status or warm starts the disk refused (inputs are checked)
        raise _stopped(run_dir, os_error(exc, run_dir, "write the run")) from None
    finally:
        os.close(lock)


def _train(cfg: TrainConfig, run_dir: Path, progress: bool) -> TrainResult:
    device = resolve_device(cfg.device)
    spec = cfg.data_spec()
    splits = load_splits(spec)
    config = cfg.model_config(splits.tokenizer.vocab_size)
    require_memory(training_bytes(config, cfg.batch_size, cfg.seq_len),
                   f"training {cfg.arch} ({cfg.n_layers} layers, dim {cfg.dim}, vocab {config.vocab_size}) on "
                   f"batches of {cfg.batch_size} x {cfg.seq_len} tokens", device)
    batch_of, subset = _training_source(cfg, splits, spec)
    tracker = _tracker(cfg, spec, subset)
    found = list_checkpoints(run_dir)
    if found:
        ckpt = load_checkpoint(found[-1], {"norm_backend": cfg.norm_backend}, device=device)
        model, start, initial_loss = ckpt.model, ckpt.step, ckpt.meta["initial_loss"]
        optimizer = make_optimizer(model, cfg)
        if cfg.optimizer == "adamw":
            ckpt.restore_optimizer(optimizer)
        if tracker is not None and _vectors_file(run_dir, start).is_file():
            tracker.vectors = read_safetensors(_vectors_file(run_dir, start))
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(config).to(device)
        optimizer = make_optimizer(model, cfg)
        start, initial_loss = 0, None
    metrics_file = run_dir / METRICS_FILE
    _restart_metrics(metrics_file, start)
    meta = {"train_config": cfg.to_dict(), "data": spec.to_dict(), "tokenizer": splits.tokenizer.to_dict(),
            "seed": cfg.seed, "sampler": "batch of step s drawn with seed (seed, s)"}

    acts = {}
    hooks = _block_hooks(model, acts)
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, file=sys.stderr, disable=not progress, desc=cfg.arch, unit="step")
    status, reason, step, shown = "completed", None, start, {}
    try:
        with open(metrics_file, "a") as log:

            def track(at: int):
                """Measure the sharpness at `at` if due (the model as it stands), and log its lines."""
                if tracker is None or not tracker.settings.due(at, cfg.steps):
                    return
                for hook in hooks:  # the tracker's copy of the model must not feed the training's act_rms
                    hook.remove()
                records = tracker.measure(model, optimizer, at, lr_at(cfg, min(at, cfg.steps - 1)))
                hooks[:] = _block_hooks(model, acts)
                log.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
                log.flush()
                shown["sharpness"] = "failed" if records[-1]["value"] is None else f"{records[-1]['value']:.4g}"
                bar.set_postfix(shown)

            if start == 0:
                track(0)
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                idx, targets = (t.to(device) for t in batch_of(step))
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
                record = {"kind": "loss", "step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                          "act_rms": {k: v.float().pow(2).mean().sqrt().item() for k, v in acts.items()},
                          "tokens_per_s": idx.numel() / seconds}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                shown["loss"] = f"{loss_value:.4f}"
                bar.set_postfix(shown)
                done = step + 1
                track(done)
                if done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
                    os.fsync(log.fileno())
                    if tracker is not None:
                        _save_vectors(run_dir, done, tracker.vectors)
                    try:
                        save_checkpoint(run_dir, done, model, optimizer, {**meta, "initial_loss": initial_loss})
                    except UserError as exc:  # a full disk: what is saved stays, the run stops resumable
                        raise _stopped(run_dir, exc) from None
                    if tracker is not None:
                        _prune_vectors(run_dir, done)
                step = done
    except KeyboardInterrupt:
        _write_json(run_dir / STATUS_FILE, {"status": "interrupted", "step": step,
                                            "resume_from": resume_point(run_dir, verify=False)})
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


def _stopped(run_dir: Path, problem: UserError) -> UserError:
    """A run stopped by a failed write, with the step it resumes from."""
    return UserError(f"{problem}; the run stopped and resumes from step {resume_point(run_dir, verify=False)} "
                     "when the same command is rerun (free space first)")


def resume_point(run_dir, verify: bool = True) -> int:
    """The update a rerun resumes from: the latest complete checkpoint's step (0 without one). verify: check
    that checkpoint reads (its record and weights) and, for a tracked run, that its warm starts are there
    (a UserError otherwise)."""
    run_dir = Path(run_dir)
    found = list_checkpoints(run_dir)
    if not found:
        return 0
    if not verify:
        return int(CKPT_RE.match(found[-1].name).group(1))
    _, _, meta, step = read_native(found[-1], {})
    if meta.get("train_config", {}).get("track_every") and not _vectors_file(run_dir, step).is_file():
        raise UserError(f"{run_dir}: checkpoint {found[-1].name} lacks the tracker's warm starts "
                        f"({_vectors_file(run_dir, step)})")
    return step


def _divergence(loss: float, grad_norm: float, initial_loss: float, factor: float) -> str | None:
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    if loss > factor * initial_loss:
        return f"loss {loss:.4g} exceeds {factor:g} x the initial loss {initial_loss:.4g}"
    return None
