"""K-fold splits: coverage classes, stratification, determinism, the CSV round trip and bad folds files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from saltkit.data import layout
from saltkit.data.folds import (
    coverage_class,
    ensure_folds,
    folds_for_dataset,
    make_folds,
    mask_coverage,
    read_folds,
    split_items,
    write_folds,
)
from saltkit.data.layout import DatasetError, copy_subset, load_mask, sample_dir, train_items


@pytest.fixture
def tiny(tmp_path):
    ids = [it["id"] for it in train_items(sample_dir())][:20]
    return copy_subset(sample_dir(), tmp_path / "tgs", ids)


def test_coverage_class():
    n = 101 * 101
    cov = np.array([0, 1 / n, 0.0999, 0.1, 0.55, 0.9, 1.0])
    np.testing.assert_array_equal(coverage_class(cov), [-1, 0, 0, 1, 5, 9, 9])
    masks = np.zeros((3, 101, 101), np.uint8)
    masks[1, :, :51] = 1
    masks[2] = 255
    np.testing.assert_allclose(mask_coverage(masks), [0, 51 / 101, 1])
    np.testing.assert_array_equal(coverage_class(masks), [-1, 5, 9])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        coverage_class(np.array([0.5, 1.5]))


def test_make_folds_stratified_and_deterministic(sample_dir):
    items = train_items(sample_dir)
    ids = [it["id"] for it in items]
    masks = np.stack([load_mask(it["label"]) for it in items])
    folds = make_folds(ids, masks, k=10, seed=0)
    assert list(folds.columns) == ["id", "fold", "coverage_class"] and folds["id"].tolist() == sorted(ids)
    assert folds.groupby("fold").size().tolist() == [10] * 10
    # Every class is spread evenly: its count per fold differs by at most one.
    per_class = pd.crosstab(folds["coverage_class"], folds["fold"]).reindex(columns=range(10), fill_value=0)
    assert ((per_class.max(axis=1) - per_class.min(axis=1)) <= 1).all()
    assert per_class.loc[-1].sum() == int((masks.reshape(100, -1).sum(1) == 0).sum())
    # Same inputs in another order -> the same table; another seed -> another split.
    rev = make_folds(ids[::-1], masks[::-1], k=10, seed=0)
    pd.testing.assert_frame_equal(rev, folds)
    other = make_folds(ids, masks, k=10, seed=1)
    assert not other["fold"].equals(folds["fold"])
    pd.testing.assert_frame_equal(other[["id", "coverage_class"]], folds[["id", "coverage_class"]])


def test_make_folds_errors():
    with pytest.raises(ValueError, match="k=1"):
        make_folds(["a", "b"], [0.1, 0.2], k=1)
    with pytest.raises(ValueError, match="k=3"):
        make_folds(["a", "b"], [0.1, 0.2], k=3)
    with pytest.raises(ValueError, match="duplicate ids: a"):
        make_folds(["a", "a"], [0.1, 0.2], k=2)
    with pytest.raises(ValueError, match="2 ids but 3"):
        make_folds(["a", "b"], [0.1, 0.2, 0.3], k=2)


def test_write_read_round_trip(tmp_path):
    folds = make_folds([f"id{i:02d}" for i in range(30)], np.linspace(0, 1, 30), k=3, seed=4)
    path = tmp_path / "folds.csv"
    write_folds(folds, path)
    assert path.read_text().splitlines()[0] == "id,fold,coverage_class"
    back = read_folds(path, k=3)
    pd.testing.assert_frame_equal(back, folds)
    assert [p.name for p in tmp_path.iterdir()] == ["folds.csv"]  # no temp file left


def test_ids_that_look_like_numbers_stay_strings(tmp_path):
    folds = make_folds(["1e05", "0012", "abc", "7"], [0, 0.5, 0.2, 0], k=2)
    write_folds(folds, tmp_path / "f.csv")
    assert sorted(read_folds(tmp_path / "f.csv")["id"]) == ["0012", "1e05", "7", "abc"]


@pytest.mark.parametrize(
    "text, k, message",
    [
        ("id,fold\na,0\n", None, "header is id,fold; expected id,fold,coverage_class"),
        ("id,fold,coverage_class\na,0,1\nb,x,1\n", None, "line 3 \\(id b\\): fold 'x' is not an integer"),
        ("id,fold,coverage_class\na,0,1\nb,1.5,1\n", None, "line 3 \\(id b\\): fold '1.5' is not an integer"),
        ("id,fold,coverage_class\na,0,1\nb,-1,1\n", None, "line 3 \\(id b\\): fold -1 < 0"),
        ("id,fold,coverage_class\na,0,1\nb,2,1\n", None, "fold\\(s\\) 1 have no ids"),
        ("id,fold,coverage_class\na,0,1\nb,5,1\n", 3, "line 3 \\(id b\\): fold 5 is outside 0..2 for k=3"),
        ("id,fold,coverage_class\na,0,1\nb,1,1\n", 3, "has 2 folds \\(0..1\\); expected k=3"),
        ("id,fold,coverage_class\na,0,1\na,1,1\n", None, "id a appears 2 times \\(lines 2, 3\\)"),
        ("id,fold,coverage_class\na,0,12\nb,1,1\n", None, "line 2 \\(id a\\): coverage_class 12 is outside"),
    ],
)
def test_read_folds_rejects(tmp_path, text, k, message):
    path = tmp_path / "folds.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=f"{path}.*{message}"):
        read_folds(path, k=k)


def test_write_folds_invalid_leaves_nothing(tmp_path):
    bad = pd.DataFrame({"id": ["a", "b"], "fold": [0, 2], "coverage_class": [0, 0]})
    with pytest.raises(DatasetError, match="fold\\(s\\) 1 have no ids"):
        write_folds(bad, tmp_path / "f.csv")
    with pytest.raises(ValueError, match="columns"):
        write_folds(bad[["id", "fold"]], tmp_path / "f.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_folds(make_folds(["a", "b"], [0, 0], k=2), tmp_path / "no" / "f.csv")
    assert list(tmp_path.iterdir()) == []


def test_split_items(sample_dir):
    items = train_items(sample_dir)
    folds = folds_for_dataset(sample_dir, k=5)
    seen = []
    for fold in range(5):
        train, val = split_items(items, folds, fold)
        assert len(train) == 80 and len(val) == 20
        assert {it["id"] for it in val} == set(folds.loc[folds["fold"] == fold, "id"])
        assert not {it["id"] for it in train} & {it["id"] for it in val}
        seen += [it["id"] for it in val]
    assert sorted(seen) == sorted(it["id"] for it in items)
    for bad in (5, -1, "2"):
        with pytest.raises(DatasetError, match=f"fold {bad!r} is not a valid fold: expected an integer in 0..4"):
            split_items(items, folds, bad)
    with pytest.raises(DatasetError, match="ids not in the folds table"):
        split_items(items, folds.iloc[1:], 0)
    with pytest.raises(DatasetError, match="folds table ids not among the items"):
        split_items(items[1:], folds, 0)


def test_ensure_folds(tiny, tmp_path):
    path = tmp_path / "folds.csv"
    created = ensure_folds(tiny, path, k=4)
    assert path.is_file() and len(created) == 20
    mtime = path.stat().st_mtime_ns
    again = ensure_folds(tiny, path, k=4)
    pd.testing.assert_frame_equal(again, created)
    assert path.stat().st_mtime_ns == mtime  # read, not rewritten
    with pytest.raises(DatasetError, match="has 4 folds \\(0..3\\); expected k=5"):
        ensure_folds(tiny, path, k=5)
    gone = created["id"].iloc[0]
    for sub in ("images", "masks"):
        (tiny / "train" / sub / f"{gone}.png").unlink()
    with pytest.raises(DatasetError, match=f"{path}: folds file does not match the dataset \\(ids not in .*{gone}"):
        ensure_folds(tiny, path, k=4)


def test_ensure_folds_bad_dataset_writes_nothing(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        ensure_folds(tmp_path / "missing", tmp_path / "folds.csv")
    assert not (tmp_path / "folds.csv").exists()
    assert layout.sample_dir().is_dir()


def write_lists(folder, folds: list[list[str]]) -> tuple[list, list]:
    """The original recipe's layout: list_valid{k}.csv and list_train{k}.csv, one id per line, no header."""
    folder.mkdir(parents=True, exist_ok=True)
    valid, train = [], []
    for k, ids in enumerate(folds):
        others = [i for j, f in enumerate(folds) if j != k for i in f]
        valid.append(folder / f"list_valid{k}.csv")
        train.append(folder / f"list_train{k}.csv")
        valid[-1].write_text("\n".join(ids) + "\n")
        train[-1].write_text("\n".join(others) + "\n")
    return valid, train


