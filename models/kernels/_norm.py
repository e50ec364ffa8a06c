"""Fused row-wise norms (RMSNorm, LayerNorm): Triton kernels for forward, backward and double backward.

RMSNorm is LayerNorm without centering and without bias, so one set of kernels serves both (`CENTERED`).
Per row x in R^N:  z = x - mean(x) (z = x for RMSNorm),  r = (mean(z^2) + eps)^(-1/2),  xh = r z,
y = w * xh + b.  With Q = I - 11^T/N (centered) or Q = I, and P = xh xh^T / N, the Jacobian is
dy/dx = diag(w) r (Q - P), a symmetric operator r (Q - P) after the weight.

Backward (dy -> dx, dw, db), g = w * dy, mean over the row written <.>:
  dx = r (g - <g> - <g xh> xh),  dw = sum_rows dy * xh,  db = sum_rows dy   (<g> = 0 for RMSNorm).

Double backward: the cotangents (u, v, s) of (dx, dw, db) give the gradient of
L = <u, dx> + <v, dw> + <s, db> = sum_rows [u . dx + (v * dy) . xh + s . dy].  With h = v * dy,
ug = <u g> - <u><g>, ux = <u xh>, gx = <g xh>, hx = <h xh>, and t = r (u - <u> - ux xh):
  dx2 = r^2 [ (3 gx ux - ug) xh - ux (g - <g>) - gx (u - <u>) ] + r (h - <h> - hx xh)
  dw2 = sum_rows dy * t,     ddy = w * t + v * xh + s.
(Derivation: dx = r Q g - (r^3/N) <g,z>_sum z with dr/dz = -r^3 z / N, and d/dx = Q d/dz.)

A program handles a range of rows, one row at a time. Rows of at most MAX_BLOCK features (`ONE_CHUNK`) are
loaded once into registers, every row sum is taken from them, and the weight-gradient partial stays in
registers and is stored once per program. Wider rows loop over chunks: one pass for mean(x) when centered, one
for the row sums, one to write, and the partial is updated in memory per row. Partials are fp32 (fp64), one
per program, summed over programs in torch: deterministic, no atomics.

Each launcher is registered as a torch.library custom op (`torch.ops.hessian_tools.norm_forward`, ...): an
opaque call for torch.compile, and an op PyTorch's legacy vmap (autograd.grad(is_grads_batched=True)) can loop
over, where a Triton launch on its batched tensors would fail. Under torch.compile the public call is the op
itself, differentiable (reverse mode) through the ops' registered autograd; in eager it is the autograd
Functions below, which add forward mode and torch.func vmap rules.

Derivatives of third order and beyond differentiate the double backward written in plain torch ops.
Forward-mode rules reuse the next order: dy/dx . tx = w * Backward(x, no weight, tx).dx, and the tangent of
Backward in (x, w) is DoubleBackward with (u, v) = (tx, tw), because Backward is the gradient of
Phi(x, w) = sum_rows dy . y(x, w) and the Hessian of Phi is symmetric. Inside two or more torch.func
forward-mode levels (where PyTorch cannot differentiate a Function's jvp rule) or four levels of differentiation
(see `needs_composite`) the public call is the composite norm itself.
"""

import functools

import torch
import triton
import triton.language as tl

from models.kernels._common import (
    LAUNCHES,
    NormSpec,
    as_groups,
    as_rows,
    device_guard,
    groupwise,
    launch_geometry,
    needs_composite,
    partials,
    reduce_partials,
    vmap_rowwise,
)

# ---------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _program_rows(rows_per_group, rows_per_program):
    """This program's group and its row range [start, stop) (rows numbered group-major over all groups)."""
    group = tl.program_id(0)
    first = tl.program_id(1) * rows_per_program
    last = tl.minimum(first + rows_per_program, rows_per_group)
    base = group.to(tl.int64) * rows_per_group
    return group, base + first, base + last


