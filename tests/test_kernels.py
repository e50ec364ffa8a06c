"""Fused Triton norms (models.kernels) against the reference norms of models.norms (backend "torch").

On CPU the kernels run in the Triton interpreter (about 1 ms per program), so shapes stay tiny. fp64 checks use
gradcheck's fast mode (a random projection of the Jacobian, against central differences) to stay cheap.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from kernel_device import generator, on_device, token_batch  # noqa: F401 (on_device: autouse fixture)
from torch.func import grad, hessian, jacfwd, jvp, vjp, vmap

from models import build_model, math_attention, next_token_loss
from models.config import GPTConfig
from models.kernels import _common, layer_norm, rms_norm
from models.norms import LayerNorm, RMSNorm
from models.norms import layer_norm as ref_layer_norm
from models.norms import rms_norm as ref_rms_norm

EPS = 1e-5
F64 = dict(dtype=torch.float64)


def kernel_and_reference(op: str, affine: bool, N: int, seed: int = 0):
    """(kernel f, reference f, params): f(x, *params) with params = (w, b) / (w,) / () as the op takes them."""
    g = generator(seed)
    params = (torch.randn(N, generator=g, **F64), torch.randn(N, generator=g, **F64)) if affine else ()
    if op == "rms":
        params = params[:1]
        kern = lambda x, *p: rms_norm(x, p[0] if p else None, EPS)  # noqa: E731
        ref = lambda x, *p: ref_rms_norm(x, p[0] if p else None, EPS)  # noqa: E731
    else:
        kern = lambda x, *p: layer_norm(x, *(p or (None, None)), EPS)  # noqa: E731
        ref = lambda x, *p: ref_layer_norm(x, *(p or (None, None)), EPS)  # noqa: E731
    return kern, ref, params


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture
def small_block(monkeypatch):
    """Force the chunked path: rows wider than 8 features loop over chunks of 8."""
    monkeypatch.setattr(_common, "MAX_BLOCK", 8)


CASES = [(op, affine) for op in ("rms", "ln") for affine in (True, False)]


@pytest.mark.parametrize("op,affine", CASES)
@pytest.mark.parametrize("N", [1, 7, 32, 33])
def test_gradcheck_and_gradgradcheck(op, affine, N):
    kern, _, params = kernel_and_reference(op, affine, N)
    x = torch.randn(3, N, **F64)
    inputs = tuple(t.requires_grad_() for t in (x, *params))
    assert torch.autograd.gradcheck(kern, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(kern, inputs, fast_mode=True)


@pytest.mark.parametrize("op,affine", CASES)
def test_chunked_rows_gradgradcheck(op, affine, small_block):
    kern, ref, params = kernel_and_reference(op, affine, 37)
    x = torch.randn(5, 37, **F64)  # 5 chunks of 8, the last one masked; 5 rows over 4 programs
    torch.testing.assert_close(kern(x, *params), ref(x, *params), rtol=1e-12, atol=1e-12)
    inputs = tuple(t.clone().requires_grad_() for t in (x, *params))
    assert torch.autograd.gradgradcheck(kern, inputs, fast_mode=True)


def test_third_derivative_through_composite_path():
    """Derivatives of the double backward (third order) go through the plain-torch composite."""
    kern, _, params = kernel_and_reference("ln", True, 6)
    x = torch.randn(2, 6, **F64)
    inputs = tuple(t.requires_grad_() for t in (x, *params))

    def second(x, w, b):
        y = kern(x, w, b)
        (gx,) = torch.autograd.grad((y.sin() * y).sum(), x, create_graph=True)
        return gx

    assert torch.autograd.gradgradcheck(second, inputs, fast_mode=True)


def plain_layer_norm(x, w=None, b=None):
    """LayerNorm in elementary torch ops (no F.layer_norm), for forward-over-forward reference Hessians."""
    z = x - x.mean(-1, keepdim=True)
    y = z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + EPS)
    return y if w is None else y * w + b


def scalar(f):
    """A non-quadratic scalar of the norm output, so that Hessians see its second derivative."""
    return lambda x, *p: (f(x, *p).sin() * torch.linspace(-1, 1, x.shape[-1], **F64)).sum()


@pytest.mark.parametrize("op,affine", CASES)
def test_torch_func_compositions_match_reference(op, affine):
    kern, ref, params = kernel_and_reference(op, affine, 5)
    x, tx = torch.randn(3, 5, **F64), torch.randn(3, 5, **F64)
    fk, fr = scalar(kern), scalar(ref)
    argnums = tuple(range(1 + len(params)))
    primals, tangents = (x, *params), (tx, *(torch.randn_like(p) for p in params))
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # noqa: E731

    close(grad(fk, argnums)(*primals), grad(fr, argnums)(*primals))
    close(jvp(kern, primals, tangents), jvp(ref, primals, tangents))
    dy = torch.randn(3, 5, **F64)
    close(vjp(kern, *primals)[1](dy), vjp(ref, *primals)[1](dy))
    close(vmap(kern, in_dims=(0, *[None] * len(params)))(x, *params), ref(x, *params))
    # forward over reverse and reverse over reverse (Hessian-vector products)
    hvp_k = jvp(lambda *a: grad(fk, argnums)(*a), primals, tangents)[1]
    hvp_r = jvp(lambda *a: grad(fr, argnums)(*a), primals, tangents)[1]
    close(hvp_k, hvp_r)
    close(vjp(lambda *a: grad(fk, argnums)(*a), *primals)[1](tangents), hvp_r)
    # dense Hessian (jacfwd over jacrev) against forward-over-forward of plain ops: PyTorch's own F.layer_norm
    # gets both jacfwd(jacfwd) (x-x block) and hessian (w-x block) wrong by O(1) here (measured)
    fp = scalar(plain_layer_norm) if op == "ln" else fr
    close(hessian(fk, argnums)(*primals), jacfwd(jacfwd(fp, argnums), argnums)(*primals))


@pytest.mark.parametrize("op", ["rms", "ln"])
def test_vmap_over_weights_and_per_sample_gradients(op):
    """Batched weights (vmap over w) and per-sample gradients keep one weight gradient per vmap element."""
    kern, ref, params = kernel_and_reference(op, True, 4)
    x = torch.randn(3, 2, 4, **F64)
    ws = torch.randn(3, 4, **F64)
    in_dims = (0, 0) + (None,) * (len(params) - 1)
    torch.testing.assert_close(
        vmap(kern, in_dims=in_dims)(x, ws, *params[1:]), vmap(ref, in_dims=in_dims)(x, ws, *params[1:])
    )
    fk, fr = scalar(kern), scalar(ref)
    per_sample = lambda f: vmap(grad(f, (0, 1)), in_dims=(0,) + (None,) * len(params))(x, *params)  # noqa: E731
    torch.testing.assert_close(per_sample(fk), per_sample(fr), rtol=1e-10, atol=1e-12)


def model_pair(arch: str, dtype=torch.float64):
    """Two copies of one tiny model, with the fused and the reference norms, and a batch."""
    models = []
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        cfg = GPTConfig(arch=arch, vocab_size=32, dim=16, n_layers=1, n_heads=2, seq_len=4, norm_backend=backend)
        models.append(build_model(cfg).to(dtype))
    return models, token_batch(1, 4, 32)


def hvps(model, batch, v):
    """The HVP of the mean next-token loss in the engine's three modes: rev-rev, fwd-rev, double backward."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    loss = lambda p: next_token_loss(lambda idx: torch.func.functional_call(model, p, (idx,)), batch)  # noqa: E731
    with math_attention():
        rev_rev = vjp(grad(loss), params)[1](v)[0]
        fwd_rev = jvp(grad(loss), (params,), (v,))[1]
        live = list(model.parameters())
        grads = torch.autograd.grad(next_token_loss(model, batch), live, create_graph=True)
        double = dict(zip(params, torch.autograd.grad(grads, live, [v[k] for k in params])))
    return rev_rev, fwd_rev, double


