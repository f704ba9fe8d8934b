"""What a `saltkit NAME ...` command is: each command module of `saltkit.cli` (data, inference, seismic, the
bundle workflows) defines its commands with it, and the parser (`saltkit.cli.main`) lists them."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    """One `saltkit NAME ...` command: `add_arguments(parser)` declares it, `run(args)` returns the exit code."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    passthrough: bool = False  # arguments reach `run` unparsed, as `args.args` (the bundle workflows)
    one_line_errors: tuple[type[BaseException], ...] = (ValueError, OSError)  # besides saltkit's own errors


def register_subcommand(registry: dict[str, Subcommand], command: Subcommand) -> None:
    """Add `command` to `registry`; a name can be registered only once."""
    if command.name in registry:
        raise ValueError(f"saltkit subcommand {command.name!r} is already registered")
    registry[command.name] = command


def tta_option(text: str) -> bool:
    """argparse type of `--tta true|false`: config.as_bool's words; anything else is argparse's usage error."""
    from saltkit.config import as_bool

    try:
        return as_bool(text, "--tta")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
