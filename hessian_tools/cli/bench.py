"""`hessian-tools bench`: the engine's benchmarks (hessian_tools/bench/), raw results as JSON, BENCHMARKS.md from them.

Parts: the HVP cost (default), --peers (against PyHessian, hessian-eigenthings, curvlinops + eigsh on the demo's
trained checkpoints: the peers must be installed, `bash benchmarks/install_peers.sh`), --scale (GPT-2-small
shape, slow), --throughput (training throughput), --tracking (sharpness tracking's cost in training), --all (every part: regenerates BENCHMARKS.md). Each part's
result goes to RESULTS/{part}.json and its BENCHMARKS.md section is written from that file; --report rewrites
the sections from the committed results without measuring. --quick: tiny shapes, nothing written (for tests).
"""

DEFAULT_OUT = "BENCHMARKS.md"


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="benchmark the HVPs and estimators against the gradient and the peers",
                              description=__doc__.splitlines()[0])
    p.add_argument("--peers", action="store_true", help="ours against the peers on the demo's checkpoints")
    p.add_argument("--scale", action="store_true", help="the GPT-2-small shape at 4 x 256 tokens (slow)")
    p.add_argument("--throughput", action="store_true", help="training throughput of every variant")
    p.add_argument("--tracking", action="store_true", help="what --track-sharpness 25 adds to a demo-sized run")
    p.add_argument("--all", action="store_true", help="every part (about an hour on 2 idle cores)")
    p.add_argument("--report", action="store_true", help="only rewrite BENCHMARKS.md from the results files")
    p.add_argument("--quick", action="store_true", help="tiny shapes; writes nothing")
    p.add_argument("--runs", default="benchmarks/runs", metavar="DIR",
                   help="demo experiment directory whose runs/{arch} the peers part uses (trained there if missing)")
    p.add_argument("--results", default=None, metavar="DIR", help="results directory (default benchmarks/results)")
    p.add_argument("--no-write", action="store_true", help="write neither results nor BENCHMARKS.md")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="FILE", help=f"markdown file (default {DEFAULT_OUT})")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(run=run)


def run(args) -> int:
    import json
    import sys
    from pathlib import Path

    import torch

    from hessian_tools import bench
    from hessian_tools.bench.report import SECTIONS, markdown
    from hessian_tools.benchmarks_md import write_section
    from hessian_tools.errors import UserError

    out = Path(args.out)
    results_dir = Path(args.results) if args.results else bench.RESULTS_DIR
    write = not (args.no_write or args.quick)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    if write and not out.parent.is_dir():
        raise UserError(f"--out {out}: the directory {out.parent} does not exist")
    some = args.peers or args.scale or args.throughput or args.tracking
    parts = [p for p, on in (("engine", args.all or not some), ("peers", args.all or args.peers),
                             ("scale", args.all or args.scale), ("train-throughput", args.all or args.throughput),
                             ("tracking", args.all or args.tracking))
             if on or (args.report and not some)]
    if args.report:  # every part that has results, unless parts are named
        parts = [p for p in parts if bench.load(p, results_dir) is not None or some]
    elif args.peers or args.all:
        from hessian_tools.bench.peers import PACKAGES, require

        require(*PACKAGES)  # before any long measurement
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    results = {}
    for part in parts:
        if args.report:
            result = bench.load(part, results_dir)
            if result is None:
                raise UserError(f"no results for {part} in {results_dir}; run the benchmark first")
        elif part == "train-throughput":
            from hessian_tools.bench import throughput

            result = throughput.run(quick=args.quick, say=say)
        else:
            result = bench.run_part(part, quick=args.quick, runs_root=args.runs, with_peers=True, say=say)
        results[part] = result
        if write:
            if not args.report:
                say(f"wrote {bench.save(result, results_dir)}")
            write_section(out, SECTIONS[part], markdown(result))
            say(f"wrote the {SECTIONS[part]} section of {out}")
    if args.json:
        print(json.dumps(results, allow_nan=False))
    else:
        print("\n\n".join(markdown(r) for r in results.values()))
    return 0