@pytest.mark.parametrize("arch,kernel", [("simplegpt", "rms_norm"), ("llama2", "rms_norm"), ("gpt2", "layer_norm")])
def test_model_hvp_matches_reference_and_uses_fused_double_backward(arch, kernel):
    (fused, reference), batch = model_pair(arch)
    g = generator(2)
    v = {k: torch.randn(p.shape, generator=g, **F64) for k, p in reference.named_parameters()}
    before = _common.LAUNCHES[f"{kernel}.bwd2"]
    got = hvps(fused, batch, v)
    launched = _common.LAUNCHES[f"{kernel}.bwd2"] - before
    want = hvps(reference, batch, v)[2]
    for mode in got:
        for k in want:
            torch.testing.assert_close(mode[k], want[k], rtol=1e-9, atol=1e-12, msg=k)
    n_norms = sum(isinstance(m, (RMSNorm, LayerNorm)) for m in fused.modules())
    assert launched >= 3 * n_norms  # every norm ran the fused double backward in each of the three modes


def dtype_errors(f_kernel, f_ref, inputs, dtype):
    """Max abs error of the fused kernel and of the reference, both in `dtype`, against the reference in fp64."""

    def outputs(f, dt):
        args = [t.to(dt).requires_grad_() for t in inputs]
        y = f(*args)
        dy = torch.cos(torch.arange(y.numel(), **F64)).reshape(y.shape).to(dt)
        grads = torch.autograd.grad(y, args, dy, create_graph=True)
        second = torch.autograd.grad(sum((g.float() * g.float()).sum() for g in grads), args, allow_unused=True)
        return [t.double() for t in (y, *grads, *second) if t is not None]  # db does not depend on anything

    exact = outputs(f_ref, torch.float64)
    err = lambda outs: [(o - e).abs().max().item() for o, e in zip(outs, exact)]  # noqa: E731
    return err(outputs(f_kernel, dtype)), err(outputs(f_ref, dtype)), [e.abs().max().item() for e in exact]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["rms", "ln"])
