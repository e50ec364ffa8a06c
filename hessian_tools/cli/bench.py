"""`hessian-tools bench`: HVP cost against the gradient, and our estimators against PyHessian 0.1, in one run.

Prints a table of the ratios (or, with --json, one JSON object) and writes its section of BENCHMARKS.md
(between the engine-bench markers; other sections are kept) unless --no-write. The protocol is in
`hessian_tools/bench.py`. --quick: a tiny model and no GPT-2-small shape (seconds, for tests).
"""

DEFAULT_OUT = "BENCHMARKS.md"


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="benchmark the HVPs and estimators against the gradient and PyHessian",
                              description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, no GPT-2-small shape")
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="FILE", help=f"markdown file (default {DEFAULT_OUT})")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(run=run)


def run(args) -> int:
    import json
    import sys
    from pathlib import Path

    from hessian_tools.bench import SECTION, markdown, run_bench
    from hessian_tools.benchmarks_md import write_section
    from hessian_tools.errors import UserError

    import torch

    out = Path(args.out)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not args.no_write and not out.parent.is_dir():
        raise UserError(f"--out {out}: the directory {out.parent} does not exist")
    result = run_bench(args.quick, progress=lambda line: print(line, file=sys.stderr, flush=True))
    text = markdown(result)
    if not args.no_write:
        write_section(out, SECTION, text)
        print(f"wrote the engine section of {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        print(text)
    return 0
