"""Training runs survive kills, interrupts and a second process: SIGKILL, SIGTERM and Ctrl-C of a real `train`
process end, after a rerun, with the records of an uninterrupted run; the metrics log is never cut in place; a
fresh run killed before its first rename resumes; two trains on one RUN_DIR cannot both run."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import models.train as train_mod
from hessian_tools.cli import main
from models.checkpoint import list_checkpoints, load_checkpoint
from models.train import TrainConfig, read_metrics, train

ROOT = Path(__file__).resolve().parents[1]
FLAGS = {"arch": "llama2", "dim": 16, "n_layers": 1, "n_heads": 2, "seq_len": 8, "batch_size": 4, "steps": 30,
         "warmup": 2, "lr": 1e-2, "save_every": 10, "track_every": 10, "track_batch_size": 2, "track_hvps": 6,
         "norm_backend": "torch", "device": "cpu"}
CLI = {"n_layers": "--layers", "n_heads": "--heads", "track_every": "--track-sharpness", "track_hvps": "--track-hvps"}
CFG = TrainConfig(**FLAGS)
TIMING = ("tokens_per_s", "wall_time_s")


def command(out) -> list[str]:
    flags = [x for k, v in FLAGS.items() for x in (CLI.get(k, "--" + k.replace("_", "-")), str(v))]
    return [sys.executable, "-m", "hessian_tools", "train", "--out", str(out), "--quiet", *flags]


def records(run_dir) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(Path(run_dir) / "metrics.jsonl",
                                                                                   kind=None)]


def last_loss_step(run_dir) -> int:
    lines = read_metrics(Path(run_dir) / "metrics.jsonl")
    return lines[-1]["step"] if lines else 0


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train(CFG, out, progress=False)
    return out


def assert_same_run(run_dir, whole):
    got = records(run_dir)
    assert got == records(whole)  # every loss and sharpness line, bit for bit, each once
    assert len({(m["kind"], m["step"], m.get("measure")) for m in got}) == len(got)
    assert [p.name for p in list_checkpoints(run_dir)] == [p.name for p in list_checkpoints(whole)]
    a, b = load_checkpoint(run_dir), load_checkpoint(whole)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("sig, after", [(signal.SIGKILL, 3), (signal.SIGKILL, 12), (signal.SIGTERM, 12),
                                        (signal.SIGINT, 12)],
                         ids=["SIGKILL-before-first-checkpoint", "SIGKILL", "SIGTERM", "SIGINT"])
def test_a_signalled_train_process_resumes_to_the_uninterrupted_records(sig, after, whole, tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one thread, as this process
    # SIGINT at its default, so the child's Python turns it into KeyboardInterrupt (a background job inherits
    # it ignored)
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while last_loss_step(out) < after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[1]
        if sig == signal.SIGKILL and after > 10:  # meanwhile, a second train on the same RUN_DIR is refused
            before = (out / "metrics.jsonl").read_bytes()
            assert main(command(out)[3:]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"another train process (pid {proc.pid})" in err
            assert (out / "metrics.jsonl").read_bytes().startswith(before)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    stopped_at = last_loss_step(out)
    assert stopped_at < CFG.steps  # it was stopped mid-run
    if after < CFG.save_every:
        assert not list_checkpoints(out)  # ... before its first checkpoint
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
        resume = 10 * (stopped_at // 10)
        status = json.loads((out / "status.json").read_text())
        assert status["status"] == "interrupted" and status["resume_from"] == resume
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and f"interrupted by {signal.Signals(sig).name}" in last
        assert "is resumable" in last and f"checkpoint at step {resume} (checked)" in last
    assert train(CFG, out, progress=False).status == "completed"
    assert_same_run(out, whole)


def test_resume_never_cuts_the_metrics_in_place(whole, tmp_path, monkeypatch):
    """A kill at the worst moment of a resume's rewrite of metrics.jsonl (just after the file is opened for
    writing, or just before a rename over it) keeps every line already there."""
    out = tmp_path / "run"
    real_batch = train_mod.training_batch

    def interrupted(splits, spec, step, *args):
        if step == 15:
            raise KeyboardInterrupt
        return real_batch(splits, spec, step, *args)

    monkeypatch.setattr(train_mod, "training_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(CFG, out, progress=False)
    monkeypatch.setattr(train_mod, "training_batch", real_batch)
    before = (out / "metrics.jsonl").read_bytes()
    assert last_loss_step(out) == 15  # lines after checkpoint 10: the resume must drop them
    real_open, real_replace = io.open, os.replace

    def killed_after_truncating(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if Path(file).name == "metrics.jsonl" and "w" in mode:
            f.close()
            raise KeyboardInterrupt
        return f

    def killed_before_renaming(src, dst, *args, **kwargs):
        if Path(dst).name == "metrics.jsonl":
            raise KeyboardInterrupt
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(io, "open", killed_after_truncating)  # pathlib's open and write_text go through it
    monkeypatch.setattr(os, "replace", killed_before_renaming)
    with pytest.raises(KeyboardInterrupt):
        train(CFG, out, progress=False)
    assert (out / "metrics.jsonl").read_bytes() == before
    monkeypatch.setattr(io, "open", real_open)
    monkeypatch.setattr(os, "replace", real_replace)
    assert train(CFG, out, progress=False).status == "completed"
    assert_same_run(out, whole)


def test_a_fresh_run_killed_before_its_first_rename_resumes(whole, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".train_config.json.tmp").write_text('{"arch": "lla')  # the first write, cut short by a kill
    (out / ".train.lock").write_text("4242")
    assert train(CFG, out, progress=False).status == "completed"
    assert not list(out.glob(".*.tmp"))
    assert_same_run(out, whole)
