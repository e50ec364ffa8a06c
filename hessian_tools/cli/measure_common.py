"""What `spectrum`, `trace` and `density` share: flags, checkpoint and batches, the operator, the guard, output.

Flow of every measuring command: load CKPT, draw `--batches` fixed held-out batches (`--seed` seeds them and
the estimator), build the operator (parameter space, or activation space at `--site` or `--role --layer`;
rescaled as `--scaled` / `--scale-free` say, recorded as settings.operator.scaled), run the self-check guard on
the unscaled operator (result on stderr), run the estimator with an HVP progress bar on stderr, then print one JSON object
(`--json`: the record's to_dict() with provenance) or a short table. Under torchrun with `--distributed`
each rank evaluates its share of the batches (in activation space: owns their blocks) and only rank 0 prints.
Exit status: 0, 2 on bad input (one line on stderr), 3 when the estimator failed (its status on stderr).
"""

from __future__ import annotations

import dataclasses
import json
import sys

from hessian_tools.cli.common import (add_checkpoint_argument, add_model_flags, at_least, nonneg_int, positive_int,
                                      require_torchrun, seed_int)
from models.config import SITE_ROLES

SPACES = ("params", "activation")
MODES = ("auto", "rev-rev", "fwd-rev", "double-backward")  # hessian_tools.operators.MODES, without importing torch
SCALED = ("none", "layer", "elementwise", "adam")  # --scaled: "none" or a key of hessian_tools.operators.SCALINGS
EXIT_FAILED = 3
MIN_GROUPS = 8  # hessian_tools.estimators.data_error.MIN_GROUPS, without importing torch


