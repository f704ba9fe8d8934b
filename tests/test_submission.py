"""Submission files: written atomically in the given order, read back, and validated against the expected ids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from saltkit.data.layout import read_rle_masks
from saltkit.submission import (
    SubmissionError,
    read_submission,
    submission_masks,
    validate_submission,
    write_submission,
)


@pytest.fixture
def truth(sample_dir):
    return read_rle_masks(sample_dir / "train.csv")


def test_write_read_round_trip(truth, tmp_path):
    df, masks = truth
    ids = df["id"].tolist()[::-1]  # any order: the file follows it
    path = tmp_path / "sub.csv"
    write_submission(ids, masks[::-1], path)
    lines = path.read_text().splitlines()
    assert lines[0] == "id,rle_mask" and len(lines) == 101
    back = validate_submission(path, df["id"])
    assert back["id"].tolist() == ids
    assert back["rle_mask"].tolist() == df["rle_mask"].tolist()[::-1]
    np.testing.assert_array_equal(submission_masks(back, path), masks[::-1])
    # RLE strings and torch masks give the same file.
    write_submission(ids, back["rle_mask"].tolist(), tmp_path / "again.csv")
    write_submission(ids, torch.from_numpy(masks[::-1].copy()), tmp_path / "torch.csv")
    assert (tmp_path / "again.csv").read_text() == path.read_text() == (tmp_path / "torch.csv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.csv", "sub.csv", "torch.csv"]


def test_write_rejects_bad_input_and_leaves_nothing(truth, tmp_path):
    df, masks = truth
    path = tmp_path / "sub.csv"
    ids = df["id"].tolist()
    with pytest.raises(SubmissionError, match="100 ids but 99 masks"):
        write_submission(ids, masks[:99], path)
    with pytest.raises(SubmissionError, match=f"duplicate ids {ids[0]}"):
        write_submission([ids[0], *ids[:99]], masks, path)
    with pytest.raises(SubmissionError, match=r"masks must be \(N, 101, 101\)"):
        write_submission(ids, masks[:, :50], path)
    with pytest.raises(SubmissionError, match=f"RLE for id {ids[1]}: .*starts must ascend"):
        write_submission(ids[:2], ["", "5 1 3 1"], path)
    assert list(tmp_path.iterdir()) == []
    # A failed write keeps the previous file intact.
    write_submission(ids[:1], [""], path)
    before = path.read_text()
    with pytest.raises(SubmissionError):
        write_submission(ids[:1], ["0 1"], path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


def _write(tmp_path, rows, header="id,rle_mask"):
    path = tmp_path / "sub.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.mark.parametrize(
    "rows, header, message",
    [
        (["a,", "b,1 2"], "id,rle", "header is id,rle; expected id,rle_mask"),
        (["a,", "b,1 2", "a,3 1"], "id,rle_mask", "id a appears 2 times \\(lines 2, 4\\)"),
        (["a,"], "id,rle_mask", "1 expected ids are missing: b"),
        (["a,", "b,", "zz,"], "id,rle_mask", "line 4: unknown id zz"),
        (["a,", "b,5 2 1 1"], "id,rle_mask", "line 3 \\(id b\\): RLE run 2 starts at 1.*must ascend"),
        (["a,1 5 3 1", "b,"], "id,rle_mask", "line 2 \\(id a\\): RLE run 2 \\(start 3\\) overlaps run 1"),
        (["a,", "b,10201 2"], "id,rle_mask", "line 3 \\(id b\\): .*past the 10201 pixels of a 101x101 mask"),
        (["a,1 2 3", "b,"], "id,rle_mask", "line 2 \\(id a\\): RLE has 3 numbers"),
        (["a,one 2", "b,"], "id,rle_mask", "line 2 \\(id a\\): RLE token 'one' is not an integer"),
    ],
)
def test_validate_rejects(tmp_path, rows, header, message):
    path = _write(tmp_path, rows, header)
    with pytest.raises(SubmissionError, match=f"{path}.*{message}"):
        validate_submission(path, ["a", "b"])


def test_validate_dataframe(tmp_path):
    df = pd.DataFrame({"id": ["a", "b"], "rle_mask": ["", "1 3"]})
    assert validate_submission(df, ["b", "a"]) is df
    with pytest.raises(SubmissionError, match="preds.csv: 1 expected ids are missing: c"):
        validate_submission(df, ["a", "b", "c"], source="preds.csv")
    with pytest.raises(SubmissionError, match="appear more than once: a"):
        validate_submission(pd.DataFrame({"id": ["a", "a"], "rle_mask": ["", ""]}), ["a"])
    with pytest.raises(SubmissionError, match="file not found"):
        read_submission(tmp_path / "none.csv")
