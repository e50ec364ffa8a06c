"""Training throughput of every variant at two widths, with the norms' backends side by side.

For dim 128 and dim 256 (4 layers, 4 heads, seq 128, batch 16): AdamW steps (forward, backward, clip, update)
of every variant with the reference torch norms, simplegpt and llama2 with the compiled norms (`norm_backend=
"compiled"`, models/norms.py; compile time is reported and excluded from the rates), and simplegpt with its
norms removed (an ablation that changes the function: it says how much of the overhead the norms are).
After warm-up the candidates take turns, `per_round` timed steps per turn, so a change of machine load hits
all of them alike; the median of the rounds is reported. CPU time (summed over threads) is hardly affected by
other processes sharing the cores, so the CPU-time ratios are the comparison. Also times a demo-sized run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from hessian_tools.bench.common import machine

WIDTHS = (128, 256)
SHAPE = dict(n_layers=4, n_heads=4, seq_len=128)
BATCH = 16
QUICK = dict(dim=16, n_layers=1, n_heads=2, seq_len=8)
DEMO = dict(dim=64, n_layers=2, n_heads=4, seq_len=64, batch_size=16, steps=300, save_every=0)
CANDIDATES = (("llama2", "torch"), ("llama2_qknorm", "torch"), ("simplegpt", "torch"), ("gpt2", "torch"),
              ("simplegpt_gpt2", "torch"), ("llama2", "compiled"), ("simplegpt", "compiled"), ("simplegpt", "none"))


def _name(arch: str, norm: str) -> str:
    return arch if norm == "torch" else f"{arch} {'no-norm' if norm == 'none' else norm}"


class Stepper:
    """One variant with its AdamW optimizer and a fixed list of training batches."""

    def __init__(self, arch: str, norm: str, shape: dict, batch: int, n_batches: int):
        from models.config import GPTConfig
        from models.data import DataSpec, load_splits, training_batch
        from models.gpt import build_model
        from models.train import TrainConfig, make_optimizer

        spec = DataSpec()
        splits = load_splits(spec)
        torch.manual_seed(0)
        backend = "torch" if norm == "none" else norm
        cfg = GPTConfig(arch=arch, vocab_size=splits.tokenizer.vocab_size, norm_backend=backend, **shape)
        self.model = build_model(cfg).train()
        if norm == "none":
            _drop_simple_norms(self.model)
        self.opt = make_optimizer(self.model, TrainConfig(arch=arch))
        self.batches = [training_batch(splits, spec, s, batch, shape["seq_len"]) for s in range(n_batches)]
        self.tokens_per_step = batch * shape["seq_len"]
        self.done = 0

    def run(self, n: int) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second of this process) over n AdamW steps."""
        from models.gpt import next_token_loss

        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            loss = next_token_loss(self.model, self.batches[self.done % len(self.batches)])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.done += 1
        tokens = n * self.tokens_per_step
        return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)


def _drop_simple_norms(model: nn.Module):
    """The ablation: every SimpleNorm's RMSNorm becomes the identity (its linear map stays)."""
    from models.norms import SimpleNorm

    for module in model.modules():
        if isinstance(module, SimpleNorm):
            module.norm = nn.Identity()


def rates(shape: dict, candidates, warmup: int, rounds: int, per_round: int) -> dict:
    batch = 4 if shape is QUICK else BATCH
    steppers = {_name(a, n): (a, n, Stepper(a, n, shape, batch, warmup + rounds * per_round)) for a, n in candidates}
    out = {}
    for name, (arch, norm, stepper) in steppers.items():
        start = time.perf_counter()
        stepper.run(warmup)  # compiles the compiled norms
        out[name] = {"arch": arch, "norm": norm, "warmup_s": time.perf_counter() - start}
    samples = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, (_, _, stepper) in steppers.items():
            samples[name].append(stepper.run(per_round))
    for name, s in samples.items():
        out[name]["tokens_per_s"] = statistics.median(x[0] for x in s)
        out[name]["tokens_per_cpu_s"] = statistics.median(x[1] for x in s)
    return out


def demo_run() -> dict:
    """Wall and CPU seconds, final loss of a simplegpt run of the demo size (final checkpoint included)."""
    from models.train import METRICS_FILE, TrainConfig, read_metrics, train

    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        train(TrainConfig(arch="simplegpt", device="cpu", norm_backend="torch", **DEMO), tmp, progress=False)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        loss = read_metrics(Path(tmp) / METRICS_FILE)[-1]["loss"]
    return {**DEMO, "seconds": seconds, "cpu_seconds": cpu_seconds, "loss": loss}


def run(quick: bool = False, warmup: int = 3, rounds: int = 5, per_round: int = 2, say=print) -> dict:
    result = {"part": "train-throughput", "quick": quick, "machine_start": machine(), "shapes": [],
              "rounds": 1 if quick else rounds, "per_round": 1 if quick else per_round}
    widths = (QUICK["dim"],) if quick else WIDTHS
    for dim in widths:
        shape = QUICK if quick else {**SHAPE, "dim": dim}
        candidates = [c for c in CANDIDATES if c[1] != "compiled"] if quick else CANDIDATES
        say(f"throughput: dim {dim}")
        result["shapes"].append({"shape": shape, "batch": 4 if quick else BATCH,
                                 "rates": rates(shape, candidates, 1 if quick else warmup, result["rounds"],
                                                result["per_round"])})
    if not quick:
        say("throughput: demo-sized run")
        result["demo"] = demo_run()
    result["machine_end"] = machine()
    return result
