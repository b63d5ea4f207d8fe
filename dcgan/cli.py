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
    from dcgan.config import ConfigError
    from preprocessing.shards import DatasetError
    from preprocessing.storage import StorageError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DatasetError, StorageError, FileNotFoundError, ValueError) as err:
        # Bad input is one clear message, not a stack trace.
        print(f"dcgan {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
