"""`hessian-tools sweep RUN_DIR... --out RESULTS.jsonl`: measure every checkpoint of every run, resumably.

One JSON line per (checkpoint, measure, site) is appended to RESULTS.jsonl as soon as it is computed; a rerun
skips what the file already holds (same run, step, measure, site and settings). A checkpoint or measure that
fails is reported on stderr, recorded with status "error" and skipped; the exit status is then 1. See
hessian_tools.sweep.
"""

from hessian_tools.cli.common import DATA_FLAG, add_source_flags
from hessian_tools.sweep import WHAT


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="measure Hessian spectra over the checkpoints of training runs",
                              description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories (hessian-tools train --out)")
    p.add_argument("--out", required=True, metavar="RESULTS.jsonl", help="results file (appended to)")
    p.add_argument("--what", default="params", metavar="LIST",
                   help=f"comma-separated measures among {','.join(WHAT)} (default: params = top eigenvalue "
                        "and spectral norm of the parameter-space Hessian)")
    p.add_argument("--sites", default=None, metavar="REGEX",
                   help="activation sites whose name matches REGEX (default: per block the attention input, "
                        "the FFN input and the block output)")
    p.add_argument("--steps", type=int, nargs="+", default=None, metavar="STEP",
                   help="only the checkpoints at these steps (-1 = the last of each run; default: all)")
    p.add_argument("--batches", type=int, default=4, help="measurement batches (default 4)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches and probe vectors (default 0)")
    p.add_argument("--tol", type=float, default=1e-3, help="relative Lanczos tolerance (default 1e-3)")
    p.add_argument("--max-iter", type=int, default=None, help="Lanczos steps at most (default: the estimator's)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="evaluation dtype")
    p.add_argument("--groups", type=int, default=2,
                   help="disjoint batch groups of the data error bar (default 2; 0 = none)")
    p.add_argument("--density-grid", type=float, nargs=3, default=(-50.0, 450.0, 1001), metavar=("LO", "HI", "N"),
                   help="fixed SLQ grid (default -50 450 1001)")
    p.add_argument("--density-width", type=float, default=2.5, help="SLQ Gaussian width (default 2.5)")
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
                         n_groups=args.groups, density_grid=tuple(args.density_grid),
                         density_width=args.density_width, tokens=args.tokens, tokenizer=args.tokenizer,
                         data=args.data)


def run(args) -> int:
    from hessian_tools.sweep import sweep

    summary = sweep(args.runs, args.out, settings_from_args(args), progress=not args.quiet)
    print(f"{summary['measured']} measured, {summary['skipped']} already in {summary['out']}, "
          f"{summary['errors']} errors ({summary['wall_time_s']:.1f} s)")
    return 1 if summary["errors"] else 0
