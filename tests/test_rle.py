"""RLE: round trips against the real mask PNGs and train.csv, layout conventions, and decode validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from saltkit.data.layout import load_mask
from saltkit.rle import RLEError, rle_decode, rle_decode_many, rle_encode, rle_runs


def _csv_and_masks(root):
    df = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    masks = np.stack([load_mask(root / "train" / "masks" / f"{i}.png") for i in df["id"]])
    return df, masks


def _round_trip(root):
    df, masks = _csv_and_masks(root)
    encoded = rle_encode(masks)
    mismatched = [i for i, a, b in zip(df["id"], encoded, df["rle_mask"], strict=True) if a != b]
    assert not mismatched, f"encode differs from train.csv for {mismatched[:5]}"
    decoded = rle_decode_many(df["rle_mask"].tolist())
    bad = np.flatnonzero((decoded != masks).reshape(len(masks), -1).any(1))
    assert not len(bad), f"decode differs from the PNG for {df['id'].iloc[bad[:5]].tolist()}"
    return masks


def test_round_trip_sample(sample_dir):
    masks = _round_trip(sample_dir)
    assert len(masks) == 100 and masks.any(axis=(1, 2)).sum() > 30


def test_round_trip_every_train_row(tgs_dir):
    masks = _round_trip(tgs_dir)
    assert len(masks) == 3200


def test_column_major_one_indexed():
    mask = np.zeros((3, 2), np.uint8)
    mask[1, 0] = mask[2, 0] = 1  # pixels 2 and 3 (down the first column)
    mask[0, 1] = 1  # pixel 4: top of the second column, joined to the run
    assert rle_encode(mask) == "2 3"
    mask[0, 1] = 0
    mask[2, 1] = 1  # pixel 6
    assert rle_encode(mask) == "2 2 6 1"
    np.testing.assert_array_equal(rle_decode("2 2 6 1", (3, 2)), mask)


def test_edges_of_a_tile():
    full = np.ones((101, 101), np.uint8)
    assert rle_encode(full) == "1 10201"
    assert rle_encode(np.zeros((101, 101), bool)) == ""
    last = np.zeros((101, 101), np.uint8)
    last[-1, -1] = 1
    assert rle_encode(last) == "10201 1"
    np.testing.assert_array_equal(rle_decode("10201 1"), last)
    for empty in ("", "  ", None, float("nan")):
        assert rle_decode(empty).sum() == 0 and rle_decode(empty).dtype == np.uint8


def test_batch_matches_single_and_accepts_any_dtype():
    rng = np.random.default_rng(0)
    masks = (rng.random((300, 7, 5)) < rng.random((300, 1, 1))).astype(np.uint8)
    batch = rle_encode(masks)
    assert isinstance(batch, list) and batch == [rle_encode(m) for m in masks]
    assert rle_encode(masks.astype(bool)) == batch
    assert rle_encode(masks.astype(np.uint16) * 65535) == batch
    assert rle_encode(torch.from_numpy(masks)) == batch
    np.testing.assert_array_equal(rle_decode_many(batch, (7, 5)), masks)
    assert rle_encode(np.zeros((0, 101, 101))) == []


def test_encode_rejects_wrong_rank():
    with pytest.raises(ValueError, match="shape"):
        rle_encode(np.zeros((2, 1, 5, 5)))


@pytest.mark.parametrize(
    "rle, message",
    [
        ("1 2 3", "even count"),
        ("1 x", "'x' is not an integer"),
        ("1 2.5", "'2.5' is not an integer"),
        ("0 3", r"run 1 \(start 0, length 3\)"),
        ("5 0", r"run 1 \(start 5, length 0\)"),
        ("4 1 -1 2", r"run 2 \(start -1"),
        ("10 2 5 2", "starts must ascend"),
        ("10 2 10 1", "starts must ascend"),
        ("10 5 12 2", r"run 2 \(start 12\) overlaps run 1 \(pixels 10..14\)"),
        ("10200 3", "ends at pixel 10202, past the 10201 pixels of a 101x101 mask"),
        ("10202 1", "past the 10201 pixels"),
    ],
)
def test_decode_rejects(rle, message):
    with pytest.raises(RLEError, match=message):
        rle_decode(rle)


def test_touching_runs_are_valid():
    np.testing.assert_array_equal(rle_decode("1 2 3 2", (2, 2)), np.ones((2, 2), np.uint8))


def test_runs_and_batch_error_index():
    starts, lengths = rle_runs("3 2 10 4")
    assert starts.tolist() == [3, 10] and lengths.tolist() == [2, 4]
    with pytest.raises(RLEError) as info:
        rle_decode_many(["", "1 1", "1 1 1 1"])
    assert info.value.index == 2 and "starts must ascend" in str(info.value)
    with pytest.raises(RLEError, match="must be a string"):
        rle_decode(12)