def test_folds_from_the_original_id_lists(tiny, tmp_path):
    from saltkit.cli import main
    from saltkit.data.folds import folds_from_id_lists

    ids = sorted(it["id"] for it in train_items(tiny))
    folds = [ids[k::4] for k in range(4)]
    valid, train = write_lists(tmp_path / "lists", folds)
    df = folds_from_id_lists(tiny, valid, train)
    assert dict(zip(df["id"], df["fold"], strict=True)) == {i: k for k, f in enumerate(folds) for i in f}
    assert list(df["coverage_class"]) == list(coverage_class(np.array([load_mask(tiny / "train" / "masks" / f"{i}.png").mean()
                                                                          for i in df["id"]])))
    # the first line is an id too (the original's pandas read dropped it as a header)
    assert folds[0][0] in set(df["id"][df["fold"] == 0])
    out = tmp_path / "folds.csv"
    assert main(["folds", str(tiny), "--valid-lists", *map(str, valid), "--train-lists", *map(str, train),
                 "--out", str(out)]) == 0
    assert ensure_folds(tiny, out, k=4).equals(df)  # a normal folds CSV: --folds_csv takes it

    # a reduced dataset: listed ids it lacks are refused, or left out with present_only
    extra = folds[0] + ["0000000000"]
    valid, train = write_lists(tmp_path / "more", [extra, *folds[1:]])
    with pytest.raises(DatasetError, match=r"list_valid0.csv line 6: id 0000000000 is not a train id"):
        folds_from_id_lists(tiny, valid)
    assert folds_from_id_lists(tiny, valid, train, present_only=True).equals(df)


def test_folds_from_id_lists_errors(tiny, tmp_path):
    from saltkit.data.folds import folds_from_id_lists

    ids = sorted(it["id"] for it in train_items(tiny))
    valid, train = write_lists(tmp_path / "dup", [ids[:10], ids[9:]])
    with pytest.raises(DatasetError, match=rf"list_valid1.csv line 1: id {ids[9]} is already listed in .*list_valid0.csv"):
        folds_from_id_lists(tiny, valid)
    valid, _ = write_lists(tmp_path / "short", [ids[:10], ids[10:-1]])
    with pytest.raises(DatasetError, match=rf"in no validation list: {ids[-1]}"):
        folds_from_id_lists(tiny, valid)
    valid, train = write_lists(tmp_path / "train", [ids[:10], ids[10:]])
    train[1].write_text("\n".join(ids[:9]) + "\n")
    with pytest.raises(DatasetError, match=rf"list_train1.csv: the training list of fold 1 .*{ids[9]}"):
        folds_from_id_lists(tiny, valid, train)
