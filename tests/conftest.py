"""Test set-up: Triton kernels run in the interpreter on CPU (set before triton is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: one thread avoids oversubscribing CI's 2 cores (measured 3.0 s -> 0.09 s for a
# 300 x 300 Lanczos run under load).
torch.set_num_threads(1)
