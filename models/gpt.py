"""The GPT family: five variants of one transformer, selected by `GPTConfig.arch` (SIMPLEGPT.md section 1).

Module names follow the source implementations so that their state dicts load directly:
the Llama family uses the torchtitan / SimpleGPT reference names (`tok_embeddings`, `layers.{i}.attention.wq`,
`...snq`, `norm`, `output`), the GPT-2 family uses nanoGPT's (`transformer.wte`, `transformer.h.{i}.attn.c_attn`,
`lm_head`, with the LM head tied to the token embedding).

`model(idx)` maps token ids (B, T) to logits (B, T, vocab). Attention goes through
`F.scaled_dot_product_attention`; its fused kernels have no second derivatives, so the Hessian tools run it
under `sdpa_kernel(SDPBackend.MATH)` (see `math_attention`).
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.config import GPT2_FAMILY, GPTConfig
from models.norms import LayerNorm, RMSNorm, SimpleNorm


def math_attention():
    """Context manager that routes attention to PyTorch's math path, which every autodiff mode supports."""
    return sdpa_kernel(SDPBackend.MATH)


def rope_tables(head_dim: int, seq_len: int, theta: float):
    """cos and sin of shape (seq_len, head_dim / 2) for rotary embeddings of adjacent pairs (torchtitan layout)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x: (B, H, T, head_dim) by the angles of positions 0..T-1."""
    T = x.shape[-2]
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:T].to(x.dtype), sin[:T].to(x.dtype)
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)


def causal_attention(q, k, v, dropout: float = 0.0) -> torch.Tensor:
    """q, k, v: (B, H, T, head_dim) -> (B, T, H * head_dim)."""
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
    return y.transpose(1, 2).flatten(2)


def projection(cfg: GPTConfig, simple: bool, in_dim: int, out_dim: int, bias: bool = False) -> nn.Module:
    """A block linear map: Psi (SimpleNorm) in the SimpleGPT variants, a plain linear map otherwise."""
    if simple:
        return SimpleNorm(in_dim, out_dim, cfg.norm_eps, cfg.norm_backend)
    return nn.Linear(in_dim, out_dim, bias=bias)


class SplitAttention(nn.Module):
    """Causal attention with separate q, k, v, o maps stored under the source implementation's names.

    Grouped-query attention when cfg.n_kv_heads < n_heads: k and v have n_kv_heads heads, each shared by
    n_heads / n_kv_heads consecutive query heads (torchtitan's repeat_kv). QK-norm (`qk_norm`) normalizes q and
    k before RoPE, per head or over all heads together (cfg.qk_norm_scope).
    """

    def __init__(self, cfg: GPTConfig, names, simple: bool, qk_norm: bool, rope: bool, bias: bool = False):
        super().__init__()
        self.names, self.n_heads, self.n_kv_heads, self.head_dim = names, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rope, self.dropout = rope, cfg.dropout
        for name, (d_in, d_out) in zip(names, ((cfg.dim, cfg.dim), (cfg.dim, cfg.kv_dim), (cfg.dim, cfg.kv_dim),
                                               (cfg.dim, cfg.dim))):
            setattr(self, name, projection(cfg, simple, d_in, d_out, bias))
        self.qk_norm = cfg.qk_norm_scope if qk_norm else None
        if qk_norm:
            whole = cfg.qk_norm_scope == "all"
            self.q_norm = RMSNorm(cfg.dim if whole else cfg.head_dim, cfg.norm_eps, cfg.norm_backend)
            self.k_norm = RMSNorm(cfg.kv_dim if whole else cfg.head_dim, cfg.norm_eps, cfg.norm_backend)

    def forward(self, x, cos=None, sin=None):
        wq, wk, wv, wo = (getattr(self, name) for name in self.names)
        q, k, v = wq(x), wk(x), wv(x)
        if self.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            repeats = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        return wo(causal_attention(q, k, v, self.dropout if self.training else 0.0))


