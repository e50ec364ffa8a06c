"""`hessian-tools verify-bound CKPT`: the SimpleNorm Hessian bound checked layer by layer (theory/simplenorm.md).

For each SimpleNorm layer (or, for a baseline, each block linear map): measured ||H_xx|| at the layer input
with its Lanczos residual bound, the bound, bound / measured, ||C|| / ||GN||, and the weight-scale check.
Exit status 4 when a bound is violated beyond the error bar (the layer is named on stderr).
"""

from hessian_tools.cli.common import add_checkpoint_argument, add_model_flags, positive_float, positive_int, seed_int

EXIT_VIOLATED = 4


def add_parser(subparsers, name):
    p = subparsers.add_parser(name, help="check the SimpleNorm Hessian bound on every layer of a checkpoint",
                              description=__doc__.splitlines()[0])
    add_checkpoint_argument(p)
    p.add_argument("--batches", type=positive_int, default=1, help="measurement batches (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--layers", default=None, metavar="REGEX", help="only layers whose name matches REGEX")
    p.add_argument("--tol", type=positive_float, default=1e-6, help="Lanczos relative tolerance (default 1e-6)")
    p.add_argument("--scale", type=positive_float, default=2.0, help="factor c of the weight-scale check (default 2)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the measurement batches and Lanczos start")
    p.add_argument("--json", action="store_true", help='print {"layers": [...]} as one JSON object')
    add_model_flags(p, skip=("n_layers",))  # --layers here selects the layers to verify
    p.set_defaults(run=run)


def _table(rows) -> str:
    head = f"{'layer':<32} {'measured':>11} {'error':>9} {'bound':>11} {'ratio':>8} {'C/GN':>8}  scale (c: ratio)"
    lines = [head]
    for r in rows:
        s = r["scale_invariance"]
        verdict = {"eps": f"changes by eps alone (y moves {s.get('eps_output_change', 0):.1e})"}.get(s["verdict"], s["verdict"])
        lines.append(f"{r['layer']:<32} {r['measured']:>11.4e} {r['measured_error']:>9.1e} {r['bound']:>11.4e} "
                     f"{r['ratio'] or float('nan'):>8.3g} {r['c_over_gn']:>8.3g}  {s['c']:g}: {s['ratio']:.6f} {verdict}"
                     + ("  VIOLATED" if r["violated"] else ""))
    return "\n".join(lines)


def run(args) -> int:
    import json
    import sys

    import torch

    from hessian_tools.cli.common import open_from_args
    from hessian_tools.cli.measure_common import guard_line
    from hessian_tools.errors import UserError
    from hessian_tools.operators import ParamHessian, self_check
    from theory.verify import Settings, verify_bound

    if args.scale == 1:
        raise UserError("--scale 1 leaves the weights as they are: the weight-scale check needs a factor other than 1")
    ckpt = open_from_args(args)
    batches = ckpt.measurement_batches(args.batches, args.batch_size, seed=args.seed)
    guard = self_check(ParamHessian(ckpt.model, batches[:1], dtype=torch.float64), seed=args.seed)
    print(guard_line(guard), file=sys.stderr)
    settings = Settings(tol=args.tol, scale=args.scale, seed=args.seed)
    progress = None if args.json else (lambda name: print(f"measuring {name} ...", file=sys.stderr))
    rows = verify_bound(ckpt.model, batches, args.layers, settings, progress)
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt.path), "arch": ckpt.config.arch, "step": ckpt.step,
                          "tokens": ckpt.token_provenance(), "settings_from": ckpt.settings_from,
                          "self_check": guard, "layers": rows}, indent=1))
    else:
        print(_table(rows))
    violated = [r["layer"] for r in rows if r["violated"]]
    if violated:
        print(f"hessian-tools verify-bound: bound violated beyond the error bar at {', '.join(violated)}",
              file=sys.stderr)
        return EXIT_VIOLATED
    return 0
