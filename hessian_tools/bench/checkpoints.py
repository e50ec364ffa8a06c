"""The models the peers are compared on: the training runs of the demo's study scale (dim 64, 2 layers, context
64, 300 steps, checkpoints at steps 75, 150, 225, 300), trained here once, and the same configuration at its
initialisation (the run's seed)."""

from __future__ import annotations

from pathlib import Path

import torch

MEASURE = dict(n_batches=1, batch_size=16)  # one held-out batch of 16 x 64 tokens: PyHessian's data=(x, y)


def run_dirs(archs, root: Path, say=print) -> dict:
    """{arch: run directory}: ROOT/runs/{arch}, trained there (the study scale's seed 0) if missing or unfinished."""
    from hessian_tools.demo import SCALES
    from models.train import TrainConfig, train

    dirs = {}
    for arch in archs:
        run_dir = Path(root) / "runs" / arch
        say(f"checkpoints: {arch} ({run_dir})")
        train(TrainConfig(arch=arch, device="cpu", **SCALES["study"].train), run_dir, progress=False)
        dirs[arch] = run_dir
    return dirs


def load_run(run_dir) -> list:
    """[(step, model, batch)] for every checkpoint of a run, in step order, each with the run's held-out batch."""
    from models.checkpoint import list_checkpoints, load_checkpoint

    out = []
    for path in list_checkpoints(run_dir):
        ckpt = load_checkpoint(path, {"norm_backend": "torch"})
        batch = ckpt.measurement_batches(MEASURE["n_batches"], MEASURE["batch_size"], seed=0)[0]
        out.append((ckpt.step, ckpt.model.float().eval(), batch))
    return out


def at_init(run_dir):
    """(0, the run's model at its initialisation, its batch): the last checkpoint's config, seeded as training is."""
    from models.checkpoint import list_checkpoints, load_checkpoint
    from models.gpt import build_model

    ckpt = load_checkpoint(list_checkpoints(run_dir)[-1], {"norm_backend": "torch"})
    torch.manual_seed(0)
    model = build_model(ckpt.config).float().eval()
    return 0, model, ckpt.measurement_batches(MEASURE["n_batches"], MEASURE["batch_size"], seed=0)[0]
