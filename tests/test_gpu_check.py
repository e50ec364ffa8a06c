"""benchmarks/gpu_check.sh and benchmarks/norm_kernels.py, run as the GPU machine will run them, in their CPU
dry-run mode (every step but the CUDA timing; kernels in the Triton interpreter)."""

import importlib.util
import os
import pathlib
import subprocess
import sys

from hessian_tools.benchmarks_md import markers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_benchmark_runs_from_a_source_tree_without_the_package_installed(tmp_path):
    """python -S (no site-packages, so no editable install) from another directory still finds the package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-S", str(ROOT / "benchmarks" / "norm_kernels.py"), "--help"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--quick" in done.stdout and "--dry-run" in done.stdout


def section(text: str) -> str:
    start, end = markers("norm-kernels")
    assert start in text and end in text
    return text.split(start, 1)[1].split(end, 1)[0]


def test_gpu_check_dry_run_runs_every_step_and_writes_the_section(tmp_path):
    before = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    for n in (1, 2, 3):
        assert f"gpu_check step {n}" in log
    assert "FAILED" not in log and "all steps passed" in log
    assert "1 passed" in (tmp_path / "tests.log").read_text()  # the kernel test step ran a kernel test
    body = section((tmp_path / "BENCHMARKS.md").read_text())
    assert "DRY RUN" in body
    for op in ("rms_norm", "layer_norm"):
        for pass_ in ("fwd", "bwd", "bwd2"):
            row = next(line for line in body.splitlines() if line.startswith(f"| {op} | fp32 | 8 |") and
                       f"| {pass_} |" in line)  # fmt: skip
            triton, torch, compiled, liger = (c.strip() for c in row.split("|")[6:10])
            assert "%" in triton and "%" in torch  # both measured (once)
            assert liger == "not installed" or importlib.util.find_spec("liger_kernel")
            if pass_ == "bwd2":  # AOTAutograd's compiled backward is once differentiable, and says so
                assert compiled.startswith("n/a (RuntimeError") and "double backward" in compiled
            else:
                assert "%" in compiled and "fallback" not in compiled
    assert "| triton |" in body and "| torch |" in body  # engine rows for both norm backends
    hutchinson = [line for line in body.splitlines() if line.startswith(("| auto |", "| double-backward |"))]
    assert len(hutchinson) == 2 and all(line.rstrip().endswith("| ok |") for line in hutchinson)
    assert "| double-backward | double-backward | 16 |" in body  # batched double backward through the kernels
    after = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    assert after == before  # a dry run never touches the committed file
