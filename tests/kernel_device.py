"""Where the kernel tests run: on the GPU when there is one (benchmarks/gpu_check.sh), else on CPU with the
kernels in the Triton interpreter. Kernel test modules import `on_device` (an autouse fixture) and draw random
numbers from `generator(seed)`, so the same tests run on both."""

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def on_device():
    """Factory functions (randn, zeros, models' parameters) create tensors on DEVICE during each test."""
    with DEVICE:
        yield


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def token_batch(batch: int, seq: int, vocab: int, seed: int = 1):
    """(idx, targets) of random tokens on DEVICE."""
    g = generator(seed)
    return tuple(torch.randint(0, vocab, (batch, seq), generator=g, device=DEVICE) for _ in range(2))
