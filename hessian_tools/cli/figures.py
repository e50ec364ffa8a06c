"""`hessian-tools figures`: regenerate every figure by executing the notebooks (papermill).

The experiment at --scale is trained, swept and verified first (reusing whatever --runs already holds); then
each notebook in notebooks/ runs with those results and writes its figure to --out as PNG and PDF.
"""

from hessian_tools.cli.common import nonneg_int
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
    p.add_argument("--jobs", type=nonneg_int, default=0, help="worker processes (default: up to 2)")
    p.add_argument("--notebooks", default=None, metavar="DIR", help="notebook directory (default: the repo's)")
    p.add_argument("--executed", default=None, metavar="DIR",
                   help="keep the executed notebooks here (default: a temporary directory)")
    p.set_defaults(run=run)


def run(args) -> int:
    from hessian_tools.demo import DEFAULT_ROOT
    from hessian_tools.figures import render
    from hessian_tools.paths import input_dir, output_dir

    for path, flag in ((args.out, "--out"), (args.runs or DEFAULT_ROOT / args.scale, "--runs"),
                       (args.executed, "--executed")):  # before training and sweeping for minutes
        if path is not None:
            output_dir(path, flag)
    if args.notebooks is not None:
        input_dir(args.notebooks, "--notebooks directory")
    result = render(args.scale, args.out, args.runs, args.jobs, args.archs, args.notebooks, args.executed)
    for path in result["figures"]:
        print(path)
    print(f"{len(result['notebooks'])} notebooks executed in {result['wall_time_s']:.0f} s")
    return 0
