"""`hessian-tools density CKPT --out FILE.png`: the spectral density by stochastic Lanczos quadrature.

Same operator flags as `spectrum`. `--probes` Rademacher probes of `--iter` Lanczos steps each; the density
is a sum of Gaussians of standard deviation `--width` on the grid `--grid LO HI N` (fix both to compare
models). Writes the plot to FILE.png and the record (the object `--json` prints) to FILE.json beside it.
"""

from hessian_tools.cli.common import GridAction, at_least, positive_float, positive_int
from hessian_tools.cli.measure_common import add_measure_flags


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="spectral density (SLQ) plot and record", description=__doc__.splitlines()[0])
    g = p.add_argument_group("estimator")
    g.add_argument("--out", required=True, metavar="FILE.png", help="plot file; the record goes to FILE.json")
    g.add_argument("--grid", nargs=3, action=GridAction, default=None, metavar=("LO", "HI", "N"),
                   help="density grid (default: the Ritz range padded by 5 %%, 1001 points)")
    g.add_argument("--width", type=positive_float, default=None, help="Gaussian width (default 1 %% of the grid range)")
    g.add_argument("--probes", type=at_least(2), default=10, help="SLQ probes (at least 2; default 10)")
    g.add_argument("--iter", type=positive_int, default=80, help="Lanczos steps per probe (default 80)")
    add_measure_flags(p, data_spread=False)
    p.set_defaults(run=run)


def plot_density(record) -> bytes:
    """PNG bytes: the density on a log scale (floored at 1e-12 of its peak), the record's settings in the title."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    p = record.payload
    grid, density = np.asarray(p["grid"]), np.asarray(p["density"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(grid, np.maximum(density, 1e-12 * density.max()))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    prov, op = record.provenance, record.settings.get("operator", {})
    where = op.get("site") or op.get("params") or "all params"
    ax.set_title(f"{prov.get('arch')} step {prov.get('step')}, {where}: {record.settings['n_probes']} probes x "
                 f"{record.settings['n_iter']} steps, width {p['width']:.2g}", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=120, format="png")
    plt.close(fig)
    return png.getvalue()


def table(record) -> list[str]:
    from hessian_tools.cli.measure_common import summary_lines

    p = record.payload
    return summary_lines(record) + [
        f"{'grid':<14} [{p['grid'][0]:.4g}, {p['grid'][-1]:.4g}], {len(p['grid'])} points, width {p['width']:.3g}, "
        f"mass on grid {p['mass_on_grid']:.4f}"]


def run(args) -> int:
    import functools
    import json
    from pathlib import Path

    from hessian_tools.cli.measure_common import prepare
    from hessian_tools.errors import UserError
    from hessian_tools.estimators import slq_density
    from hessian_tools.footprint import density_bytes, require_memory
    from hessian_tools.paths import output_file, write_atomic

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must end in .png (the record is written beside it as .json)")
    for path in (out, out.with_suffix(".json")):
        output_file(path, "--out")  # before the computation
    if args.grid is not None:
        require_memory({"density grid": density_bytes(args.grid[2], args.iter)},
                       f"--grid with {args.grid[2]:,} points")
    est = functools.partial(slq_density, n_probes=args.probes, n_iter=args.iter, grid=args.grid, width=args.width,
                            seed=args.seed)
    m = prepare(args, lambda n: min(n, args.iter) + 16)  # one probe's Lanczos basis at a time
    record = m.run(est, "density (SLQ)", args.probes * min(args.iter, m.op.shape[0]))
    files = {"out": {"png": str(out), "json": str(out.with_suffix(".json"))}}

    def write(obj, final):
        write_atomic(out.with_suffix(".json"), json.dumps(obj, allow_nan=False) + "\n", "--out")
        write_atomic(out, plot_density(final), "--out")

    lines = lambda r: table(r) + [f"{'written':<14} {out}, {out.with_suffix('.json')}"]  # noqa: E731
    return m.finish(record, lines, extra=files, write=write)
