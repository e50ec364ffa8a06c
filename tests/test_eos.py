"""The edge-of-stability experiment: its runs are full-batch gradient descent with tracking, its summary and
README section are computed from the runs, and the figure is written."""

import json

import pytest

from hessian_tools import eos
from hessian_tools.benchmarks_md import write_section
from models.train import TrainConfig, read_metrics


def synthetic_run(arch, lr, ratios, status="completed", seed=0):
    """A summary run whose sharpness is ratios x 2 / lr at steps 0, 10, 20, ..."""
    steps = 10 * (len(ratios) - 1)
    return {"arch": arch, "lr": lr, "seed": seed, "status": status, "step": steps, "reason": None,
            "threshold": 2 / lr, "wall_time_s": 1.0, "loss": [[s, 3.0 - s / 100] for s in range(steps + 1)],
            "sharpness": [[10 * i, r * 2 / lr, 0.99 * r * 2 / lr, 1.01 * r * 2 / lr] for i, r in enumerate(ratios)]}


def test_findings_classify_each_row_from_its_numbers():
    runs = [synthetic_run("llama2", 0.1, [0.1, 0.2, 0.3, 0.4, 0.45]),  # never reaches 2 / lr
            synthetic_run("llama2", 1.0, [0.2, 0.9, 1.1, 1.0, 1.2]),  # rises and hovers
            synthetic_run("simplegpt", 1.0, [50, 20, 9, 8, 7]),  # stays above
            synthetic_run("gpt2", 1.0, [3, 4], status="diverged")]
    summary = {"scale": "tiny", "settings": eos.SCALES["tiny"].train, "lrs": [0.1, 1.0], "seeds": [0],
               "archs": ["llama2", "simplegpt", "gpt2"], "runs": runs}
    text = eos.findings(summary)
    assert "| llama2 | 0.1 | 20 | completed (1) | 0.1 | not in all | 0.40 | 0% | 0.45 | 2.600 |" in text
    assert "| llama2 | 1 | 2 | completed (1) | 0.2 | 10 | 1.10 | 100% |" in text
    sentences = text.split("What the runs show")[1]
    assert "stayed below 2/lr throughout" in sentences and "llama2 at lr 0.1." in sentences
    assert "rose to 2/lr and hovered there" in sentences and ": llama2 at lr 1." in sentences
    assert "sat above 2/lr without diverging (median ratio above 2.0): simplegpt at lr 1." in sentences
    assert "diverged: gpt2 at lr 1." in sentences
    assert "the final full-batch loss ranks llama2 2.600 < simplegpt 2.600." in sentences  # gpt2 diverged


def test_tiny_experiment_runs_gradient_descent_tracked_and_writes_its_outputs(tmp_path):
    exp = eos.EosExperiment("tiny", tmp_path, archs=("llama2",), jobs=1).prepare()
    summary = exp.summary()
    assert [(r["arch"], r["lr"], r["seed"]) for r in summary["runs"]] == [("llama2", 0.3, 0), ("llama2", 1.0, 0)]
    run_dir = exp.run_dir("llama2", 1.0, 0)
    cfg = json.loads((run_dir / "train_config.json").read_text())
    assert (cfg["optimizer"], cfg["schedule"], cfg["warmup"], cfg["batch_size"]) == ("sgd", "constant", 0, 8)
    assert cfg == TrainConfig(**cfg).to_dict()
    sharp = read_metrics(run_dir / "metrics.jsonl", kind="sharpness")
    run = summary["runs"][1]
    assert [p[:2] for p in run["sharpness"]] == [[m["step"], m["value"]] for m in sharp] and len(sharp) == 3
    assert run["threshold"] == 2.0 and all(m["settings"]["batches"] == "training subset" for m in sharp)
    readme = tmp_path / "README.md"
    write_section(readme, "other", "kept as it is")
    paths = eos.write_outputs(summary, tmp_path)
    assert [p.name for p in paths] == ["eos.png", "eos.pdf", "eos.json", "README.md"]
    assert all(p.stat().st_size > 1000 for p in paths[:2])
    assert json.loads((tmp_path / "eos.json").read_text()) == summary
    text = readme.read_text()
    assert "kept as it is" in text and "## Edge of stability" in text and "| llama2 | 1 | 2 | completed (1) |" in text
    before = exp.run_dir("llama2", 0.3, 0).joinpath("metrics.jsonl").stat().st_mtime_ns
    exp.prepare()  # finished runs are reused
    assert exp.run_dir("llama2", 0.3, 0).joinpath("metrics.jsonl").stat().st_mtime_ns == before


def test_unknown_scale():
    with pytest.raises(Exception, match="unknown eos scale"):
        eos.EosExperiment("huge")


def test_stability_claim_compares_diverged_seeds_per_pair():
    from hessian_tools.eos import _stability_claim

    def row(*statuses):
        return (None, sorted(set(statuses)), list(statuses))

    verdicts = {("simplegpt", 1.0): row("completed", "completed"), ("llama2", 1.0): row("diverged", "completed"),
                ("simplegpt_gpt2", 1.0): row("diverged", "completed"), ("gpt2", 1.0): row("completed", "completed"),
                ("llama2_qknorm", 1.0): row("completed", "completed")}
    found = _stability_claim(verdicts, [1.0])
    assert found == ["simplegpt vs llama2 supports (lr 1: 0/2 vs 1/2)",
                     "simplegpt vs llama2_qknorm cannot settle (lr 1: 0/2 vs 0/2)",
                     "simplegpt_gpt2 vs gpt2 contradicts (lr 1: 1/2 vs 0/2)"]
