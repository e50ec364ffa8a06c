"""Closed forms of one SimpleNorm layer on a batch of tokens (theory/simplenorm.md, SIMPLEGPT.md section 2).

Conventions. Tokens are rows: x (N, m) holds the layer inputs x_t, W (d, m), gamma (d,), eps the RMSNorm
epsilon, and the layer is y_t = gamma * sqrt(d) * z_t / s_t with z_t = W x_t, s_t = sqrt(||z_t||^2 + d eps)
(eps = 0 is the note's Psi; every formula here keeps eps, so it is exact for the implemented layer).
g (N, d) holds g_t = dl/dy_t for the loss l of the whole batch (whatever its reduction).
Input-space vectors are (N, m), output-space vectors (N, d); J and C are block diagonal over tokens.
"""

import math
from dataclasses import dataclass

import torch

TWO_OVER_SQRT3 = 2.0 / math.sqrt(3.0)


@dataclass(frozen=True)
class SimpleNormLayer:
    """The tensors of one SimpleNorm layer at one batch: inputs x (N, m), weight W (d, m), gamma (d,), eps."""

    x: torch.Tensor
    weight: torch.Tensor
    gamma: torch.Tensor
    eps: float

    @property
    def d(self) -> int:
        return self.weight.shape[0]

    @property
    def z(self) -> torch.Tensor:
        """W x_t, (N, d)."""
        return self.x @ self.weight.T

    @property
    def s(self) -> torch.Tensor:
        """s_t = sqrt(||W x_t||^2 + d eps), (N, 1)."""
        return (self.z.pow(2).sum(-1, keepdim=True) + self.d * self.eps).sqrt()

    def output(self) -> torch.Tensor:
        """y_t, (N, d): the layer's forward map in closed form."""
        return self.gamma * math.sqrt(self.d) * self.z / self.s


def output_scale_under_weight_scale(layer: SimpleNormLayer, c: float) -> torch.Tensor:
    """f_t = ||y_t(cW)|| / ||y_t(W)|| = s_t / sqrt(||W x_t||^2 + d eps / c^2) = (1 - t_t (1 - c^-2))^-1/2, (N,),
    t_t = d eps / s_t^2: W -> cW with eps fixed is the layer with eps / c^2, which rescales each y_t by f_t."""
    t = (layer.d * layer.eps / layer.s.pow(2)).squeeze(-1)
    return (1 - t * (1 - c**-2)).rsqrt()


