"""Typed, validated configuration of the GPT family; recorded verbatim in every checkpoint."""

import dataclasses
import math
from dataclasses import dataclass

from hessian_tools.errors import UserError

ARCHS = ("llama2", "llama2_qknorm", "simplegpt", "gpt2", "simplegpt_gpt2")
LLAMA_FAMILY = ("llama2", "llama2_qknorm", "simplegpt")
GPT2_FAMILY = ("gpt2", "simplegpt_gpt2")
NORM_BACKENDS = ("auto", "torch", "triton", "compiled")


def llama_ffn_hidden(dim: int, multiple_of: int = 32) -> int:
    """SwiGLU width of the Llama recipe: 2/3 of 4 * dim, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass(frozen=True)
class GPTConfig:
    """One transformer family; `arch` picks the block (see SIMPLEGPT.md section 1).

    seq_len is the longest context (size of the RoPE table or of the learned position table).
    ffn_hidden = 0 means the family default: llama_ffn_hidden(dim) for the Llama family, 4 * dim for GPT-2.
    norm_backend: "torch" (reference), "triton" (fused kernels), "auto" (triton on CUDA, torch elsewhere),
    "compiled" (torch.compile while training, the reference otherwise; see models.norms).
    """

    arch: str = "simplegpt"
    vocab_size: int = 128
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    seq_len: int = 128
    ffn_hidden: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    bias: bool = True
    dropout: float = 0.0
    norm_backend: str = "auto"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise UserError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.norm_backend not in NORM_BACKENDS:
            raise UserError(f"unknown norm backend {self.norm_backend!r}; choose one of {', '.join(NORM_BACKENDS)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise UserError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.arch in LLAMA_FAMILY and self.head_dim % 2:
            raise UserError(f"RoPE needs an even head dimension, got dim/n_heads = {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.ffn_hidden == 0:
            default = llama_ffn_hidden(self.dim) if self.arch in LLAMA_FAMILY else 4 * self.dim
            object.__setattr__(self, "ffn_hidden", default)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown model settings {unknown}; known settings are {sorted(known)}")
        return cls(**data)
