"""Fused norms as drop-in replacements (issue 14, defects 3-5): outputs that own their memory, width 0, the output
dtype of F.layer_norm, torch.compile (custom ops), and launches under the tensor's CUDA device."""

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from kernel_device import DEVICE, generator, token_batch

from models import build_model, next_token_loss
from models.config import GPTConfig
from models.kernels import _common, _norm, layer_norm, rms_norm
from models.norms import layer_norm as ref_layer_norm
from models.norms import rms_norm as ref_rms_norm

EPS = 1e-5
F64 = dict(dtype=torch.float64, device=DEVICE)  # tensors made explicitly on DEVICE: under a torch.device
# context (a TorchFunctionMode) dynamo cannot trace Tensor.unflatten


def pair(op: str):
    """(fused f, reference f) with f(x, w, b); the reference is the torch backend (F.layer_norm for LayerNorm)."""
    if op == "rms":
        return (lambda x, w, b: rms_norm(x, w, EPS)), (lambda x, w, b: ref_rms_norm(x, w, EPS))
    return (lambda x, w, b: layer_norm(x, w, b, EPS)), (lambda x, w, b: ref_layer_norm(x, w, b, EPS))


def leaf_inputs(N=6, rows=3, dtype=torch.float64, wdtype=None, seed=0):
    g = generator(seed)
    x = torch.randn(rows, N, generator=g, **F64).to(dtype)
    w, b = (torch.randn(N, generator=g, **F64).to(wdtype or dtype) for _ in range(2))
    return [t.requires_grad_() for t in (x, w, b)]


# --------------------------------------------------------------------------------------------- defect 3: layout


@pytest.mark.parametrize("op", ["rms", "ln"])
def test_outputs_allow_in_place_ops_like_the_reference(op):
    """The output owns its memory: in-place ops work and autograd differentiates through them."""
    grads = []
    for f in pair(op):
        x, w, b = leaf_inputs()
        y = f(x, w, b)
        y.mul_(2).add_(1)
        (y.sin() * torch.arange(6, **F64)).sum().backward()
        grads.append((y.detach(), x.grad, w.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["rms", "ln"])
def test_width_zero_returns_empty_like_the_reference(op):
    outs = []
    for f in pair(op):
        x, w, b = leaf_inputs(N=0)
        y = f(x, w, b)
        gx, gw = torch.autograd.grad(y.sum(), (x, w), allow_unused=True, materialize_grads=True)
        outs.append((y, gx, gw))
    for got, want in zip(*outs):
        assert got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("op", ["rms", "ln"])
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                          (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)])
def test_output_and_gradient_dtypes_match_the_reference(op, dtype, wdtype):
    """LayerNorm returns the input dtype like F.layer_norm (bf16 input, fp32 weight -> bf16); RMSNorm promotes
    like the torch backend; gradients come back in their input's dtype."""
    dtypes = []
    for f in pair(op):
        x, w, b = leaf_inputs(dtype=dtype, wdtype=wdtype)
        y = f(x, w, b)
        gx, gw = torch.autograd.grad(y.float().sum(), (x, w))
        dtypes.append((y.dtype, gx.dtype, gw.dtype))
    assert dtypes[0] == dtypes[1]
    if op == "ln":
        assert dtypes[0][0] == F.layer_norm(torch.ones(1, 6, dtype=dtype), (6,), torch.ones(6, dtype=wdtype)).dtype


# ------------------------------------------------------------------------------------ defect 4: torch.compile


