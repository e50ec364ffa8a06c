"""Training runs: metrics, checkpoints, exact resume, divergence, config clashes, the lr sweep, the CLI."""

import json

import pytest
import torch

import models.train as train_mod
from hessian_tools.cli import main
from hessian_tools.errors import UserError
from models.checkpoint import list_checkpoints, load_checkpoint
from models.train import TrainConfig, lr_at, read_metrics, train

TINY = dict(dim=16, n_layers=2, n_heads=2, seq_len=8, batch_size=4, warmup=2, norm_backend="torch", device="cpu")


def without_timing(lines):
    return [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in lines]


def test_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(steps=10, warmup=2, lr=1.0)
    assert [lr_at(cfg, s) for s in range(10)] == pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8,
                                                                2 / 8, 1 / 8])


def test_run_writes_metrics_checkpoints_and_status(tmp_path):
    cfg = TrainConfig(arch="llama2", steps=10, save_every=4, lr=1e-2, **TINY)
    result = train(cfg, tmp_path, progress=False)
    assert result.status == "completed" and result.step == 10
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_0000004", "ckpt_0000008", "ckpt_0000010"]
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in lines] == list(range(1, 11))
    assert set(lines[0]) == {"kind", "step", "loss", "lr", "grad_norm", "act_rms", "tokens_per_s"}
    assert list(lines[0]["act_rms"]) == ["layers.0", "layers.1"]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "completed", "step": 10}
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 10 and ckpt.meta["train_config"] == cfg.to_dict()
    assert ckpt.meta["tokenizer"]["kind"] == "char" and ckpt.config.vocab_size == 103
    (idx, targets), = ckpt.measurement_batches(1, 2)
    assert idx.shape == (2, 8)
    (idx4, targets4), = load_checkpoint(list_checkpoints(tmp_path)[0]).measurement_batches(1, 2)
    assert torch.equal(idx, idx4) and torch.equal(targets, targets4)  # every checkpoint sees the same tokens
    # the decayed parameters are exactly the linear-map weights
    decayed = {id(p) for p in train_mod.make_optimizer(ckpt.model, cfg).param_groups[0]["params"]}
    names = {n for n, p in ckpt.model.named_parameters() if id(p) in decayed}
    assert "output.weight" in names and "layers.0.attention.wq.weight" in names
    assert not any("norm" in n or "tok_embeddings" in n for n in names)


@pytest.mark.parametrize("arch", ["simplegpt", "gpt2"])
def test_resumed_run_repeats_the_uninterrupted_one(arch, tmp_path, monkeypatch):
    cfg = TrainConfig(arch=arch, steps=9, save_every=3, lr=1e-2, **TINY)
    train(cfg, tmp_path / "whole", progress=False)

    real_batch = train_mod.training_batch

    def interrupted(splits, spec, step, *args):
        if step == 7:  # Ctrl-C during step 8, after checkpoint 6 and metrics line 7
            raise KeyboardInterrupt
        return real_batch(splits, spec, step, *args)

    monkeypatch.setattr(train_mod, "training_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "split", progress=False)
    assert json.loads((tmp_path / "split" / "status.json").read_text())["status"] == "interrupted"
    assert [m["step"] for m in read_metrics(tmp_path / "split" / "metrics.jsonl")] == list(range(1, 8))
    assert list_checkpoints(tmp_path / "split")[-1].name == "ckpt_0000006"
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # a line cut short by a kill
    monkeypatch.setattr(train_mod, "training_batch", real_batch)
    assert train(cfg, tmp_path / "split", progress=False).status == "completed"
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert without_timing(split) == without_timing(whole)  # float equality, not approximate
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "split")
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    for name, v in a.adam_second_moments().items():
        assert torch.equal(v, b.adam_second_moments()[name]), name


def test_run_dir_clashes(tmp_path):
    cfg = TrainConfig(arch="gpt2", steps=2, **TINY)
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(UserError, match=r"different settings \(lr: 0.003 there, 0.1 now\)"):
        train(TrainConfig(arch="gpt2", steps=2, lr=0.1, **TINY), tmp_path / "run", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and not a training run"):
        train(cfg, tmp_path / "other", progress=False)
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(UserError, match="afile is a file, not a directory"):
        train(cfg, tmp_path / "afile", progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert train(cfg, tmp_path / "run", progress=False).status == "completed"  # a finished run is reused
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_divergence_is_a_status_and_exit_code_3(tmp_path, capsys):
    args = ["train", "--arch", "llama2", "--out", str(tmp_path), "--lr", "1e4", "--steps", "20", "--warmup", "1",
            "--dim", "16", "--layers", "1", "--heads", "2", "--seq-len", "8", "--batch-size", "4", "--quiet",
            "--device", "cpu"]
    assert main(args) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged" in err and "Traceback" not in err
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "diverged" and 1 <= status["step"] < 20 and status["reason"]


def test_cli_train_on_a_file_then_inspect(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "run"
    assert main(["train", "--arch", "simplegpt_gpt2", "--out", str(out), "--steps", "3", "--dim", "16",
                 "--layers", "1", "--heads", "2", "--seq-len", "8", "--batch-size", "2", "--quiet",
                 "--data", str(text)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "simplegpt_gpt2" and info["step"] == 3 and info["config"]["dim"] == 16
    assert info["config"]["vocab_size"] == len(set(text.read_text()))
    (idx, _), = load_checkpoint(out).measurement_batches(1, 2)
    assert int(idx.max()) < len(set(text.read_text()))


@pytest.mark.parametrize("flags, message", [
    (["--grad-clip", "-1"], "--grad-clip must be a non-negative finite number, got -1"),
    (["--weight-decay", "-3"], "--weight-decay must be a non-negative finite number, got -3"),
    (["--norm-backend", "triton", "--device", "cpu"], "norm_backend 'triton' needs a CUDA device"),
])
def test_bad_train_settings_are_one_line_errors(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a CPU machine outside the tests
    code = main(["train", "--arch", "simplegpt", "--out", str(tmp_path / "run"), "--steps", "2", "--dim", "16",
                 "--layers", "1", "--heads", "2", "--seq-len", "8", "--batch-size", "2", "--quiet", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err


def test_data_path_is_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "text.txt").write_text("abc def ghi. " * 50)
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(arch="gpt2", steps=1, data="text.txt", **TINY)
    assert cfg.data == str(tmp_path / "text.txt")
