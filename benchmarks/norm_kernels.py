"""GPU benchmark of the fused norms: bandwidth of forward, backward and double backward as a fraction of clone,
and the Hessian engine through them.

Usage: python benchmarks/norm_kernels.py [--quick] [--widths ...] [--dtypes bf16 fp32] [--gbytes 1] [--dry-run]
Runs from a source tree without installing the package (it puts the tree on sys.path). Needs CUDA, except with
--dry-run, which runs every step on CPU (kernels in the Triton interpreter, tiny shapes, torch.compile with the
aot_eager backend) with each timed call made once and timed by the wall clock: its numbers measure nothing, and
its table goes to a temporary file unless --out names one. A real run writes its section of BENCHMARKS.md.

Norm table: rows are chosen so that the forward pass moves about `--gbytes` GB; bandwidth = bytes_moved / time,
with the bytes of each pass counted explicitly (the minimum traffic: each row tensor read or written once, see
`bytes_moved`), reported as a fraction of the bandwidth `torch.clone` reaches on the same GPU; times are the
median of triton.testing.do_bench. Columns: our Triton kernels, the PyTorch reference eager and under
torch.compile (compiled anew for every configuration, fullgraph; a pass that compiled no graph is reported as a
fallback), and Liger-Kernel's autograd Functions when liger_kernel is importable ("not installed" otherwise;
"n/a (...)" where an implementation cannot run a pass, e.g. a once-differentiable backward).

Engine rows: a GPT-2-small-shaped model (124M parameters) in float32 with norm_backend triton and torch: one
gradient, one HVP per mode (best of 3 after the first) and their ratio, and Hutchinson's trace estimate with
the operator's defaults (mode auto, chunk auto: batched double backward when it is the fastest mode) and with
double backward forced.
"""

import argparse
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a fresh clone runs without installing the package

from hessian_tools.benchmarks_md import write_section  # noqa: E402

SECTION = "norm-kernels"
PASSES = ("fwd", "bwd", "bwd2")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
QUICK = dict(widths=[1024, 4096, 16384], dtypes=["bf16", "fp32"])
DRY = dict(widths=[8], dtypes=["fp32"], gbytes=1e-5, ops=["rms_norm", "layer_norm"])
# row tensors (M x N) read or written, per pass: fwd x -> y; bwd x, dy -> dx; bwd2 x, dy, u -> dx2, ddy
ROW_TENSORS = {"fwd": 2, "bwd": 3, "bwd2": 5}
# per-feature vectors (N): rms fwd w; bwd w -> dw; bwd2 w, v -> dw2; LayerNorm adds b / db / s
VECTORS = {"rms_norm": {"fwd": 1, "bwd": 2, "bwd2": 3}, "layer_norm": {"fwd": 2, "bwd": 3, "bwd2": 4}}
ENGINE_MODEL = dict(arch="gpt2", vocab_size=50304, dim=768, n_layers=12, n_heads=12, seq_len=1024)
ENGINE_BATCH = (1, 256)
DRY_ENGINE_MODEL = dict(arch="gpt2", vocab_size=32, dim=16, n_layers=1, n_heads=2, seq_len=8)
DRY_ENGINE_BATCH = (1, 4)
HUTCHINSON_SAMPLES = 16  # two blocks of 8 probes (in a dry run: one block of 2)
EPS = 1e-5


