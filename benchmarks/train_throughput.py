"""Training throughput of every variant (hessian_tools/bench/throughput.py): writes benchmarks/results/
train-throughput.json and, from it, the train-throughput section of BENCHMARKS.md.

Usage: python benchmarks/train_throughput.py   (the same as `hessian-tools bench --throughput`)
"""

from hessian_tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "--throughput"]))
