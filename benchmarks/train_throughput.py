"""Training throughput (tokens/s) of every variant at one shape, and the wall time of a demo-sized run.

Writes its section of BENCHMARKS.md between the train-throughput markers (other sections are left alone).
Usage: python benchmarks/train_throughput.py [--device cpu] [--rounds 5] [--per-round 2] [--skip-demo]
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hessian_tools.benchmarks_md import write_section
from models.config import ARCHS, GPTConfig
from models.data import DataSpec, load_splits, training_batch
from models.gpt import build_model, next_token_loss
from models.train import TrainConfig, make_optimizer, train

SECTION = "train-throughput"
SHAPE = dict(dim=128, n_layers=4, n_heads=4, seq_len=128)
BATCH = 16
DEMO = dict(dim=64, n_layers=2, n_heads=4, seq_len=64, batch_size=16, steps=300, save_every=0)


class Stepper:
    """One variant at the benchmark shape with its AdamW optimizer and a fixed list of training batches."""

    def __init__(self, arch: str, device: torch.device, n_batches: int):
        spec = DataSpec()
        splits = load_splits(spec)
        torch.manual_seed(0)
        cfg = GPTConfig(arch=arch, vocab_size=splits.tokenizer.vocab_size, **SHAPE)
        self.device = device
        self.model = build_model(cfg).to(device).train()
        self.opt = make_optimizer(self.model, TrainConfig(arch=arch))
        self.batches = [tuple(t.to(device) for t in training_batch(splits, spec, s, BATCH, SHAPE["seq_len"]))
                        for s in range(n_batches)]
        self.done = 0

    def run(self, n: int) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second of this process) over n AdamW steps."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            batch = self.batches[self.done % len(self.batches)]
            loss = next_token_loss(self.model, batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.done += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        tokens = n * BATCH * SHAPE["seq_len"]
        return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)


def throughputs(device: torch.device, warmup: int, rounds: int, per_round: int) -> dict:
    """{arch: (median tokens per wall second, median tokens per CPU second)}: after `warmup` untimed steps
    each, the variants take turns, `per_round` timed steps per turn, so a change in machine load affects all
    of them alike. CPU time (summed over threads) is hardly affected by other processes sharing the cores."""
    steppers = {arch: Stepper(arch, device, warmup + rounds * per_round) for arch in ARCHS}
    for stepper in steppers.values():
        stepper.run(warmup)
    rates = {arch: [] for arch in ARCHS}
    for _ in range(rounds):
        for arch, stepper in steppers.items():
            rates[arch].append(stepper.run(per_round))
    return {arch: tuple(statistics.median(x) for x in zip(*r)) for arch, r in rates.items()}


def demo_seconds(device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds, final loss) of a simplegpt run of the demo size, final checkpoint included."""
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        train(TrainConfig(arch="simplegpt", device=device, **DEMO), tmp, progress=False)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        loss = (Path(tmp) / "metrics.jsonl").read_text().splitlines()[-1]
    return seconds, cpu_seconds, json.loads(loss)["loss"]


def section(rates: dict, demo, device: torch.device, rounds: int, per_round: int, load: tuple) -> str:
    where = (f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, {device}; 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} "
             "at the end: a load above the core count means other processes shared the CPUs")
    lines = ["## Training throughput", "",
             f"`python benchmarks/train_throughput.py` ({where}). Shape: dim {SHAPE['dim']}, "
             f"{SHAPE['n_layers']} layers, {SHAPE['n_heads']} heads, seq {SHAPE['seq_len']}, batch {BATCH}; "
             f"AdamW steps (forward, backward, clip, update); the variants take turns, {per_round} timed steps each "
             f"per round after warm-up, {rounds} rounds; median of the rounds.", "",
             "| variant | tokens/s (wall) | tokens per CPU-second | CPU time vs llama2 |", "|---|---:|---:|---:|"]
    cpu = {arch: r[1] for arch, r in rates.items()}
    for arch, (wall, per_cpu) in rates.items():
        lines.append(f"| {arch} | {wall:,.0f} | {per_cpu:,.0f} | {cpu['llama2'] / per_cpu:.2f}x |")
    lines += ["", f"SimpleGPT overhead over llama2 at equal shape (CPU time per step): "
              f"{cpu['llama2'] / cpu['simplegpt']:.2f}x; simplegpt_gpt2 over gpt2: "
              f"{cpu['gpt2'] / cpu['simplegpt_gpt2']:.2f}x."]
    if demo is not None:
        lines += ["", f"Demo-sized run (simplegpt, dim {DEMO['dim']}, {DEMO['n_layers']} layers, seq "
                  f"{DEMO['seq_len']}, batch {DEMO['batch_size']}, {DEMO['steps']} steps, one checkpoint): "
                  f"{demo[0]:.1f} s wall, {demo[1]:.1f} CPU-seconds over {torch.get_num_threads()} threads, final "
                  f"training loss {demo[2]:.3f}."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    args = parser.parse_args()
    device = torch.device(args.device)
    load_start = os.getloadavg()[0]
    rates = throughputs(device, args.warmup, args.rounds, args.per_round)
    for arch, (wall, per_cpu) in rates.items():
        print(f"{arch:<16} {wall:>10,.0f} tokens/s {per_cpu:>10,.0f} tokens/CPU-s", flush=True)
    demo = None if args.skip_demo else demo_seconds(args.device)
    text = section(rates, demo, device, args.rounds, args.per_round, (load_start, os.getloadavg()[0]))
    print(text)
    write_section(args.out, SECTION, text)


if __name__ == "__main__":
    main()