def bytes_moved(op: str, pass_: str, M: int, N: int, itemsize: int) -> int:
    """Minimum bytes a pass over M rows of width N moves: row tensors and per-feature vectors, each once."""
    return (ROW_TENSORS[pass_] * M + VECTORS[op][pass_]) * N * itemsize


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="widths 1024 4096 16384, bf16 and fp32 (under 5 minutes)")
    p.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--ops", nargs="+", choices=sorted(VECTORS), default=["rms_norm", "layer_norm"])
    p.add_argument("--gbytes", type=float, default=1.0, help="bytes moved by the forward pass, in GB")
    p.add_argument("--no-engine", action="store_true", help="skip the engine rows (GPT-2 small HVPs, Hutchinson)")
    p.add_argument("--dry-run", action="store_true", help="run every step once on CPU; measures nothing")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="markdown file whose norm-kernels section is written (default: BENCHMARKS.md; with "
                        "--dry-run a temporary file)")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.dtypes = QUICK["widths"], QUICK["dtypes"]
    if args.dry_run:
        args.widths, args.dtypes, args.gbytes, args.ops = DRY["widths"], DRY["dtypes"], DRY["gbytes"], DRY["ops"]
    if args.out is None:
        args.out = pathlib.Path(tempfile.mkdtemp()) / "BENCHMARKS.md" if args.dry_run else ROOT / "BENCHMARKS.md"
    return args


class Run:
    """Where and how this run measures: the device, the timer, the torch.compile backend."""

    def __init__(self, dry: bool):
        import torch

        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.compile_backend = "aot_eager" if dry else "inductor"

    def ms(self, fn) -> float:
        """Milliseconds of one call: do_bench's median on CUDA; one wall-clock call in a dry run."""
        if self.dry:
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100)

    def seconds(self, fn, repeats: int = 3) -> float:
        """Best wall time of `repeats` synchronized calls (after one warm-up call); one call in a dry run."""
        import torch

        if not self.dry:
            fn()
        times = []
        for _ in range(1 if self.dry else repeats):
            if not self.dry:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if not self.dry:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)


class CountingBackend:
    """A torch.compile backend that counts the graphs it compiles, so that an eager fallback is seen."""

    def __init__(self, name: str):
        self.name, self.graphs = name, 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        return lookup_backend(self.name)(gm, example_inputs)


