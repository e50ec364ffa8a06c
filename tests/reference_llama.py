"""The SimpleGPT reference's three Llama models as one function of a state dict, written from its source
(src/torchtitan/models/llama/{prenorm,preqknorm,simplegpt}_model.py), independently of models.gpt: complex
RoPE on the saved `freqs_cis` table, repeat_kv by expand + reshape, explicit causal softmax attention.

Also `reference_state`: a model's state dict as that code saves it (its persistent `freqs_cis` buffer, 2 x the
training length, computed in float32 as the reference does).
"""

import math

import torch
import torch.nn.functional as F

KINDS = {"llama2": "prenorm", "llama2_qknorm": "preqknorm", "simplegpt": "simplegpt"}


def precompute_freqs_cis(head_dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def reference_state(model, training_seq_len: int) -> dict:
    cfg = model.config
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["freqs_cis"] = precompute_freqs_cis(cfg.head_dim, 2 * training_seq_len, cfg.rope_theta)
    return state


def _rms(x, weight, eps):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _rope(x, freqs_cis):
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotated = pairs * freqs_cis[: x.shape[1]].view(1, x.shape[1], 1, -1)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


def _repeat_kv(x, n_rep):
    bs, slen, n_kv, head_dim = x.shape
    return x[:, :, :, None, :].expand(bs, slen, n_kv, n_rep, head_dim).reshape(bs, slen, n_kv * n_rep, head_dim)


def reference_logits(state: dict, tokens: torch.Tensor, kind: str, n_heads: int, n_kv_heads: int,
                     eps: float = 1e-5) -> torch.Tensor:
    """Logits (B, T, vocab) of the reference model `kind` (prenorm, preqknorm, simplegpt) with weights `state`."""
    s = state
    n_layers = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("layers."))

    def lin(x, name):
        if kind == "simplegpt":
            return _rms(x @ s[f"{name}.lin.weight"].T, s[f"{name}.norm.weight"], eps)
        return x @ s[f"{name}.weight"].T

    names = {"prenorm": ("wq", "wk", "wv", "wo", "w1", "w2", "w3"),
             "preqknorm": ("wq", "wk", "wv", "wo", "w1", "w2", "w3"),
             "simplegpt": ("snq", "snk", "snv", "sno", "sn1", "sn2", "sn3")}[kind]
    h = s["tok_embeddings.weight"][tokens]
    bs, T, dim = h.shape
    head_dim = dim // n_heads
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(n_layers):
        p = f"layers.{i}"
        q_n, k_n, v_n, o_n, gate, down, up = (f"{p}.{part}.{n}" for part, n in zip(
            ["attention"] * 4 + ["feed_forward"] * 3, names))
        x = h if kind == "simplegpt" else _rms(h, s[f"{p}.attention_norm.weight"], eps)
        xq, xk, xv = lin(x, q_n), lin(x, k_n), lin(x, v_n)
        if kind == "preqknorm":
            xq, xk = _rms(xq, s[f"{p}.attention.q_norm.weight"], eps), _rms(xk, s[f"{p}.attention.k_norm.weight"], eps)
        xq = _rope(xq.view(bs, T, n_heads, head_dim), s["freqs_cis"])
        xk = _rope(xk.view(bs, T, n_kv_heads, head_dim), s["freqs_cis"])
        xv = xv.view(bs, T, n_kv_heads, head_dim)
        keys, values = _repeat_kv(xk, n_heads // n_kv_heads), _repeat_kv(xv, n_heads // n_kv_heads)
        scores = xq.transpose(1, 2) @ keys.transpose(1, 2).transpose(-1, -2) / math.sqrt(head_dim)
        attn = torch.softmax(scores + mask, dim=-1) @ values.transpose(1, 2)
        h = h + lin(attn.transpose(1, 2).reshape(bs, T, dim), o_n)
        x = h if kind == "simplegpt" else _rms(h, s[f"{p}.ffn_norm.weight"], eps)
        h = h + lin(F.silu(lin(x, gate)) * lin(x, up), down)
    return _rms(h, s["norm.weight"], eps) @ s["output.weight"].T
