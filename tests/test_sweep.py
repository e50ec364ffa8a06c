"""Checkpoint sweeps: comparable measurements, an independent reference, restart after a kill, corrupt
checkpoints, concurrent writers, the CLI."""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hessian_tools.sweep as sweep_mod
from hessian_tools.cli import main
from hessian_tools.errors import UserError
from hessian_tools.results_io import read_records
from hessian_tools.sweep import SweepSettings, default_sites, plan, record_key, sweep
from models.checkpoint import list_checkpoints, load_checkpoint
from models.config import ARCHS, GPTConfig
from models.gpt import build_model, math_attention
from models.sites import list_sites
from models.train import TrainConfig, train
from operator_refs import confirmed_dense_hessian

TINY = dict(dim=16, n_layers=1, n_heads=2, seq_len=8, batch_size=4, steps=4, save_every=2, warmup=1,
            norm_backend="torch", device="cpu")
FAST = dict(n_batches=2, batch_size=2, seq_len=8, tol=1e-4, n_groups=2)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for arch in ("simplegpt", "llama2"):
        train(TrainConfig(arch=arch, lr=1e-2, **TINY), root / arch, progress=False)
    return root


def keys(records):
    return [record_key(r) for r in records]


@pytest.mark.parametrize("arch", ARCHS)
def test_default_sites_are_valid_and_comparable(arch):
    model = build_model(GPTConfig(arch=arch, vocab_size=11, dim=16, n_layers=2, n_heads=2, seq_len=8))
    sites = default_sites(model)
    assert set(s for s, _, _ in sites) <= set(list_sites(model))
    assert [(role, layer) for _, role, layer in sites] == [(r, i) for i in range(2)
                                                           for r in ("attn_in", "ffn_in", "block_out")]


def test_sweep_measures_every_checkpoint_on_the_same_batches(runs, tmp_path):
    out = tmp_path / "r.jsonl"
    summary = sweep([runs / "simplegpt", runs / "llama2"], out, SweepSettings(**FAST), progress=False)
    records = read_records(out)
    assert summary["measured"] == len(records) == 2 * 2 * 2 and summary["errors"] == 0
    assert len(set(keys(records))) == len(records)
    by_measure = collections.Counter((r["provenance"]["arch"], r["provenance"]["measure"]) for r in records)
    assert by_measure == {(a, m): 2 for a in ("simplegpt", "llama2")
                          for m in ("params.lambda_max", "params.spectral_norm")}
    for r in records:
        p = r["provenance"]
        assert r["status"] == "ok" and r["converged"] and r["value"] > 0 and r["hvp_count"] > 0
        assert p["batches"] == {"n_batches": 2, "batch_size": 2, "seq_len": 8, "seed": 0, "split": "held-out"}
        assert p["version"] and p["checkpoint"].endswith(f"ckpt_{p['step']:07d}")
        spread = r["payload"]["data_spread"]
        assert len(spread["group_values"]) == 2 and spread["std_error"] == pytest.approx(spread["std"] / 2 ** 0.5)
        assert r["settings"]["self_check"]["difference_rel"] < 1e-2
    # the batch losses recorded by each operator are those of the same tokens: identical at equal weights
    losses = {r["provenance"]["step"]: r["settings"]["operator"]["batch_losses"] for r in records
              if r["provenance"]["arch"] == "llama2" and r["provenance"]["measure"] == "params.lambda_max"}
    ckpt = load_checkpoint(runs / "llama2" / "ckpt_0000002")
    batches = ckpt.measurement_batches(2, 2, 8, seed=0)
    from models.gpt import next_token_loss
    with torch.no_grad():
        assert losses[2] == pytest.approx([float(next_token_loss(ckpt.model, b)) for b in batches], rel=1e-5)
    # the second checkpoint is warm-started from the first one's top vector
    warm = {r["provenance"]["step"]: r["settings"]["warm_start"] for r in records
            if r["provenance"]["measure"] == "params.lambda_max"}
    assert warm == {2: False, 4: True}


