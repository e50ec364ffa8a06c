"""Sharpness tracked during training: exact on a quadratic, the thresholds' formulas, agreement with `spectrum` on
the final checkpoint, training untouched by the tracking, resume without duplicates, full-batch gradient descent."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import models.train as train_mod
from hessian_tools.cli import main
from hessian_tools.errors import UserError
from hessian_tools.tracking import SharpnessTracker, TrackSettings, adam_threshold, gd_threshold
from models.checkpoint import list_checkpoints, load_checkpoint
from models.train import TrainConfig, make_optimizer, read_metrics, train

TINY = dict(dim=16, n_layers=1, n_heads=2, seq_len=8, batch_size=4, warmup=2, norm_backend="torch", device="cpu")
TRACK = dict(track_every=4, track_batch_size=2, track_hvps=12)
TIMING = ("tokens_per_s", "wall_time_s")


def without_timing(lines):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in lines]


def keys(lines):
    return [(m["step"], m.get("measure")) for m in lines]


# ---- a quadratic model: the tracked value against the analytic Hessian, GD's blow-up against 2 / lambda_max ----


def regression(n=40, d=6, seed=0):
    """(model, batch, loss_fn, lambda_max): least squares 0.5 mean (x.w - y)^2, Hessian X^T X / n exactly."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    loss_fn = lambda m, b: 0.5 * (m(b[0]).squeeze(-1) - b[1]).pow(2).mean()  # noqa: E731
    return model, (X, y), loss_fn, float(np.linalg.eigvalsh((X.T @ X / n).numpy()).max())


def gd_losses(lr, steps=200):
    model, batch, loss_fn, _ = regression()
    optimizer = make_optimizer(model, TrainConfig(optimizer="sgd", lr=lr))
    losses = []
    for _ in range(steps):
        loss = loss_fn(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_tracked_sharpness_of_a_quadratic_is_its_hessian_and_gd_blows_up_at_two_over_it():
    model, batch, loss_fn, lam = regression()
    tracker = SharpnessTracker(TrackSettings(every=1, tol=1e-10, max_hvps=6, dtype="float64"), [batch], loss_fn)
    optimizer = make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1))
    (rec,) = tracker.measure(model, optimizer, 0, 0.1)
    assert rec["kind"] == "sharpness" and rec["measure"] == "params.lambda_max" and rec["status"] == "ok"
    assert rec["value"] == pytest.approx(lam, rel=1e-12)
    assert rec["interval"][0] <= lam <= rec["interval"][1] and rec["error_kind"] == "certified"  # the basis spans R^6
    assert rec["threshold"] == pytest.approx(2 / 0.1) and rec["threshold_rule"].startswith("2 / lr")
    limit = gd_threshold(rec["value"])  # 2 / lambda_max: the lr at which GD on this quadratic blows up
    grid = [limit * c for c in (0.9, 0.96, 1.04, 1.1)]
    blown = [lr for lr in grid if not (lambda losses: losses[-1] < 10 * losses[0])(gd_losses(lr))]
    stable = [lr for lr in grid if lr not in blown]
    assert min(blown) / limit <= 1.05 and max(stable) / limit >= 0.95 and max(stable) < min(blown)


@pytest.mark.parametrize("beta1", [0.9, 0.5])
def test_adam_threshold_is_where_heavy_ball_with_a_frozen_preconditioner_blows_up(beta1):
    """m <- beta1 m + (1 - beta1) lambda x, x <- x - lr m (Adam's momentum, P frozen = 1) on 0.5 lambda x^2."""
    lr = 0.01
    limit = adam_threshold(lr, beta1)
    assert limit == pytest.approx({0.9: 38, 0.5: 6}[beta1] / lr)

    def final(lam, steps=2000):
        x, m = 1.0, 0.0
        for _ in range(steps):
            m = beta1 * m + (1 - beta1) * lam * x
            x -= lr * m
        return abs(x)

    assert final(0.97 * limit) < 1e-3 and not final(1.03 * limit) < 1e3  # (an overflow to nan is a blow-up too)


def test_a_failed_measurement_is_a_record_not_a_crash():
    model, batch, loss_fn, _ = regression()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    tracker = SharpnessTracker(TrackSettings(every=1, dtype="float64"), [batch], loss_fn)
    (rec,) = tracker.measure(model, make_optimizer(model, TrainConfig(optimizer="sgd")), 3, 0.1)
    assert rec["status"].startswith("failed") and "nan" in rec["status"] and rec["value"] is None
    assert rec["step"] == 3 and rec["hvp_count"] == 0


