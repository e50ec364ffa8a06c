"""The benchmark code paths at tiny shapes: what they measure is checked against independent computations
(no wall-clock limit anywhere): flop ratios against the derivation, products against a float64 reference,
ratios against the measured times, the peers' answers and ours against the float64 reference and scipy."""

import importlib.util
import json
import pytest
import torch
from scipy.sparse.linalg import eigsh

from hessian_tools import bench
from hessian_tools.bench import accuracy, checkpoints, report, scale
from hessian_tools.bench import peers as P
from hessian_tools.bench.common import SHAPES, make_batch, make_model
from hessian_tools.cli import main
from hessian_tools.errors import UserError

# matrix-multiply flops of one product over the gradient's (operators/hvp.py): (kept graph, fresh)
DERIVED = {"double-backward": (2.0, 3.0), "rev-rev": (2.0, 3.0), "fwd-rev": (3.0, 3.0)}


@pytest.fixture(scope="module")
def engine():
    return bench.run_part("engine", quick=True, say=lambda line: None)


def test_engine_flop_ratios_match_the_derived_bound_and_ratios_come_from_the_times(engine):
    for arch, a in engine["hvp"]["params"].items():
        for mode, m in a["modes"].items():
            kept, fresh = DERIVED[mode]
            # the counted flops are the derivation's up to the few non-matmul flops FlopCounter also sees
            assert m["kept_flop_ratio"] == pytest.approx(kept, rel=0.02), (arch, mode)
            assert m["fresh_flop_ratio"] == pytest.approx(fresh, rel=0.02), (arch, mode)
            assert m["kept_ratio"] == m["kept_s"] / a["grad_s"] and m["fresh_ratio"] == m["fresh_s"] / a["grad_s"]
            assert m["first_ratio"] == m["first_s"] / a["grad_s"]
            graph = m["kept_graph_bytes"]
            assert (graph == 0) if mode == "fwd-rev" else (0 < graph <= m["peak_bytes"]), (arch, mode)
            assert m["fresh_peak_bytes"] > 0
        fastest = min(a["modes"], key=lambda k: a["modes"][k]["kept_s"])
        assert a["fastest_kept"] == fastest
    assert engine["hvp"]["lower_bound"] == {"kept": 2.0, "fresh": pytest.approx(8 / 3)}


