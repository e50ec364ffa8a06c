"""TrainConfig: every setting a training run depends on (no torch import, so the CLI can show defaults)."""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from hessian_tools.errors import UserError
from models.config import GPTConfig

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("linear", "constant")
TRACK_DTYPES = ("float32", "float64")
# weight_decay and grad_clip when not given: the AdamW recipe's, or none for plain gradient descent
OPTIMIZER_DEFAULTS = {"adamw": {"weight_decay": 0.1, "grad_clip": 1.0}, "sgd": {"weight_decay": 0.0, "grad_clip": 0.0}}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; recorded in RUN_DIR/train_config.json and every checkpoint.

    data None = the embedded corpus. save_every 0 = checkpoint only at the last step; grad_clip 0 = no clipping.
    device "auto" = cuda when available. optimizer "adamw" (models.train's recipe) or "sgd" (plain gradient
    descent: no momentum; weight_decay must be 0); weight_decay / grad_clip None = the optimizer's default
    (OPTIMIZER_DEFAULTS). schedule "linear" = warm-up then linear decay to 0, "constant" = warm-up then lr.
    train_subset N > 0 trains on N fixed sequences of the training split (batch_size <= N; batch_size = N is
    full-batch training). track_* = sharpness tracking (hessian_tools.tracking; track_every 0 = off).
    """

    arch: str = "simplegpt"
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 64
    ffn_hidden: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    norm_backend: str = "auto"
    n_kv_heads: int = 0
    multiple_of: int = 32
    ffn_dim_multiplier: float | None = None
    data: str | None = None
    heldout_fraction: float = 0.1
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float | None = None
    grad_clip: float | None = None
    diverge_factor: float = 3.0
    seed: int = 0
    save_every: int = 100
    device: str = "auto"
    optimizer: str = "adamw"
    schedule: str = "linear"
    train_subset: int = 0
    track_every: int = 0
    track_batches: int = 1
    track_batch_size: int = 8
    track_tol: float = 1e-2
    track_hvps: int = 20
    track_dtype: str = "float32"

    def __post_init__(self):
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("track_dtype", TRACK_DTYPES)):
            if getattr(self, name) not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name, value in OPTIMIZER_DEFAULTS[self.optimizer].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("batch_size", "steps", "track_batches", "track_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup", "save_every", "train_subset", "track_every"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"lr must be a positive finite number, got {self.lr}")
        if not (self.grad_clip >= 0 and self.weight_decay >= 0 and math.isfinite(self.grad_clip + self.weight_decay)):
            raise UserError(f"grad_clip and weight_decay must be >= 0 and finite (grad_clip 0 = no clipping), got "
                            f"{self.grad_clip} and {self.weight_decay}")
        if self.optimizer == "sgd" and self.weight_decay > 0:
            raise UserError(f"optimizer sgd is plain gradient descent, without weight decay; got weight_decay "
                            f"{self.weight_decay} (drop --weight-decay or pass 0)")
        if self.train_subset and self.batch_size > self.train_subset:
            raise UserError(f"batch_size {self.batch_size} exceeds train_subset {self.train_subset}: a batch is "
                            "drawn from the subset (batch_size = train_subset is full-batch training)")
        if not 0 < self.track_tol < 1:
            raise UserError(f"track_tol must lie in (0, 1) (relative width of the interval), got {self.track_tol}")
        if self.track_hvps < 2:
            raise UserError(f"track_hvps must be at least 2 (Lanczos steps per tracked eigenvalue), got "
                            f"{self.track_hvps}")
        if self.data is not None:  # absolute, so the run's measurements find it from any directory
            object.__setattr__(self, "data", str(Path(self.data).resolve()))
        self.model_config(vocab_size=1)  # validate the model shape now

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(
            arch=self.arch, vocab_size=vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
            seq_len=self.seq_len, ffn_hidden=self.ffn_hidden, rope_theta=self.rope_theta,
            norm_eps=self.norm_eps, norm_backend=self.norm_backend, n_kv_heads=self.n_kv_heads,
            multiple_of=self.multiple_of, ffn_dim_multiplier=self.ffn_dim_multiplier,
        )

    def data_spec(self):
        from models.data import DataSpec

        return DataSpec(self.data, self.heldout_fraction, self.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_defaults() -> dict:
    """{field: default} of TrainConfig (a run recorded before a field existed ran with its default)."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}
