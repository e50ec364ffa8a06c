#!/usr/bin/env bash
# The peers of `hessian-tools bench --peers`, in their own virtual environment, without letting any of them
# replace the pinned CPU build of torch (curvlinops 3.0.1 alone would pull torch 2.14.1 with CUDA).
# Usage: bash benchmarks/install_peers.sh [VENV]   (default VENV: .peers-venv in the repository root)
# Then: VENV/bin/hessian-tools bench --peers
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.peers-venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch==2.13.0
pip install -q -e '.[dev]'
# the peers themselves, with --no-deps, then the few small dependencies they import
pip install -q --no-deps hessian-eigenthings==1.0a5 curvlinops-for-pytorch==3.0.1
pip install -q --no-deps einops einconv opt-einsum linear_operator backpack-for-pytorch
python - <<'PY'
import torch
assert torch.__version__ == "2.13.0+cpu" or torch.cuda.is_available(), torch.__version__
import curvlinops, hessian_eigenthings, pyhessian  # noqa: F401
print("peers installed; torch", torch.__version__)
PY
