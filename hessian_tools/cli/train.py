"""`hessian-tools train`: one training run into RUN_DIR (resumes if RUN_DIR holds the same run)."""

import dataclasses
import sys

from hessian_tools.cli.common import add_model_flags

# flag dest -> (flag, type, help) of the optimisation settings (TrainConfig fields)
TRAIN_FLAGS = {
    "batch_size": ("--batch-size", int, "sequences per step"),
    "steps": ("--steps", int, "optimizer updates"),
    "lr": ("--lr", float, "peak learning rate"),
    "warmup": ("--warmup", int, "linear warm-up steps"),
    "weight_decay": ("--weight-decay", float, "AdamW weight decay of linear-map weights"),
    "grad_clip": ("--grad-clip", float, "global gradient-norm clip (0 = off)"),
    "seed": ("--seed", int, "seed of initialisation and batches"),
    "save_every": ("--save-every", int, "checkpoint every N steps (0 = only the last)"),
    "device": ("--device", str, "cpu, cuda or auto"),
}
DIVERGED_EXIT = 3


def add_train_flags(parser, skip=()):
    """The TrainConfig flags beyond the model shape (all default None = the TrainConfig default)."""
    from models.train_config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    group = parser.add_argument_group("training settings")
    for dest, (flag, type_, help_) in TRAIN_FLAGS.items():
        if dest in skip:
            continue
        group.add_argument(flag, dest=dest, type=type_, default=None, help=f"{help_} (default {defaults[dest]})")


def train_settings(args, skip=()) -> dict:
    """{TrainConfig field: value} for the model and training flags the user set."""
    from hessian_tools.cli.common import overrides_from_args

    settings = {k: v for k, v in vars(args).items() if k in TRAIN_FLAGS and v is not None}
    settings.update(overrides_from_args(args))
    return {k: v for k, v in settings.items() if k not in skip}


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="train one model (checkpoints, metrics, resume)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_flags(p)
    add_train_flags(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from models.train import TrainConfig, train

    cfg = TrainConfig(**train_settings(args))
    result = train(cfg, args.out, progress=not args.quiet)
    if result.status == "diverged":
        print(f"hessian-tools train: run diverged after {result.step} steps ({result.reason}); "
              f"see {result.run_dir}/status.json", file=sys.stderr)
        return DIVERGED_EXIT
    print(f"completed {result.step} steps in {result.run_dir}")
    return 0
