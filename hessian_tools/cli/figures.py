"""`hessian-tools figures`: regenerate every figure by executing the notebooks (papermill).

The experiment at --scale is trained, swept and verified first (reusing whatever --runs already holds), its
compact results written to OUT/results/; then each notebook in notebooks/ plots them into --out as PNG and PDF,
and OUT/README.md's numbers section, where that file exists, is rewritten from them. --from-results DIR skips
the experiment and plots a bundle already written (e.g. the committed figures/results/).
"""

from hessian_tools.cli.common import nonneg_int, positive_int
from models.config import ARCHS


def add_parser(subparsers, name):
    from hessian_tools.demo import SCALES

    p = subparsers.add_parser(name, help="regenerate all figures by executing the notebooks",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", default="figures", metavar="DIR", help="figure directory (default figures/)")
    p.add_argument("--scale", default="small", choices=tuple(SCALES), help="experiment size (default small)")
    p.add_argument("--runs", default=None, metavar="DIR", help="experiment directory (default demo_runs/SCALE)")
    p.add_argument("--arch", dest="archs", action="append", choices=ARCHS, default=None,
                   help="architecture (repeat for several; default all five)")
    p.add_argument("--seeds", type=positive_int, default=None, metavar="N", help="training seeds (default: the scale's)")
    p.add_argument("--jobs", type=nonneg_int, default=0, help="worker processes (default: up to 2)")
    p.add_argument("--from-results", default=None, metavar="DIR",
                   help="plot this results bundle instead of preparing an experiment")
    p.add_argument("--notebooks", default=None, metavar="DIR", help="notebook directory (default: the repo's)")
    p.add_argument("--executed", default=None, metavar="DIR",
                   help="keep the executed notebooks here (default: a temporary directory)")
    p.set_defaults(run=run)


def run(args) -> int:
    from hessian_tools.demo import DEFAULT_ROOT
    from hessian_tools.figures import render, render_from
    from hessian_tools.paths import input_dir, output_dir

    runs = None if args.from_results else args.runs or DEFAULT_ROOT / args.scale
    for path, flag in ((args.out, "--out"), (runs, "--runs"), (args.executed, "--executed")):
        if path is not None:  # before training and sweeping for minutes
            output_dir(path, flag)
    if args.notebooks is not None:
        input_dir(args.notebooks, "--notebooks directory")
    if args.from_results:
        input_dir(args.from_results, "--from-results directory")
        result = render_from(args.from_results, args.out, args.notebooks, args.executed)
    else:
        result = render(args.scale, args.out, args.runs, args.jobs, args.archs, args.notebooks, args.executed,
                        seeds=args.seeds)
    for path in result["figures"]:
        print(path)
    if result["readme"]:
        print(f"rewrote the numbers of {result['readme']}")
    print(f"{len(result['notebooks'])} notebooks executed in {result['wall_time_s']:.0f} s")
    return 0