def test_activation_norm_matches_a_dense_float64_reference(runs, tmp_path):
    out = tmp_path / "a.jsonl"
    settings = SweepSettings(what=("activation",), sites=r"^layers\.0:out$", steps=(-1,), n_batches=1, batch_size=2,
                             seq_len=8, dtype="float64", tol=1e-10, n_groups=0)
    sweep([runs / "simplegpt"], out, settings, progress=False)
    (record,) = read_records(out)
    assert record["provenance"]["site"] == "layers.0:out" and record["provenance"]["step"] == 4
    ckpt = load_checkpoint(runs / "simplegpt")
    model = ckpt.model.double().requires_grad_(False)
    idx, targets = ckpt.measurement_batches(1, 2, 8, seed=0)[0]
    with torch.no_grad():
        x0 = model.layers[0](model.tok_embeddings(idx), model.rope_cos, model.rope_sin)

    def f(delta):  # the loss as a function of layer 0's output, by a separate forward written out here
        with math_attention():
            x = x0 + delta.view_as(x0)
            logits = model.output(model.norm(x))
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    H = confirmed_dense_hessian(f, torch.zeros(x0.numel(), dtype=torch.float64))
    reference = float(np.abs(np.linalg.eigvalsh(H.numpy())).max())
    assert record["value"] == pytest.approx(reference, rel=1e-8)


def test_restart_after_an_injected_failure_gives_the_same_records(runs, tmp_path, monkeypatch):
    run_dirs = [runs / "simplegpt", runs / "llama2"]
    settings = SweepSettings(**FAST)
    reference = tmp_path / "ref.jsonl"
    sweep(run_dirs, reference, settings, progress=False)
    out = tmp_path / "r.jsonl"
    real_append, written = sweep_mod.append_record, []

    def failing_append(path, record, key=None):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(record)
        return real_append(path, record, key)

    monkeypatch.setattr(sweep_mod, "append_record", failing_append)
    with pytest.raises(KeyboardInterrupt):
        sweep(run_dirs, out, settings, progress=False)
    monkeypatch.setattr(sweep_mod, "append_record", real_append)
    assert len(read_records(out)) == 3
    summary = sweep(run_dirs, out, settings, progress=False)
    assert summary["skipped"] == 3 and summary["measured"] == 5
    records = read_records(out)
    assert sorted(keys(records), key=str) == sorted(keys(read_records(reference)), key=str)
    assert len(set(keys(records))) == len(records)
    again = sweep(run_dirs, out, settings, progress=False)
    assert again["measured"] == 0 and len(read_records(out)) == len(records)


