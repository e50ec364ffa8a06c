"""`hessian-tools train`: one training run into RUN_DIR (resumes if RUN_DIR holds the same run).

With --track-sharpness EVERY, lambda_max of the parameter Hessian (and for AdamW lambda_max(P^-1 H)) is measured
every EVERY steps on fixed batches and logged to RUN_DIR/metrics.jsonl beside the stability thresholds
(hessian_tools.tracking). Ctrl-C or SIGTERM stops the run at once, leaving it resumable from its latest
checkpoint (checked, and said on exit: status 130 / 143); rerun the same command to continue.
"""

import contextlib
import dataclasses
import signal
import sys
import threading

from hessian_tools.cli.common import (add_model_flags, at_least, device, nonneg_float, nonneg_int, positive_float,
                                     positive_int, probability, seed_int)

# flag dest -> (flag, type, help[, choices]) of the optimisation settings (TrainConfig fields)
TRAIN_FLAGS = {
    "batch_size": ("--batch-size", positive_int, "sequences per step"),
    "steps": ("--steps", positive_int, "optimizer updates"),
    "lr": ("--lr", positive_float, "peak learning rate"),
    "warmup": ("--warmup", nonneg_int, "linear warm-up steps"),
    "schedule": ("--schedule", str, "after warm-up: linear decay to 0, or constant", ("linear", "constant")),
    "optimizer": ("--optimizer", str, "adamw, or sgd: plain gradient descent (no momentum, weight decay or clipping)",
                  ("adamw", "sgd")),
    "weight_decay": ("--weight-decay", nonneg_float, "AdamW weight decay of linear-map weights (default 0.1; sgd: 0)"),
    "grad_clip": ("--grad-clip", nonneg_float, "global gradient-norm clip, 0 = off (default 1.0; sgd: 0)"),
    "train_subset": ("--train-subset", nonneg_int, "train on N fixed sequences of the training split (0 = all of "
                                                   "it); --batch-size N makes every step full-batch"),
    "seed": ("--seed", seed_int, "seed of initialisation and batches"),
    "save_every": ("--save-every", nonneg_int, "checkpoint every N steps (0 = only the last)"),
    "device": ("--device", device, "cpu, cuda, cuda:N or auto"),
    "track_every": ("--track-sharpness", nonneg_int, "EVERY: measure the sharpness at steps 0, EVERY, 2 EVERY, ... "
                                                     "and the last (0 = off)"),
    "track_batches": ("--track-batches", positive_int, "held-out batches the sharpness is measured on (the training "
                                                       "subset instead, with --train-subset)"),
    "track_batch_size": ("--track-batch-size", positive_int, "sequences per tracking batch"),
    "track_tol": ("--track-tol", probability, "Lanczos stops when its interval is within this relative width"),
    "track_hvps": ("--track-hvps", at_least(2), "at most this many Lanczos steps (HVPs) per tracked eigenvalue; "
                                                "float32 adds one float64 product that measures the rounding"),
    "track_dtype": ("--track-dtype", str, "dtype of the tracking's Hessian-vector products", ("float32", "float64")),
}
DIVERGED_EXIT = 3
INTERRUPT_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as a shell reports it


def add_train_flags(parser, skip=()):
    """The TrainConfig flags beyond the model shape (all default None = the TrainConfig default)."""
    from models.train_config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    group = parser.add_argument_group("training settings")
    for dest, (flag, type_, help_, *choices) in TRAIN_FLAGS.items():
        if dest in skip:
            continue
        shown = "" if defaults[dest] is None else f" (default {defaults[dest]})"
        group.add_argument(flag, dest=dest, type=type_, default=None, choices=choices[0] if choices else None,
                           metavar="EVERY" if dest == "track_every" else None, help=help_ + shown)


def train_settings(args, skip=()) -> dict:
    """{TrainConfig field: value} for the model and training flags the user set."""
    from hessian_tools.cli.common import overrides_from_args

    settings = {k: v for k, v in vars(args).items() if k in TRAIN_FLAGS and v is not None}
    settings.update(overrides_from_args(args))
    return {k: v for k, v in settings.items() if k not in skip}


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="train one model (checkpoints, metrics, sharpness tracking, resume)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_flags(p)
    add_train_flags(p)
    p.set_defaults(run=run)


@contextlib.contextmanager
def terminate_as_interrupt():
    """While inside, SIGTERM raises models.train.Terminated (a KeyboardInterrupt) where it arrives, as Ctrl-C
    does; the previous handler is restored on exit. Outside the main thread, nothing changes."""
    from models.train import Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_exit(exc: KeyboardInterrupt) -> tuple:
    """(the signal, the exit status) of an interrupt caught under `terminate_as_interrupt`."""
    from models.train import Terminated

    sig = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
    return sig, INTERRUPT_EXIT[sig]


def run(args) -> int:
    from hessian_tools.errors import UserError
    from models.train import TrainConfig, resume_point, train

    cfg = TrainConfig(**train_settings(args))
    try:
        with terminate_as_interrupt():
            result = train(cfg, args.out, progress=not args.quiet)
    except KeyboardInterrupt as exc:
        sig, code = interrupt_exit(exc)
        try:
            step = resume_point(args.out)
        except UserError as problem:
            print(f"hessian-tools train: interrupted by {sig.name}; the run may not resume: {problem}",
                  file=sys.stderr)
            return code
        where = f"its checkpoint at step {step} (checked)" if step else "step 0 (no checkpoint yet)"
        print(f"hessian-tools train: interrupted by {sig.name}; {args.out} is resumable: rerun the same command to "
              f"continue from {where}", file=sys.stderr)
        return code
    if result.status == "diverged":
        print(f"hessian-tools train: run diverged after {result.step} steps ({result.reason}); "
              f"see {result.run_dir}/status.json", file=sys.stderr)
        return DIVERGED_EXIT
    print(f"completed {result.step} steps in {result.run_dir}")
    return 0