def _project(z: torch.Tensor, s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(I - z z^T / s^2) w per token."""
    return w - z * (z * w).sum(-1, keepdim=True) / s.pow(2)


def jvp(layer: SimpleNormLayer, v: torch.Tensor) -> torch.Tensor:
    """J v = (sqrt(d) / s) D (I - z z^T / s^2) W v per token; v (N, m) -> (N, d)."""
    z, s = layer.z, layer.s
    return layer.gamma * math.sqrt(layer.d) * _project(z, s, v @ layer.weight.T) / s


def vjp(layer: SimpleNormLayer, w: torch.Tensor) -> torch.Tensor:
    """J^T w per token; w (N, d) -> (N, m)."""
    z, s = layer.z, layer.s
    return (math.sqrt(layer.d) * _project(z, s, layer.gamma * w) / s) @ layer.weight


def curvature_matvec(layer: SimpleNormLayer, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """C v = sum_k g_k d^2 y_k / dx^2 applied to v; v (N, m) -> (N, m).

    Per token, with q = gamma * g_t and p = W v_t:
    C v_t = -(sqrt(d) / s^3) W^T [ q (z.p) + z (q.p) + (q.z) (p - 3 z (z.p) / s^2) ].
    """
    z, s = layer.z, layer.s
    q, p = layer.gamma * g, v @ layer.weight.T
    zp, qp, qz = ((a * b).sum(-1, keepdim=True) for a, b in ((z, p), (q, p), (q, z)))
    inner = q * zp + z * qp + qz * (p - 3 * z * zp / s.pow(2))
    return -(math.sqrt(layer.d) / s.pow(3) * inner) @ layer.weight


def curvature_matrix(u: torch.Tensor, v: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
    """M = u v^T + v u^T + a (I - 3 rho u u^T), a = u.v, for one token (u a unit vector; rho = 1 when eps = 0)."""
    a = u @ v
    eye = torch.eye(u.numel(), dtype=u.dtype, device=u.device)
    return torch.outer(u, v) + torch.outer(v, u) + a * (eye - 3 * rho * torch.outer(u, u))


def curvature_matrix_norm(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """||M|| = (|a| + sqrt(a^2 + 4 ||P v||^2)) / 2 with a = u.v, P = I - u u^T (rho = 1)."""
    a = u @ v
    pv2 = (v.pow(2).sum() - a**2).clamp_min(0)
    return (a.abs() + (a**2 + 4 * pv2).sqrt()) / 2


def worst_case_v(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A unit v with u.v = 1/sqrt(3) and ||P v|| = sqrt(2/3) (the direction of P w): ||M(u, v)|| = 2/sqrt(3)."""
    pw = w - u * (u @ w)
    return u / math.sqrt(3.0) + math.sqrt(2.0 / 3.0) * pw / pw.norm()


def spectral_norm_2(weight: torch.Tensor) -> float:
    """||W||_2, the largest singular value."""
    return float(torch.linalg.matrix_norm(weight, ord=2))


def simplenorm_bound(layer: SimpleNormLayer, g: torch.Tensor, hyy_norm: float) -> dict:
    """The bound on ||H_xx|| for the batch tensor x, and its factors (theory/simplenorm.md, section 5).

    bound = ||W||^2 [ d gamma_max^2 ||H_yy|| / min_t s_t^2 + (2/sqrt(3)) sqrt(d) gamma_max max_t ||g_t|| / s_t^2 ],
    the first term bounding ||J^T H_yy J|| (||J|| = max over tokens), the second ||C|| (max over tokens).
    """
    w2 = spectral_norm_2(layer.weight) ** 2
    s2 = layer.s.squeeze(-1).pow(2)
    g_norm = g.norm(dim=-1)
    gmax = float(layer.gamma.abs().max())
    d = layer.d
    gn_bound = w2 * d * gmax**2 * hyy_norm / float(s2.min())
    c_bound = w2 * TWO_OVER_SQRT3 * math.sqrt(d) * gmax * float((g_norm / s2).max())
    return {
        "weight_norm": math.sqrt(w2),
        "wx_norm_min": float(layer.z.norm(dim=-1).min()),
        "wx_norm_max": float(layer.z.norm(dim=-1).max()),
        "gamma_max": gmax,
        "g_norm_max": float(g_norm.max()),
        "hyy_norm": hyy_norm,
        "gn_bound": gn_bound,
        "c_bound": c_bound,
        "bound": gn_bound + c_bound,
    }


def linear_bound(weight: torch.Tensor, hyy_norm: float) -> float:
    """Plain linear layer y = W x (+ b): H_xx = W^T H_yy W exactly, so ||H_xx|| <= ||W||^2 ||H_yy||."""
    return spectral_norm_2(weight) ** 2 * hyy_norm


def prenorm_bound(x: torch.Tensor, norm_gamma: torch.Tensor, norm_eps: float, centered: bool,
                  weight: torch.Tensor, g: torch.Tensor, hyy_norm: float) -> float:
    """Bound on the Hessian w.r.t. the norm input x (N, m) of y = W Norm(x), along this linear map only.

    Norm is RMSNorm (centered=False) or LayerNorm (centered=True: the mean removal is a projection, norm 1);
    g (N, d) = dl/dy_t. The norm is a SimpleNorm with W = I (or the centering), so
    bound = m gamma_max^2 ||W||^2 ||H_yy|| / min_t s_t^2 + (2/sqrt(3)) sqrt(m) gamma_max max_t ||W^T g_t|| / s_t^2,
    s_t^2 = ||x_t (centered)||^2 + m eps: it grows as ||W||^2 when W -> cW.
    """
    xc = x - x.mean(-1, keepdim=True) if centered else x
    m = x.shape[-1]
    s2 = xc.pow(2).sum(-1) + m * norm_eps
    gmax = float(norm_gamma.abs().max())
    gn = m * gmax**2 * spectral_norm_2(weight) ** 2 * hyy_norm / float(s2.min())
    c = TWO_OVER_SQRT3 * math.sqrt(m) * gmax * float(((g @ weight).norm(dim=-1) / s2).max())
    return gn + c
