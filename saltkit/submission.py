"""Competition submission files: `id,rle_mask` for every test id, written atomically and validated."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from saltkit.data.layout import DatasetError, csv_line, decode_rle_column, id_listing, read_rle_csv
from saltkit.io import atomic_write
from saltkit.rle import TILE_SHAPE, RLEError, rle_encode, rle_runs


class SubmissionError(DatasetError):
    """A submission that is malformed or does not cover the expected ids exactly once."""


def write_submission(ids: Sequence[str], masks_or_rles, path: str | Path,
                     shape: tuple[int, int] = TILE_SHAPE) -> None:
    """Write `id,rle_mask` rows in the order of `ids`, atomically.

    `masks_or_rles`: binary masks (N, H, W) (numpy or torch; nonzero = salt), or N RLE strings which are
    checked against `shape`. Nothing is written when the input is invalid.
    """
    ids = [str(i) for i in ids]
    if isinstance(masks_or_rles, (list, tuple)) and all(isinstance(r, str) for r in masks_or_rles):
        rles = list(masks_or_rles)
        for i, rle in enumerate(rles):
            try:
                rle_runs(rle, shape)
            except RLEError as e:
                raise SubmissionError(f"{path}: RLE for id {ids[i] if i < len(ids) else i}: {e}") from None
    else:
        masks = np.asarray(masks_or_rles)
        if masks.ndim != 3 or masks.shape[1:] != tuple(shape):
            raise SubmissionError(f"{path}: masks must be (N, {shape[0]}, {shape[1]}), got shape {masks.shape}")
        rles = rle_encode(masks)
    if len(rles) != len(ids):
        raise SubmissionError(f"{path}: {len(ids)} ids but {len(rles)} masks")
    dup = pd.Series(ids)[pd.Series(ids).duplicated()].tolist()
    if dup:
        raise SubmissionError(f"{path}: duplicate ids {id_listing(dup)}")
    with atomic_write(path) as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "rle_mask"])
        writer.writerows(zip(ids, rles, strict=True))


def read_submission(path: str | Path) -> pd.DataFrame:
    """Read a submission -> DataFrame(id, rle_mask); checks the header and unique ids (RLE: validate_submission)."""
    try:
        return read_rle_csv(path)
    except DatasetError as e:
        raise SubmissionError(str(e)) from None


def validate_submission(path_or_df, expected_ids: Sequence[str], shape: tuple[int, int] = TILE_SHAPE,
                        source: str | Path | None = None) -> pd.DataFrame:
    """Check a submission (path or DataFrame(id, rle_mask)) against the expected ids -> the frame, unchanged.

    Raises SubmissionError naming the file and the line/id: wrong header, an id twice, an expected id missing,
    an unknown id, or an RLE that is malformed, unsorted, overlapping or outside the H*W pixels of `shape`.
    `source` names a DataFrame's file in messages.
    """
    if isinstance(path_or_df, pd.DataFrame):
        source, df = str(source or "submission"), path_or_df
        if list(df.columns) != ["id", "rle_mask"]:
            raise SubmissionError(f"{source}: columns are {list(df.columns)}; expected ['id', 'rle_mask']")
        dup = df["id"][df["id"].duplicated()].tolist()
        if dup:
            raise SubmissionError(f"{source}: ids appear more than once: {id_listing(dup)}")
    else:
        source, df = str(path_or_df), read_submission(path_or_df)
    expected = [str(i) for i in expected_ids]
    present = set(df["id"])
    missing = [i for i in expected if i not in present]
    if missing:
        raise SubmissionError(f"{source}: {len(missing)} expected ids are missing: {id_listing(missing)}")
    known = set(expected)
    unknown = [(row, i) for row, i in enumerate(df["id"]) if i not in known]
    if unknown:
        row, first = unknown[0]
        raise SubmissionError(f"{source} line {csv_line(row)}: unknown id {first} "
                              f"({len(unknown)} unknown ids: {id_listing([i for _, i in unknown])})")
    for row, (i, rle) in enumerate(zip(df["id"], df["rle_mask"], strict=True)):
        try:
            rle_runs(rle, shape)
        except RLEError as e:
            raise SubmissionError(f"{source} line {csv_line(row)} (id {i}): {e}") from None
    return df


def submission_masks(df: pd.DataFrame, source: str | Path, shape: tuple[int, int] = TILE_SHAPE) -> np.ndarray:
    """Decode a submission frame's masks -> uint8 (N, H, W) in row order; errors name `source`, line and id."""
    try:
        return decode_rle_column(df, source, shape)
    except DatasetError as e:
        raise SubmissionError(str(e)) from None