def add_measure_flags(p, data_spread: bool = True):
    """CKPT, the operator flags, the data flags, --json, --distributed and the model override flags."""
    add_checkpoint_argument(p)
    g = p.add_argument_group("operator")
    g.add_argument("--space", choices=SPACES, default=None,
                   help="parameters or the activation at --site (default: activation if --site is given)")
    g.add_argument("--site", default=None, metavar="NAME", help="activation site, e.g. layers.0:out "
                   "(`hessian-tools inspect CKPT` lists them)")
    g.add_argument("--role", choices=SITE_ROLES, default=None,
                   help="activation site by role, the same in every architecture (with --layer): the residual "
                   "stream entering / leaving the block, the attention or FFN branch's input after any pre-norm")
    g.add_argument("--layer", type=nonneg_int, default=None, metavar="I", help="block index (0-based) of --role")
    g.add_argument("--params", default=None, metavar="REGEX", help="only parameters whose name matches REGEX")
    g.add_argument("--scaled", choices=SCALED, default="none",
                   help="parameter coordinates: none (raw), layer (S H S, S = rms of each tensor), elementwise "
                   "(diag|w| H diag|w|), adam (P^-1/2 H P^-1/2, P = Adam's denominator in the checkpoint)")
    g.add_argument("--scale-free", action="store_true",
                   help="activation Hessian times the site's mean squared activation (over the batches)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="evaluation dtype of the products (Krylov vectors are float64 always; default float32)")
    g.add_argument("--mode", choices=MODES, default="auto",
                   help="HVP mode (default auto: double-backward, the fastest on CPU)")
    g.add_argument("--memory-budget", type=positive_int, default=None, metavar="BYTES",
                   help="working memory the products may use: graphs are dropped or batches micro-batched to fit")
    d = p.add_argument_group("data")
    d.add_argument("--batches", type=positive_int, default=1, help="held-out measurement batches (default 1)")
    d.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch (default 8)")
    d.add_argument("--seq-len", dest="measure_seq_len", type=positive_int, default=None, metavar="T",
                   help="tokens per sequence (default: the model's context length)")
    d.add_argument("--seed", type=seed_int, default=0, help="seed of the batches and of the estimator (default 0)")
    if data_spread:
        d.add_argument("--data-spread", type=at_least(MIN_GROUPS), default=None, metavar="GROUPS",
                       help="data error bar: delete-one-group jackknife over GROUPS >= 8 disjoint groups of the "
                       "batches (bias-corrected estimate, standard error, 68 %% interval for the population value)")
        d.add_argument("--sample-size-curve", action="store_true",
                       help="also the estimate on the first 1, 2, 4, ..., N batches (with the jackknife at each "
                       "multiple of --data-spread GROUPS)")
    d.add_argument("--distributed", action="store_true",
                   help="under torchrun: each rank evaluates its share of the batches")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_model_flags(p, skip=("seq_len",))  # --seq-len above is the measurement length; --context-len the model's
    p.add_argument("--context-len", dest="seq_len", type=positive_int, default=None, metavar="T",
                   help="context length of a foreign checkpoint that does not record it")


@dataclasses.dataclass
class Measurement:
    """A loaded checkpoint, its batches and the operator on them, guarded; `op` may be distributed."""

    args: object
    ckpt: object
    batches: list
    op: object
    local: object  # the operator on this process's batches (op itself unless distributed)
    rank: int
    guard: dict

    @property
    def talk(self) -> bool:
        return self.rank == 0

    def say(self, line: str):
        if self.talk:
            print(line, file=sys.stderr)

    def run(self, estimator, desc: str, total: int | None = None):
        """estimator(op) with an HVP progress bar on stderr."""
        from hessian_tools.progress import ProgressOperator, hvp_bar

        with hvp_bar(desc, total, self.talk) as bar:
            return estimator(ProgressOperator(self.op, bar))

    @property
    def data_asked(self) -> bool:
        return getattr(self.args, "data_spread", None) is not None or getattr(self.args, "sample_size_curve", False)

    def solver(self, estimator):
        """`estimator`, keeping Ritz vectors when a data error bar will warm-start from them."""
        import functools

        from hessian_tools.estimators.data_error import warm_startable

        return functools.partial(estimator, return_vectors=True) if self.data_asked and warm_startable(estimator) \
            else estimator

    def spread(self, estimator, desc: str, union=None) -> dict:
        """The data error records the flags ask for: {"data_spread": jackknife (--data-spread GROUPS),
        "sample_size_curve": sample_size_curve (--sample-size-curve)}; `union` = the estimate already made."""
        from hessian_tools.estimators import jackknife, sample_size_curve
        from hessian_tools.progress import ProgressOperator, hvp_bar
        from hessian_tools.records import Estimate

        groups, curve = getattr(self.args, "data_spread", None), getattr(self.args, "sample_size_curve", False)
        if not self.data_asked:
            return {}
        make_op = operator_factory(self.args, self.ckpt)
        out = {}
        with hvp_bar(f"{desc} (data error)", None, self.talk) as bar:
            counted = lambda b: ProgressOperator(make_op(b), bar)  # noqa: E731
            if curve:
                out["sample_size_curve"] = sample_size_curve(counted, self.batches, estimator, n_groups=groups,
                                                             union=union)
                last = out["sample_size_curve"].payload["points"][-1]["jackknife"]
                if last is not None:
                    out["data_spread"] = Estimate.from_dict(last)
            else:
                out["data_spread"] = jackknife(counted, self.batches, estimator, n_groups=groups, union=union)
        return out

    def finish(self, record, table_lines, spread: dict | None = None, extra: dict | None = None, write=None) -> int:
        """Attach provenance and the guard; on rank 0 call write(JSON object, record) if given, then print.

        `spread`: the data error records from `spread()`, printed under their keys.

        Returns the exit status."""
        from hessian_tools import __version__
        from hessian_tools.errors import UserError

        a = self.args
        record = dataclasses.replace(record, settings={**record.settings, "self_check": self.guard}, vectors=None)
        spread = spread or {}
        record = record.with_provenance(
            command=a.command, checkpoint=str(self.ckpt.path), arch=self.ckpt.config.arch, step=self.ckpt.step,
            version=__version__, n_batches=len(self.batches), batch_size=a.batch_size,
            seq_len=int(self.batches[0][0].shape[-1]), data_seed=a.seed,
            world_size=getattr(self.op, "world_size", 1), tokens=self.ckpt.token_provenance(),
            settings_from=self.ckpt.settings_from)
        out = record.to_dict()
        out.update({key: data.to_dict() for key, data in spread.items()})
        out.update(extra or {})
        if self.talk:
            if write is not None and record.status == "ok":
                try:
                    write(out, record)
                except UserError as exc:  # what was computed is not lost: it goes to stdout
                    print(json.dumps(out, allow_nan=False))
                    raise UserError(f"{exc}; the record was printed on stdout instead") from None
            if a.json:
                print(json.dumps(out, allow_nan=False))
            else:
                print("\n".join(table_lines(record) + _data_lines(spread)))
        failed = [r.status for r in (record, *spread.values()) if r.status != "ok"]
        if failed:
            self.say(f"hessian-tools {a.command}: the estimate failed: {failed[0]}")
            return EXIT_FAILED
        return 0


def operator_factory(args, ckpt):
    """batches -> the operator the flags ask for on the checkpoint's model: ParamHessian or ActivationHessian,
    wrapped as --scaled or --scale-free say (hessian_tools.operators.SCALINGS)."""
    from hessian_tools.errors import UserError
    from hessian_tools.operators import SCALINGS, ActivationHessian, AdamPreconditioned, AdamState, ParamHessian

    model = ckpt.model
    common = dict(dtype=args.dtype, mode=args.mode, memory_budget=args.memory_budget)
    if args.space == "activation":
        build = lambda b: ActivationHessian(model, b, args.site, **common)  # noqa: E731
        wrap = SCALINGS["scale-free"] if args.scale_free else None
    else:
        build = lambda b: ParamHessian(model, b, params=args.params, **common)  # noqa: E731
        wrap = SCALINGS.get(args.scaled)
        if args.scaled == "adam":
            try:
                state = AdamState.from_checkpoint(ckpt)
            except UserError as exc:
                raise UserError(f"--scaled adam needs the run's Adam state: {exc}") from None
            wrap = lambda op: AdamPreconditioned(op, state)  # noqa: E731
    return build if wrap is None else (lambda b: wrap(build(b)))


def _check_flags(args):
    from hessian_tools.errors import UserError

    if (args.role is None) != (args.layer is None):
        raise UserError("--role and --layer go together: --role ROLE --layer I names block I's site of that role")
    if args.role and args.site:
        raise UserError("--role --layer names a site: drop it or the --site")
    args.space = args.space or ("activation" if args.site or args.role else "params")
    if args.space == "params" and (args.site or args.role):
        raise UserError(f"{'--site' if args.site else '--role'} names an activation: drop --space params (or it)")
    if args.space == "activation" and args.scaled != "none":
        raise UserError("--scaled rescales parameter coordinates; at an activation site use --scale-free")
    if args.space == "params" and args.scale_free:
        raise UserError("--scale-free rescales an activation Hessian; in parameter space use --scaled")
    if args.space == "activation" and args.params:
        raise UserError("--params selects parameters: use it with --space params, not with an activation --site")
    groups = getattr(args, "data_spread", None)
    if args.distributed and (groups is not None or getattr(args, "sample_size_curve", False)):
        raise UserError("--data-spread and --sample-size-curve do not run under --distributed; drop one of them")
    if args.distributed and args.scale_free:
        raise UserError("--scale-free does not run under --distributed (each rank would scale by its own batches' "
                        "mean square); drop one of them")
    if args.distributed:
        require_torchrun()
    if groups is not None and args.batches % groups:
        raise UserError(f"--batches {args.batches} is not a multiple of --data-spread {groups}: the groups must "
                        "be equal")


def check_memory(args, ckpt, basis_vectors):
    """UserError (hessian_tools.footprint) when the model copy, the kept graphs and the estimator's float64
    vectors (`basis_vectors(n)` of them, n = the operator's size, or this rank's rows of it for sharded activation
    vectors) cannot fit in the available memory; checked before the batches are drawn. Under --distributed each
    rank is checked for its share of the batches (rank 0's, the largest)."""
    import re

    import torch.distributed as dist

    from hessian_tools.footprint import graph_bytes, krylov_bytes, model_bytes, require_memory

    world = dist.get_world_size() if args.distributed else 1
    config, n_batches = ckpt.config, -(-args.batches // world)
    rows, seq_len = args.batch_size, ckpt.measurement_seq_len(args.measure_seq_len)
    width = 8 if args.dtype == "float64" else 4
    if args.space == "activation":
        n = n_batches * rows * seq_len * config.dim
    else:
        try:
            chosen = re.compile(args.params or "")
        except re.error:
            chosen = re.compile("")  # the operator names the bad regex
        n = sum(p.numel() for name, p in ckpt.model.named_parameters() if chosen.search(name))
    graphs = n_batches * graph_bytes(config, rows, seq_len, width)
    parts = {"model copy": model_bytes(config, width),
             "kept graphs": graphs if args.memory_budget is None else min(graphs, args.memory_budget),
             "float64 vectors": krylov_bytes(n, basis_vectors(n))}
    per_rank = " per rank" if world > 1 else ""
    sharded = per_rank if args.space == "activation" else ""
    require_memory(parts, f"{args.command} on {n_batches} batches{per_rank} of {rows} x {seq_len} tokens (operator "
                   f"size {n:,}{sharded})", next(ckpt.model.parameters()).device)


def prepare(args, basis_vectors=lambda n: 3) -> Measurement:
    """Load, draw batches, build and guard the operator (one line on stderr per step that takes time).

    basis_vectors(n): how many float64 vectors of the operator's size n the estimator keeps (memory check)."""
    from hessian_tools.cli.common import open_from_args
    from hessian_tools.errors import UserError
    from hessian_tools.operators import ScaledOperator, self_check
    from hessian_tools.operators.sites import list_sites
    from models.sites import role_site

    _check_flags(args)
    rank = 0
    if args.distributed:
        from hessian_tools.distributed import init_distributed

        rank, _ = init_distributed()
    ckpt = open_from_args(args)
    if args.role:
        args.site = role_site(ckpt.model, args.role, args.layer)
    if args.space == "activation" and not args.site:
        raise UserError(f"--space activation needs --site NAME; valid sites: {', '.join(list_sites(ckpt.model))}")
    check_memory(args, ckpt, basis_vectors)
    batches = ckpt.measurement_batches(args.batches, args.batch_size, args.measure_seq_len, seed=args.seed)
    make_op = operator_factory(args, ckpt)
    if args.distributed:
        from hessian_tools.distributed import DistributedOperator, ShardedBlockOperator

        op = (ShardedBlockOperator if args.space == "activation" else DistributedOperator)(make_op, batches)
        local = op.local
    else:
        op = local = make_op(batches)
    guard = self_check(local.op if isinstance(local, ScaledOperator) else local, seed=args.seed)
    m = Measurement(args, ckpt, batches, op, local, rank, guard)
    m.say(guard_line(guard))
    return m


def guard_line(guard: dict) -> str:
    """The self-check's report in one line (with the gradient's noise floor and the step, when it adapted)."""
    floor = "" if guard["noise_floor_rel"] is None else \
        f" at step {guard['difference_step']:.0e} (the gradient's noise floor is {guard['noise_floor_rel']:.0e})"
    return (f"self-check ({guard['dtype']}, mode {guard['mode']}): finite, asymmetry {guard['symmetry_rel']:.1e} "
            f"(tol {guard['tolerances']['symmetry']:.0e}), differences {guard['difference_rel']:.1e} "
            f"(tol {guard['tolerances']['difference']:.0e}){floor}: ok")


def error_meaning(record) -> str:
    """What the error bar promises, in words: certified, probabilistic with what failure probability, measured,
    or an estimate (records.Estimate's error kinds)."""
    p = record.payload
    kind, chance = record.error_kind, p.get("failure_probability")
    side = f"{p['certified_side']} side certified" if p.get("certified_side") not in (None, "both") else ""
    if kind == "probabilistic":
        return f"probabilistic: {side}, the other fails with probability <= {chance:.0e}"
    if kind == "measured":
        odds = f"; {side}, the other also fails with probability <= {chance:.0e} over the start" if chance else ""
        return (f"measured, not certified: rests on the operator's rounding {p.get('rounding', float('nan')):.1e} as "
                f"measured against float64 products (a measurement, not a bound){odds}")
    if kind == "certified":
        return "certified"
    if kind == "residual-bound":
        return "certified for some eigenvalue, not necessarily this one"
    if kind == "estimate":
        return "estimate, no guarantee"
    return kind


def summary_lines(record) -> list[str]:
    """value +- error and what it promises, converged, HVPs, wall time, mode: the table every command starts with."""
    op = record.settings.get("operator", {})
    where = op.get("site") or (f"params {op['params']!r}" if op.get("params") else "all params")
    scaled = "" if op.get("scaled", "none") == "none" else f", scaled {op['scaled']}"
    value = "failed" if record.value is None else f"{record.value:.8g}"
    error = "" if record.error is None else f" +- {record.error:.2g} ({error_meaning(record)})"
    interval = record.payload.get("interval")
    floor = "   limited by the operator's rounding" if record.payload.get("limited_by_rounding") else ""
    return [
        f"{record.quantity:<14} {value}{error}",
        *([f"{'interval':<14} [{interval[0]:.10g}, {interval[1]:.10g}]"] if interval else []),
        f"{'converged':<14} {'yes' if record.converged else 'no'}   status {record.status}{floor}",
        f"{'cost':<14} {record.hvp_count} HVPs, {record.wall_time_s:.3g} s",
        f"{'operator':<14} {op.get('kind', '?')} ({where}), n = {op.get('n', '?')}, {op.get('dtype', '?')}, "
        f"mode {op.get('mode', '?')}{scaled}",
    ]


def _data_lines(spread: dict) -> list[str]:
    lines = []
    if "data_spread" in spread:
        lines += _jackknife_lines(spread["data_spread"])
    if "sample_size_curve" in spread:
        lines += _curve_lines(spread["sample_size_curve"])
    return lines


def _jackknife_lines(jk) -> list[str]:
    p, s = jk.payload, jk.settings
    head = f"{'data error':<14} jackknife, {s['n_groups']} groups of {s['group_size']} batches"
    if jk.status != "ok":
        return [f"{head}: {jk.status}"]
    low, high = p["interval"]
    solver = p["solver_error_propagated"]
    solver = "n/a" if solver is None else f"{solver:.2g}"
    lines = [f"{head}: {jk.value:.8g} +- {jk.error:.3g} (bias-corrected; union {p['union_value']:.8g}, "
             f"bias {p['bias']:+.3g})",
             f"{'':<14} {100 * p['level']:g} % interval [{low:.6g}, {high:.6g}] for the population value; "
             f"solver errors move it by <= {solver}; {jk.hvp_count} HVPs ({p['operators']['combination']})"]
    return lines + ([f"{'':<14} warning: {p['warning']}"] if p["warning"] else [])


def _curve_lines(curve) -> list[str]:
    level = curve.payload["level"]
    lines = [f"{'sample size':<14} {'batches':>7}  {'estimate':>14}  {'solver error':>12}  "
             f"jackknife ({100 * level:g} % interval)"]
    for p in curve.payload["points"]:
        value = "failed" if p["value"] is None else f"{p['value']:.8g}"
        solver = "" if p["solver_error"] is None else f"{p['solver_error']:.2g}"
        jk, data = p["jackknife"], ""
        if jk is not None:
            data = jk["status"] if jk["status"] != "ok" else \
                f"{jk['value']:.6g} +- {jk['error']:.2g} [{jk['payload']['interval'][0]:.6g}, " \
                f"{jk['payload']['interval'][1]:.6g}]"
        lines.append(f"{'':<14} {p['n_batches']:>7}  {value:>14}  {solver:>12}  {data}")
    return lines