def liger_functions():
    """(rms_norm, layer_norm) of Liger-Kernel as f(x, w, b), or None when liger_kernel is not importable.

    Its autograd Functions are called directly, so that x, w and b are the leaves the backward reaches."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        return None
    return {
        "rms_norm": lambda x, w, b: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False),
        "layer_norm": lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, EPS),
    }


def implementations(op: str, run: Run):
    """name -> f(x, w, b) or a string saying why the column is empty; and the compile backend (a counter)."""
    import torch

    from models import kernels, norms

    if op == "rms_norm":
        impls = {
            "triton": lambda x, w, b: kernels.rms_norm(x, w, EPS),
            "torch": lambda x, w, b: norms.rms_norm(x, w, EPS, "torch"),
        }
    else:
        impls = {
            "triton": lambda x, w, b: kernels.layer_norm(x, w, b, EPS),
            "torch": lambda x, w, b: norms.layer_norm(x, w, b, EPS, "torch"),
        }
    torch._dynamo.reset()  # a fresh compile for every configuration: no recompile limit, no stale graphs
    backend = CountingBackend(run.compile_backend)
    eager = impls["torch"]
    impls["torch.compile"] = torch.compile(lambda x, w, b: eager(x, w, b), backend=backend, fullgraph=True,
                                           dynamic=False)  # fmt: skip
    liger = liger_functions()
    impls["liger"] = "not installed" if liger is None else liger[op]
    return impls, backend


def pass_closure(f, pass_: str, x, w, b):
    """A no-argument callable running one pass; graphs for the backward passes are built once, outside."""
    import torch

    if pass_ == "fwd":
        return lambda: f(x, w, b)
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    y = f(*leaves) if b is not None else f(*leaves, None)
    dy = torch.randn_like(y).requires_grad_()
    if pass_ == "bwd":
        return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)
    grads = torch.autograd.grad(y, leaves[:2], dy, create_graph=True)
    cot = [torch.randn_like(g) for g in grads]
    return lambda: torch.autograd.grad(grads, [*leaves[:2], dy], cot, retain_graph=True)


def cell(f, name, pass_, x, w, b, nbytes, clone_bw, run: Run, backend):
    """(text of one cell, milliseconds or None)."""
    import torch

    if isinstance(f, str):
        return f, None
    graphs = backend.graphs
    try:
        ms = run.ms(pass_closure(f, pass_, x, w, b))
    except Exception as err:  # an implementation without this pass (no double backward, ...)
        first = str(err).strip().splitlines()[0][:90] if str(err).strip() else ""
        return f"n/a ({type(err).__name__}: {first})".replace("|", "/"), None
    finally:
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    bw = nbytes / ms / 1e6  # GB/s
    text = f"{bw:.3g} ({100 * bw / clone_bw:.0f}%)"
    if name == "torch.compile" and backend.graphs == graphs:
        text += " eager fallback: no graph compiled"
    return text, ms


def measure(op, dtype_name, N, gbytes, clone_bw, run: Run):
    """Rows of the norm table for one (op, dtype, width)."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    itemsize = torch.empty((), dtype=dtype).element_size()
    M = max(1, int(gbytes * 1e9) // (2 * N * itemsize))
    x = torch.randn(M, N, device=run.device, dtype=dtype)
    w = torch.randn(N, device=run.device, dtype=dtype)
    b = torch.randn(N, device=run.device, dtype=dtype) if op == "layer_norm" else None
    impls, backend = implementations(op, run)
    rows = []
    for pass_ in PASSES:
        nbytes = bytes_moved(op, pass_, M, N, itemsize)
        cells, ms = {}, {}
        for name, f in impls.items():
            cells[name], ms[name] = cell(f, name, pass_, x, w, b, nbytes, clone_bw, run, backend)
        speedup = f"{ms['torch'] / ms['triton']:.1f}x" if ms["torch"] and ms["triton"] else "n/a"
        rows.append((op, dtype_name, N, M, pass_, cells, speedup))
    return rows


def clone_bandwidth(gbytes: float, run: Run) -> float:
    """GB/s of torch.clone on a tensor of gbytes / 2 (read + write = gbytes)."""
    import torch

    t = torch.empty(max(1, int(gbytes * 1e9) // 2), dtype=torch.uint8, device=run.device)
    return 2 * t.numel() / run.ms(lambda: t.clone()) / 1e6


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


def engine_rows(run: Run) -> dict:
    """HVP / gradient per mode for both norm backends and Hutchinson through the triton norms (see the module
    docstring); {"backends": {backend: {...}}, "hutchinson": [...]}."""
    import torch

    from hessian_tools.estimators.trace import hutchinson_trace
    from hessian_tools.operators import MODES, ParamHessian
    from models import build_model, math_attention, next_token_loss
    from models.config import GPTConfig

    shape, (B, T) = (DRY_ENGINE_MODEL, DRY_ENGINE_BATCH) if run.dry else (ENGINE_MODEL, ENGINE_BATCH)
    idx = torch.randint(0, shape["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(0))
    batch = (idx[:, :-1].to(run.device), idx[:, 1:].to(run.device))
    out = {"model": {**shape, "batch": [B, T]}, "backends": {}, "hutchinson": []}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = build_model(GPTConfig(**shape, norm_backend=backend)).to(run.device).eval()
        params = list(model.parameters())

        def gradient():
            with math_attention():
                torch.autograd.grad(next_token_loss(model, batch), params)

        row = {"n_params": sum(p.numel() for p in params), "grad_s": run.seconds(gradient), "modes": {}}
        v = torch.randn(row["n_params"], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for mode in MODES:
            op = ParamHessian(model, [batch], dtype=torch.float32, mode=mode)
            hvp = run.seconds(lambda: op.matvec(v))
            row["modes"][mode] = {"hvp_s": hvp, "ratio": hvp / row["grad_s"]}
        out["backends"][backend] = row
        if backend == "triton":
            for mode in ("auto", "double-backward"):  # chunk 16, as "auto" is on CUDA, in the dry run as well
                op = ParamHessian(model, [batch], dtype=torch.float32, mode=mode, chunk=16 if run.dry else "auto")
                start = time.perf_counter()
                est = hutchinson_trace(op, n_samples=2 if run.dry else HUTCHINSON_SAMPLES)
                out["hutchinson"].append({"requested_mode": mode, "mode": op.mode, "chunk": op.chunk,
                                          "trace": est.value, "std_error": est.error, "status": est.status,
                                          "hvps": est.hvp_count, "seconds": time.perf_counter() - start})
        model = params = op = None  # free this backend's model and graphs before the next one is built
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def engine_table(engine: dict) -> str:
    m = engine["model"]
    lines = [
        f"Engine through the norms: {m['arch']} shape, dim {m['dim']}, {m['n_layers']} layers, vocab "
        f"{m['vocab_size']}, batch {m['batch'][0]} x {m['batch'][1]} tokens, float32; HVP time = best of 3 after "
        "the first product; ratio = HVP / gradient.",
        "",
        "| norm backend | params | gradient (ms) | " + " | ".join(f"{mode} HVP (ms, ratio)" for mode in
                                                                 next(iter(engine["backends"].values()))["modes"]) +
        " |",
        "|---|---|---|" + "---|" * len(next(iter(engine["backends"].values()))["modes"]),
    ]  # fmt: skip
    for backend, row in engine["backends"].items():
        cells = [f"{1e3 * r['hvp_s']:.1f} ({r['ratio']:.2f}x)" for r in row["modes"].values()]
        lines.append(f"| {backend} | {row['n_params'] / 1e6:.1f}M | {1e3 * row['grad_s']:.1f} | " + " | ".join(cells) +
                     " |")  # fmt: skip
    lines += ["", f"Hutchinson trace, {HUTCHINSON_SAMPLES} Rademacher probes in blocks of 8 through `matmat`, "
                  "norm_backend triton:", "",
              "| requested mode | mode run | chunk | trace +- std. error | HVPs | seconds | status |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for h in engine["hutchinson"]:
        value = "n/a" if h["trace"] is None else f"{h['trace']:.4g} +- {h['std_error']:.2g}"
        lines.append(f"| {h['requested_mode']} | {h['mode']} | {h['chunk']} | {value} | {h['hvps']} | "
                     f"{h['seconds']:.2f} | {h['status']} |")  # fmt: skip
    return "\n".join(lines)


def environment(run: Run) -> str:
    import os
    import platform

    import torch
    import triton

    device = "CPU (dry run: kernels in the Triton interpreter)" if run.dry else torch.cuda.get_device_name()
    return (f"Run on {device}; torch {torch.__version__}, triton {triton.__version__}, Python "
            f"{platform.python_version()}; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}.")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("norm_kernels benchmark needs a CUDA GPU (none found); nothing measured (--dry-run runs it on CPU)",
              file=sys.stderr)  # fmt: skip
        return 2
    run = Run(args.dry_run)
    started = time.perf_counter()
    clone_bw = clone_bandwidth(args.gbytes, run)
    rows = []
    for op in args.ops:
        for dtype_name in args.dtypes:
            for N in args.widths:
                rows += measure(op, dtype_name, N, args.gbytes, clone_bw, run)
                print(*rows[-3:], sep="\n", flush=True)
    parts = [environment(run)]
    if args.dry_run:
        parts.append("DRY RUN on CPU: every step ran once; the numbers below measure nothing.")
    parts.append(table(rows, clone_bw, "CPU" if args.dry_run else torch.cuda.get_device_name()))
    print(f"norm table done after {time.perf_counter() - started:.0f} s", flush=True)
    if not args.no_engine:
        parts.append(engine_table(engine_rows(run)))
    parts.append(f"Whole run: {time.perf_counter() - started:.0f} s including compiles.")
    body = "\n\n".join(parts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_section(args.out, SECTION, body)
    print(body)
    print(f"section {SECTION!r} written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
