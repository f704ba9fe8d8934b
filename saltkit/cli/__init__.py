"""The `saltkit` command line, in one package: this module builds the parser and runs a command (`main`, the
`saltkit` entry point; `python -m saltkit.cli` runs it too). The commands come from

- `saltkit.cli.data_commands`: folds, score, check-data (no torch or MONAI);
- `saltkit.cli.inference_commands`: ensemble, pseudo-label, export;
- `saltkit.cli.seismic_commands`: predict, mosaic;
- `saltkit.cli.workflows`: the bundle workflows (train, swa, evaluate, tune, inference, predict's bundle).

Each defines its commands as `saltkit.cli.subcommand.Subcommand`s in a `register(registry)` function. An
area's module is imported only for its own commands (`AREA_COMMANDS`), so `saltkit --help` and the data
commands start without torch or MONAI.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from saltkit.cli.subcommand import Subcommand, register_subcommand


def builtin_subcommands() -> dict[str, Subcommand]:
    """The data subcommands (`saltkit.cli.data_commands`), which start without torch or MONAI."""
    from saltkit.cli import data_commands

    registry: dict[str, Subcommand] = {}
    data_commands.register(registry)
    return registry


# The commands of the areas whose packages import torch and MONAI (seconds): name -> (the module whose
# `register(registry)` defines it, its summary as `saltkit --help` lists it). tests/test_cli.py checks that
# these are the commands and summaries the modules register.
AREA_COMMANDS: dict[str, tuple[str, str]] = {
    "ensemble": ("saltkit.cli.inference_commands",
                 "average saved probabilities of several runs into one validated submission"),
    "pseudo-label": ("saltkit.cli.inference_commands", "predict unlabelled tiles with a teacher and write "
                     "the confident ones as a training set"),
    "export": ("saltkit.cli.inference_commands", "export a checkpoint's network to TorchScript (the default) "
               "or ONNX, or package it as the bundle's model file"),
    "predict": ("saltkit.cli.seismic_commands",
                "salt probability of section images of any size or of a whole SEG-Y volume"),
    "mosaic": ("saltkit.cli.seismic_commands",
               "assemble real seismic sections from the tiles listed in mosaics.csv"),
    "sections": ("saltkit.cli.seismic_commands",
                 "turn a SEG-Y volume and its mask volume into labelled sections to train on, folds by inline range"),
}


def _no_arguments(_parser: argparse.ArgumentParser) -> None:
    """A listed command's options are its module's, declared when that command is the one run."""


def _listed_only(_args: argparse.Namespace) -> int:
    raise RuntimeError("a command listed by saltkit.cli.AREA_COMMANDS runs from its own module's registry")


def command_registry(loaded: set[str] | None = None) -> dict[str, Subcommand]:
    """Every saltkit command: the data commands, inference's, seismic's, then the bundle workflows not defined yet
    (seismic's `predict` has its own options; the predict bundle runs the same code).

    The areas' commands are registered by their modules for the modules in `loaded` (None: every area), and
    only listed (name and summary, `AREA_COMMANDS`) for the others.
    """
    from saltkit.cli.workflows import register as register_workflows

    registry = builtin_subcommands()
    for module in dict.fromkeys(module for module, _ in AREA_COMMANDS.values()):
        if loaded is None or module in loaded:
            importlib.import_module(module).register(registry)
            continue
        for name, (owner, summary) in AREA_COMMANDS.items():
            if owner == module:
                register_subcommand(registry, Subcommand(name, summary, _no_arguments, _listed_only))
    register_workflows(registry)
    return registry


def all_subcommands() -> dict[str, Subcommand]:
    """Every saltkit command, each area's module imported."""
    return command_registry()


def registry_for(argv: list[str]) -> dict[str, Subcommand]:
    """The commands for `saltkit ARGV`: the module of the command named first imported, the others listed."""
    command = AREA_COMMANDS.get(argv[0]) if argv else None
    return command_registry(set() if command is None else {command[0]})


DESCRIPTION = """TGS salt segmentation toolkit.

The bundle workflows (train, swa, evaluate, inference, ...) take override files, then any bundle key:
  saltkit train configs/pad.json --max_epochs 2
is `python -m monai.bundle run training --config_file "['bundles/saltnet/configs/train.json','configs/pad.json']"
--max_epochs 2`. The other commands spell options with hyphens (--min-component-size); underscores work too.
Errors end with one line `saltkit COMMAND: error: ...` (exit code 2); SALTKIT_DEBUG=1 shows the traceback."""


def build_parser(registry: dict[str, Subcommand]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saltkit", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in sorted(registry.values(), key=lambda c: not c.passthrough):  # bundle workflows first
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        # `--clip-range -1e4 1e4`: argparse before Python 3.13 reads -1e4 as an option
        p._negative_number_matcher = NEGATIVE_NUMBER
        command.add_arguments(p)
    return parser


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def hyphenated_options(args: list[str]) -> list[str]:
    """`--min_component_size 5` -> `--min-component-size 5` (option names only; values, and every word after a
    bare `--`, are left alone)."""
    out = []
    for i, a in enumerate(args):
        if a == "--":
            return out + args[i:]
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            a = "--" + name[2:].replace("_", "-") + eq + value
        out.append(a)
    return out


def parse_command_line(parser: argparse.ArgumentParser, registry: dict[str, Subcommand],
                       argv: list[str]) -> argparse.Namespace:
    """Namespace of `saltkit ARGV`: a passthrough command gets its arguments unparsed (`args.args`)."""
    command = registry.get(argv[0]) if argv else None
    if command is not None and command.passthrough:
        if not {"-h", "--help"} & set(argv[1:]):
            return argparse.Namespace(command=argv[0], args=argv[1:])
        return parser.parse_args(argv[:1] + ["--help"])
    return parser.parse_args(argv[:1] + hyphenated_options(argv[1:]))


def main(argv: list[str] | None = None, registry: dict[str, Subcommand] | None = None) -> int:
    """Run `saltkit ARGS`; bad input gives a one-line message on stderr and exit code 2 (no traceback).

    Bad input: saltkit's own errors (saltkit.errors), and for the commands that say so, any ValueError / OSError.
    """
    from saltkit.errors import EXIT_CODE, debug_enabled, report, user_error

    argv = sys.argv[1:] if argv is None else list(argv)
    registry = registry_for(argv) if registry is None else registry
    args = parse_command_line(build_parser(registry), registry, argv)
    command = registry[args.command]
    from saltkit.io import clean_up_on_termination

    clean_up_on_termination()
    try:
        return command.run(args)
    except Exception as e:
        bad_input = user_error(e) or (e if isinstance(e, command.one_line_errors) else None)
        if bad_input is None or debug_enabled():
            raise
        report(bad_input, f"saltkit {args.command}")
        return EXIT_CODE
