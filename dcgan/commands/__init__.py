"""Subcommands of the `dcgan` CLI (layer: dcgan); each module has `register(subparsers)` and sets `func`.

What they share: every flag is sugar for one dotted override of the configuration (`--steps 5` is `train.steps=5`,
`--set section.field=value` is any other), the stage runs where `dcgan.stages.run` says, progress goes to stderr and
the result to stdout (a summary, or one JSON line with `--json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import yaml


TOP_LEVEL = ("name", "root", "data", "run")  # config fields outside the sections that flags may set


def add_config_flags(p: argparse.ArgumentParser, address: bool = True) -> None:
    p.add_argument("--config", help="experiment YAML (configs/*.yaml); flags override its fields")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", dest="sets",
                   help="override any config field, e.g. --set train.lr=0.001 or --set root=s3://bucket (repeatable; "
                        "the value is YAML)")
    if address:
        p.add_argument("--address", dest="cluster.address", metavar="ADDRESS",
                       help="where to run: http://HEAD:8265 (a Ray Job on that cluster), auto or HOST:PORT (join "
                            "the cluster this machine is on); default RAY_ADDRESS, else a local Ray")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line on stdout")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted overrides the command line gives: flags whose dest is a dotted config field, then --set. The one
    rule for both: a --set value is YAML and not empty, and a field is set once (`--steps 5 --set train.steps=7`
    is an error naming both, not a silent winner)."""
    from dcgan.config import ConfigError

    out = {k: v for k, v in vars(args).items() if ("." in k or k in TOP_LEVEL) and v is not None}
    flag_names = getattr(args, "flag_names", None) or {}
    given: dict[str, str] = {k: f"{flag_names.get(k, '--' + k)} {v}" for k, v in out.items()}
    for item in getattr(args, "sets", []) or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or ("." not in key and key not in TOP_LEVEL):
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. train.lr=0.001, or a top-level "
                              f"field ({', '.join(TOP_LEVEL)}), e.g. root=s3://bucket")
        if not value.strip():
            raise ConfigError(f"--set {item!r}: no value after '='; give one (YAML), or leave the flag out to keep "
                              f"the config's {key}")
        if key in given:
            raise ConfigError(f"{given[key]} and --set {item} both set {key}: give it once")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML "
                              f"({getattr(err, 'problem', None) or type(err).__name__})") from None
        given[key] = f"--set {item}"
    return out


def given_location(value: str | None, flag: str) -> str | None:
    """A location given on the command line (`storage.given`: resolved, an empty one refused); None when not given."""
    from preprocessing import storage

    return None if value is None else storage.given(value, flag)


def config_of(args: argparse.Namespace, base=None):
    """The resolved configuration of a command: --config (or `base`, or the defaults) with the overrides."""
    from dcgan.config import load_config

    return load_config(args.config, overrides(args), base=None if args.config else base)


def emit(line: str) -> None:
    """A progress line (a Ray Job's log, a skipped stage) on stderr."""
    print(line, file=sys.stderr, flush=True)


def finish(args: argparse.Namespace, call, summary: Callable[[dict], str]) -> int:
    """Run the stage and print its result: a human summary, or the JSON line."""
    from dcgan import stages

    result = stages.run(call, emit=emit)
    print(stages.result_line(result) if args.json else summary(result), flush=True)
    return 0


def dumps(value: Any) -> str:
    return json.dumps(value, default=str)
