"""`saltkit folds`, `saltkit score` and `saltkit check-data`: the data commands (listed by saltkit.cli through
`register`). They import pandas and numpy only when run, never torch or MONAI."""

from __future__ import annotations

import argparse
from pathlib import Path

from saltkit.cli.subcommand import Subcommand, register_subcommand

# ---------------------------------------------------------------- folds


def _folds_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset_dir", type=Path, nargs="?", help="dataset folder in the competition layout")
    p.add_argument("--sections", type=Path, default=None, metavar="DIR",
                   help="instead of a dataset: fold the labelled sections of DIR (NAME.png with NAME_mask.png) "
                        "whole, balanced by labelled pixels; writes name,fold")
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

    if (args.sections is None) == (args.dataset_dir is None):
        raise ValueError("give a dataset folder or --sections DIR (one of them)")
    if args.sections is not None:
        return _section_folds_run(args)
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


def _section_folds_run(args: argparse.Namespace) -> int:
    from saltkit.data.labelled_sections import folds_for_sections, write_section_folds

    if args.valid_lists or args.train_lists or args.present_only:
        raise ValueError("--valid-lists, --train-lists and --present-only fold tiles, not --sections")
    df = folds_for_sections(args.sections, k=args.k, seed=args.seed)
    write_section_folds(df, args.out)
    sizes = df.groupby("fold").size().tolist()
    print(f"wrote {args.out}: {len(df)} sections in {len(sizes)} folds of {min(sizes)}-{max(sizes)} (seed "
          f"{args.seed}, balanced by labelled pixels)")
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


# ---------------------------------------------------------------- registry


def register(registry: dict[str, Subcommand]) -> None:
    """Add the data commands to `registry`."""
    register_subcommand(registry, Subcommand("folds", "write a stratified K-fold split of a dataset's train tiles (or of sections)",
                                             _folds_arguments, _folds_run))
    register_subcommand(registry, Subcommand("score", "score predictions (id,rle_mask) against labelled RLE",
                                             _score_arguments, _score_run))
    register_subcommand(registry, Subcommand("check-data", "check a dataset folder and report what is wrong",
                                             _check_arguments, _check_run))
