"""`hessian-tools sweep RUN_DIR... --out RESULTS.jsonl`: measure every checkpoint of every run, resumably.

One JSON line per (checkpoint, measure, site) is appended to RESULTS.jsonl as soon as it is computed; a rerun
skips what the file already holds (same run, step, measure, site, settings and model file). A unit that cannot
be measured (a checkpoint that does not load, missing optimizer state, a failed solve) is reported on stderr in
one line and recorded with status "failed: REASON"; the sweep goes on and exits 1. Parameter-space measures
carry the jackknife over --groups batch groups, activation sites the spread over batches (see
hessian_tools.sweep_measures). Ctrl-C or SIGTERM stops it, keeping every record written (exit 130 / 143).
"""

import sys

from hessian_tools.cli.common import (DATA_FLAG, GridAction, add_source_flags, flag_type, nonneg_int, positive_float,
                                      positive_int, probability, seed_int)
from hessian_tools.schema import Int
from hessian_tools.sweep import WHAT, SweepSettings


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="measure Hessian spectra over the checkpoints of training runs",
                              description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories (hessian-tools train --out)")
    p.add_argument("--out", required=True, metavar="RESULTS.jsonl", help="results file (appended to)")
    p.add_argument("--what", default="params", metavar="LIST",
                   help=f"comma-separated groups among {','.join(WHAT)} or measure names (e.g. "
                        "params.lambda_max, layer.lambda_max; default: params = top eigenvalue and spectral norm of "
                        "the parameter-space Hessian)")
    p.add_argument("--sites", default=None, metavar="REGEX",
                   help="per-module activation sites whose name matches REGEX, for experts (default: the sites by "
                        "role, the same in every architecture: block input, attention input, FFN input, block "
                        "output)")
    p.add_argument("--steps", type=flag_type(int, Int(low=-1), "step"), nargs="+", default=None, metavar="STEP",
                   help="only the checkpoints at these steps (-1 = the last of each run; default: all)")
    p.add_argument("--batches", type=positive_int, default=SweepSettings.n_batches,
                   help=f"measurement batches (default {SweepSettings.n_batches})")
    p.add_argument("--batch-size", type=positive_int, default=SweepSettings.batch_size,
                   help=f"sequences per batch (default {SweepSettings.batch_size})")
    p.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the batches and probe vectors (default 0)")
    p.add_argument("--tol", type=probability, default=1e-3, help="relative Lanczos tolerance (default 1e-3)")
    p.add_argument("--max-iter", type=positive_int, default=None, help="Lanczos steps at most (default: the estimator's)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="evaluation dtype")
    p.add_argument("--groups", type=nonneg_int, default=SweepSettings.n_groups,
                   help=f"disjoint batch groups of the jackknife data error bar (>= 8, dividing --batches; default "
                        f"{SweepSettings.n_groups}; 0 = none)")
    p.add_argument("--fuse-batches", action="store_true",
                   help="evaluate each parameter-space operator's batches as one batch (fewer, larger products; "
                        "memory of all its sequences at once)")
    p.add_argument("--density-grid", nargs=3, action=GridAction, default=(-50.0, 450.0, 1001), metavar=("LO", "HI", "N"),
                   help="fixed SLQ grid (default -50 450 1001)")
    p.add_argument("--density-width", type=positive_float, default=2.5, help="SLQ Gaussian width (default 2.5)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(DATA_FLAG, dest="data", default=None, metavar="FILE",
                   help="UTF-8 text of the measurement batches (default: each run's own)")
    add_source_flags(p, skip=("job_config",))
    p.set_defaults(run=run)


def settings_from_args(args):
    from hessian_tools.sweep import SweepSettings

    return SweepSettings(what=tuple(w.strip() for w in args.what.split(",") if w.strip()), sites=args.sites,
                         steps=args.steps, n_batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len,
                         seed=args.seed, tol=args.tol, max_iter=args.max_iter, dtype=args.dtype,
                         n_groups=args.groups, fuse_batches=args.fuse_batches, density_grid=tuple(args.density_grid),
                         density_width=args.density_width, tokens=args.tokens, tokenizer=args.tokenizer,
                         data=args.data)


def run(args) -> int:
    from hessian_tools.cli.train import interrupt_exit, terminate_as_interrupt
    from hessian_tools.sweep import sweep

    try:
        with terminate_as_interrupt():
            summary = sweep(args.runs, args.out, settings_from_args(args), progress=not args.quiet)
    except KeyboardInterrupt as exc:
        sig, code = interrupt_exit(exc)
        print(f"hessian-tools sweep: interrupted by {sig.name}; the records written so far are kept in {args.out}: "
              "rerun the same command to measure the rest", file=sys.stderr)
        return code
    print(f"{summary['measured']} measured, {summary['skipped']} already in {summary['out']}, "
          f"{summary['failed']} failed ({summary['wall_time_s']:.1f} s)")
    return 1 if summary["failed"] else 0
