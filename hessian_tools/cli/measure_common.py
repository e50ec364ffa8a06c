"""What `spectrum`, `trace` and `density` share: flags, checkpoint and batches, the operator, the guard, output.

Flow of every measuring command: load CKPT, draw `--batches` fixed held-out batches (`--seed` seeds them and
the estimator), build the operator (parameter space, or activation space at `--site`), run the self-check
guard (result on stderr), run the estimator with an HVP progress bar on stderr, then print one JSON object
(`--json`: the record's to_dict() with provenance) or a short table. Under torchrun with `--distributed`
each rank evaluates its share of the batches (in activation space: owns their blocks) and only rank 0 prints.
Exit status: 0, 2 on bad input (one line on stderr), 3 when the estimator failed (its status on stderr).
"""

from __future__ import annotations

import dataclasses
import json
import sys

from hessian_tools.cli.common import add_checkpoint_argument, add_model_flags

SPACES = ("params", "activation")
MODES = ("auto", "rev-rev", "fwd-rev", "double-backward")  # hessian_tools.operators.MODES, without importing torch
EXIT_FAILED = 3


def add_measure_flags(p, data_spread: bool = True):
    """CKPT, the operator flags, the data flags, --json, --distributed and the model override flags."""
    add_checkpoint_argument(p)
    g = p.add_argument_group("operator")
    g.add_argument("--space", choices=SPACES, default=None,
                   help="parameters or the activation at --site (default: activation if --site is given)")
    g.add_argument("--site", default=None, metavar="NAME", help="activation site, e.g. layers.0:out "
                   "(`hessian-tools inspect CKPT` lists them)")
    g.add_argument("--params", default=None, metavar="REGEX", help="only parameters whose name matches REGEX")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="evaluation dtype of the products (Krylov vectors are float64 always; default float32)")
    g.add_argument("--mode", choices=MODES, default="auto",
                   help="HVP mode (default auto: double-backward, the fastest on CPU)")
    g.add_argument("--memory-budget", type=int, default=None, metavar="BYTES",
                   help="working memory the products may use: graphs are dropped or batches micro-batched to fit")
    d = p.add_argument_group("data")
    d.add_argument("--batches", type=int, default=1, help="held-out measurement batches (default 1)")
    d.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    d.add_argument("--seq-len", dest="measure_seq_len", type=int, default=None, metavar="T",
                   help="tokens per sequence (default: the model's context length)")
    d.add_argument("--seed", type=int, default=0, help="seed of the batches and of the estimator (default 0)")
    if data_spread:
        d.add_argument("--data-spread", type=int, default=None, metavar="GROUPS",
                       help="also repeat the estimate on GROUPS disjoint groups of the batches (their std)")
    d.add_argument("--distributed", action="store_true",
                   help="under torchrun: each rank evaluates its share of the batches")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    add_model_flags(p, skip=("seq_len",))  # --seq-len above is the measurement length; --context-len the model's
    p.add_argument("--context-len", dest="seq_len", type=int, default=None, metavar="T",
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

    def spread(self, estimator, desc: str):
        """data_spread of `estimator` over --data-spread disjoint groups of the batches (None if not asked)."""
        groups = getattr(self.args, "data_spread", None)
        if groups is None:
            return None
        from hessian_tools.estimators import data_spread
        from hessian_tools.progress import ProgressOperator, hvp_bar

        make_op = operator_factory(self.args, self.ckpt.model)
        with hvp_bar(f"{desc} (data spread, {groups} groups)", None, self.talk) as bar:
            return data_spread(lambda b: ProgressOperator(make_op(b), bar), self.batches, estimator, n_groups=groups,
                               seed=self.args.seed)

    def finish(self, record, table_lines, spread=None, extra: dict | None = None, write=None) -> int:
        """Attach provenance and the guard; on rank 0 call write(JSON object, record) if given, then print.

        Returns the exit status."""
        from hessian_tools import __version__

        a = self.args
        record = dataclasses.replace(record, settings={**record.settings, "self_check": self.guard})
        record = record.with_provenance(
            command=a.command, checkpoint=str(self.ckpt.path), arch=self.ckpt.config.arch, step=self.ckpt.step,
            version=__version__, n_batches=len(self.batches), batch_size=a.batch_size,
            seq_len=int(self.batches[0][0].shape[-1]), data_seed=a.seed,
            world_size=getattr(self.op, "world_size", 1))
        out = record.to_dict()
        if spread is not None:
            out["data_spread"] = spread.to_dict()
        out.update(extra or {})
        if self.talk:
            if write is not None and record.status == "ok":
                write(out, record)
            if a.json:
                print(json.dumps(out, allow_nan=False))
            else:
                print("\n".join(table_lines(record) + (_spread_lines(spread) if spread else [])))
        failed = [r.status for r in (record, spread) if r is not None and r.status != "ok"]
        if failed:
            self.say(f"hessian-tools {a.command}: the estimate failed: {failed[0]}")
            return EXIT_FAILED
        return 0


def operator_factory(args, model):
    """batches -> the operator the flags ask for (ParamHessian or ActivationHessian) on `model`."""
    from hessian_tools.operators import ActivationHessian, ParamHessian

    common = dict(dtype=args.dtype, mode=args.mode, memory_budget=args.memory_budget)
    if args.space == "activation":
        return lambda batches: ActivationHessian(model, batches, args.site, **common)
    return lambda batches: ParamHessian(model, batches, params=args.params, **common)


def _check_flags(args):
    from hessian_tools.errors import UserError

    for flag, value in (("--batches", args.batches), ("--batch-size", args.batch_size),
                        ("--seq-len", args.measure_seq_len or 1), ("--memory-budget", 1 if args.memory_budget is None else args.memory_budget)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    args.space = args.space or ("activation" if args.site else "params")
    if args.space == "params" and args.site:
        raise UserError("--site names an activation: drop --space params (or the --site)")
    if args.space == "activation" and args.params:
        raise UserError("--params selects parameters: use it with --space params, not with an activation --site")
    if args.distributed and getattr(args, "data_spread", None) is not None:
        raise UserError("--data-spread does not run under --distributed; drop one of them")


def prepare(args) -> Measurement:
    """Load, draw batches, build and guard the operator (one line on stderr per step that takes time)."""
    from hessian_tools.cli.common import overrides_from_args
    from hessian_tools.errors import UserError
    from hessian_tools.operators import self_check
    from hessian_tools.operators.sites import list_sites
    from models.checkpoint import load_checkpoint

    _check_flags(args)
    rank = 0
    if args.distributed:
        from hessian_tools.distributed import init_distributed

        rank, _ = init_distributed()
    ckpt = load_checkpoint(args.checkpoint, overrides_from_args(args))
    if args.space == "activation" and not args.site:
        raise UserError(f"--space activation needs --site NAME; valid sites: {', '.join(list_sites(ckpt.model))}")
    batches = ckpt.measurement_batches(args.batches, args.batch_size, args.measure_seq_len, seed=args.seed)
    make_op = operator_factory(args, ckpt.model)
    if args.distributed:
        from hessian_tools.distributed import DistributedBlockOperator, DistributedOperator

        op = (DistributedBlockOperator if args.space == "activation" else DistributedOperator)(make_op, batches)
        local = op.local
    else:
        op = local = make_op(batches)
    guard = self_check(local, seed=args.seed)
    m = Measurement(args, ckpt, batches, op, local, rank, guard)
    m.say(f"self-check ({guard['dtype']}, mode {guard['mode']}): finite, asymmetry {guard['symmetry_rel']:.1e} "
          f"(tol {guard['tolerances']['symmetry']:.0e}), differences {guard['difference_rel']:.1e} "
          f"(tol {guard['tolerances']['difference']:.0e}): ok")
    return m


def summary_lines(record) -> list[str]:
    """value +- error, error kind, converged, HVPs, wall time, mode: the table every command starts with."""
    op = record.settings.get("operator", {})
    where = op.get("site") or (f"params {op['params']!r}" if op.get("params") else "all params")
    value = "failed" if record.value is None else f"{record.value:.8g}"
    error = "" if record.error is None else f" +- {record.error:.2g} ({record.error_kind})"
    return [
        f"{record.quantity:<14} {value}{error}",
        f"{'converged':<14} {'yes' if record.converged else 'no'}   status {record.status}",
        f"{'cost':<14} {record.hvp_count} HVPs, {record.wall_time_s:.3g} s",
        f"{'operator':<14} {op.get('kind', '?')} ({where}), n = {op.get('n', '?')}, {op.get('dtype', '?')}, "
        f"mode {op.get('mode', '?')}",
    ]


def _spread_lines(spread) -> list[str]:
    p = spread.payload
    if spread.status != "ok":
        return [f"{'data spread':<14} failed: {spread.status}"]
    solver = p.get("mean_solver_error")
    solver = "n/a" if solver is None else f"{solver:.2g}"
    groups = ", ".join(f"{v:.6g}" for v in p["group_values"])
    return [f"{'data spread':<14} std {spread.error:.3g} over {len(p['group_values'])} groups "
            f"(mean {spread.value:.8g}; solver error {solver}): {groups}"]
