"""`hessian-tools trace CKPT`: the Hessian trace by Hutchinson or Hutch++, with its standard error.

Same operator flags as `spectrum`. Hutchinson uses `--samples` Rademacher probes, or (with
`--target-std-error`) stops once its standard error is below the target (at most 10 x --samples probes).
Hutch++ spends `--samples` HVPs (a multiple of 3 is used).
"""

from hessian_tools.cli.common import positive_float, positive_int
from hessian_tools.cli.measure_common import add_measure_flags


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="Hessian trace with a standard error", description=__doc__.splitlines()[0])
    g = p.add_argument_group("estimator")
    g.add_argument("--method", choices=("hutchinson", "hutchpp"), default="hutchinson", help="default hutchinson")
    g.add_argument("--samples", type=positive_int, default=100, help="probes (Hutchinson) or HVPs (Hutch++); default 100")
    g.add_argument("--target-std-error", type=positive_float, default=None,
                   help="Hutchinson: stop once the standard error is at most this")
    add_measure_flags(p)
    p.set_defaults(run=run)


def estimator(args):
    import functools

    from hessian_tools.errors import UserError
    from hessian_tools.estimators import hutchinson_trace, hutchpp_trace

    if args.method == "hutchpp":
        if args.target_std_error is not None:
            raise UserError("--target-std-error works with --method hutchinson only")
        return functools.partial(hutchpp_trace, n_matvecs=args.samples, seed=args.seed)
    return functools.partial(hutchinson_trace, n_samples=args.samples, seed=args.seed,
                             target_std_error=args.target_std_error)


def table(record) -> list[str]:
    from hessian_tools.cli.measure_common import summary_lines

    lines = summary_lines(record)
    n = record.settings.get("operator", {}).get("n")
    if record.value is not None and n:
        lines.append(f"{'trace / n':<14} {record.value / n:.8g}")
    return lines


def run(args) -> int:
    from hessian_tools.cli.measure_common import prepare

    est = estimator(args)
    m = prepare(args, lambda n: args.samples if args.method == "hutchpp" else 3)  # Hutch++ keeps its sketch
    total = args.samples if args.target_std_error is None else None
    return m.finish(m.run(est, f"trace ({args.method})", total), table, m.spread(est, "trace"))
