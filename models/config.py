"""Typed, validated configuration of the GPT family; recorded verbatim in every checkpoint."""

import dataclasses
import math
from dataclasses import dataclass

from hessian_tools.errors import UserError

ARCHS = ("llama2", "llama2_qknorm", "simplegpt", "gpt2", "simplegpt_gpt2")
LLAMA_FAMILY = ("llama2", "llama2_qknorm", "simplegpt")
GPT2_FAMILY = ("gpt2", "simplegpt_gpt2")
NORM_BACKENDS = ("auto", "torch", "triton", "compiled")
SITE_ROLES = ("block_in", "attn_in", "ffn_in", "block_out")  # activation sites by role: models.sites.role_sites
QK_NORM_SCOPES = ("head", "all")
GELU_APPROXIMATIONS = ("none", "tanh")


def llama_ffn_hidden(dim: int, multiple_of: int = 32, multiplier: float | None = None) -> int:
    """SwiGLU width of the Llama recipe (torchtitan / the SimpleGPT reference): int(2/3 of 4 * dim), times
    `multiplier` (truncated to an int) if given, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass(frozen=True)
class GPTConfig:
    """One transformer family; `arch` picks the block (see SIMPLEGPT.md section 1).

    seq_len is the longest context (size of the RoPE table or of the learned position table).
    ffn_hidden = 0 means the family default: llama_ffn_hidden(dim, multiple_of, ffn_dim_multiplier) for the
    Llama family, 4 * dim for GPT-2.
    norm_backend: "torch" (reference), "triton" (fused kernels), "auto" (triton on CUDA, torch elsewhere),
    "compiled" (torch.compile while training, the reference otherwise; see models.norms).
    n_kv_heads: key/value heads of grouped-query attention (Llama family; 0 = n_heads, plain multi-head);
    query head h attends with key/value head h // (n_heads / n_kv_heads).
    qk_norm_scope (llama2_qknorm): "head" = RMSNorm over each head's head_dim vector, "all" = over all heads
    together (n_heads * head_dim for q, n_kv_heads * head_dim for k), as the SimpleGPT reference's preqknorm.
    tie_embeddings: the Llama family's LM head shares the token embedding (the GPT-2 family always does).
    gelu_approximate (GPT-2 family): "none" = exact GELU (nanoGPT), "tanh" = Hugging Face GPT-2's gelu_new.
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
    n_kv_heads: int = 0
    multiple_of: int = 32
    ffn_dim_multiplier: float | None = None
    qk_norm_scope: str = "head"
    tie_embeddings: bool = False
    gelu_approximate: str = "none"

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
        for name, value, choices in (("qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES),
                                     ("gelu_approximate", self.gelu_approximate, GELU_APPROXIMATIONS)):
            if value not in choices:
                raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise UserError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.arch in GPT2_FAMILY and (self.n_kv_heads != self.n_heads or self.tie_embeddings):
            raise UserError(f"{self.arch} has plain multi-head attention and a tied LM head: n_kv_heads and "
                            "tie_embeddings apply to the Llama family only")
        if self.multiple_of < 1 or (self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0):
            raise UserError(f"multiple_of must be positive and ffn_dim_multiplier positive or None, got "
                            f"{self.multiple_of} and {self.ffn_dim_multiplier}")
        if self.arch in LLAMA_FAMILY and self.head_dim % 2:
            raise UserError(f"RoPE needs an even head dimension, got dim/n_heads = {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.ffn_hidden == 0:
            default = (llama_ffn_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier)
                       if self.arch in LLAMA_FAMILY else 4 * self.dim)
            object.__setattr__(self, "ffn_hidden", default)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key and value maps' outputs: n_kv_heads * head_dim."""
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown model settings {unknown}; known settings are {sorted(known)}")
        return cls(**data)