def test_sigkill_in_the_middle_then_rerun_completes_without_duplicates(runs, tmp_path):
    out = tmp_path / "k.jsonl"
    cmd = [sys.executable, "-m", "hessian_tools", "sweep", str(runs / "simplegpt"), str(runs / "llama2"),
           "--out", str(out), "--batches", "2", "--batch-size", "2", "--seq-len", "8", "--tol", "1e-4", "--quiet",
           "--what", "params,trace"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and len(read_records(out)) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(read_records(out))
    assert 2 <= before < 12
    with open(out, "ab") as f:  # the kill may also cut a line short: simulate the worst case
        f.write(b'{"provenance": {"run_dir"')
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    records = read_records(out)
    assert len(records) == 12 and len(set(keys(records))) == 12
    assert all(json.loads(line) for line in out.read_text().splitlines())


def test_corrupt_checkpoint_is_reported_and_skipped(runs, tmp_path, capsys):
    run = tmp_path / "broken"
    shutil.copytree(runs / "llama2", run)
    target = list_checkpoints(run)[0] / "model.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    out = tmp_path / "c.jsonl"
    summary = sweep([run], out, SweepSettings(**FAST), progress=False)
    err = capsys.readouterr().err
    assert "ckpt_0000002" in err and len(err.strip().splitlines()) == 1
    records = read_records(out)
    failed = [r for r in records if r["status"] == "error"]
    assert len(failed) == 1 and "cannot load checkpoint" in failed[0]["payload"]["message"]
    assert failed[0]["value"] is None and failed[0]["provenance"]["step"] == 2
    assert sorted(r["provenance"]["step"] for r in records if r["status"] == "ok") == [4, 4]
    assert summary["errors"] == 2
    sweep([run], out, SweepSettings(**FAST), progress=False)  # retried, the same error not written twice
    assert len(read_records(out)) == len(records)


def test_two_concurrent_sweeps_into_one_file_neither_interleave_nor_duplicate(runs, tmp_path):
    out = tmp_path / "both.jsonl"
    both = [str(runs / "simplegpt"), str(runs / "llama2")]
    procs = [subprocess.Popen([sys.executable, "-m", "hessian_tools", "sweep", *order, "--out", str(out),
                               "--batches", "2", "--batch-size", "2", "--seq-len", "8", "--quiet",
                               "--what", "params,trace"], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for order in (both, both[::-1])]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 12 and len(set(keys(records))) == 12


def test_settings_hash_is_per_measure(runs, tmp_path):
    out = tmp_path / "h.jsonl"
    base = dict(FAST, steps=(-1,))
    sweep([runs / "llama2"], out, SweepSettings(what=("params", "trace"), **base), progress=False)
    assert len(read_records(out)) == 3
    changed_trace = sweep([runs / "llama2"], out, SweepSettings(what=("params", "trace"), trace_matvecs=12, **base),
                          progress=False)
    assert changed_trace["measured"] == 1 and changed_trace["skipped"] == 2
    changed_tol = sweep([runs / "llama2"], out, SweepSettings(what=("params",), **dict(base, tol=1e-5)),
                        progress=False)
    assert changed_tol["measured"] == 2


def test_plan_lists_units_and_rejects_bad_input(runs, tmp_path):
    units = plan([runs / "simplegpt"], SweepSettings(what=("activation", "bound"), **FAST))
    assert [u.step for u in units].count(2) == len(units) // 2
    assert {u.measure for u in units} == {"activation.spectral_norm", "bound.hxx"}
    assert len([u for u in units if u.measure == "bound.hxx"]) == 2 * 7  # q, k, v, o, gate, down, up
    with pytest.raises(UserError, match="holds no checkpoint"):
        plan([tmp_path], SweepSettings())
    with pytest.raises(UserError, match="unknown --what"):
        SweepSettings(what=("curvature",))
    with pytest.raises(UserError, match="matches no site"):
        plan([runs / "simplegpt"], SweepSettings(what=("activation",), sites="nothing-like-this"))
    with pytest.raises(UserError, match="multiple of --groups"):
        SweepSettings(n_batches=3, n_groups=2)


def test_cli_sweep(runs, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    argv = ["sweep", str(runs / "llama2"), "--out", str(out), "--batches", "2", "--batch-size", "2",
            "--seq-len", "8", "--steps", "-1", "--quiet"]
    assert main(argv) == 0
    assert "2 measured" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 measured, 2 already" in capsys.readouterr().out
    assert main(["sweep", str(runs / "llama2"), "--out", str(out), "--what", "bogus"]) == 2
    assert "unknown --what bogus" in capsys.readouterr().err


def test_cli_sweep_on_a_token_file(runs, tmp_path, capsys):
    """--tokens measures every checkpoint on the file's ids: recorded in the provenance and in the settings hash."""
    ids = np.random.default_rng(0).integers(0, 103, 300).astype(np.int32)
    np.save(tmp_path / "val.npy", ids)
    out = tmp_path / "tokens.jsonl"
    argv = ["sweep", str(runs / "llama2"), "--out", str(out), "--batches", "2", "--batch-size", "2", "--seq-len", "8",
            "--steps", "-1", "--quiet", "--groups", "0"]
    assert main(argv) == 0 and main([*argv, "--tokens", str(tmp_path / "val.npy")]) == 0
    assert "2 measured" in capsys.readouterr().out.splitlines()[-1]
    plain, tokens = read_records(out)[:2], read_records(out)[2:]
    assert [r["provenance"]["tokens"]["source"] for r in plain + tokens] == ["char"] * 2 + ["tokens"] * 2
    assert tokens[0]["provenance"]["tokens"]["n_tokens"] == 300
    assert tokens[0]["provenance"]["settings_hash"] != plain[0]["provenance"]["settings_hash"]
    assert tokens[0]["value"] != plain[0]["value"]
    np.save(tmp_path / "big.npy", ids + 103)
    assert main([*argv, "--tokens", str(tmp_path / "big.npy")]) == 2
    assert f"token id {ids[0] + 103} at position 0 is outside the vocabulary" in capsys.readouterr().err
