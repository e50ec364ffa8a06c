"""`spectrum`, `trace` and `density` on a tiny saved checkpoint, against dense float64 Hessians.

The references are built here, independently of hessian_tools.operators: the loss as a function of a flat
float64 vector (a parameter subset, or a perturbation added at an activation site by a hook), its Hessian
row by row by double backward of unit vectors, confirmed on two columns by central differences.
"""

import copy
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hessian_tools.cli import main
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import GPTConfig
from models.data import CharTokenizer, DataSpec
from models.gpt import build_model, math_attention, next_token_loss

PARAMS = r"layers\.0\.attention\.snq\."  # 272 parameters: a dense reference stays cheap
SITE = "layers.0.feed_forward:in"  # 2 x 8 x 16 = 256 activations per batch
DATA = ["--batches", "2", "--batch-size", "2", "--seed", "3"]
EXACT = ["--dtype", "float64", "--mode", "double-backward"]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A simplegpt (dim 16, 1 layer, context 8) checkpoint with its own 7-character corpus."""
    root = tmp_path_factory.mktemp("ckpt")
    rng = random.Random(0)
    text = "".join(rng.choice("abcdef ") for _ in range(3000))
    (root / "corpus.txt").write_text(text)
    tokenizer = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    cfg = GPTConfig(arch="simplegpt", vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, seq_len=8,
                    ffn_hidden=16)
    meta = {"data": DataSpec(path=str(root / "corpus.txt")).to_dict(), "tokenizer": tokenizer.to_dict()}
    return save_checkpoint(root / "run", 5, build_model(cfg), None, meta)


def batches_of(path):
    ckpt = load_checkpoint(path)
    return ckpt.model, ckpt.measurement_batches(2, 2, seed=3)


def dense_hessian(f, x0, step=1e-5):
    """Hessian of scalar f at flat float64 x0 by double backward of unit vectors, checked by differences."""
    x = x0.clone().requires_grad_(True)
    with math_attention():
        g = torch.autograd.grad(f(x), x, create_graph=True)[0]
        rows = torch.stack([torch.autograd.grad(g[i], x, retain_graph=True)[0] for i in range(x.numel())])

        def grad_at(y):
            y = y.clone().requires_grad_(True)
            return torch.autograd.grad(f(y), y)[0]

        for i in (0, x.numel() - 1):
            e = torch.zeros_like(x0)
            e[i] = step
            fd = (grad_at(x0 + e) - grad_at(x0 - e)) / (2 * step)
            # O(step^2) truncation and O(eps / step) rounding: 1e-6 of the column's norm is ample
            assert (fd - rows[:, i]).norm() <= 1e-6 * rows[:, i].norm(), f"double backward != differences at {i}"
    return ((rows + rows.T) / 2).numpy()


@pytest.fixture(scope="module")
def dense_params(ckpt_dir):
    return param_hessian(ckpt_dir)


def param_hessian(path):
    """Dense Hessian of the mean loss over the batches w.r.t. the PARAMS subset."""
    model, batches = batches_of(path)
    model = copy.deepcopy(model).double()
    fixed = {k: v.detach() for k, v in model.named_parameters()}
    names = [k for k in fixed if re.search(PARAMS, k)]
    sizes = [fixed[k].numel() for k in names]

    def f(theta):
        sub = {k: t.view_as(fixed[k]) for k, t in zip(names, theta.split(sizes))}
        # equal batch sizes: the mean over batches is the mean over their union
        return sum(next_token_loss(lambda i: torch.func.functional_call(model, {**fixed, **sub}, (i,)), b)
                   for b in batches) / len(batches)

    return dense_hessian(f, torch.cat([fixed[k].reshape(-1) for k in names]))


def activation_hessian(path):
    """Dense Hessian of batch 0's mean loss w.r.t. the input of layers.0.feed_forward (one batch)."""
    model, batches = batches_of(path)
    model = copy.deepcopy(model).double()
    module = model.get_submodule(SITE.split(":")[0])
    shape = (2, 8, 16)

    def f(delta):
        handle = module.register_forward_pre_hook(lambda mod, args: (args[0] + delta.view(shape),) + args[1:])
        try:
            return next_token_loss(model, batches[0])
        finally:
            handle.remove()

    return dense_hessian(f, torch.zeros(int(np.prod(shape)), dtype=torch.float64))


def run_json(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out), err