def test_engine_products_equal_a_float64_reference():
    """The bench's float32 products (every mode) against a float64 double-backward product of the same model."""
    from hessian_tools.operators import MODES, ParamHessian

    shape = SHAPES["quick"]
    model, batch = make_model("simplegpt", shape), make_batch(shape)
    ref_op = ParamHessian(model.double(), [batch], dtype=torch.float64, mode="double-backward")
    v = torch.randn(ref_op.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = ref_op.matvec(v)
    for mode in MODES:
        got = ParamHessian(model.float(), [batch], dtype=torch.float32, mode=mode).matvec(v)
        assert float((got - ref).norm() / ref.norm()) < 1e-4, mode  # float32 rounding of a ~8k-term product


def test_engine_markdown_states_goals_from_the_results(engine):
    text = report.markdown(engine)
    auto = {arch: a["modes"]["double-backward"] for arch, a in engine["hvp"]["params"].items()}
    worst = max(auto, key=lambda k: auto[k]["kept_ratio"])
    assert f"worst {worst} {auto[worst]['kept_ratio']:.2f}" in text
    met = all(m["kept_ratio"] <= 2.0 for m in auto.values())
    assert ("kept <= 2.0: **met**" in text) == met and ("kept <= 2.0: **missed**" in text) != met
    assert "load average" in text


@pytest.fixture(scope="module")
def peers_result(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return bench.run_part("peers", quick=True, runs_root=root, with_peers=False, say=lambda line: None)


def test_peers_part_without_peers_checks_ours_against_the_reference(peers_result):
    for model, r in peers_result["models"].items():
        ref = r["reference"]
        assert ref["converged"] and ref["spectral_norm"] == max(abs(ref["lambda_max"]), abs(ref["lambda_min"]))
        for q, row in r["quantities"].items():
            ours = row["ours"]
            assert ours["rel_error"] == abs(ours["value"] - ref[q]) / abs(ref[q])
            assert ours["rel_error"] <= accuracy.ACCURACY and ours["hvps"] > 0, (model, q)
            assert row["peers"] == {} and "speedup" not in row
            oracle = row["ours_oracle"]  # the smallest ladder step within the accuracy, as the peers are credited
            assert oracle["reached"] and oracle["setting"] in accuracy.LANCZOS_LADDER, (model, q)
            assert f"| {oracle['hvps']} / " in report.markdown(peers_result)
    sweep = peers_result["sweep"]
    assert sweep["steps"] == [10, 20] and "speedup" not in sweep
    assert sweep["ours_warm_s"] == sum(c["warm"]["seconds"] for c in sweep["checkpoints"])
    for c in sweep["checkpoints"]:
        assert c["warm_rel_error"] <= accuracy.ACCURACY
    for t in peers_result["traces"].values():
        assert t["hvp_ratio"] == t["hutchinson"]["hvps"] / t["hutchpp"]["hvps"]
        if t["hutchinson"]["reached"]:
            assert t["hutchinson"]["std_error"] <= t["hutchpp"]["std_error"]
    json.dumps(peers_result, allow_nan=False)
    assert "not measured (run with the peers installed)" in report.markdown(peers_result)


def test_the_float64_reference_agrees_with_scipy_eigsh(peers_result, tmp_path_factory):
    """The reference every tool is scored against, checked by ARPACK on our own float64 operator."""
    from hessian_tools.operators import ParamHessian

    run_dir = peers_result["runs_root"] + "/runs/simplegpt"
    _, model, batch = checkpoints.load_run(run_dir)[-1]
    ref = peers_result["models"]["simplegpt step 20"]["reference"]
    linop = ParamHessian(model, [batch], dtype=torch.float64).to_scipy()
    top = eigsh(linop, k=1, which="LA", tol=1e-10, return_eigenvectors=False)[0]
    bottom = eigsh(linop, k=1, which="SA", tol=1e-10, return_eigenvectors=False)[0]
    assert ref["lambda_max"] == pytest.approx(top, rel=1e-8)
    assert ref["lambda_min"] == pytest.approx(bottom, rel=1e-8)


def test_pyhessian_adapter_counts_its_products_and_is_scored_against_the_reference(peers_result):
    """PyHessian is in the dev extra: its recorded Rayleigh quotients end at its own answer, and the default row's
    error is its distance to our float64 reference."""
    if importlib.util.find_spec("pyhessian") is None:
        pytest.skip("PyHessian (dev extra) is not installed")
    _, model, batch = checkpoints.load_run(peers_result["runs_root"] + "/runs/simplegpt")[-1]
    (values, _), counted = P.pyhessian(model, batch, "eigenvalues", maxIter=30, tol=1e-4)
    assert counted.hvps >= 2 and counted.trace[-1][1] == pytest.approx(values[0], rel=1e-5)
    assert all(t1 >= t0 for (t0, _), (t1, _) in zip(counted.trace, counted.trace[1:]))
    ref = peers_result["models"]["simplegpt step 20"]["reference"]
    row = accuracy._default_row(values[0], "dominant", ref, counted.hvps, 1.0)
    assert row["rel_error"] == abs(values[0] - ref["dominant"]) / abs(ref["dominant"])


def test_oracle_stops_take_the_first_answer_within_the_accuracy():
    counted = P.Counted()
    counted.trace = [(0.1, 5.0), (0.2, 9.0), (0.3, 9.995), (0.4, 10.0)]
    assert counted.first_within(10.0, 1e-3) == (3, 0.3) and counted.first_within(20.0, 1e-3) is None
    calls = []

    def run(setting):
        calls.append(setting)
        c = P.Counted()
        c.trace = [(0.0, 0.0)] * setting
        return 10.0 * (1 - 10.0 ** -setting), c

    hit = accuracy._ladder((1, 2, 3, 4, 5), 10.0, run)
    assert hit["setting"] == 3 and hit["hvps"] == 3 and hit["reached"] and calls == [1, 2, 3]
    assert accuracy.attempt(lambda: 1 / 0) == {"reached": False, "failed": "ZeroDivisionError: division by zero"}


def test_bench_peers_without_the_peers_is_a_one_line_error(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "curvlinops" else real(name, *a))
    with pytest.raises(UserError, match="install_peers.sh"):
        P.require("curvlinops")
    assert main(["bench", "--peers", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "curvlinops 3.0.1" in err[0] and "benchmarks/install_peers.sh" in err[0]


def test_scale_part_at_a_tiny_shape():
    result = bench.run_part("scale", quick=True, say=lambda line: None)
    s = result["scale"]
    from models.config import GPTConfig
    from models.gpt import build_model

    assert s["n_params"] == sum(p.numel() for p in build_model(GPTConfig(**scale.QUICK)).parameters())
    for mode, m in s["modes"].items():
        assert m["kept_ratio"] == m["kept_s"] / s["grad_s"] and m["peak_bytes"] > 0
    lam = s["lambda_max"]
    assert lam["converged"] and lam["hvps"] > lam["steps"] > 0 and lam["steps"] <= lam["max_iter"]
    lo, hi = lam["interval"]
    assert lo <= lam["value"] <= hi and (hi - lo) <= 2 * scale.ACCURACY * abs(lam["value"])
    assert lam["basis_budget_bytes"] > 0 and lam["error_kind"] == "measured"
    text = report.markdown(result)
    assert "HVP <= 3 gradients" in text and "lambda_max to 0.001 (guaranteed interval): **met**" in text


def test_throughput_part_at_a_tiny_shape():
    from hessian_tools.bench import throughput

    result = throughput.run(quick=True, say=lambda line: None)
    (run,) = result["shapes"]
    cpu = {name: r["tokens_per_cpu_s"] for name, r in run["rates"].items()}
    assert set(cpu) == {"llama2", "llama2_qknorm", "simplegpt", "gpt2", "simplegpt_gpt2", "simplegpt no-norm"}
    text = report.markdown(result)
    assert f"{cpu['llama2'] / cpu['simplegpt']:.2f}x" in text
    assert f"reference norms {cpu['llama2'] / cpu['simplegpt'] - 1:+.0%}" in text


def test_committed_results_and_benchmarks_md_agree():
    """Every committed results file regenerates its BENCHMARKS.md section word for word."""
    from hessian_tools.benchmarks_md import markers

    text = (bench.RESULTS_DIR.parents[1] / "BENCHMARKS.md").read_text()
    found = sorted(bench.RESULTS_DIR.glob("*.json"))
    assert found, "no committed benchmark results"
    for path in found:
        result = json.loads(path.read_text())
        start, end = markers(report.SECTIONS[result["part"]])
        section = text.split(start, 1)[1].split(end, 1)[0].strip("\n")
        assert section == report.markdown(result).strip("\n"), f"BENCHMARKS.md disagrees with {path.name}"



def test_tracking_part_at_a_tiny_shape():
    """Overheads in the section are the medians' ratios; the errors are the tracked values' against Lanczos."""
    result = bench.run_part("tracking", quick=True, say=lambda line: None)
    base = result["wall_s"]["untracked"][0]
    text = report.markdown(result)
    for name, q in result["tracked"].items():
        assert f"| {name} | {result['wall_s'][name][0]:.1f} s | {result['wall_s'][name][0] / base - 1:+.0%} |" in text
        for m in q["measures"].values():
            assert abs(m["value_last"] - m["converged"]) < 0.5 * m["converged"]  # tracked vs float64 to 1e-8
        assert q["measurements"] == 3  # steps 0, 5 and the last (10)


def test_a_late_write_failure_prints_the_measured_results(tmp_path, monkeypatch, capsys):
    """bench measures, then the markdown write fails: the results go to stdout, one error line, exit 2."""
    from hessian_tools.cli import main
    from hessian_tools.errors import UserError

    measured = json.loads((bench.RESULTS_DIR / "tracking.json").read_text())  # a real result, not re-measured
    monkeypatch.setattr(bench, "run_part", lambda part, **kw: measured)

    def refuse(*args):
        raise UserError(f"{tmp_path / 'B.md'}: the disk is full")

    monkeypatch.setattr("hessian_tools.benchmarks_md.write_section", refuse)
    rc = main(["bench", "--tracking", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "B.md")])
    out, err = capsys.readouterr()
    assert rc == 2
    assert json.loads(out) == {"tracking": measured}
    lines = [line for line in err.splitlines() if line.startswith("hessian-tools")]
    assert len(lines) == 1 and "the disk is full; the results measured so far were printed on stdout" in lines[0]
    assert json.loads((tmp_path / "results" / "tracking.json").read_text()) == measured  # saved before the failure
