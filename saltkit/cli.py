"""`saltkit` command line: the data commands defined here (folds, score, check-data), those of inference
(ensemble, pseudo-label, export) and seismic (predict, mosaic), and the bundle workflows (train, swa,
evaluate, tune, inference).

Each area defines its commands as `saltkit.subcommands.Subcommand`s in a `register(registry)` function; this
module builds one argparse parser. An area's module is imported only for its own commands (`AREA_COMMANDS`),
so `saltkit --help` and the data commands start without torch or MONAI.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

from saltkit.subcommands import Subcommand, register_subcommand

# ---------------------------------------------------------------- folds


def _folds_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset_dir", type=Path, help="dataset folder in the competition layout")
    p.add_argument("--k", type=int, default=10, help="number of folds (default 10)")
    p.add_argument("--out", type=Path, default=Path("folds.csv"), help="CSV to write (default folds.csv)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--valid-lists", type=Path, nargs="+", metavar="FILE",
                   help="instead of stratifying: fold k = the ids in the k-th file (one id per line), e.g. the "
                        "original recipe's list_valid0_400.csv ... list_valid9_400.csv")
    p.add_argument("--train-lists", type=Path, nargs="+", metavar="FILE",
                   help="with --valid-lists: check that the k-th file lists exactly the other folds' ids")
    p.add_argument("--present-only", action="store_true",
                   help="with --valid-lists: leave out listed ids the dataset does not have")


def _folds_run(args: argparse.Namespace) -> int:
    from saltkit.data.folds import folds_for_dataset, folds_from_id_lists, write_folds

    if args.valid_lists:
        df = folds_from_id_lists(args.dataset_dir, args.valid_lists, args.train_lists, args.present_only)
        how = f"from {len(args.valid_lists)} validation lists"
    elif args.train_lists or args.present_only:
        raise ValueError("--train-lists and --present-only need --valid-lists")
    else:
        df = folds_for_dataset(args.dataset_dir, k=args.k, seed=args.seed)
        how = f"seed {args.seed}, stratified by coverage class"
    write_folds(df, args.out)
    sizes = df.groupby("fold").size().tolist()
    print(f"wrote {args.out}: {len(df)} ids in {len(sizes)} folds of {min(sizes)}-{max(sizes)} ({how})")
    return 0


# ---------------------------------------------------------------- score


def _score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("truth_csv", type=Path, help="labelled id,rle_mask CSV (e.g. train.csv rows of a held-out fold)")
    p.add_argument("pred_csv", type=Path, help="predictions in submission format (id,rle_mask), same ids")
    p.add_argument("--per-image", type=Path, default=None, metavar="OUT.csv",
                   help="also write id,metric,pixel_accuracy,truth_empty per tile")


def _score_run(args: argparse.Namespace) -> int:
    import pandas as pd

    from saltkit.data.layout import read_rle_masks
    from saltkit.io import atomic_write
    from saltkit.metrics import competition_metric, pixel_accuracy
    from saltkit.submission import read_submission, submission_masks, validate_submission

    truth_df, truths = read_rle_masks(args.truth_csv)
    pred_df = validate_submission(read_submission(args.pred_csv), truth_df["id"], source=args.pred_csv)
    # Predictions in the truth's row order.
    pred_df = pred_df.set_index("id").loc[truth_df["id"]].reset_index()
    preds = submission_masks(pred_df, args.pred_csv)
    scores, accuracy = competition_metric(preds, truths), pixel_accuracy(preds, truths)
    if args.per_image is not None:
        table = pd.DataFrame({"id": truth_df["id"], "metric": scores, "pixel_accuracy": accuracy,
                              "truth_empty": ~truths.reshape(len(truths), -1).any(1)})
        with atomic_write(args.per_image) as f:
            table.to_csv(f, index=False)
        print(f"wrote {args.per_image}")
    empty = ~truths.reshape(len(truths), -1).any(1)
    print(f"tiles: {len(scores)} ({int(empty.sum())} with empty truth)")
    print(f"pixel accuracy: {accuracy.mean():.6f}")
    if empty.any():
        print(f"metric on empty-truth tiles: {scores[empty].mean():.6f}")
    if (~empty).any():
        print(f"metric on salt tiles: {scores[~empty].mean():.6f}")
    print(f"{scores.mean():.6f}")
    return 0


# ---------------------------------------------------------------- check-data


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset_dir", type=Path, help="dataset folder in the competition layout")


def _check_run(args: argparse.Namespace) -> int:
    from saltkit.data.layout import check_dataset, test_items, train_items

    problems = check_dataset(args.dataset_dir)
    if problems:
        for line in problems:
            print(line)
        print(f"{len(problems)} problem(s) in {args.dataset_dir}")
        return 1
    train = train_items(args.dataset_dir)
    has_test = (Path(args.dataset_dir) / "test" / "images").is_dir()
    n_test = len(test_items(args.dataset_dir)) if has_test else 0
    with_depth = sum(it["depth"] == it["depth"] for it in train)  # NaN != NaN
    print(f"ok: {len(train)} train tiles with masks ({with_depth} with depth), {n_test} test tiles in "
          f"{args.dataset_dir}")
    return 0


# ---------------------------------------------------------------- registry and entry point


def builtin_subcommands() -> dict[str, Subcommand]:
    """The data subcommands defined here."""
    registry: dict[str, Subcommand] = {}
    register_subcommand(registry, Subcommand("folds", "write a stratified K-fold split of a dataset's train tiles",
                                             _folds_arguments, _folds_run))
    register_subcommand(registry, Subcommand("score", "score predictions (id,rle_mask) against labelled RLE",
                                             _score_arguments, _score_run))
    register_subcommand(registry, Subcommand("check-data", "check a dataset folder and report what is wrong",
                                             _check_arguments, _check_run))
    return registry


# The commands of the areas whose packages import torch and MONAI (seconds): name -> (the module whose
# `register(registry)` defines it, its summary as `saltkit --help` lists it). tests/test_cli.py checks that
# these are the commands and summaries the modules register.
AREA_COMMANDS: dict[str, tuple[str, str]] = {
    "ensemble": ("saltkit.inference.commands",
                 "average saved probabilities of several runs into one validated submission"),
    "pseudo-label": ("saltkit.inference.commands", "predict unlabelled tiles with a teacher and write the "
                     "confident ones as a training set"),
    "export": ("saltkit.inference.commands", "export a checkpoint's network to TorchScript (the default) or "
               "ONNX, or package it as the bundle's model file"),
    "predict": ("saltkit.seismic.commands",
                "salt probability of section images of any size or of a whole SEG-Y volume"),
    "mosaic": ("saltkit.seismic.commands",
               "assemble real seismic sections from the tiles listed in mosaics.csv"),
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
    from saltkit.workflows import register as register_workflows

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


if __name__ == "__main__":
    raise SystemExit(main())
