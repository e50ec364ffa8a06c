"""`hessian-tools demo` at the tiny scale: the comparison table, the figures, and reuse on a second call."""

import io
import os

import pytest

from hessian_tools.cli import main
from hessian_tools.demo import Experiment, demo
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
    rows = {r["arch"]: r for r in result["rows"]}
    assert set(rows) == set(ARCHS)
    for arch, row in rows.items():
        assert row["final_loss"] > 0 and row["lambda_max"] > 0 and row["lambda_error"] >= 0
        assert row["act_norm_max"] >= row["act_norm_median"] > 0
        low, high = row["tightness"]
        assert 1 <= low <= high  # the bound holds on every layer
        assert row["gd_threshold"] == pytest.approx(2 / row["lambda_max"])
        assert row["adam_threshold"] > 0
        assert row["largest_stable_lr"] in (None, 1e-2, 3e-1)
        line = next(line for line in text.splitlines() if line.startswith(arch + " "))
        assert f"{row['lambda_max']:.4g}" in line
    assert "figures:" in text and all(p in text for p in result["figures"])
    assert len(result["figures"]) == 12 and all(os.path.getsize(p) > 1000 for p in result["figures"])


def test_second_call_reuses_everything(first):
    root, text, result = first
    before, records = snapshot(root), read_records(root / "results.jsonl")
    assert any("ckpt_" in p for p in before)
    log, again = io.StringIO(), io.StringIO()
    second = demo(Experiment("tiny", root, jobs=1, archs=ARCHS, log=log), out=again)
    assert snapshot(root) == before  # no run was retrained or resumed
    assert read_records(root / "results.jsonl") == records  # nothing remeasured
    assert "training" not in log.getvalue() and "sweeping" not in log.getvalue()
    assert [r["lambda_max"] for r in second["rows"]] == [r["lambda_max"] for r in result["rows"]]


def test_cli_demo_rejects_bad_input(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "--steps must be an integer >= 3, got 1" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown scale"):
        Experiment("huge", tmp_path)
