"""`hessian-tools lr-sweep`: short runs over learning rates and seeds; the largest stable lr per architecture.

Per seed, the largest lr whose run is stable; over seeds, the largest lr stable for every seed (models.lr_sweep
states the stability criterion). Seeds are --seed, --seed + 1, ..., --seed + N - 1 for --seeds N.
"""

from hessian_tools.cli.common import add_model_flags, positive_float, positive_int
from hessian_tools.cli.train import add_train_flags, train_settings
from models.config import ARCHS


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="largest stable learning rate per architecture, over seeds",
                              description=__doc__.splitlines()[0])
    p.add_argument("--arch", dest="archs", action="append", required=True, choices=ARCHS,
                   help="architecture (repeat the flag for several)")
    p.add_argument("--lrs", type=positive_float, nargs="+", required=True, help="learning rates to try")
    p.add_argument("--seeds", type=positive_int, default=3, metavar="N",
                   help="training seeds per (arch, lr): --seed, --seed + 1, ... (default 3)")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory (DIR/{arch}/lr_{lr}/seed_{seed}/)")
    p.add_argument("--progress", action="store_true", help="show each run's progress bar")
    add_model_flags(p, skip=("arch",))
    add_train_flags(p, skip=("lr",))
    p.set_defaults(run=run)


def run(args) -> int:
    from models.lr_sweep import format_table, lr_sweep
    from models.train_config import TrainConfig

    base = TrainConfig(**train_settings(args))
    seeds = range(base.seed, base.seed + args.seeds)
    record = lr_sweep(args.archs, args.lrs, args.out, base, seeds=seeds, progress=args.progress)
    print(format_table(record))
    print(f"wrote {args.out}/lr_sweep.json")
    return 0
