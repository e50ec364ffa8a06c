"""`hessian-tools spectrum CKPT`: extreme Hessian eigenvalues (Lanczos or power iteration) with stated intervals.

Parameter space (all parameters or `--params REGEX`) or activation space at `--site` (or `--role R --layer I`);
the Hessian of the mean next-token loss over the measurement batches, in raw coordinates or, for comparisons
between architectures, rescaled: `--scaled layer|elementwise|adam` (parameters), `--scale-free` (activations).
The interval's certified side comes from interlacing, the other holds except with probability
--failure-probability over the random start (float32: it rests on the measured rounding); Lanczos stops when the
interval is within tol * |theta| or at the rounding floor. Power iteration finds the largest-magnitude
eigenvalues; its upper side tightens slowly.
"""

import math

from hessian_tools.cli.common import positive_float, positive_int, probability
from hessian_tools.cli.measure_common import add_measure_flags

WHICH = ("largest", "smallest", "both", "magnitude")


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="extreme Hessian eigenvalues with stated intervals",
                              description=__doc__.splitlines()[0])
    g = p.add_argument_group("estimator")
    g.add_argument("--method", choices=("lanczos", "power"), default="lanczos", help="default lanczos")
    g.add_argument("--k", type=positive_int, default=1, help="eigenvalues wanted (at each end for --which both; default 1)")
    g.add_argument("--which", choices=WHICH, default=None,
                   help="default largest (lanczos) / magnitude (power, which finds only those)")
    g.add_argument("--tol", type=positive_float, default=1e-6, help="relative tolerance on the interval (default 1e-6)")
    g.add_argument("--failure-probability", type=probability, default=1e-3,
                   help="allowed probability that the uncertified side fails (default 1e-3)")
    g.add_argument("--max-iter", type=positive_int, default=None,
                   help="HVP limit (default: lanczos min(n, 100 + 10 k); power 1000 per eigenvalue)")
    g.add_argument("--basis-dtype", choices=("float64", "float32"), default=None,
                   help="storage of the Lanczos basis (default float64; float32 halves its memory, the arithmetic "
                        "stays float64 and the intervals include the storage's rounding)")
    g.add_argument("--basis-budget", type=positive_int, default=None, metavar="BYTES",
                   help="bytes the Lanczos basis may take: max-iter is lowered to fit (an unconverged answer with "
                        "its interval instead of running out of memory)")
    add_measure_flags(p)
    p.set_defaults(run=run)


def estimator(args):
    """op -> Estimate for the flags (a partial of lanczos or power_iteration)."""
    import functools

    import torch

    from hessian_tools.errors import UserError
    from hessian_tools.estimators import lanczos, power_iteration

    if args.method == "power":
        if args.basis_dtype or args.basis_budget:
            raise UserError("--basis-dtype and --basis-budget size the Lanczos basis: use them with --method lanczos")
        if args.which not in (None, "magnitude"):
            raise UserError(f"--method power finds the largest-magnitude eigenvalues only; use --which magnitude "
                            f"or --method lanczos for --which {args.which}")
        limit = {} if args.max_iter is None else {"max_iter": args.max_iter}
        return functools.partial(power_iteration, k=args.k, tol=args.tol, seed=args.seed,
                                 failure_probability=args.failure_probability, **limit)
    return functools.partial(lanczos, k=args.k, which=args.which or "largest", tol=args.tol, max_iter=args.max_iter,
                             seed=args.seed, failure_probability=args.failure_probability,
                             basis_dtype=getattr(torch, args.basis_dtype or "float64"), basis_budget=args.basis_budget)


def basis_vectors(args):
    """n -> the float64 vectors' worth of memory the estimator keeps: Lanczos' basis (grown in blocks of up to
    16; a float32 vector counts half, at most --basis-budget in all), power's k + 2."""
    if args.method == "power":
        return lambda n: args.k + 2
    wanted = args.k * (2 if args.which == "both" else 1)
    width = 0.5 if args.basis_dtype == "float32" else 1.0

    def vectors(n):
        kept = min(n, args.max_iter or 100 + 10 * wanted) * width
        if args.basis_budget is not None:
            kept = min(kept, args.basis_budget / (8 * max(n, 1)))
        return math.ceil(kept) + 16
    return vectors


def table(record) -> list[str]:
    from hessian_tools.cli.measure_common import summary_lines

    lines = summary_lines(record)
    p = record.payload
    if len(p.get("eigenvalues", [])) > 1:
        lines.append("eigenvalues    " + ", ".join(f"{v:.8g} in [{lo:.8g}, {hi:.8g}]" for v, (lo, hi)
                                                   in zip(p["eigenvalues"], p.get("intervals", p["residual_intervals"]))))
    for end, cluster in p.get("clusters", {}).items():
        if cluster["size"] > 1:
            lo, hi = cluster["interval"]
            lines.append(f"{end + ' cluster':<14} {cluster['size']} Ritz values within tol of each other, "
                         f"enclosed in [{lo:.10g}, {hi:.10g}]: " + ", ".join(f"{v:.10g}" for v in cluster["ritz_values"]))
    return lines


def run(args) -> int:
    from hessian_tools.cli.measure_common import prepare

    est = estimator(args)  # flag errors before the (slow) load
    m = prepare(args, basis_vectors(args))
    record = m.run(m.solver(est), f"spectrum ({args.method})")
    return m.finish(record, table, m.spread(est, "spectrum", union=record))
