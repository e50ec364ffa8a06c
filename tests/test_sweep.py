"""Checkpoint sweeps: comparable measurements, an independent reference, data error bars, failure records for
every unit that cannot be measured, restart after an interruption (signals: test_sweep_interrupts.py),
concurrent writers, content-keyed records, the CLI."""

import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hessian_tools.sweep as sweep_mod
from hessian_tools.cli import main
from hessian_tools.errors import UserError
from hessian_tools.records import Estimate
from hessian_tools.results_io import read_records
from hessian_tools.sweep import SweepSettings, default_sites, plan, record_key, sweep
from hessian_tools.sweep_measures import Measurer
from models.checkpoint import list_checkpoints, load_checkpoint
from models.config import ARCHS, GPTConfig
from models.gpt import build_model, math_attention
from models.sites import list_sites
from models.train import TrainConfig, train
from operator_refs import confirmed_dense_hessian

TINY = dict(dim=16, n_layers=1, n_heads=2, seq_len=8, batch_size=4, steps=4, save_every=2, warmup=1,
            norm_backend="torch", device="cpu")
FAST = dict(n_batches=2, batch_size=2, seq_len=8, tol=1e-4, n_groups=0)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLI = ["--batches", "2", "--batch-size", "2", "--seq-len", "8", "--tol", "1e-4", "--groups", "0", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for arch in ("simplegpt", "llama2"):
        train(TrainConfig(arch=arch, lr=1e-2, **TINY), root / arch, progress=False)
    return root


def keys(records):
    return [record_key(r) for r in records]


def copy_run(runs, tmp_path, arch="llama2", name="copy"):
    run = tmp_path / name
    shutil.copytree(runs / arch, run)
    return run


def by_measure(records):
    return collections.Counter(r["provenance"]["measure"] for r in records)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_sites_are_the_role_sites(arch):
    model = build_model(GPTConfig(arch=arch, vocab_size=11, dim=16, n_layers=2, n_heads=2, seq_len=8))
    sites = default_sites(model)
    assert set(s for s, _, _ in sites) <= set(list_sites(model))
    assert [(role, layer) for _, role, layer in sites] == [("block_in", 0)] + [
        (r, i) for i in range(2) for r in ("attn_in", "ffn_in", "block_out")]
    attn = next(s for s, r, i in sites if r == "attn_in" and i == 0)
    assert attn.endswith(("attention:in", "attn:in"))  # the branch input every q, k, v map reads


def test_sweep_measures_every_checkpoint_on_the_same_batches(runs, tmp_path):
    out = tmp_path / "r.jsonl"
    summary = sweep([runs / "simplegpt", runs / "llama2"], out, SweepSettings(**FAST), progress=False)
    records = read_records(out)
    assert summary["measured"] == len(records) == 2 * 2 * 2 and summary["failed"] == 0
    assert len(set(keys(records))) == len(records)
    for r in records:
        p = r["provenance"]
        assert r["status"] == "ok" and r["converged"] and r["value"] > 0 and r["hvp_count"] > 0
        assert r["error_kind"] == "measured"  # float32: resting on the measured rounding of the products
        lo, hi = r["payload"]["interval"]
        assert r["value"] - r["error"] <= lo <= hi <= r["value"] + r["error"]
        assert p["batches"]["n_batches"] == 2 and p["batches"]["seq_len"] == 8 and p["train_seed"] == 0
        assert p["model_sha256"] == sweep_mod.model_digest(p["checkpoint"]) and len(p["model_sha256"]) == 64
        assert r["payload"]["data_error"] is None and r["settings"]["self_check"]["difference_rel"] < 1e-2
    losses = {r["provenance"]["step"]: r["settings"]["operator"]["batch_losses"] for r in records
              if r["provenance"]["arch"] == "llama2" and r["provenance"]["measure"] == "params.lambda_max"}
    ckpt = load_checkpoint(runs / "llama2" / "ckpt_0000002")
    from models.gpt import next_token_loss
    with torch.no_grad():
        expected = [float(next_token_loss(ckpt.model, b)) for b in ckpt.measurement_batches(2, 2, 8, seed=0)]
    assert losses[2] == pytest.approx(expected, rel=1e-5)
    warm = {r["provenance"]["step"]: r["settings"]["warm_start"] for r in records
            if r["provenance"]["measure"] == "params.lambda_max"}
    assert warm == {2: False, 4: True}


def test_jackknife_data_error_and_comparable_measures(runs, tmp_path):
    """n_groups 8: every parameter-space Lanczos measure carries the jackknife over 8 groups; the fused
    evaluation gives the same numbers as batch by batch."""
    out, unfused = tmp_path / "j.jsonl", tmp_path / "u.jsonl"
    base = dict(steps=(-1,), n_batches=8, batch_size=1, seq_len=8, n_groups=8, dtype="float64", tol=1e-5)
    sweep([runs / "simplegpt"], out, SweepSettings(what=("params.lambda_max", "scaled", "adam"), fuse_batches=True,
                                                   **base), progress=False)
    sweep([runs / "simplegpt"], unfused, SweepSettings(what=("params.lambda_max",), **base), progress=False)
    records, (other,) = read_records(out), read_records(unfused)
    assert by_measure(records) == {"params.lambda_max": 1, "layer.lambda_max": 1, "elementwise.lambda_max": 1,
                                   "adam.sharpness": 1}
    for r in records:
        d = r["payload"]["data_error"]
        assert r["error_kind"] == "probabilistic" and r["payload"]["certified_side"] == "lower"
        assert d["method"] == "jackknife" and d["status"] == "ok" and d["n_groups"] == 8
        assert len(d["leave_one_out_values"]) == 8 and d["interval"][0] < d["value"] < d["interval"][1]
        assert d["union_value"] == pytest.approx(r["value"], rel=1e-12)
    raw = records[0]
    assert other["value"] == pytest.approx(raw["value"], rel=1e-6)
    assert other["payload"]["data_error"]["value"] == pytest.approx(raw["payload"]["data_error"]["value"], rel=1e-4)
    assert raw["payload"]["data_error"]["combination"] == "rebuilt"
    assert other["payload"]["data_error"]["combination"] == "weighted sum"
    scaled = {r["provenance"]["measure"]: r["settings"]["operator"]["scaled"] for r in records}
    assert scaled == {"params.lambda_max": "none", "layer.lambda_max": "layer", "elementwise.lambda_max": "elementwise",
                      "adam.sharpness": "adam"}
    adam = next(r for r in records if r["provenance"]["measure"] == "adam.sharpness")["payload"]["adam"]
    assert adam["threshold_peak"] == pytest.approx(38 / 1e-2)  # (2 + 2 beta1) / ((1 - beta1) lr), beta1 = 0.9
    hashes = {SweepSettings(**{**base, "n_groups": g}).hash("params.lambda_max") for g in (0, 8)}
    assert len(hashes) == 2  # the groups enter the settings hash


def test_activation_norm_is_the_mean_over_batches_of_dense_references(runs, tmp_path):
    out = tmp_path / "a.jsonl"
    settings = SweepSettings(what=("activation",), sites=r"^layers\.0:out$", steps=(-1,), n_batches=2,
                             batch_size=2, seq_len=8, dtype="float64", tol=1e-10, n_groups=0)
    sweep([runs / "simplegpt"], out, settings, progress=False)
    raw, free = read_records(out)
    assert raw["provenance"]["site"] == "layers.0:out" and raw["provenance"]["site_role"] == "block_out"
    ckpt = load_checkpoint(runs / "simplegpt")
    model = ckpt.model.double().requires_grad_(False)
    references, mean_squares = [], []
    for idx, targets in ckpt.measurement_batches(2, 2, 8, seed=0):
        with torch.no_grad():
            x0 = model.layers[0](model.tok_embeddings(idx), model.rope_cos, model.rope_sin)

        def f(delta, x0=x0, targets=targets):  # the loss as a function of layer 0's output, written out here
            with math_attention():
                logits = model.output(model.norm(x0 + delta.view_as(x0)))
                return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

        H = confirmed_dense_hessian(f, torch.zeros(x0.numel(), dtype=torch.float64))
        references.append(float(np.abs(np.linalg.eigvalsh(H.numpy())).max()))
        mean_squares.append(float(x0.pow(2).mean()))
    assert raw["value"] == pytest.approx(np.mean(references), rel=1e-8)
    assert raw["payload"]["data_error"]["values"] == pytest.approx(references, rel=1e-8)
    assert raw["payload"]["block_diagonal_norm"] == pytest.approx(max(references) / 2, rel=1e-8)
    assert raw["error_kind"] == "probabilistic" and raw["payload"]["failure_probability"] == pytest.approx(2e-3)
    assert free["value"] == pytest.approx(np.dot(references, mean_squares) / 2, rel=1e-8)
    assert free["settings"]["operator"]["scaled"] == "scale-free"
    d = free["payload"]["data_error"]
    assert d["method"] == "per-batch" and d["n_batches"] == 2 and d["interval"][0] < free["value"] < d["interval"][1]


def test_bound_rows_say_what_their_error_is(runs, tmp_path):
    out = tmp_path / "b.jsonl"
    sweep([runs / "simplegpt"], out, SweepSettings(what=("bound",), layers=r"snq$", steps=(-1,), **FAST),
          progress=False)
    (row,) = read_records(out)
    assert row["error_kind"] == "probabilistic" and row["payload"]["certified_side"] == "lower"
    assert row["payload"]["failure_probability"] == 1e-3 and row["payload"]["bound"] >= row["value"]


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


def test_a_resumed_cold_sweep_agrees_with_an_uninterrupted_warm_one(runs, tmp_path):
    """The later checkpoint is warm-started in the uninterrupted sweep and cold after the restart: the two
    intervals must overlap (each holds the eigenvalue with probability 1 - 1e-3) at the default tolerance."""
    settings = SweepSettings(what=("params.lambda_max", "layer.lambda_max"), n_batches=2, batch_size=2, seq_len=8,
                             n_groups=0)
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    sweep([runs / "simplegpt", runs / "llama2"], whole, settings, progress=False)
    for steps in ((2,), None):  # the first checkpoint, then (a new process: no warm vectors) the rest
        sweep([runs / "simplegpt", runs / "llama2"], resumed, SweepSettings(**{**settings.__dict__, "steps": steps}),
              progress=False)
    a, b = ({record_key(r): r for r in read_records(f)} for f in (whole, resumed))
    later = [k for k in a if k[1] == 4]
    assert len(later) == 4 and set(a) == set(b)
    for key in later:
        warm, cold = a[key], b[key]
        assert warm["settings"]["warm_start"] and not cold["settings"]["warm_start"]
        (lo1, hi1), (lo2, hi2) = warm["payload"]["interval"], cold["payload"]["interval"]
        assert max(lo1, lo2) <= min(hi1, hi2), (key, warm["payload"]["interval"], cold["payload"]["interval"])
        assert abs(warm["value"] - cold["value"]) <= warm["error"] + cold["error"]


def test_a_corrupt_checkpoint_fails_its_units_and_the_sweep_goes_on(runs, tmp_path, capsys):
    run = copy_run(runs, tmp_path)
    target = list_checkpoints(run)[0] / "model.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    out = tmp_path / "c.jsonl"
    summary = sweep([run], out, SweepSettings(what=("params", "activation"), sites=r"^layers\.0:out$", **FAST),
                    progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    records = read_records(out)
    failed = [r for r in records if r["status"] != "ok"]
    assert len(failed) == 4 == summary["failed"] and len(err) == 4 and all("ckpt_0000002" in line for line in err)
    for r in failed:
        assert r["status"].startswith("failed: cannot load checkpoint") and r["value"] is None
        assert r["payload"]["message"] in r["status"] and r["provenance"]["step"] == 2
    assert sorted(r["provenance"]["measure"] for r in failed) == ["activation.scale_free", "activation.spectral_norm",
                                                                 "params.lambda_max", "params.spectral_norm"]
    assert sorted(r["provenance"]["step"] for r in records if r["status"] == "ok") == [4, 4, 4, 4]  # measured after
    again = sweep([run], out, SweepSettings(what=("params", "activation"), sites=r"^layers\.0:out$", **FAST),
                  progress=False)
    assert again["failed"] == 4 and len(read_records(out)) == len(records)  # retried; the same failure not rewritten
    assert main(["sweep", str(run), "--out", str(tmp_path / "cli.jsonl"), *CLI]) == 1
    assert "2 failed" in capsys.readouterr().out


def test_a_checkpoint_with_corrupt_metadata_gets_failure_records(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    (list_checkpoints(run)[0] / "meta.json").write_text('{"model_config": {"arch": "simplegpt", "dim": "sixteen"')
    out = tmp_path / "m.jsonl"
    settings = SweepSettings(what=("params.lambda_max", "activation", "bound"), sites=r"^layers\.0:out$",
                             layers="wq$", **FAST)
    summary = sweep([run], out, settings, progress=False)
    failed = [r for r in read_records(out) if r["status"] != "ok"]
    assert summary["failed"] == len(failed) == 4  # lambda_max, the two activation measures, the bound
    assert {r["provenance"]["measure"] for r in failed} == {"params.lambda_max", "activation.spectral_norm",
                                                           "activation.scale_free", "bound.hxx"}
    assert all("meta.json" in r["status"] and r["provenance"]["step"] == 2 for r in failed)


def test_every_unit_that_cannot_be_measured_gets_a_failure_record(runs, tmp_path, monkeypatch):
    real = Measurer.measure

    def flaky(self, unit, ckpt, batches):
        if unit.measure == "params.spectral_norm":
            raise RuntimeError("out of luck\nsecond line")
        if unit.measure == "params.lambda_max" and unit.step == 2:  # a record the contract forbids
            return Estimate("lambda_max", None, None, "none", True, 0, 0.0)
        return real(self, unit, ckpt, batches)

    monkeypatch.setattr(Measurer, "measure", flaky)
    out = tmp_path / "u.jsonl"
    summary = sweep([runs / "llama2"], out, SweepSettings(**FAST), progress=False)
    records = read_records(out)
    assert summary["failed"] == 3 and summary["measured"] == 1
    statuses = sorted((r["provenance"]["step"], r["provenance"]["measure"], r["status"]) for r in records)
    assert statuses == [(2, "params.lambda_max", "failed: params.lambda_max produced no value"),
                        (2, "params.spectral_norm", "failed: RuntimeError: out of luck"),
                        (4, "params.lambda_max", "ok"),
                        (4, "params.spectral_norm", "failed: RuntimeError: out of luck")]
    assert all(r["value"] is None for r in records if r["status"] != "ok")


def test_adam_units_without_optimizer_state_fail(runs, tmp_path):
    run = copy_run(runs, tmp_path, arch="simplegpt")
    first, last = list_checkpoints(run)
    (first / "optimizer.safetensors").unlink()
    from safetensors.torch import load_file, save_file
    state = load_file(last / "optimizer.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("layers.0.attention.snq.lin.weight.")},
              last / "optimizer.safetensors")
    out = tmp_path / "adam.jsonl"
    summary = sweep([run], out, SweepSettings(what=("adam",), **FAST), progress=False)
    records = read_records(out)
    assert summary["failed"] == 2 and [r["value"] for r in records] == [None, None]
    assert "holds no optimizer state" in records[0]["status"]
    assert "no second moment for parameter 'layers.0.attention.snq.lin.weight'" in records[1]["status"]


def test_records_are_keyed_by_the_model_file(runs, tmp_path):
    """A run directory re-created with another model gets new records, not the old ones."""
    run = copy_run(runs, tmp_path)
    out = tmp_path / "h.jsonl"
    settings = SweepSettings(what=("params.lambda_max",), steps=(-1,), **FAST)
    sweep([run], out, settings, progress=False)
    shutil.rmtree(run)
    train(TrainConfig(arch="llama2", lr=1e-2, seed=1, **TINY), run, progress=False)
    summary = sweep([run], out, settings, progress=False)
    old, new = read_records(out)
    assert summary["measured"] == 1 and old["provenance"]["model_sha256"] != new["provenance"]["model_sha256"]
    assert new["provenance"]["train_seed"] == 1 and old["value"] != new["value"]


def test_concurrent_sweeps_write_each_record_and_each_failure_once(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    target = list_checkpoints(run)[0] / "model.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    out = tmp_path / "both.jsonl"
    both = [str(runs / "simplegpt"), str(run)]
    procs = [subprocess.Popen([sys.executable, "-m", "hessian_tools", "sweep", *order, "--out", str(out), *CLI,
                               "--what", "params,trace"], env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for order in (both, both[::-1])]
    for p in procs:
        assert p.wait() == 1, p.stderr.read()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 12 and len(set(keys(records))) == 12
    assert sum(r["status"] != "ok" for r in records) == 3


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
    assert {u.measure for u in units} == {"activation.spectral_norm", "activation.scale_free", "bound.hxx"}
    assert len([u for u in units if u.measure == "bound.hxx"]) == 2 * 7  # q, k, v, o, gate, down, up
    assert len([u for u in units if u.measure == "activation.scale_free"]) == 2 * 4  # block_in, attn, ffn, out
    with pytest.raises(UserError, match="holds no checkpoint"):
        plan([tmp_path], SweepSettings())
    with pytest.raises(UserError, match="unknown --what"):
        SweepSettings(what=("curvature",))
    with pytest.raises(UserError, match="matches no site"):
        plan([runs / "simplegpt"], SweepSettings(what=("activation",), sites="nothing-like-this"))
    with pytest.raises(UserError, match="multiple of --groups"):
        SweepSettings(n_batches=12, n_groups=8)
    with pytest.raises(UserError, match="at least 8 groups"):
        SweepSettings(n_batches=4, n_groups=2)


def test_cli_sweep(runs, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    argv = ["sweep", str(runs / "llama2"), "--out", str(out), *CLI, "--steps", "-1"]
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
    argv = ["sweep", str(runs / "llama2"), "--out", str(out), *CLI, "--steps", "-1"]
    assert main(argv) == 0 and main([*argv, "--tokens", str(tmp_path / "val.npy")]) == 0
    assert "2 measured" in capsys.readouterr().out.splitlines()[-1]
    plain, tokens = read_records(out)[:2], read_records(out)[2:]
    assert [r["provenance"]["tokens"]["source"] for r in plain + tokens] == ["char"] * 2 + ["tokens"] * 2
    assert tokens[0]["provenance"]["tokens"]["n_tokens"] == 300
    assert tokens[0]["provenance"]["settings_hash"] != plain[0]["provenance"]["settings_hash"]
    assert tokens[0]["value"] != plain[0]["value"]
    np.save(tmp_path / "big.npy", ids + 103)
    assert main([*argv, "--tokens", str(tmp_path / "big.npy")]) == 1
    assert f"token id {ids[0] + 103} at position 0 is outside the vocabulary" in capsys.readouterr().err
