"""`hessian-tools bench`: the engine's benchmarks, each a part with one job, raw results kept as JSON.

Parts (each writes benchmarks/results/{part}.json, and its BENCHMARKS.md section is generated from that JSON
by `report.py`, so the text can always be checked against the committed results):
- "engine": HVP cost per mode and variant against the gradient, flops and memory (`hvp_cost.py`);
- "peers": ours against PyHessian, hessian-eigenthings and curvlinops + eigsh on the demo's trained checkpoints
  and at init, a warm-started 4-checkpoint sweep, traces at matched standard error (`accuracy.py`, `peers.py`);
- "scale": the GPT-2-small shape at 4 x 256 tokens (`scale.py`);
- "tracking": sharpness tracking's cost in a training run, side by side with untracked runs (`tracking_cost.py`).
Every result records the machine and its load average at the start and the end.
"""

from __future__ import annotations

import json
from pathlib import Path

from hessian_tools.bench.common import ARCHS, DESCRIBED, SHAPES, machine

PARTS = ("engine", "peers", "scale", "tracking")
RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def run_part(part: str, quick: bool = False, runs_root=None, with_peers: bool = True, say=print) -> dict:
    """One part's result as a JSON-able dict (see the module docstring)."""
    result = {"part": part, "quick": quick, "machine_start": machine()}
    if part == "engine":
        from hessian_tools.bench import hvp_cost

        shape = SHAPES["quick" if quick else "full"]
        result["shape"] = {k: shape[k] for k in DESCRIBED}
        result["hvp"] = hvp_cost.run(shape, say)
    elif part == "peers":
        result.update(compare_peers(quick, runs_root, with_peers, say))
    elif part == "scale":
        from hessian_tools.bench import scale

        result["scale"] = scale.run(quick, say)
    elif part == "tracking":
        from hessian_tools.bench import tracking_cost

        result.update(tracking_cost.run(quick, say=say))
    else:
        raise ValueError(part)
    result["machine_end"] = machine()
    return result


def compare_peers(quick: bool, runs_root, with_peers: bool, say) -> dict:
    """The "peers" part: step-300 checkpoints of every variant and simplegpt at init; the warm sweep; traces."""
    from hessian_tools.bench import accuracy, checkpoints
    from hessian_tools.bench import peers as P

    if with_peers:
        P.require(*P.PACKAGES)
    archs = ("simplegpt",) if quick else ARCHS
    root = Path(runs_root)
    if quick:
        dirs = {"simplegpt": _tiny_run(root)}
    else:
        dirs = checkpoints.run_dirs(archs, root, say)
    out = {"runs_root": str(root), "with_peers": with_peers, "accuracy": accuracy.ACCURACY, "models": {}, "traces": {}}
    xtrace_seeds = 3 if quick else accuracy.XTRACE_SEEDS
    for arch in archs:
        step, model, batch = checkpoints.load_run(dirs[arch])[-1]
        say(f"peers: {arch} step {step}")
        out["models"][f"{arch} step {step}"] = accuracy.model_rows(model, batch, with_peers)
        say(f"peers: {arch} step {step} trace")
        out["traces"][f"{arch} step {step}"] = accuracy.trace_rows(model, batch, with_peers, xtrace_seeds)
    step, model, batch = checkpoints.at_init(dirs["simplegpt"])
    say("peers: simplegpt at init")
    out["models"]["simplegpt init"] = accuracy.model_rows(model, batch, with_peers)
    run = checkpoints.load_run(dirs["simplegpt"])
    say(f"peers: warm sweep over {len(run)} simplegpt checkpoints")
    out["sweep"] = {"steps": [s for s, _, _ in run],
                    **accuracy.warm_sweep([m for _, m, _ in run], run[-1][2], with_peers)}
    return out


def _tiny_run(root: Path) -> Path:
    """The demo's tiny scale (dim 16, 1 layer, 20 steps, 2 checkpoints): the quick part's stand-in."""
    from hessian_tools.demo import SCALES
    from models.train import TrainConfig, train

    run_dir = root / "runs" / "simplegpt"
    train(TrainConfig(arch="simplegpt", device="cpu", **{**SCALES["tiny"].train, "batch_size": 16}), run_dir,
          progress=False)
    return run_dir


def save(result: dict, results_dir=RESULTS_DIR) -> Path:
    from hessian_tools.paths import output_dir, write_atomic

    path = output_dir(results_dir, "--results") / f"{result['part']}.json"
    write_atomic(path, json.dumps(result, indent=1, allow_nan=False) + "\n", "--results")
    return path


def load(part: str, results_dir=RESULTS_DIR) -> dict | None:
    from hessian_tools.schema import MapOf
    from models.schemas import read_json

    path = Path(results_dir) / f"{part}.json"
    return read_json(path, MapOf(), "benchmark results file") if path.exists() else None