def test_spectrum_params_matches_dense_hessian(ckpt_dir, dense_params, capsys):
    top = np.linalg.eigvalsh(dense_params)[-1]
    rec, err = run_json(capsys, "spectrum", str(ckpt_dir), "--params", PARAMS, "--tol", "1e-10", "--json",
                        *DATA, *EXACT)
    assert rec["quantity"] == "lambda_max" and rec["converged"] and rec["status"] == "ok"
    assert rec["value"] == pytest.approx(top, rel=1e-6)
    assert abs(rec["value"] - top) <= rec["error"] + 1e-12 * abs(top)  # the certified bound holds
    assert rec["settings"]["operator"]["n"] == 272 and rec["settings"]["operator"]["mode"] == "double-backward"
    assert rec["settings"]["self_check"]["symmetry_rel"] < 1e-8
    prov = rec["provenance"]
    assert (prov["arch"], prov["step"], prov["n_batches"], prov["seq_len"]) == ("simplegpt", 5, 2, 8)
    assert prov["checkpoint"] == str(ckpt_dir) and prov["version"]
    assert "self-check" in err  # the guard's result goes to stderr


def test_spectrum_activation_site_matches_dense_hessian(ckpt_dir, capsys):
    eigs = np.linalg.eigvalsh(activation_hessian(ckpt_dir))
    argv = ["spectrum", str(ckpt_dir), "--site", SITE, "--which", "both", "--tol", "1e-10", "--json",
            "--batches", "1", "--batch-size", "2", "--seed", "3", *EXACT]
    rec, _ = run_json(capsys, *argv)
    assert rec["settings"]["operator"]["kind"] == "activation" and rec["settings"]["operator"]["site"] == SITE
    top, bottom = rec["payload"]["eigenvalues"]
    assert top == pytest.approx(eigs[-1], rel=1e-6)
    assert bottom == pytest.approx(eigs[0], rel=1e-6, abs=1e-9 * abs(eigs[-1]))
    # the human table: value, error kind, convergence, cost and mode
    assert main([a for a in argv if a != "--json"]) == 0
    table = capsys.readouterr().out
    assert "lower side certified, the other fails with probability <= 1e-03" in table and "interval" in table
    assert "HVPs" in table and "double-backward" in table


@pytest.mark.parametrize("method, samples", [("hutchinson", 200), ("hutchpp", 60)])
def test_trace_within_three_standard_errors(ckpt_dir, dense_params, capsys, method, samples):
    exact = float(np.trace(dense_params))
    rec, _ = run_json(capsys, "trace", str(ckpt_dir), "--params", PARAMS, "--method", method, "--samples",
                      str(samples), "--json", *DATA, *EXACT)
    assert rec["quantity"] == "trace" and rec["error_kind"] == "standard-error" and rec["hvp_count"] == samples
    assert 0 < rec["error"] and abs(rec["value"] - exact) <= 3 * rec["error"]


