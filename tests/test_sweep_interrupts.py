"""Sweeps survive signals: SIGKILL, SIGTERM and Ctrl-C (SIGINT) of a real `sweep` process, then the same command
again, end with the records of an uninterrupted sweep: every unit once, the same statuses, the same values
where no warm start is involved and overlapping intervals where the resumed (cold) solve replaces a warm one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hessian_tools.results_io import read_records
from hessian_tools.sweep import record_key
from models.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=16, n_layers=1, n_heads=2, seq_len=8, batch_size=4, steps=6, save_every=2, warmup=1,
            norm_backend="torch", device="cpu")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
FLAGS = ["--batches", "2", "--batch-size", "2", "--seq-len", "8", "--tol", "1e-4", "--groups", "0", "--quiet",
         "--what", "params,trace"]
UNITS = 3 * 3  # checkpoints x measures


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run of three checkpoints: its later checkpoints are warm-started from the earlier ones."""
    root = tmp_path_factory.mktemp("runs")
    train(TrainConfig(arch="simplegpt", lr=1e-2, **TINY), root / "simplegpt", progress=False)
    return [root / "simplegpt"]


def command(runs, out) -> list[str]:
    return [sys.executable, "-m", "hessian_tools", "sweep", *map(str, runs), "--out", str(out), *FLAGS]


@pytest.fixture(scope="module")
def whole(runs, tmp_path_factory):
    """The uninterrupted sweep's records, by key."""
    out = tmp_path_factory.mktemp("whole") / "whole.jsonl"
    done = subprocess.run(command(runs, out), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = read_records(out)
    assert len(records) == UNITS
    return {record_key(r): r for r in records}


def count(out) -> int:
    return len(read_records(out)) if out.exists() else 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signalled_sweep_resumes_to_the_uninterrupted_records(sig, runs, whole, tmp_path):
    out = tmp_path / "r.jsonl"
    # SIGINT at its default, so the child's Python turns it into KeyboardInterrupt (a background job inherits
    # it ignored)
    proc = subprocess.Popen(command(runs, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while count(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    before = read_records(out)
    assert 3 <= len(before) < UNITS  # stopped mid-sweep
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        with open(out, "ab") as f:  # a kill may also cut a line short: simulate the worst case
            f.write(b'{"provenance": {"run_dir"')
    else:
        assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and f"interrupted by {sig.name}" in last and "records written so far" in last
    done = subprocess.run(command(runs, out), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = read_records(out)
    assert [r for r in records[:len(before)]] == before  # nothing written before was rewritten
    got = {record_key(r): r for r in records}
    assert len(got) == len(records) == UNITS and set(got) == set(whole)
    for key, r in got.items():
        w = whole[key]
        assert r["status"] == w["status"] == "ok", key
        if not (r["settings"].get("warm_start") or w["settings"].get("warm_start")):
            assert r["value"] == w["value"], key  # the same solve in both sweeps
        else:  # one was warm-started from the previous checkpoint, the other (after the restart) maybe not
            (lo1, hi1), (lo2, hi2) = r["payload"]["interval"], w["payload"]["interval"]
            assert max(lo1, lo2) <= min(hi1, hi2), (key, r["payload"]["interval"], w["payload"]["interval"])