class FusedQKVAttention(nn.Module):
    """nanoGPT's attention: one `c_attn` map to q, k, v (with bias), then `c_proj`."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.c_attn = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x, cos=None, sin=None):
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2) for t in self.c_attn(x).chunk(3, dim=-1))
        return self.c_proj(causal_attention(q, k, v, self.dropout if self.training else 0.0))


class SwiGLU(nn.Module):
    """out = down(silu(gate(h)) * up(h)); names (gate, down, up) = (w1, w2, w3) or (sn1, sn2, sn3)."""

    def __init__(self, cfg: GPTConfig, names, simple: bool):
        super().__init__()
        self.names = names
        gate, down, up = names
        setattr(self, gate, projection(cfg, simple, cfg.dim, cfg.ffn_hidden))
        setattr(self, down, projection(cfg, simple, cfg.ffn_hidden, cfg.dim))
        setattr(self, up, projection(cfg, simple, cfg.dim, cfg.ffn_hidden))

    def forward(self, h):
        gate, down, up = (getattr(self, name) for name in self.names)
        return down(F.silu(gate(h)) * up(h))


class GeluMLP(nn.Module):
    """nanoGPT's MLP: c_proj(gelu(c_fc(h))), with Psi maps in `simplegpt_gpt2`; GELU exact or tanh-approximated
    (cfg.gelu_approximate)."""

    def __init__(self, cfg: GPTConfig, simple: bool):
        super().__init__()
        self.c_fc = projection(cfg, simple, cfg.dim, cfg.ffn_hidden, cfg.bias)
        self.c_proj = projection(cfg, simple, cfg.ffn_hidden, cfg.dim, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.approximate = cfg.gelu_approximate

    def forward(self, h):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(h), approximate=self.approximate)))


class LlamaBlock(nn.Module):
    """Pre-norm: h = x + Attn(RMSNorm(x)); out = h + SwiGLU(RMSNorm(h)) (llama2, llama2_qknorm)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_backend)
        self.attention = SplitAttention(cfg, ("wq", "wk", "wv", "wo"), False, cfg.arch == "llama2_qknorm", True)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_backend)
        self.feed_forward = SwiGLU(cfg, ("w1", "w2", "w3"), False)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class SimpleBlock(nn.Module):
    """SimpleGPT: h = x + Attn_Psi(x); out = h + FFN_Psi(h); no pre-norm, every block linear is a Psi."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attention = SplitAttention(cfg, ("snq", "snk", "snv", "sno"), True, False, True)
        self.feed_forward = SwiGLU(cfg, ("sn1", "sn2", "sn3"), True)

    def forward(self, x, cos, sin):
        h = x + self.attention(x, cos, sin)
        return h + self.feed_forward(h)


class GPT2Block(nn.Module):
    """nanoGPT's block (pre-LayerNorm) for gpt2; for simplegpt_gpt2, Psi maps and no pre-norm."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.simple = cfg.arch == "simplegpt_gpt2"
        if self.simple:
            self.attn = SplitAttention(cfg, ("c_q", "c_k", "c_v", "c_proj"), True, False, False)
        else:
            self.ln_1 = LayerNorm(cfg.dim, cfg.bias, cfg.norm_eps, cfg.norm_backend)
            self.attn = FusedQKVAttention(cfg)
            self.ln_2 = LayerNorm(cfg.dim, cfg.bias, cfg.norm_eps, cfg.norm_backend)
        self.mlp = GeluMLP(cfg, self.simple)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos=None, sin=None):
        if self.simple:
            h = x + self.resid_dropout(self.attn(x))
            return h + self.mlp(h)
        h = x + self.resid_dropout(self.attn(self.ln_1(x)))
        return h + self.mlp(self.ln_2(h))


class LlamaGPT(nn.Module):
    """llama2, llama2_qknorm and simplegpt: RoPE, SwiGLU, final RMSNorm, LM head untied unless
    cfg.tie_embeddings."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        block = SimpleBlock if cfg.arch == "simplegpt" else LlamaBlock
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_backend)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        """The reference initialisation (SIMPLEGPT.md section 1); depends on the global torch seed."""
        nn.init.normal_(self.tok_embeddings.weight, std=1.0)
        for layer_id, layer in enumerate(self.layers):
            deep = 0.02 / math.sqrt(2 * (layer_id + 1))
            attn, ffn = layer.attention, layer.feed_forward
            stds = dict(zip(attn.names, (0.02, 0.02, 0.02, deep)))
            stds.update(zip(ffn.names, (0.02, deep, deep)))  # gate, down, up
            for name, std in stds.items():
                module = getattr(attn, name, None) or getattr(ffn, name)
                nn.init.trunc_normal_(module.weight, std=std)  # cut at +-2 absolute, as the reference does
            for module in layer.modules():
                if isinstance(module, RMSNorm):
                    nn.init.ones_(module.weight)
        nn.init.ones_(self.norm.weight)
        if not self.config.tie_embeddings:
            std = self.config.dim**-0.5
            nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        return self.output(self.norm(x))


class NanoGPT(nn.Module):
    """gpt2 and simplegpt_gpt2: learned positions, GELU MLP, final LayerNorm, LM head tied to `wte`."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.dim),
                wpe=nn.Embedding(cfg.seq_len, cfg.dim),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layers)),
                ln_f=LayerNorm(cfg.dim, cfg.bias, cfg.norm_eps, cfg.norm_backend),
            )
        )
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.reset_parameters()

    def reset_parameters(self):
        """nanoGPT's initialisation: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 n_layers)), norms 1."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or ".ln_" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.config.n_layers) if "c_proj" in name else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def build_model(cfg: GPTConfig) -> nn.Module:
    """A freshly initialised model of the configured variant (seed the global RNG first for repeatability)."""
    return NanoGPT(cfg) if cfg.arch in GPT2_FAMILY else LlamaGPT(cfg)


def next_token_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy over all B * T targets; batch = (idx, targets), both (B, T) int64."""
    idx, targets = batch
    logits = model(idx)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@contextlib.contextmanager
def evaluation(model: nn.Module):
    """Put the model in eval mode for the duration (dropout off), restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
