"""Subcommands of the `dcgan` CLI; each module has `register(subparsers)` and sets `func` on its parser."""