@triton.jit
def _fwd_kernel(
    X, W, B, Y, rows_per_group, rows_per_program, N, eps,
    CENTERED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    group, start, stop = _program_rows(rows_per_group, rows_per_program)
    W += group * N
    B += group * N
    cols = tl.arange(0, BLOCK)
    for row in range(start, stop):
        x_row = X + row * N
        mean = tl.zeros([BLOCK], dtype=ACC)
        if CENTERED:
            for off in range(0, N, BLOCK):
                mean += tl.load(x_row + off + cols, mask=off + cols < N, other=0).to(ACC)
        mean = tl.sum(mean, axis=0) / N if CENTERED else 0.0
        ss = tl.zeros([BLOCK], dtype=ACC)
        z = ss  # after the loop: the whole row when it is one chunk
        for off in range(0, N, BLOCK):
            mask = off + cols < N
            z = tl.where(mask, tl.load(x_row + off + cols, mask=mask, other=0).to(ACC) - mean, 0)
            ss += z * z
        r = 1 / tl.sqrt(tl.sum(ss, axis=0) / N + eps)
        for off in range(0, N, BLOCK):
            c = off + cols
            mask = c < N
            if not ONE_CHUNK:
                z = tl.where(mask, tl.load(x_row + c, mask=mask, other=0).to(ACC) - mean, 0)
            y = z * r
            if HAS_W:
                y = y * tl.load(W + c, mask=mask, other=0).to(ACC)
            if HAS_B:
                y = y + tl.load(B + c, mask=mask, other=0).to(ACC)
            tl.store(Y + row * N + c, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(
    X, W, DY, DX, DWP, DBP, rows_per_group, rows_per_program, N, eps,
    CENTERED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    group, start, stop = _program_rows(rows_per_group, rows_per_program)
    W += group * N
    part = (group * tl.num_programs(1) + tl.program_id(1)) * N
    DWP += part
    DBP += part
    cols = tl.arange(0, BLOCK)
    dw_acc = tl.zeros([BLOCK], dtype=ACC)  # the partials of a one-chunk row, stored once at the end
    db_acc = tl.zeros([BLOCK], dtype=ACC)
    for row in range(start, stop):
        x_row, dy_row = X + row * N, DY + row * N
        mean = tl.zeros([BLOCK], dtype=ACC)
        if CENTERED:
            for off in range(0, N, BLOCK):
                mean += tl.load(x_row + off + cols, mask=off + cols < N, other=0).to(ACC)
        mean = tl.sum(mean, axis=0) / N if CENTERED else 0.0
        ss = tl.zeros([BLOCK], dtype=ACC)
        s_g = tl.zeros([BLOCK], dtype=ACC)
        s_gz = tl.zeros([BLOCK], dtype=ACC)
        z, dy = ss, ss  # after the loop: the whole row when it is one chunk
        for off in range(0, N, BLOCK):
            c = off + cols
            mask = c < N
            z = tl.where(mask, tl.load(x_row + c, mask=mask, other=0).to(ACC) - mean, 0)
            dy = tl.load(dy_row + c, mask=mask, other=0).to(ACC)
            g = dy
            if HAS_W:
                g = dy * tl.load(W + c, mask=mask, other=0).to(ACC)
            ss += z * z
            s_g += g
            s_gz += g * z
        r = 1 / tl.sqrt(tl.sum(ss, axis=0) / N + eps)
        g_mean = tl.sum(s_g, axis=0) / N if CENTERED else 0.0
        gx = r * tl.sum(s_gz, axis=0) / N
        for off in range(0, N, BLOCK):
            c = off + cols
            mask = c < N
            if not ONE_CHUNK:
                z = tl.where(mask, tl.load(x_row + c, mask=mask, other=0).to(ACC) - mean, 0)
                dy = tl.load(dy_row + c, mask=mask, other=0).to(ACC)
            xh = z * r
            g = dy
            if HAS_W:
                g = dy * tl.load(W + c, mask=mask, other=0).to(ACC)
                if ONE_CHUNK:
                    dw_acc += dy * xh
                else:
                    tl.store(DWP + c, tl.load(DWP + c, mask=mask, other=0) + dy * xh, mask=mask)
            if HAS_B:
                if ONE_CHUNK:
                    db_acc += dy
                else:
                    tl.store(DBP + c, tl.load(DBP + c, mask=mask, other=0) + dy, mask=mask)
            dx = r * (g - g_mean - gx * xh)
            tl.store(DX + row * N + c, dx.to(DX.dtype.element_ty), mask=mask)
    if ONE_CHUNK:
        if HAS_W:
            tl.store(DWP + cols, dw_acc, mask=cols < N)
        if HAS_B:
            tl.store(DBP + cols, db_acc, mask=cols < N)


@triton.jit
def _bwd2_kernel(
    X, W, DY, U, V, S, DX2, DW2P, DDY, rows_per_group, rows_per_program, N, eps,
    CENTERED: tl.constexpr, HAS_W: tl.constexpr, HAS_S: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):  # fmt: skip
    group, start, stop = _program_rows(rows_per_group, rows_per_program)
    W += group * N
    V += group * N
    S += group * N
    DW2P += (group * tl.num_programs(1) + tl.program_id(1)) * N
    cols = tl.arange(0, BLOCK)
    dw_acc = tl.zeros([BLOCK], dtype=ACC)  # the partial of a one-chunk row, stored once at the end
    for row in range(start, stop):
        x_row, dy_row, u_row = X + row * N, DY + row * N, U + row * N
        mean = tl.zeros([BLOCK], dtype=ACC)
        if CENTERED:
            for off in range(0, N, BLOCK):
                mean += tl.load(x_row + off + cols, mask=off + cols < N, other=0).to(ACC)
        mean = tl.sum(mean, axis=0) / N if CENTERED else 0.0
        ss = tl.zeros([BLOCK], dtype=ACC)
        s_g = tl.zeros([BLOCK], dtype=ACC)
        s_u = tl.zeros([BLOCK], dtype=ACC)
        s_h = tl.zeros([BLOCK], dtype=ACC)
        s_ug = tl.zeros([BLOCK], dtype=ACC)
        s_gz = tl.zeros([BLOCK], dtype=ACC)
        s_uz = tl.zeros([BLOCK], dtype=ACC)
        s_hz = tl.zeros([BLOCK], dtype=ACC)
        z, dy, u = ss, ss, ss  # after the loop: the whole row when it is one chunk
        for off in range(0, N, BLOCK):
            c = off + cols
            mask = c < N
            z = tl.where(mask, tl.load(x_row + c, mask=mask, other=0).to(ACC) - mean, 0)
            dy = tl.load(dy_row + c, mask=mask, other=0).to(ACC)
            u = tl.load(u_row + c, mask=mask, other=0).to(ACC)
            g = dy
            if HAS_W:
                g = dy * tl.load(W + c, mask=mask, other=0).to(ACC)
                h = dy * tl.load(V + c, mask=mask, other=0).to(ACC)
                s_h += h
                s_hz += h * z
            ss += z * z
            s_g += g
            s_u += u
            s_ug += u * g
            s_gz += g * z
            s_uz += u * z
        r = 1 / tl.sqrt(tl.sum(ss, axis=0) / N + eps)
        g_mean = tl.sum(s_g, axis=0) / N if CENTERED else 0.0
        u_mean = tl.sum(s_u, axis=0) / N if CENTERED else 0.0
        h_mean = tl.sum(s_h, axis=0) / N if CENTERED else 0.0
        ug = tl.sum(s_ug, axis=0) / N - u_mean * g_mean
        gx = r * tl.sum(s_gz, axis=0) / N
        ux = r * tl.sum(s_uz, axis=0) / N
        hx = r * tl.sum(s_hz, axis=0) / N
        for off in range(0, N, BLOCK):
            c = off + cols
            mask = c < N
            if not ONE_CHUNK:
                z = tl.where(mask, tl.load(x_row + c, mask=mask, other=0).to(ACC) - mean, 0)
                dy = tl.load(dy_row + c, mask=mask, other=0).to(ACC)
                u = tl.load(u_row + c, mask=mask, other=0).to(ACC)
            xh = z * r
            t = r * (u - u_mean - ux * xh)
            g = dy
            ddy = t
            if HAS_W:
                w = tl.load(W + c, mask=mask, other=0).to(ACC)
                v = tl.load(V + c, mask=mask, other=0).to(ACC)
                g = dy * w
                ddy = w * t + v * xh
                if ONE_CHUNK:
                    dw_acc += dy * t
                else:
                    tl.store(DW2P + c, tl.load(DW2P + c, mask=mask, other=0) + dy * t, mask=mask)
            dx2 = r * r * ((3 * gx * ux - ug) * xh - ux * (g - g_mean) - gx * (u - u_mean))
            if HAS_W:
                dx2 += r * (dy * v - h_mean - hx * xh)
            if HAS_S:
                ddy += tl.load(S + c, mask=mask, other=0).to(ACC)
            tl.store(DX2 + row * N + c, dx2.to(DX2.dtype.element_ty), mask=mask)
            tl.store(DDY + row * N + c, ddy.to(DDY.dtype.element_ty), mask=mask)
    if ONE_CHUNK and HAS_W:
        tl.store(DW2P + cols, dw_acc, mask=cols < N)


# -------------------------------------------------------------------------------------------------- launchers


@torch.compiler.disable
def _launch(kernel, name: str, geo, *args, **flags):
    """Launch over geo.grid on geo.device (inside its CUDA device context); nothing to do without rows.

    Never traced by dynamo: under torch.compile the ops' fake kernels stand in, and an op that runs eagerly
    inside a compiled region (after a graph break) must not have its launch traced."""
    LAUNCHES[name] += 1
    if 0 in geo.grid or geo.N == 0:
        return
    with device_guard(geo.device):
        kernel[geo.grid](
            *args, geo.rows_per_group, geo.rows_per_program, geo.N, flags.pop("eps"), **flags,
            BLOCK=geo.block, ACC=geo.acc, ONE_CHUNK=geo.N <= geo.block, num_warps=geo.num_warps,
        )  # fmt: skip


def output_dtype(spec: NormSpec, x, w, b) -> torch.dtype:
    """LayerNorm returns x's dtype (as F.layer_norm does for bf16/fp16 input with fp32 parameters); RMSNorm
    promotes over (x, w), as the torch backend's x_hat.type_as(x) * w does."""
    if spec.centered:
        return x.dtype
    return functools.reduce(torch.promote_types, (t.dtype for t in (x, w, b) if t is not None))


def norm_forward(spec: NormSpec, x, w, b):
    """y = w * xh + b, a new contiguous tensor of x's shape in `output_dtype`."""
    geo = launch_geometry(spec, x, w, b)
    xr = as_rows(x, geo.N)
    y = torch.empty(x.shape, dtype=output_dtype(spec, x, w, b), device=x.device)
    wg, bg = as_groups(w, geo), as_groups(b, geo)
    _launch(
        _fwd_kernel, f"{spec.name}.fwd", geo, xr, xr if wg is None else wg, xr if bg is None else bg, y,
        eps=spec.eps, CENTERED=spec.centered, HAS_W=w is not None, HAS_B=b is not None,
    )  # fmt: skip
    return y


def norm_backward(spec: NormSpec, x, w, b, dy):
    """(dx, dw, db); dw and db are None without weight / bias (b only tells whether db exists, and its dtype)."""
    geo = launch_geometry(spec, x, w, dy, row_tensors=2)
    xr, dyr = as_rows(x, geo.N), as_rows(dy, geo.N)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dwp, dbp = partials(geo, x.device, w is not None), partials(geo, x.device, b is not None)
    _launch(
        _bwd_kernel, f"{spec.name}.bwd", geo, xr, xr if w is None else as_groups(w, geo), dyr, dx,
        xr if dwp is None else dwp, xr if dbp is None else dbp,
        eps=spec.eps, CENTERED=spec.centered, HAS_W=w is not None, HAS_B=b is not None,
    )  # fmt: skip
    dw = reduce_partials(dwp, geo, w.dtype) if w is not None else None
    db = reduce_partials(dbp, geo, b.dtype) if b is not None else None
    return dx, dw, db


def norm_backward2(spec: NormSpec, x, w, dy, u, v, s):
    """(dx2, dw2, ddy): gradient of <u, dx> + <v, dw> + <s, db> in (x, w, dy); None cotangents count as zero."""
    geo = launch_geometry(spec, x, w, dy, u, row_tensors=3)
    xr, dyr = as_rows(x, geo.N), as_rows(dy, geo.N)
    ur = torch.zeros_like(xr) if u is None else as_rows(u, geo.N)
    if w is not None and v is None:
        v = torch.zeros_like(w)
    dx2 = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ddy = torch.empty(dy.shape, dtype=dy.dtype, device=x.device)
    dw2p = partials(geo, x.device, w is not None)
    wg, vg, sg = as_groups(w, geo), as_groups(v, geo), as_groups(s, geo)
    _launch(
        _bwd2_kernel, f"{spec.name}.bwd2", geo, xr, xr if wg is None else wg, dyr, ur, xr if vg is None else vg,
        xr if sg is None else sg, dx2, xr if dw2p is None else dw2p, ddy,
        eps=spec.eps, CENTERED=spec.centered, HAS_W=w is not None, HAS_S=s is not None,
    )  # fmt: skip
    dw2 = reduce_partials(dw2p, geo, w.dtype) if w is not None else None
    return dx2, dw2, ddy


# ------------------------------------------------------------------------------------- launchers as torch ops
# torch.ops.hessian_tools.norm_forward / norm_backward / norm_backward2: the launchers as CPU and CUDA kernels,
# fake (meta) kernels for torch.compile, and (registered below the Functions) Autograd kernels that are the
# Functions themselves, so the ops have every derivative the Functions have. Ops return tensors only: an absent
# weight or bias gradient is an empty tensor to the ops, None to the Functions.

_LIB = torch.library.Library("hessian_tools", "DEF")
_SPEC_ARGS = "bool centered, float eps, int lead"
_LIB.define(f"norm_forward(Tensor x, Tensor? w, Tensor? b, {_SPEC_ARGS}) -> Tensor")
_LIB.define(f"norm_backward(Tensor x, Tensor? w, Tensor? b, Tensor dy, {_SPEC_ARGS}) -> (Tensor, Tensor, Tensor)")
_LIB.define(f"norm_backward2(Tensor x, Tensor? w, Tensor dy, Tensor? u, Tensor? v, Tensor? s, {_SPEC_ARGS}) "
            "-> (Tensor, Tensor, Tensor)")  # fmt: skip


def _absent(t, like):
    return like.new_empty(0) if t is None else t


def _present(t, given):
    return None if given is None else t


def _empty_like(t, like):
    """What a kernel returns in the place of t: a new contiguous tensor of t's shape and dtype (empty when t is
    absent); the fake kernels must match the real strides."""
    return like.new_empty(0) if t is None else t.new_empty(t.shape)


def _register(name: str, kernel, fake):
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, kernel, key)
    torch.library.register_fake(f"hessian_tools::{name}", fake, lib=_LIB)


_register(
    "norm_forward",
    lambda x, w, b, *spec: norm_forward(NormSpec(*spec), x, w, b),
    lambda x, w, b, *spec: x.new_empty(x.shape, dtype=output_dtype(NormSpec(*spec), x, w, b)),
)
_register(
    "norm_backward",
    lambda x, w, b, dy, *spec: (lambda dx, dw, db: (dx, _absent(dw, x), _absent(db, x)))(
        *norm_backward(NormSpec(*spec), x, w, b, dy)),
    lambda x, w, b, dy, *spec: (_empty_like(x, x), _empty_like(w, x), _empty_like(b, x)),
)
_register(
    "norm_backward2",
    lambda x, w, dy, u, v, s, *spec: (lambda dx2, dw2, ddy: (dx2, _absent(dw2, x), ddy))(
        *norm_backward2(NormSpec(*spec), x, w, dy, u, v, s)),
    lambda x, w, dy, u, v, s, *spec: (_empty_like(x, x), _empty_like(w, x), _empty_like(dy, x)),
)


def _kernel_call(op, spec: NormSpec, *tensors):
    """Call a norm op's CPU/CUDA kernel, below its Autograd kernel (which is the Function calling this)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*tensors, spec.centered, spec.eps, spec.lead)


def forward_op(spec: NormSpec, x, w, b):
    return _kernel_call(torch.ops.hessian_tools.norm_forward, spec, x, w, b)


def backward_op(spec: NormSpec, x, w, b, dy):
    dx, dw, db = _kernel_call(torch.ops.hessian_tools.norm_backward, spec, x, w, b, dy)
    return dx, _present(dw, w), _present(db, b)


def backward2_op(spec: NormSpec, x, w, dy, u, v, s):
    dx2, dw2, ddy = _kernel_call(torch.ops.hessian_tools.norm_backward2, spec, x, w, dy, u, v, s)
    return dx2, _present(dw2, w), ddy


# --------------------------------------------------------------------------- composite path (third order and up)


def reference_norm(spec: NormSpec, x, w, b):
    """The norm in plain, arbitrarily differentiable torch ops (computed in the dtype of x)."""
    z = x - x.mean(-1, keepdim=True) if spec.centered else x
    y = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + spec.eps)
    if w is not None:
        y = y * groupwise(w, x, spec.lead)
    return y if b is None else y + groupwise(b, x, spec.lead)


def composite_norm(spec: NormSpec, x, w, b):
    """reference_norm with the kernels' precision and dtypes: fp32 (fp64) arithmetic, output in output_dtype."""
    acc = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (x, w, b)) else torch.float32
    up = [None if t is None else t.to(acc) for t in (x, w, b)]
    return reference_norm(spec, *up).to(output_dtype(spec, x, w, b))


def _reference_backward2(spec: NormSpec, x, w, dy, u, v, s):
    """norm_backward2 by nested torch.func.vjp of reference_norm (all arguments tensors)."""

    def backward(x, w, dy):
        return torch.func.vjp(lambda x, w: reference_norm(spec, x, w, None), x, w)[1](dy)

    dx2, dw2, ddy = torch.func.vjp(backward, x, w, dy)[1]((u, v))
    return dx2, dw2, ddy + groupwise(s, x, spec.lead)


def _full_backward2_inputs(x, w, dy, u, v, s):
    """Replace absent arguments by their neutral values (weight 1, cotangents 0; per-feature shape of w) and
    make every argument contiguous (forward-mode duals cannot be made of vmap's stride-0 expanded tensors)."""
    shape = w.shape if w is not None else (s.shape if s is not None else x.shape[-1:])
    ones = torch.ones(shape, dtype=x.dtype, device=x.device)
    zeros = torch.zeros_like(ones)
    full = (x, ones if w is None else w, dy, torch.zeros_like(x) if u is None else u, zeros if v is None else v,
            zeros if s is None else s)  # fmt: skip
    return tuple(t.contiguous() for t in full)


def composite_backward2_vjp(spec: NormSpec, inputs, grads):
    """Gradients of the double backward's outputs (dx2, dw2, ddy), cotangents `grads` (None for zero), w.r.t.
    its inputs (x, w, dy, u, v, s); None where an input was absent."""
    full = _full_backward2_inputs(*inputs)
    cotangents = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, full[:3]))
    out = torch.func.vjp(lambda *a: _reference_backward2(spec, *a), *full)[1](cotangents)
    return tuple(None if given is None else g for g, given in zip(out, inputs))


