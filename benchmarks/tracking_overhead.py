"""What sharpness tracking adds to a training run (hessian_tools/bench/tracking_cost.py): writes
benchmarks/results/tracking.json and, from it, the sharpness-tracking section of BENCHMARKS.md.

Usage: python benchmarks/tracking_overhead.py   (the same as `hessian-tools bench --tracking`)
"""

from hessian_tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "--tracking"]))
