"""`spectrum` / `trace` with --scaled, --scale-free and --role --layer on a trained run, against dense float64
references (operator_refs) and theory.checks; `inspect` lists the role sites; bad combinations are one line."""

import json
import shutil

import pytest
import torch
from operator_refs import confirmed_dense_hessian, flat_param_loss

from hessian_tools.cli import main
from models.checkpoint import list_checkpoints, load_checkpoint
from models.train import TrainConfig, train
from theory.checks import check_adam_sharpness

PARAMS = r"layers\.0\.attention\.snq\."  # 16 x 16 + 16 = 272 parameters
DATA = ["--batches", "2", "--batch-size", "2", "--seed", "3", "--dtype", "float64", "--mode", "double-backward"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A simplegpt (dim 16, 1 layer, context 8) trained 20 AdamW steps: its run directory."""
    cfg = TrainConfig(arch="simplegpt", dim=16, n_layers=1, n_heads=2, seq_len=8, batch_size=4, steps=20,
                      save_every=0, norm_backend="torch", device="cpu")
    out = tmp_path_factory.mktemp("scaled") / "run"
    assert train(cfg, out, progress=False).status == "completed"
    return out


@pytest.fixture(scope="module")
def dense(run):
    """(model, names, dense float64 Hessian on PARAMS over the CLI's batches)."""
    ckpt = load_checkpoint(run)
    model = ckpt.model.double()
    batches = ckpt.measurement_batches(2, 2, seed=3)
    names = [n for n, _ in model.named_parameters() if n.startswith("layers.0.attention.snq.")]
    f, theta = flat_param_loss(model, batches, names)
    return model, names, confirmed_dense_hessian(f, theta)


def spectrum(capsys, *argv):
    assert main(["spectrum", *argv, "--json", "--tol", "1e-10", *DATA]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_scaled_layer_matches_the_dense_reference(run, dense, capsys):
    model, names, H = dense
    named = dict(model.named_parameters())
    rms = torch.cat([torch.full((named[n].numel(),), float(named[n].detach().pow(2).mean().sqrt()),
                                dtype=torch.float64) for n in names])
    top = float(torch.linalg.eigvalsh(rms[:, None] * H * rms[None, :])[-1])
    rec = spectrum(capsys, str(run), "--params", PARAMS, "--scaled", "layer")
    assert rec["value"] == pytest.approx(top, rel=1e-8)
    op = rec["settings"]["operator"]
    assert op["scaled"] == "layer" and sorted(op["scaling"]["tensor_rms"]) == sorted(names)
    raw = spectrum(capsys, str(run), "--params", PARAMS)
    assert raw["settings"]["operator"]["scaled"] == "none"
    assert raw["value"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)


def test_scaled_adam_matches_theory_checks(run, capsys):
    rec = spectrum(capsys, str(run), "--scaled", "adam")
    ckpt = load_checkpoint(run)
    check = check_adam_sharpness(ckpt, ckpt.measurement_batches(2, 2, seed=3), tol=1e-10)
    assert rec["value"] == pytest.approx(check["preconditioned_sharpness"], rel=1e-8)
    scaling = rec["settings"]["operator"]["scaling"]
    assert scaling["steps"] == [20] and scaling["beta2"] == 0.95 and scaling["eps"] == 1e-8


def test_trace_takes_the_scaled_coordinates(run, dense, capsys):
    model, names, H = dense
    absw = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1).abs() for n in names])
    exact = float((absw**2 * torch.diagonal(H)).sum())
    assert main(["trace", str(run), "--params", PARAMS, "--scaled", "elementwise", "--samples", "100", "--json",
                 *DATA]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["settings"]["operator"]["scaled"] == "elementwise"
    assert abs(rec["value"] - exact) <= 3 * rec["error"]


def test_role_site_and_scale_free(run, capsys):
    plain = spectrum(capsys, str(run), "--site", "layers.0.feed_forward:in")
    rec = spectrum(capsys, str(run), "--role", "ffn_in", "--layer", "0", "--scale-free")
    op = rec["settings"]["operator"]
    assert op["site"] == "layers.0.feed_forward:in" and op["scaled"] == "scale-free"
    ms = op["scaling"]["mean_square"]
    assert ms == pytest.approx(plain["settings"]["operator"]["activation_mean_square"], rel=1e-12)
    assert rec["value"] == pytest.approx(ms * plain["value"], rel=1e-8)
    argv = ["spectrum", str(run), "--role", "ffn_in", "--layer", "0", "--scale-free", "--tol", "1e-4", *DATA]
    assert main(argv) == 0
    assert "scaled scale-free" in capsys.readouterr().out


def test_inspect_lists_the_role_sites(run, capsys):
    assert main(["inspect", str(run), "--json"]) == 0
    roles = json.loads(capsys.readouterr().out)["roles"]
    assert roles == [{"block_in": "layers.0:in", "attn_in": "layers.0.attention:in",
                      "ffn_in": "layers.0.feed_forward:in", "block_out": "layers.0:out"}]
    assert main(["inspect", str(run)]) == 0
    assert "layer 0: block_in = layers.0:in, attn_in = layers.0.attention:in" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--scaled", "adam"], "--scaled adam needs the run's Adam state: "),
    (["--site", "layers.0:in", "--scaled", "layer"], "at an activation site use --scale-free"),
    (["--scale-free"], "in parameter space use --scaled"),
    (["--role", "attn_in"], "--role and --layer go together"),
    (["--role", "attn_in", "--layer", "3"], "layer 3 is not a block of this model: choose 0 to 0"),
    (["--role", "attn_in", "--layer", "0", "--site", "layers.0:in"], "--role --layer names a site"),
    (["--role", "attn_in", "--layer", "0", "--space", "params"], "--role names an activation"),
])
def test_bad_combinations_are_one_line_errors(run, tmp_path, capsys, argv, message):
    bare = tmp_path / "bare"  # the run's checkpoint without its optimizer state
    shutil.copytree(list_checkpoints(run)[-1], bare)
    (bare / "optimizer.safetensors").unlink()
    assert main(["spectrum", str(bare), *argv, "--batch-size", "1"]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("hessian-tools")]
    assert out == "" and "Traceback" not in err and len(lines) == 1 and message in lines[0], err
    if argv == ["--scaled", "adam"]:
        assert "holds no optimizer state" in lines[0]