# ------------------------------------------------------------------------------------------ autograd Functions


class NormForward(torch.autograd.Function):
    """y = norm(x) * w + b; backward -> NormBackward."""

    @staticmethod
    def forward(spec, x, w, b):
        return forward_op(spec, x, w, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, x, w, b = inputs
        ctx.spec = spec
        ctx.save_for_backward(x, w, b)
        ctx.save_for_forward(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w, b = ctx.saved_tensors
        return None, *NormBackward.apply(ctx.spec, x, w, b, dy)

    @staticmethod
    def jvp(ctx, _, tx, tw, tb):
        x, w, b = ctx.saved_tensors
        spec, out = ctx.spec, None
        if tx is not None:
            out = NormBackward.apply(spec, x, None, None, tx)[0]
            out = out if w is None else out * groupwise(w, x, spec.lead)
        if tw is not None:
            term = groupwise(tw, x, spec.lead) * NormForward.apply(spec, x, None, None)
            out = term if out is None else out + term
        if tb is not None:
            term = groupwise(tb, x, spec.lead).expand(x.shape)
            out = term if out is None else out + term
        return out.to(output_dtype(spec, x, w, b))

    @staticmethod
    def vmap(info, in_dims, spec, *tensors):
        return vmap_rowwise(NormForward, info, in_dims, spec, *tensors)


class NormBackward(torch.autograd.Function):
    """(x, w, b, dy) -> (dx, dw, db); b only tells whether db exists. backward -> NormBackward2."""

    @staticmethod
    def forward(spec, x, w, b, dy):
        return backward_op(spec, x, w, b, dy)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, x, w, b, dy = inputs
        ctx.spec = spec
        ctx.save_for_backward(x, w, b, dy)
        ctx.save_for_forward(x, w, b, dy)

    @staticmethod
    def backward(ctx, gdx, gdw, gdb):
        x, w, b, dy = ctx.saved_tensors
        dx2, dw2, ddy = NormBackward2.apply(ctx.spec, x, w, dy, gdx, gdw if w is not None else None, gdb)
        return None, dx2, dw2, None, ddy

    @staticmethod
    def jvp(ctx, _, tx, tw, tb, tdy):
        x, w, b, dy = ctx.saved_tensors
        spec = ctx.spec
        dx_t = torch.zeros_like(x)
        dw_t = None if w is None else torch.zeros_like(w)
        db_t = None if b is None else torch.zeros_like(b)
        if tx is not None or (w is not None and tw is not None):
            dx2, dw2, _ = NormBackward2.apply(spec, x, w, dy, tx, tw if w is not None else None, None)
            dx_t = dx_t + dx2
            dw_t = None if w is None else dw_t + dw2
        if tdy is not None:
            dx1, dw1, db1 = NormBackward.apply(spec, x, w, b, tdy)
            dx_t = dx_t + dx1
            dw_t = None if w is None else dw_t + dw1
            db_t = None if b is None else db_t + db1
        return dx_t, dw_t, db_t

    @staticmethod
    def vmap(info, in_dims, spec, *tensors):
        return vmap_rowwise(NormBackward, info, in_dims, spec, *tensors)


class NormBackward2(torch.autograd.Function):
    """(x, w, dy, u, v, s) -> (dx2, dw2, ddy); its own derivatives go through the composite torch path."""

    @staticmethod
    def forward(spec, x, w, dy, u, v, s):
        return backward2_op(spec, x, w, dy, u, v, s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, *tensors = inputs
        ctx.spec = spec
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)

    @staticmethod
    def backward(ctx, gdx2, gdw2, gddy):
        return None, *composite_backward2_vjp(ctx.spec, ctx.saved_tensors, (gdx2, gdw2, gddy))

    @staticmethod
    def jvp(ctx, _, *tangents):
        inputs = ctx.saved_tensors
        full = _full_backward2_inputs(*inputs)
        tangents = tuple(torch.zeros_like(p) if t is None else t.contiguous() for t, p in zip(tangents, full))
        dx2_t, dw2_t, ddy_t = torch.func.jvp(lambda *a: _reference_backward2(ctx.spec, *a), full, tangents)[1]
        return dx2_t, None if inputs[1] is None else dw2_t, ddy_t

    @staticmethod
    def vmap(info, in_dims, spec, *tensors):
        return vmap_rowwise(NormBackward2, info, in_dims, spec, *tensors)


_LIB.impl("norm_forward", lambda x, w, b, *spec: NormForward.apply(NormSpec(*spec), x, w, b), "Autograd")
_LIB.impl("norm_backward", lambda x, w, b, dy, *spec: (lambda dx, dw, db: (dx, _absent(dw, x), _absent(db, x)))(
    *NormBackward.apply(NormSpec(*spec), x, w, b, dy)), "Autograd")
_LIB.impl("norm_backward2", lambda x, w, dy, u, v, s, *spec: (lambda dx2, dw2, ddy: (dx2, _absent(dw2, x), ddy))(
    *NormBackward2.apply(NormSpec(*spec), x, w, dy, u, v, s)), "Autograd")


def fused_norm(x, weight, bias, eps: float, centered: bool):
    """Public entry of the fused norms: one group (lead = 0), per-feature weight and bias of shape (N,).

    Eager: the autograd Functions (all derivative orders, forward mode, torch.func vmap rules). Under
    torch.compile: the op torch.ops.hessian_tools.norm_forward, opaque to dynamo, whose Autograd kernel is the
    same Function. Inside nested forward-mode transforms or fourth-order torch.func: the composite norm.
    """
    spec = NormSpec(centered=centered, eps=float(eps))
    if needs_composite():
        return composite_norm(spec, x, weight, bias)
    if torch.compiler.is_compiling():
        return torch.ops.hessian_tools.norm_forward(x, weight, bias, spec.centered, spec.eps, spec.lead)
    return NormForward.apply(spec, x, weight, bias)
