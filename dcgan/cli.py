"""`dcgan` command line: one subcommand per job; each lives in dcgan/commands/<name>.py with a `register(sub)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand modules, in the order `dcgan --help` lists them.
COMMANDS = ["info", "build", "dedup", "train", "sample", "evaluate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcgan", description="DCGAN at cluster scale (Radford, Metz & Chintala 2016)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"dcgan.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    return run_command(f"dcgan {args.command}", lambda: args.func(args))


def run_command(prog: str, fn) -> int:
    """The one error path of every front end: a known fault (`UserError`) is one line on stderr and exit 2; Ctrl-C
    is one line and exit 130 (what was written stays resumable); anything else is a bug and keeps its traceback."""
    from preprocessing.errors import UserError, one_line

    try:
        return int(fn() or 0)
    except UserError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