def test_low_precision_within_pytorch_error(op, dtype):
    """Forward, gradients and double backward at 256 rows: error at most 2x PyTorch's own in the same dtype,
    plus 4 units of round-off at the output's scale (PyTorch's error can be lucky on a single output)."""
    kern, ref, params = kernel_and_reference(op, True, 24)
    x = 3 * torch.randn(256, 24, **F64) + 1
    kernel_err, torch_err, scale = dtype_errors(kern, ref, (x, *params), dtype)
    unit = torch.finfo(dtype).eps
    for k, t, s in zip(kernel_err, torch_err, scale):
        assert k <= 2 * t + 4 * unit * s, (kernel_err, torch_err, scale)


def load_benchmark():
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "norm_kernels.py"
    spec = importlib.util.spec_from_file_location("norm_kernels_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_byte_counts():
    """The GPU benchmark imports on CPU and counts the bytes of each pass explicitly."""
    bench = load_benchmark()
    M, N, s = 1000, 4096, 2
    # rows: x -> y; x, dy -> dx; x, dy, u -> dx2, ddy.  vectors: w (b); w, dw (db); w, v, dw2 (s)
    assert bench.bytes_moved("rms_norm", "fwd", M, N, s) == (2 * M + 1) * N * s
    assert bench.bytes_moved("rms_norm", "bwd", M, N, s) == (3 * M + 2) * N * s
    assert bench.bytes_moved("rms_norm", "bwd2", M, N, s) == (5 * M + 3) * N * s
    assert bench.bytes_moved("layer_norm", "bwd2", M, N, s) == (5 * M + 4) * N * s


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_benchmark_refuses_to_run_without_cuda(tmp_path, capsys):
    bench = load_benchmark()
    assert bench.main(["--widths", "1024", "--out", str(tmp_path / "B.md")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "B.md").exists()



def compile_kernels_for_sm90():
    """Compile every kernel variant to PTX for an H100/H200 (needs no GPU; run without TRITON_INTERPRET)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from models.kernels import _norm

    scalars = {"rows_per_group": "i32", "rows_per_program": "i32", "N": "i32", "eps": "fp32"}
    for elem, acc in (("bf16", "fp32"), ("fp64", "fp64")):
        rows, part = f"*{elem}", f"*{acc}"
        for centered, affine, one_chunk in ((True, True, True), (False, False, True), (True, True, False)):
            flags = {"CENTERED": centered, "HAS_W": affine, "BLOCK": 1024, "ACC": getattr(tl, f"float{acc[2:]}"),
                     "ONE_CHUNK": one_chunk}
            kernels = [
                (_norm._fwd_kernel, dict(X=rows, W=rows, B=rows, Y=rows), {"HAS_B": affine}),
                (_norm._bwd_kernel, dict(X=rows, W=rows, DY=rows, DX=rows, DWP=part, DBP=part), {"HAS_B": affine}),
                (_norm._bwd2_kernel, dict(X=rows, W=rows, DY=rows, U=rows, V=rows, S=rows, DX2=rows, DW2P=part,
                                          DDY=rows), {"HAS_S": affine}),
            ]  # fmt: skip
            for fn, pointers, extra in kernels:
                constexprs = {**flags, **extra}
                signature = {**pointers, **scalars, **{k: "constexpr" for k in constexprs}}
                compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
                assert ".target sm_90" in compiled.asm["ptx"]
                print(fn.__name__, elem, centered, affine, one_chunk, "compiled")


def test_kernels_compile_to_ptx_for_sm90():
    """The interpreter accepts more than the compiler does: compile all kernels for sm_90 in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); " \
           "import test_kernels; test_kernels.compile_kernels_for_sm90()"  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("compiled") == 18
