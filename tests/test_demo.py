"""`hessian-tools demo` at the tiny scale: the comparison table, the figures, reuse on a second call, and training
that gives the same numbers however it is run."""

import io
import json
import os

import pytest

from hessian_tools.cli import main
from hessian_tools.demo import Experiment, _train_task, demo
from hessian_tools.errors import UserError
from hessian_tools.results_io import read_records

ARCHS = ("simplegpt", "llama2")


def snapshot(root):
    """{path: mtime_ns} of every checkpoint file and metrics file under root."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and (p.parent.name.startswith("ckpt_") or p.name == "metrics.jsonl")}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    text = io.StringIO()
    result = demo(Experiment("tiny", root, jobs=1, archs=ARCHS, log=io.StringIO()), out=text)
    return root, text.getvalue(), result


def test_table_compares_every_architecture(first):
    root, text, result = first
    archs = result["summary"]["archs"]
    assert set(archs) == set(ARCHS)
    for arch, e in archs.items():
        assert e["final_loss"]["n"] == 1 and e["final_loss"]["mean"] > 0
        for measure in ("params.lambda_max", "layer.lambda_max", "elementwise.lambda_max", "adam.sharpness"):
            (seed,) = e[measure]["seeds"].values()
            assert seed["value"] > 0 and seed["interval"][0] <= seed["value"] <= seed["interval"][1]
        jk = e["params.lambda_max"]["seeds"][0]
        assert jk["data_method"] == "jackknife" and jk["data_interval"][0] < jk["data_value"] < jk["data_interval"][1]
        assert e["gd_threshold"]["mean"] == pytest.approx(2 / e["params.lambda_max"]["value"]["mean"])
        sites = e["activation"]["activation.scale_free"]
        assert {role for role, _, _ in sites} == {"attn_in", "ffn_in", "block_out"}
        assert all(s["range_from"] == "data" for s in sites.values())  # the per-batch interval
        low, high = e["bound"]["tightness"]
        assert 1 <= low <= high and e["bound"]["violated"] == 0  # the bound holds on the layer checked
        assert e["stable_lr"]["all_seeds"] in (None, 1e-2, 3e-1) and set(e["stable_lr"]["per_seed"]) == {"0"}
        assert sorted(e["sample_size"]) == [1, 2, 4, 8]
        line = next(line for line in text.splitlines() if line.startswith(arch + " "))
        assert f"{e['params.lambda_max']['value']['mean']:.3g}" in line
    assert "simplegpt vs llama2" in text and "figures:" in text and all(p in text for p in result["figures"])
    assert len(result["figures"]) == 12 and all(os.path.getsize(p) > 1000 for p in result["figures"])
    timing = json.loads((root / "timing.json").read_text())
    assert timing["demo"]["wall_time_s"] > 0 and len(timing["demo"]["load_average_before"]) == 3
    assert timing["train"]["runs"] == 2 * 3 and timing["sweep"]["tasks"] > 0


def test_second_call_reuses_everything(first):
    root, text, result = first
    before, records = snapshot(root), read_records(root / "results.jsonl")
    assert any("ckpt_" in p for p in before)
    log, again = io.StringIO(), io.StringIO()
    second = demo(Experiment("tiny", root, jobs=1, archs=ARCHS, log=log), out=again)
    assert snapshot(root) == before  # no run was retrained or resumed
    assert read_records(root / "results.jsonl") == records  # nothing remeasured
    assert "training" not in log.getvalue() and "sweeping" not in log.getvalue()
    assert second["summary"]["claims"] == result["summary"]["claims"]


def test_training_gives_bit_identical_losses_in_and_out_of_worker_processes(tmp_path):
    """The same code and seed give the same losses: twice in this process (where torch may use more threads)
    and once in a worker process of the demo's pool."""
    exp = Experiment("tiny", tmp_path / "a", jobs=2, archs=("llama2_qknorm",))
    settings = exp._train_settings("llama2_qknorm", 1, steps=12, lr=0.3)
    runs = [str(tmp_path / name) for name in ("one", "two", "worker")]
    _train_task(settings, runs[0])
    _train_task(settings, runs[1])
    exp._map(_train_task, [(settings, runs[2]), (settings, str(tmp_path / "unused"))])
    losses = [[json.loads(line)["loss"] for line in open(f"{run}/metrics.jsonl")] for run in runs]
    assert len(losses[0]) == 12 and losses[0] == losses[1] == losses[2]


def test_cli_demo_rejects_bad_input(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "--steps must be an integer >= 3, got 1" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "--seeds must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown scale"):
        Experiment("huge", tmp_path)