# ---- tracked training runs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A tracked AdamW run and the same run untracked."""
    root = tmp_path_factory.mktemp("tracked")
    cfg = TrainConfig(arch="simplegpt", steps=10, save_every=5, lr=1e-2, **TINY, **TRACK)
    train(cfg, root / "tracked", progress=False)
    train(TrainConfig(arch="simplegpt", steps=10, save_every=5, lr=1e-2, **TINY), root / "plain", progress=False)
    return cfg, root


def test_tracking_records_and_training_untouched(tracked):
    cfg, root = tracked
    lines = read_metrics(root / "tracked" / "metrics.jsonl", kind=None)
    sharp = [m for m in lines if m["kind"] == "sharpness"]
    # steps 0, 4, 8 and the last; no preconditioner before the first update
    assert keys(sharp) == [(0, "params.lambda_max"), (4, "params.lambda_max"), (4, "adam.sharpness"),
                           (8, "params.lambda_max"), (8, "adam.sharpness"), (10, "params.lambda_max"),
                           (10, "adam.sharpness")]
    for m in sharp:
        assert m["status"] == "ok" and m["value"] > 0 and m["interval"][0] <= m["value"] <= m["interval"][1]
        assert m["error_kind"] == "measured" and 0 < m["lanczos_steps"] <= cfg.track_hvps
        assert m["hvp_count"] == m["lanczos_steps"] + 1  # float32: one float64 product measures the rounding
        lr = train_mod.lr_at(cfg, min(m["step"], cfg.steps - 1))
        assert m["lr"] == lr
        beta1 = 0.9
        want = 2 / lr if m["measure"] == "params.lambda_max" else (2 + 2 * beta1) / ((1 - beta1) * lr)
        assert m["threshold"] == pytest.approx(want, rel=1e-12)
        assert m["settings"]["batches"] == "held-out" and m["settings"]["batch_size"] == 2
    assert [m["settings"]["warm_start"] for m in sharp] == [False, True, False, True, True, True, True]
    # the tracked run's losses, gradient norms and weights are bit for bit the untracked run's
    plain = read_metrics(root / "plain" / "metrics.jsonl")
    assert without_timing(read_metrics(root / "tracked" / "metrics.jsonl")) == without_timing(plain)
    a, b = load_checkpoint(root / "tracked"), load_checkpoint(root / "plain")
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("measure, flags", [("params.lambda_max", []), ("adam.sharpness", ["--scaled", "adam"])])
def test_last_tracked_value_matches_spectrum_on_the_final_checkpoint(tracked, measure, flags, capsys):
    cfg, root = tracked
    last = [m for m in read_metrics(root / "tracked" / "metrics.jsonl", kind="sharpness")
            if m["measure"] == measure][-1]
    assert last["step"] == cfg.steps
    args = ["spectrum", str(root / "tracked"), "--batches", "1", "--batch-size", "2", "--seed", "0", "--tol", "1e-6",
            "--json", *flags]
    assert main(args) == 0
    ref = json.loads(capsys.readouterr().out)
    assert ref["provenance"]["step"] == cfg.steps
    assert abs(last["value"] - ref["value"]) <= last["error"] + ref["error"]
    lo, hi = last["interval"]
    assert lo - ref["error"] <= ref["value"] <= hi + ref["error"]