def test_trace_xtrace_within_three_errors_labelled_an_estimate(ckpt_dir, dense_params, capsys):
    argv = ["trace", str(ckpt_dir), "--params", PARAMS, "--method", "xtrace", "--samples", "60", *DATA, *EXACT]
    rec, _ = run_json(capsys, *argv, "--json")
    assert rec["settings"]["method"] == "xtrace" and rec["error_kind"] == "estimate" and rec["hvp_count"] == 60
    assert len(rec["payload"]["loo_estimates"]) == 30 and rec["payload"]["rank"] == 30
    assert 0 < rec["error"] and abs(rec["value"] - float(np.trace(dense_params))) <= 3 * rec["error"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "estimate, no guarantee" in table and "XTrace's leave-one-out estimate" in table


def test_data_spread_jackknife_and_sample_size_curve(ckpt_dir, capsys):
    argv = ["spectrum", str(ckpt_dir), "--params", PARAMS, "--tol", "1e-8", "--data-spread", "8",
            "--sample-size-curve", "--batches", "8", "--batch-size", "1", "--seed", "3", *EXACT]
    rec, _ = run_json(capsys, *argv, "--json")
    jk, curve = rec["data_spread"], rec["sample_size_curve"]
    assert jk["error_kind"] == "jackknife" and jk["status"] == "ok" and jk["settings"]["n_groups"] == 8
    p = jk["payload"]
    assert p["union_value"] == rec["value"] and not jk["settings"]["union_solved_here"]  # the main solve, reused
    assert len(p["leave_one_out_values"]) == 8 and p["interval"][0] < jk["value"] < p["interval"][1]
    assert jk["value"] == pytest.approx(p["union_value"] - p["bias"]) and p["level"] == 0.68
    assert [q["n_batches"] for q in curve["payload"]["points"]] == [1, 2, 4, 8]
    assert curve["payload"]["points"][-1]["jackknife"] == jk and curve["value"] == rec["value"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "jackknife, 8 groups of 1 batches" in table and "68 % interval" in table and "sample size" in table


def test_data_spread_with_power_iteration(ckpt_dir, capsys):
    rec, _ = run_json(capsys, "spectrum", str(ckpt_dir), "--params", PARAMS, "--method", "power", "--tol", "1e-4",
                      "--data-spread", "8", "--batches", "8", "--batch-size", "1", "--json", *EXACT)
    spread = rec["data_spread"]
    assert rec["quantity"] == "lambda_absmax" and spread["error_kind"] == "jackknife"
    assert not spread["settings"]["warm_start"] and spread["error"] > 0 and "sample_size_curve" not in rec


def test_density_writes_png_and_record(ckpt_dir, tmp_path, capsys):
    out = tmp_path / "density.png"
    rec, _ = run_json(capsys, "density", str(ckpt_dir), "--params", PARAMS, "--out", str(out), "--probes", "3",
                      "--iter", "20", "--grid", "-1", "5", "51", "--width", "0.1", "--json", *DATA, *EXACT)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == rec and len(rec["payload"]["grid"]) == 51 and rec["payload"]["width"] == 0.1
    assert rec["payload"]["moments"][0] == pytest.approx(1.0, rel=1e-12)  # quadrature weights sum to 1


def test_spectrum_with_a_float32_basis_in_a_budget(ckpt_dir, dense_params, capsys):
    top = np.linalg.eigvalsh(dense_params)[-1]
    budget = 4 * 272 * 13  # 13 float32 vectors of the 272 parameters: 12 steps
    rec, _ = run_json(capsys, "spectrum", str(ckpt_dir), "--params", PARAMS, "--tol", "1e-10", "--json",
                      "--basis-dtype", "float32", "--basis-budget", str(budget), *DATA, *EXACT)
    lo, hi = rec["payload"]["interval"]
    assert lo <= top <= hi and rec["value"] == pytest.approx(top, rel=1e-4)
    assert rec["settings"]["basis_dtype"] == "float32" and rec["settings"]["basis_budget_bytes"] == budget
    assert rec["settings"]["max_iter"] == 12 and rec["payload"]["steps"] <= 12


@pytest.mark.parametrize("argv, message", [
    (["spectrum", "{ckpt}", "--site", "layers.0.nowhere:out"], "valid sites: tok_embeddings:out"),
    (["spectrum", "{missing}"], "no such checkpoint"),
    (["spectrum", "{ckpt}", "--space", "activation"], "needs --site"),
    (["spectrum", "{ckpt}", "--method", "power", "--which", "smallest"], "--which magnitude"),
    (["spectrum", "{ckpt}", "--method", "power", "--basis-dtype", "float32"], "use them with --method lanczos"),
    (["spectrum", "{ckpt}", "--params", PARAMS, "--basis-budget", "100"], "raise basis_budget"),
    (["trace", "{ckpt}", "--method", "hutchpp", "--target-std-error", "1"], "hutchinson only"),
    (["trace", "{ckpt}", "--method", "xtrace", "--target-std-error", "1"], "hutchinson only"),
    (["trace", "{ckpt}", "--method", "xtrace", "--samples", "3"], "n_matvecs=3 must be an integer >= 4"),
    (["spectrum", "{ckpt}", "--params", "no_such_param"], "no parameter matches"),
    (["spectrum", "{ckpt}", "--space", "params", "--site", SITE], "--site names an activation"),
    (["spectrum", "{ckpt}", "--site", SITE, "--params", "wq"], "--params selects parameters"),
    (["spectrum", "{ckpt}", "--distributed", "--data-spread", "8"], "do not run under --distributed"),
    (["spectrum", "{ckpt}", "--distributed", "--sample-size-curve"], "do not run under --distributed"),
    (["spectrum", "{ckpt}", "--site", SITE, "--scale-free", "--distributed"], "--scale-free does not run under"),
    (["spectrum", "{ckpt}", "--data-spread", "2"], "--data-spread must be an integer >= 8, got 2"),
    (["spectrum", "{ckpt}", "--batches", "12", "--data-spread", "8"], "not a multiple of --data-spread 8"),
    (["trace", "{ckpt}", "--batches", "0"], "--batches must be a positive integer"),
    (["density", "{ckpt}", "--out", "{tmp}/density.pdf"], "must end in .png"),
    (["density", "{ckpt}", "--out", "{tmp}/no/density.png"], "does not exist"),
    (["bench", "--threads", "0", "--no-write"], "--threads must be a positive integer"),
])
def test_bad_input_is_one_line_and_exit_2(ckpt_dir, tmp_path, capsys, argv, message):
    argv = [a.format(ckpt=ckpt_dir, missing=tmp_path / "missing", tmp=tmp_path) for a in argv]
    if argv[0] != "bench":
        argv += ["--batch-size", "1", "--mode", "double-backward"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hessian-tools")]
    assert len(lines) == 1 and message in lines[0]


def test_console_script_prints_one_json_object(ckpt_dir):
    exe = shutil.which("hessian-tools", path=str(Path(sys.executable).parent)) or "hessian-tools"
    proc = subprocess.run([exe, "trace", str(ckpt_dir), "--params", PARAMS, "--samples", "4", "--json", *DATA,
                           "--mode", "double-backward"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    assert rec["quantity"] == "trace" and rec["provenance"]["command"] == "trace"
    assert "self-check" in proc.stderr and "HVP" in proc.stderr  # guard and progress on stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.parametrize("space", [["--params", PARAMS], ["--site", SITE]], ids=["params", "activation-sharded"])
def test_spectrum_under_torchrun_matches_single_process(ckpt_dir, capsys, space):
    # 3 batches over 2 ranks: uneven shares, so the weighting of the all-reduce (params) or of the shards
    # (activations: rank 0 holds 2 batches' blocks, rank 1 one) must be exact
    argv = ["spectrum", str(ckpt_dir), *space, "--tol", "1e-10", "--which", "both", "--json",
            "--batches", "3", "--batch-size", "2", "--seed", "3", *EXACT]
    single, _ = run_json(capsys, *argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "hessian_tools", *argv, "--distributed"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # only rank 0 prints
    dist = json.loads(lines[0])
    assert dist["provenance"]["world_size"] == 2 and dist["settings"]["operator"]["world_size"] == 2
    np.testing.assert_allclose(dist["payload"]["eigenvalues"], single["payload"]["eigenvalues"], rtol=1e-8)
    assert dist["settings"]["operator"]["total_weight"] == 3 * 2 * 8
    if space[0] == "--site":  # rank 0 (which prints) keeps 2 of the 3 batches' rows of every Krylov vector
        assert dist["settings"]["operator"]["sharded"] and dist["settings"]["operator"]["n"] == 3 * 2 * 8 * 16
        assert dist["settings"]["operator"]["local_n"] == 2 * 2 * 8 * 16


@pytest.mark.parametrize("world, batches, share", [(1, 3, 3), (2, 3, 2)])
def test_the_memory_check_counts_the_largest_ranks_share_of_sharded_vectors_and_graphs(ckpt_dir, monkeypatch, world,
                                                                                      batches, share):
    from hessian_tools import footprint
    from hessian_tools.cli import build_parser
    from hessian_tools.cli.common import open_from_args
    from hessian_tools.cli.measure_common import check_memory

    args = build_parser().parse_args(["spectrum", str(ckpt_dir), "--site", SITE, "--batches", str(batches),
                                      "--batch-size", "2", *(["--distributed"] if world > 1 else [])])
    args.space = "activation"  # what the flag checks set for --site
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
    seen = {}
    monkeypatch.setattr(footprint, "require_memory", lambda parts, what, device: seen.update(parts, what=what))
    check_memory(args, open_from_args(args), lambda n: 3)
    rows = share * 2 * 8  # rank 0 holds ceil(batches / world) batches of 2 x 8 tokens
    assert seen["float64 vectors"] == footprint.krylov_bytes(rows * 16, 3)
    assert seen["kept graphs"] == share * footprint.graph_bytes(open_from_args(args).config, 2, 8, 4)
    assert f"on {share} batches{' per rank' if world > 1 else ''} of 2 x 8 tokens" in seen["what"]


def test_the_printed_promise_says_what_a_float32_interval_rests_on(ckpt_dir, capsys):
    """float64: probabilistic with its failure probability; float32: measured rounding, never "certified"."""
    lines = {}
    for dtype in ("float64", "float32"):
        assert main(["spectrum", str(ckpt_dir), "--params", PARAMS, "--tol", "1e-4", *DATA, "--dtype", dtype]) == 0
        lines[dtype] = capsys.readouterr().out
    assert "probabilistic: lower side certified, the other fails with probability <= 1e-03" in lines["float64"]
    assert "measured, not certified: rests on the operator's rounding" in lines["float32"]
    assert "(a measurement, not a bound); lower side certified, the other also fails with probability <= 1e-03" \
        in lines["float32"]
