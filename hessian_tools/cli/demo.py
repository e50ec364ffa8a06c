"""`hessian-tools demo`: train SimpleGPT and the baselines over seeds, sweep their checkpoints, verify the bound,
compare.

On the embedded corpus: runs per architecture and training seed, a short learning-rate sweep over the same
seeds, Hessian sweeps of the checkpoints (comparable measures, activation sites by role, data error bars), the
SimpleNorm bound at the last one; prints a table per architecture (mean [min, max] over seeds) and the figures
it wrote. A second call reuses everything the first computed (see hessian_tools.demo).
"""

from hessian_tools.cli.common import at_least, nonneg_int, positive_int
from models.config import ARCHS


def add_parser(subparsers, name):
    from hessian_tools.demo import SCALES

    p = subparsers.add_parser(name, help="the end-to-end comparison on small models (under 10 minutes on 2 cores)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, metavar="DIR",
                   help="experiment directory (default demo_runs/SCALE; reused by later calls)")
    p.add_argument("--scale", default="full", choices=tuple(SCALES),
                   help="model and run sizes (default full: dim 64, 2 layers, context 32, 200 steps, 3 seeds)")
    p.add_argument("--seeds", type=positive_int, default=None, metavar="N",
                   help="training seeds 0 .. N-1 of every run and of the lr sweep (default: the scale's, 3 at full)")
    p.add_argument("--steps", type=at_least(3), default=None, help="training steps of the main runs (default: the scale's)")
    p.add_argument("--arch", dest="archs", action="append", choices=ARCHS, default=None,
                   help="architecture (repeat for several; default all five)")
    p.add_argument("--jobs", type=nonneg_int, default=0, help="worker processes (default: up to 2)")
    p.add_argument("--figures", default=None, metavar="DIR", help="where figures go (default DIR/figures)")
    p.set_defaults(run=run)


def run(args) -> int:
    from hessian_tools.demo import Experiment, demo
    from hessian_tools.paths import output_dir

    exp = Experiment(args.scale, args.out, jobs=args.jobs, archs=tuple(args.archs) if args.archs else None,
                     steps=args.steps, seeds=args.seeds)
    output_dir(exp.root, "--out")  # before training for minutes
    if args.figures is not None:
        output_dir(args.figures, "--figures")
    demo(exp, args.figures)
    return 0