def test_resume_continues_the_tracking_without_duplicates_or_gaps(tracked, tmp_path, monkeypatch):
    cfg, root = tracked
    real = train_mod.training_batch

    def interrupted(splits, spec, step, *args):
        if step == 7:  # Ctrl-C in update 8: after checkpoint 5 and the measurement at step 4
            raise KeyboardInterrupt
        return real(splits, spec, step, *args)

    monkeypatch.setattr(train_mod, "training_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, progress=False)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status == {"status": "interrupted", "step": 7, "resume_from": 5}
    monkeypatch.setattr(train_mod, "training_batch", real)
    assert train(cfg, tmp_path, progress=False).status == "completed"
    whole = read_metrics(root / "tracked" / "metrics.jsonl", kind=None)
    split = read_metrics(tmp_path / "metrics.jsonl", kind=None)
    assert without_timing(split) == without_timing(whole)  # values bit for bit, warm starts included


def test_a_kill_inside_a_measurement_leaves_no_partial_step(tracked, tmp_path, monkeypatch):
    cfg, root = tracked
    real = SharpnessTracker.record
    calls = []

    def dies_in_the_adam_measure_of_step_8(self, step, measure, *args, **kwargs):
        calls.append((step, measure))
        if (step, measure) == (8, "adam.sharpness"):
            raise KeyboardInterrupt
        return real(self, step, measure, *args, **kwargs)

    monkeypatch.setattr(SharpnessTracker, "record", dies_in_the_adam_measure_of_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, progress=False)
    monkeypatch.setattr(SharpnessTracker, "record", real)
    assert train(cfg, tmp_path, progress=False).status == "completed"
    split = read_metrics(tmp_path / "metrics.jsonl", kind=None)
    assert without_timing(split) == without_timing(read_metrics(root / "tracked" / "metrics.jsonl", kind=None))
    assert len(set(keys(split))) == len(split)


# ---- full-batch gradient descent --------------------------------------------------------------------------


def test_full_batch_gradient_descent_is_plain_gd_on_the_fixed_subset(tmp_path):
    cfg = TrainConfig(arch="llama2", optimizer="sgd", train_subset=6, batch_size=6, steps=3, lr=0.05, warmup=0,
                      schedule="constant", save_every=1, track_every=1, track_hvps=6,
                      **{k: v for k, v in TINY.items() if k not in ("batch_size", "warmup")})
    assert (cfg.weight_decay, cfg.grad_clip) == (0.0, 0.0)  # gradient descent's defaults
    train(cfg, tmp_path, progress=False)
    ckpts = [load_checkpoint(p) for p in list_checkpoints(tmp_path)]
    spec = cfg.data_spec()
    _, subset = train_mod._training_source(cfg, train_mod.load_splits(spec), spec)
    assert subset[0].shape == (6, cfg.seq_len)
    for before, after in zip(ckpts, ckpts[1:]):  # theta_{t+1} = theta_t - lr grad L_subset(theta_t), exactly
        model = before.model.train()
        model.zero_grad()
        train_mod.next_token_loss(model, subset).backward()
        for (name, p), q in zip(model.named_parameters(), after.model.parameters()):
            torch.testing.assert_close(q, p.detach() - 0.05 * p.grad, rtol=0, atol=1e-6, msg=name)
    lines = read_metrics(tmp_path / "metrics.jsonl", kind=None)
    sharp = [m for m in lines if m["kind"] == "sharpness"]
    assert keys(sharp) == [(s, "params.lambda_max") for s in range(4)]  # no Adam measure for gradient descent
    assert all(m["settings"]["batches"] == "training subset" and m["threshold"] == pytest.approx(40) for m in sharp)
    assert [m["lr"] for m in lines if m["kind"] == "loss"] == [0.05] * 3


@pytest.mark.parametrize("settings, message", [
    (dict(optimizer="sgd", weight_decay=0.1), "plain gradient descent, without weight decay"),
    (dict(train_subset=4, batch_size=8), "batch_size 8 exceeds train_subset 4"),
    (dict(optimizer="adam"), "optimizer must be one of adamw, sgd"),
    (dict(track_tol=0.0), "track_tol must lie in (0, 1)"),
    (dict(track_hvps=1), "track_hvps must be at least 2"),
    (dict(lr=math.nan), "lr must be a positive finite number"),
    (dict(grad_clip=math.inf), "grad_clip and weight_decay must be >= 0 and finite"),
])
def test_bad_settings(settings, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**settings)


def test_a_run_recorded_before_the_new_settings_still_resumes(tmp_path):
    cfg = TrainConfig(arch="gpt2", steps=4, save_every=2, **TINY)
    train(cfg, tmp_path, progress=False)
    recorded = json.loads((tmp_path / "train_config.json").read_text())
    old = {k: v for k, v in recorded.items() if k not in ("optimizer", "schedule", "train_subset")
           and not k.startswith("track_")}
    (tmp_path / "train_config.json").write_text(json.dumps(old))
    (tmp_path / "status.json").unlink()  # as if it had been interrupted
    assert train(cfg, tmp_path, progress=False).status == "completed"
