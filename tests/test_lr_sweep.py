"""Learning-rate sweeps over seeds: the per-seed and all-seed thresholds, reuse, the CLI."""

import json

import pytest

from hessian_tools.cli import main
from models.lr_sweep import format_table, lr_sweep, run_dir_for, thresholds
from models.train import TrainConfig

SEEDS = [0, 1, 2]


def runs(stable: dict) -> list[dict]:
    """Runs [{lr, seed, stable}] from {lr: [stable per seed]}."""
    return [{"lr": lr, "seed": s, "stable": ok} for lr, flags in stable.items() for s, ok in zip(SEEDS, flags)]


@pytest.mark.parametrize("stable, best, per_seed, edge", [
    ({0.1: [1, 1, 1], 0.4: [1, 1, 1], 0.7: [1, 0, 0]}, 0.4, {"0": 0.7, "1": 0.4, "2": 0.4}, False),
    ({0.1: [1, 1, 1], 0.4: [1, 0, 1], 0.7: [1, 1, 1]}, 0.7, {"0": 0.7, "1": 0.7, "2": 0.7}, True),  # not monotone
    ({0.1: [1, 0, 1], 0.4: [0, 0, 1]}, None, {"0": 0.1, "1": None, "2": 0.4}, False),
])
def test_thresholds_over_seeds(stable, best, per_seed, edge):
    found = thresholds(runs(stable), sorted(stable), SEEDS)
    assert found["largest_stable_lr"] == best and found["per_seed"] == per_seed and found["at_edge"] == edge
    values = [v for v in per_seed.values() if v is not None]
    assert found["per_seed_max"] == max(values)
    assert found["per_seed_min"] == (min(values) if len(values) == len(SEEDS) else None)


def test_lr_sweep_over_seeds_reports_and_reuses(tmp_path, capsys):
    assert main(["lr-sweep", "--arch", "gpt2", "--lrs", "1e4", "1e-2", "--seeds", "2", "--seed", "5", "--out",
                 str(tmp_path), "--steps", "12", "--warmup", "2", "--dim", "16", "--layers", "1", "--heads", "2",
                 "--seq-len", "8", "--batch-size", "4", "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "lr_sweep.json").read_text())
    entry = record["archs"]["gpt2"]
    assert record["seeds"] == [5, 6] and record["lrs"] == [1e-2, 1e4]
    assert [(r["lr"], r["seed"], r["status"]) for r in entry["runs"]] == [
        (1e-2, 5, "completed"), (1e-2, 6, "completed"), (1e4, 5, "diverged"), (1e4, 6, "diverged")]
    assert entry["largest_stable_lr"] == 1e-2 and not entry["at_edge"] and entry["per_seed"] == {"5": 1e-2, "6": 1e-2}
    out = capsys.readouterr().out
    assert "largest stable lr for gpt2: 0.01 for every seed; seed 5: 0.01, seed 6: 0.01" in out
    losses = [json.loads(line)["loss"] for line in open(run_dir_for(tmp_path, "gpt2", 1e-2, 5) / "metrics.jsonl")]
    other = [json.loads(line)["loss"] for line in open(run_dir_for(tmp_path, "gpt2", 1e-2, 6) / "metrics.jsonl")]
    assert losses != other  # the seeds differ
    base = TrainConfig(**{**record["settings"], "arch": "gpt2", "lr": 1.0, "seed": 5})
    stamp = (run_dir_for(tmp_path, "gpt2", 1e-2, 5) / "metrics.jsonl").stat().st_mtime_ns
    again = lr_sweep(["gpt2"], [1e-2], tmp_path, base, seeds=[5])
    assert again["archs"]["gpt2"]["largest_stable_lr"] == 1e-2
    assert (run_dir_for(tmp_path, "gpt2", 1e-2, 5) / "metrics.jsonl").stat().st_mtime_ns == stamp  # reused
    assert "seed 5: 0.01" in format_table(again)
    assert main(["lr-sweep", "--arch", "gpt2", "--lrs", "1e-2", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert "--seeds must be a positive integer, got 0" in capsys.readouterr().err
