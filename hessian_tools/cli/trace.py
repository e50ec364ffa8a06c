"""`hessian-tools trace CKPT`: the Hessian trace by Hutchinson, Hutch++ or XTrace, with its error bar.

Same operator flags as `spectrum`. Hutchinson uses `--samples` Rademacher probes, or (with
`--target-std-error`) stops once its standard error is below the target (at most 10 x --samples probes).
Hutch++ spends `--samples` HVPs (a multiple of 3 is used), XTrace at most `--samples` (a multiple of 2); XTrace's
error is the paper's estimate, not a standard error (estimators/trace.py says what it covered).
"""

from hessian_tools.cli.common import positive_float, positive_int
from hessian_tools.cli.measure_common import add_measure_flags


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="Hessian trace with an error bar", description=__doc__.splitlines()[0])
    g = p.add_argument_group("estimator")
    g.add_argument("--method", choices=("hutchinson", "hutchpp", "xtrace"), default="hutchinson",
                   help="default hutchinson")
    g.add_argument("--samples", type=positive_int, default=100,
                   help="probes (Hutchinson) or HVPs (Hutch++, XTrace); default 100")
    g.add_argument("--target-std-error", type=positive_float, default=None,
                   help="Hutchinson: stop once the standard error is at most this")
    add_measure_flags(p)
    p.set_defaults(run=run)


def estimator(args):
    import functools

    from hessian_tools.errors import UserError
    from hessian_tools.estimators import hutchinson_trace, hutchpp_trace, xtrace_trace

    if args.method != "hutchinson":
        if args.target_std_error is not None:
            raise UserError("--target-std-error works with --method hutchinson only")
        sketch = hutchpp_trace if args.method == "hutchpp" else xtrace_trace
        return functools.partial(sketch, n_matvecs=args.samples, seed=args.seed)
    return functools.partial(hutchinson_trace, n_samples=args.samples, seed=args.seed,
                             target_std_error=args.target_std_error)


def table(record) -> list[str]:
    from hessian_tools.cli.measure_common import summary_lines

    lines = summary_lines(record)
    n = record.settings.get("operator", {}).get("n")
    if record.value is not None and n:
        lines.append(f"{'trace / n':<14} {record.value / n:.8g}")
    if record.settings.get("method") == "xtrace":
        lines.append(f"{'error':<14} XTrace's leave-one-out estimate: smaller than a standard error on synthetic "
                     "matrices (it covered the truth in 45-60 % of trials; a standard error: 67 %)")
    return lines


def run(args) -> int:
    from hessian_tools.cli.measure_common import prepare

    est = estimator(args)
    kept = {"hutchinson": 3, "hutchpp": args.samples, "xtrace": 5 * (args.samples // 2)}[args.method]
    m = prepare(args, lambda n: kept)  # the sketches keep their blocks: Hutch++ ~3 s (s = samples / 3), XTrace ~5 s
    total = args.samples if args.target_std_error is None else None
    return m.finish(m.run(est, f"trace ({args.method})", total), table, m.spread(est, "trace"))
