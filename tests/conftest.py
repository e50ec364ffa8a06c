"""Test set-up: Triton kernels run in the interpreter on CPU (set before triton is imported); small disks."""

import os
import subprocess

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: one thread avoids oversubscribing CI's 2 cores (measured 3.0 s -> 0.09 s for a
# 300 x 300 Lanczos run under load).
torch.set_num_threads(1)


@pytest.fixture
def mounted(tmp_path):
    """mounted(options) -> a fresh tmpfs with mount options, e.g. "size=64k,ro" (the test is skipped where
    mounting is not allowed; the injected-ENOSPC tests stand regardless). `fill_disk` fills one."""
    mounts = []

    def mount(options):
        point = tmp_path / f"mnt{len(mounts)}"
        point.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], check=True)


@pytest.fixture
def fill_disk():
    """fill_disk(disk): write zeros into disk/filler until the disk is full."""

    def fill(disk):
        fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        os.close(fd)

    return fill
