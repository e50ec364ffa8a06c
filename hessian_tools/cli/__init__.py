"""The `hessian-tools` console script: one module per sub-command, each with `add_parser` and `run`.

Every sub-command module defines `add_parser(subparsers)` (registering its flags) and `run(args) -> int`.
Heavy imports happen inside `run`, so `hessian-tools --help` stays fast.
"""

import argparse
import importlib
import os
import sys

from hessian_tools.errors import UserError

COMMANDS = {
    "train": "hessian_tools.cli.train",
    "lr-sweep": "hessian_tools.cli.lr_sweep",
    "inspect": "hessian_tools.cli.inspect",
    "spectrum": "hessian_tools.cli.spectrum",
    "trace": "hessian_tools.cli.trace",
    "density": "hessian_tools.cli.density",
    "bench": "hessian_tools.cli.bench",
    "verify-bound": "hessian_tools.cli.verify_bound",
    "sweep": "hessian_tools.cli.sweep",
    "figures": "hessian_tools.cli.figures",
    "demo": "hessian_tools.cli.demo",
}


def build_parser() -> argparse.ArgumentParser:
    from hessian_tools.cli.common import Parser  # one-line parse errors, for every sub-command too

    parser = Parser(
        prog="hessian-tools",
        description="Hessian spectra of GPT language models: train, measure, verify the SimpleNorm bound, plot.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        importlib.import_module(module_name).add_parser(subparsers, name)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a flag error, already printed in one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"hessian-tools {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early, e.g. piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"hessian-tools {args.command}: interrupted; everything written so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