@pytest.mark.parametrize("op", ["rms", "ln"])
def test_compiles_with_fullgraph_and_matches_eager(op):
    """Under torch.compile the norms are custom ops (opaque to dynamo): fullgraph compiles, values and
    gradients equal the eager kernels'. aot_eager runs dynamo, fake tensors and AOTAutograd, not inductor."""
    kern, _ = pair(op)
    torch._dynamo.reset()
    compiled = torch.compile(kern, fullgraph=True, backend="aot_eager")
    results = []
    for f in (compiled, kern):
        x, w, b = leaf_inputs()
        y = f(x, w, b)
        results.append((y.detach(), *torch.autograd.grad((y.sin()).sum(), (x, w))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["rms", "ln"])
def test_forward_mode_of_a_compiled_function_is_right(op):
    """torch.func.jvp of a compiled norm: nonzero and equal to the reference's (never silently zero)."""
    kern, ref = pair(op)
    torch._dynamo.reset()
    compiled = torch.compile(kern, backend="aot_eager")
    x, w, b = (t.detach() for t in leaf_inputs())
    tangents = tuple(torch.cos(t) for t in (x, w, b))
    got = torch.func.jvp(compiled, (x, w, b), tangents)[1]
    want = torch.func.jvp(ref, (x, w, b), tangents)[1]
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's CUDA path needs a GPU")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=[pytest.mark.gpu, ON_GPU])])
@pytest.mark.parametrize("arch", ["gpt2", "llama2_qknorm"])
def test_compiled_training_step_matches_eager(arch, backend):
    """The model's training step (loss and backward) under torch.compile(fullgraph=True) with fused norms gives
    the gradients of the eager reference model (on CPU with aot_eager: dynamo, fake tensors and AOTAutograd
    around the interpreted kernels; inductor on a GPU)."""
    grads = []
    for norm_backend, compile_ in (("triton", True), ("torch", False)):
        torch.manual_seed(0)
        cfg = GPTConfig(arch=arch, vocab_size=11, dim=8, n_layers=1, n_heads=2, seq_len=4, ffn_hidden=8,
                        norm_backend=norm_backend)
        model = build_model(cfg).double().to(DEVICE)
        batch = token_batch(2, 4, 11)
        torch._dynamo.reset()
        forward = torch.compile(model, fullgraph=True, backend=backend) if compile_ else model
        next_token_loss(forward, batch).backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-10, atol=1e-12, msg=k)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schemas, fake (meta) implementations (strides included: the rows are not
    contiguous here) and autograd registrations are consistent with the real ops."""
    x = torch.randn(5, 2, **F64).t()
    w, dy, u = torch.randn(5, **F64), torch.randn(2, 5, **F64), torch.randn(2, 5, **F64)
    ops = torch.ops.hessian_tools
    for centered in (False, True):
        b = torch.randn(5, **F64) if centered else None
        for args in ((x, w, b, centered, EPS, 0), (x, None, None, centered, EPS, 0)):
            torch.library.opcheck(ops.norm_forward, args)
        torch.library.opcheck(ops.norm_backward, (x, w, b, dy, centered, EPS, 0))
        torch.library.opcheck(ops.norm_backward2, (x, w, dy, u, torch.randn_like(w), b, centered, EPS, 0))
        torch.library.opcheck(ops.norm_backward2, (x, None, dy, u, None, None, centered, EPS, 0))


# -------------------------------------------------------------------------------------- defect 5: device guard


class DeviceSpy:
    """Stands in for torch.cuda.device: records the devices entered and which one is current."""

    def __init__(self):
        self.entered, self.current = [], None

    def __call__(self, device):
        spy = self

        @contextlib.contextmanager
        def guard():
            spy.entered.append(torch.device(device))
            outer, spy.current = spy.current, torch.device(device)
            try:
                yield
            finally:
                spy.current = outer

        return guard()


def test_launch_runs_under_the_tensor_device(monkeypatch):
    """A kernel on cuda:1 launches inside torch.cuda.device(cuda:1), not on the current device 0."""
    spy = DeviceSpy()
    monkeypatch.setattr(torch.cuda, "device", spy)
    seen = []

    class FakeKernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(spy.current)

    x = torch.randn(3, 4, device="cpu")
    geo = dataclasses.replace(_common.launch_geometry(_common.NormSpec(False, EPS), x), device=torch.device("cuda", 1))
    _norm._launch(FakeKernel(), "test.fwd", geo, x, eps=EPS)
    assert seen == [torch.device("cuda", 1)] and spy.entered == [torch.device("cuda", 1)]
    seen.clear()
    _norm._launch(FakeKernel(), "test.fwd", _common.launch_geometry(_common.NormSpec(False, EPS), x), x, eps=EPS)
    assert seen == [None] and len(spy.entered) == 1  # CPU tensors (the interpreter) enter no CUDA context


def test_every_launch_carries_its_input_device(monkeypatch):
    """Forward, backward and double backward all launch with the geometry of their input's device."""
    devices = []
    launch = _norm._launch
    monkeypatch.setattr(_norm, "_launch", lambda kernel, name, geo, *a, **k: (devices.append((name, geo.device)),
                                                                           launch(kernel, name, geo, *a, **k)))
    x, w, b = leaf_inputs()
    y = layer_norm(x, w, b, EPS)
    (gx,) = torch.autograd.grad(y.sin().sum(), x, create_graph=True)
    gx.sum().backward()
    assert {name for name, _ in devices} == {"layer_norm.fwd", "layer_norm.bwd", "layer_norm.bwd2"}
    assert {device for _, device in devices} == {x.device}
