"""GPU benchmark of the fused norms: bandwidth of forward, backward and double backward as a fraction of clone.

Usage (CUDA only): python benchmarks/norm_kernels.py [--widths 1024 ... 16384] [--dtypes bf16 fp32] [--gbytes 1]
Rows are chosen so that the forward pass moves about `--gbytes` GB. Bandwidth = bytes_moved / time, with the
bytes of each pass counted explicitly (the minimum traffic: each row tensor read or written once, see
`bytes_moved`), and reported as a fraction of the bandwidth `torch.clone` reaches on the same GPU. Columns: our
Triton kernels, the PyTorch reference (eager and torch.compile) and Liger-Kernel where importable ("n/a" where
an implementation cannot run a pass, e.g. Liger's once-differentiable backward). Times from
triton.testing.do_bench (median). The table replaces the section between the markers in BENCHMARKS.md.
"""

import argparse
import pathlib
import sys

from hessian_tools.benchmarks_md import write_section

SECTION = "norm-kernels"
PASSES = ("fwd", "bwd", "bwd2")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
# row tensors (M x N) read or written, per pass: fwd x -> y; bwd x, dy -> dx; bwd2 x, dy, u -> dx2, ddy
ROW_TENSORS = {"fwd": 2, "bwd": 3, "bwd2": 5}
# per-feature vectors (N): rms fwd w; bwd w -> dw; bwd2 w, v -> dw2; LayerNorm adds b / db / s
VECTORS = {"rms_norm": {"fwd": 1, "bwd": 2, "bwd2": 3}, "layer_norm": {"fwd": 2, "bwd": 3, "bwd2": 4}}


def bytes_moved(op: str, pass_: str, M: int, N: int, itemsize: int) -> int:
    """Minimum bytes a pass over M rows of width N moves: row tensors and per-feature vectors, each once."""
    return (ROW_TENSORS[pass_] * M + VECTORS[op][pass_]) * N * itemsize


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--ops", nargs="+", choices=sorted(VECTORS), default=["rms_norm", "layer_norm"])
    p.add_argument("--gbytes", type=float, default=1.0, help="bytes moved by the forward pass, in GB")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parents[1] / "BENCHMARKS.md")
    return p.parse_args(argv)


def implementations(op: str, N: int, device, dtype):
    """name -> f(x, w, b) for every implementation available here."""
    import torch

    from models import kernels, norms

    if op == "rms_norm":
        impls = {
            "triton": lambda x, w, b: kernels.rms_norm(x, w, 1e-5),
            "torch": lambda x, w, b: norms.rms_norm(x, w, 1e-5, "torch"),
        }
    else:
        impls = {
            "triton": lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5),
            "torch": lambda x, w, b: norms.layer_norm(x, w, b, 1e-5, "torch"),
        }
    impls["torch.compile"] = torch.compile(impls["torch"], dynamic=False)
    try:
        from liger_kernel.transformers.layer_norm import LigerLayerNorm
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except ImportError:
        return impls
    module = LigerRMSNorm(N, eps=1e-5) if op == "rms_norm" else LigerLayerNorm(N, eps=1e-5)
    module = module.to(device=device, dtype=dtype)

    def liger(x, w, b):
        module.weight = torch.nn.Parameter(w)
        if op == "layer_norm":
            module.bias = torch.nn.Parameter(b)
        return module(x)

    impls["liger"] = liger
    return impls


def pass_closure(f, pass_: str, x, w, b):
    """A no-argument callable running one pass; graphs for the backward passes are built once, outside."""
    import torch

    params = [w] if b is None else [w, b]
    if pass_ == "fwd":
        return lambda: f(x, w, b)
    xg = x.detach().requires_grad_()
    pg = [p.detach().requires_grad_() for p in params]
    y = f(xg, *pg) if b is not None else f(xg, pg[0], None)
    dy = torch.randn_like(y).requires_grad_()
    if pass_ == "bwd":
        return lambda: torch.autograd.grad(y, [xg, *pg], dy, retain_graph=True)
    grads = torch.autograd.grad(y, [xg, pg[0]], dy, create_graph=True)
    cot = [torch.randn_like(g) for g in grads]
    return lambda: torch.autograd.grad(grads, [xg, pg[0], dy], cot, retain_graph=True)


def measure(op, dtype_name, N, gbytes, clone_bw):
    """Rows of the table for one (op, dtype, width): per pass, bandwidth fraction of clone per implementation."""
    import torch
    from triton.testing import do_bench

    dtype = getattr(torch, DTYPES[dtype_name])
    itemsize = torch.empty((), dtype=dtype).element_size()
    M = max(1, int(gbytes * 1e9) // (2 * N * itemsize))
    x = torch.randn(M, N, device="cuda", dtype=dtype)
    w = torch.randn(N, device="cuda", dtype=dtype)
    b = torch.randn(N, device="cuda", dtype=dtype) if op == "layer_norm" else None
    impls = implementations(op, N, x.device, dtype)
    rows = []
    for pass_ in PASSES:
        nbytes = bytes_moved(op, pass_, M, N, itemsize)
        cells, ms = {}, {}
        for name, f in impls.items():
            try:
                ms[name] = do_bench(pass_closure(f, pass_, x, w, b), warmup=25, rep=100)
                bw = nbytes / ms[name] / 1e6  # GB/s
                cells[name] = f"{bw:.0f} ({100 * bw / clone_bw:.0f}%)"
            except Exception as err:  # an implementation without this pass (no double backward, ...)
                cells[name] = f"n/a ({type(err).__name__})"
            torch.cuda.empty_cache()
        speedup = f"{ms['torch'] / ms['triton']:.1f}x" if "torch" in ms and "triton" in ms else "n/a"
        rows.append((op, dtype_name, N, M, pass_, cells, speedup))
    return rows


def clone_bandwidth(gbytes: float) -> float:
    """GB/s of torch.clone on a tensor of gbytes / 2 (read + write = gbytes)."""
    import torch
    from triton.testing import do_bench

    t = torch.empty(int(gbytes * 1e9) // 2, dtype=torch.uint8, device="cuda")
    return 2 * t.numel() / do_bench(lambda: t.clone(), warmup=25, rep=100) / 1e6


def table(rows, clone_bw: float, device_name: str) -> str:
    names = list(dict.fromkeys(name for row in rows for name in row[5]))
    lines = [
        f"Fused norm kernels on {device_name}: GB/s (fraction of torch.clone, {clone_bw:.0f} GB/s). "
        "Bytes per pass counted as in `benchmarks/norm_kernels.py::bytes_moved`; speed-up = torch eager / triton.",
        "",
        "| op | dtype | N | rows | pass | " + " | ".join(names) + " | speed-up vs eager |",
        "|" + "---|" * (6 + len(names)),
    ]
    for op, dt, N, M, pass_, cells, speedup in rows:
        lines.append(f"| {op} | {dt} | {N} | {M} | {pass_} | " + " | ".join(cells.get(n, "") for n in names) +
                     f" | {speedup} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("norm_kernels benchmark needs a CUDA GPU (none found); nothing measured", file=sys.stderr)
        return 2
    clone_bw = clone_bandwidth(args.gbytes)
    rows = []
    for op in args.ops:
        for dtype_name in args.dtypes:
            for N in args.widths:
                rows += measure(op, dtype_name, N, args.gbytes, clone_bw)
                print(*rows[-3:], sep="\n", flush=True)
    body = table(rows, clone_bw, torch.cuda.get_device_name())
    write_section(args.out, SECTION, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
