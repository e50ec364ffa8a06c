"""TrainConfig: every setting a training run depends on (no torch import, so the CLI can show defaults)."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from hessian_tools.errors import UserError
from models.config import GPTConfig


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; recorded in RUN_DIR/train_config.json and every checkpoint.

    data None = the embedded corpus. save_every 0 = checkpoint only at the last step; grad_clip 0 = no clipping. device "auto" = cuda
    when available.
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
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    diverge_factor: float = 3.0
    seed: int = 0
    save_every: int = 100
    device: str = "auto"

    def __post_init__(self):
        for name in ("batch_size", "steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup", "save_every"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError(f"grad_clip and weight_decay must be >= 0 (grad_clip 0 = no clipping), got "
                            f"{self.grad_clip} and {self.weight_decay}")
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
