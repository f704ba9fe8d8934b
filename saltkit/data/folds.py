"""Deterministic K-fold splits stratified by salt coverage, stored as CSV so every run of fold k sees the same ids.

Coverage class: -1 for an empty mask, else the tenth of the tile the salt covers (0: under 10%, ..., 9: 90% and up).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import pandas as pd

from saltkit.config import ConfigError
from saltkit.data.layout import DatasetError, csv_line, id_listing, load_mask, read_id_csv, train_items
from saltkit.io import atomic_write

FOLD_COLUMNS = ["id", "fold", "coverage_class"]


def mask_coverage(masks) -> np.ndarray:
    """Fraction of salt pixels per mask: (N, H, W) (nonzero = salt) -> float64 (N,)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    return (masks.reshape(len(masks), -1) != 0).mean(axis=1)


def coverage_class(masks_or_coverage) -> np.ndarray:
    """Coverage class per tile -> int64 (N,): -1 empty, else floor(10 * coverage) capped at 9.

    Input: masks (N, H, W) or coverage fractions (N,) in [0, 1].
    """
    x = np.asarray(masks_or_coverage)
    coverage = mask_coverage(x) if x.ndim == 3 else x.astype(np.float64)
    if coverage.ndim != 1:
        raise ValueError(f"expected masks (N, H, W) or coverage (N,), got shape {x.shape}")
    if len(coverage) and not ((coverage >= 0) & (coverage <= 1)).all():
        raise ValueError("coverage must lie in [0, 1]")
    classes = np.minimum(np.floor(coverage * 10), 9).astype(np.int64)
    return np.where(coverage > 0, classes, -1)


def make_folds(ids, coverage, k: int = 10, seed: int = 0) -> pd.DataFrame:
    """Stratified K-fold assignment -> DataFrame(id, fold, coverage_class) sorted by id.

    `coverage`: (N,) fractions or (N, H, W) masks aligned with `ids`. Within each coverage class the ids are
    shuffled with `seed` and dealt to folds in turn, continuing across classes, so fold sizes differ by at most
    one and so do the class counts. The result depends only on the (id, coverage) pairs, not on their order.
    """
    ids = [str(i) for i in ids]
    classes = coverage_class(coverage)
    if len(classes) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(classes)} coverage values")
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].tolist()
        raise ValueError(f"duplicate ids: {id_listing(dup)}")
    if not 2 <= k <= len(ids):
        raise ValueError(f"k={k} folds needs 2 <= k <= number of ids ({len(ids)})")
    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    sorted_ids, sorted_classes = np.array(ids, dtype=object)[order], classes[order]
    rng = np.random.default_rng(seed)
    dealt = [rng.permutation(np.flatnonzero(sorted_classes == c)) for c in range(-1, 10)]
    dealt_order = np.concatenate(dealt)
    fold = np.empty(len(ids), dtype=np.int64)
    fold[dealt_order] = np.arange(len(ids)) % k
    return pd.DataFrame({"id": sorted_ids.astype(str), "fold": fold, "coverage_class": sorted_classes})


def _check_folds(df: pd.DataFrame, source: str, k: int | None) -> None:
    """Fold numbers contiguous 0..K-1 (and K == k when given), classes in -1..9."""
    folds = df["fold"].to_numpy()
    bad = np.flatnonzero(folds < 0)
    if len(bad):
        raise DatasetError(f"{source} line {csv_line(bad[0])} (id {df['id'].iloc[bad[0]]}): fold {folds[bad[0]]} < 0")
    n_folds = int(folds.max()) + 1 if len(folds) else 0
    if k is not None:
        bad = np.flatnonzero(folds >= k)
        if len(bad):
            raise DatasetError(f"{source} line {csv_line(bad[0])} (id {df['id'].iloc[bad[0]]}): fold {folds[bad[0]]} "
                               f"is outside 0..{k - 1} for k={k}")
        if n_folds != k:
            raise DatasetError(f"{source}: has {n_folds} folds (0..{n_folds - 1}); expected k={k}")
    empty = sorted(set(range(n_folds)) - set(folds.tolist()))
    if empty:
        raise DatasetError(f"{source}: fold(s) {', '.join(map(str, empty))} have no ids; folds must be 0..{n_folds - 1}")
    classes = df["coverage_class"].to_numpy()
    bad = np.flatnonzero((classes < -1) | (classes > 9))
    if len(bad):
        raise DatasetError(f"{source} line {csv_line(bad[0])} (id {df['id'].iloc[bad[0]]}): coverage_class "
                           f"{classes[bad[0]]} is outside -1..9")


def write_folds(df: pd.DataFrame, path: str | Path) -> None:
    """Write a folds table as `id,fold,coverage_class` CSV, atomically (nothing is written if it is invalid)."""
    if list(df.columns) != FOLD_COLUMNS:
        raise ValueError(f"folds table columns are {list(df.columns)}; expected {FOLD_COLUMNS}")
    _check_folds(df, "folds table", None)
    with atomic_write(path) as f:
        df.to_csv(f, index=False)


def read_folds(path: str | Path, k: int | None = None) -> pd.DataFrame:
    """Read a folds CSV -> DataFrame(id: str, fold: int64, coverage_class: int64); checks header, ids, fold range."""
    df = read_id_csv(path, FOLD_COLUMNS)
    out = {"id": df["id"]}
    for col in ("fold", "coverage_class"):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = np.flatnonzero((values.isna() | (values != values.round())).to_numpy())
        if len(bad):
            i = bad[0]
            raise DatasetError(f"{path} line {csv_line(i)} (id {df['id'].iloc[i]}): {col} {df[col].iloc[i]!r} "
                               "is not an integer")
        out[col] = values.astype(np.int64)
    folds = pd.DataFrame(out)
    _check_folds(folds, str(path), k)
    return folds


def split_items(items: list[dict], folds_df: pd.DataFrame, fold: int) -> tuple[list[dict], list[dict]]:
    """Split data dicts (with "id") into (train, validation) for `fold`; the folds table must cover exactly their ids."""
    n_folds = int(folds_df["fold"].max()) + 1 if len(folds_df) else 0
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < n_folds:
        raise DatasetError(f"fold {fold!r} is not a valid fold: expected an integer in 0..{n_folds - 1} "
                           f"(the folds table has {n_folds} folds)")
    fold_of = dict(zip(folds_df["id"], folds_df["fold"].tolist(), strict=True))
    item_ids = [it["id"] for it in items]
    missing = [i for i in item_ids if i not in fold_of]
    if missing:
        raise DatasetError(f"ids not in the folds table: {id_listing(missing)}")
    extra = sorted(set(fold_of) - set(item_ids))
    if extra:
        raise DatasetError(f"folds table ids not among the items: {id_listing(extra)}")
    train = [it for it in items if fold_of[it["id"]] != fold]
    val = [it for it in items if fold_of[it["id"]] == fold]
    return train, val


def folds_for_dataset(dataset_dir: str | Path, k: int = 10, seed: int = 0) -> pd.DataFrame:
    """Folds of the dataset's train tiles, stratified by the coverage of their mask PNGs."""
    items = train_items(dataset_dir)
    coverage = np.array([load_mask(it["label"]).mean() for it in items])
    return make_folds([it["id"] for it in items], coverage, k=k, seed=seed)


def ensure_folds(dataset_dir: str | Path, path: str | Path, k: int = 10, seed: int = 0) -> pd.DataFrame:
    """Folds for `dataset_dir` stored at `path`: created (atomically) when missing, else read and checked.

    An existing file must have `k` folds and list exactly the dataset's train ids, so a run never trains
    on a split made for other data.
    """
    path = Path(path)
    if not path.exists():
        df = folds_for_dataset(dataset_dir, k=k, seed=seed)
        write_folds(df, path)
        return df
    df = read_folds(path, k=k)
    ids = {it["id"] for it in train_items(dataset_dir)}
    listed = set(df["id"])
    if ids != listed:
        parts = []
        if listed - ids:
            parts.append(f"ids not in {dataset_dir}: {id_listing(sorted(listed - ids))}")
        if ids - listed:
            parts.append(f"train ids of {dataset_dir} missing from it: {id_listing(sorted(ids - listed))}")
        raise DatasetError(f"{path}: folds file does not match the dataset ({'; '.join(parts)}); "
                           "delete it to regenerate, or point folds_csv at the right file")
    return df


def read_id_list(path: str | Path) -> list[tuple[int, str]]:
    """(line number, id) for every non-blank line of a file of ids, one per line (the original recipe's fold lists)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the id list ({err})") from err
    return [(n, line.strip()) for n, line in enumerate(lines, start=1) if line.strip()]


def folds_from_id_lists(dataset_dir: str | Path, valid_lists: list[str | Path], train_lists: list[str | Path] | None = None,
                        present_only: bool = False) -> pd.DataFrame:
    """Folds given by id lists -> DataFrame(id, fold, coverage_class): fold k holds the ids of `valid_lists[k]`.

    Every id of the lists is read, the first line too (the original recipe's pandas read took it as a header and
    so dropped one id per list). Ids must not repeat and must be train ids of `dataset_dir`; with `present_only`
    the ids the dataset lacks are left out (a reduced download). Every train id of the dataset must be listed.
    `train_lists[k]`, when given, must hold exactly the ids of the other folds.
    """
    items = {it["id"]: it for it in train_items(dataset_dir)}
    fold_of: dict[str, tuple[int, str]] = {}
    for k, path in enumerate(valid_lists):
        for line, id_ in read_id_list(path):
            if id_ in fold_of:
                raise DatasetError(f"{path} line {line}: id {id_} is already listed in {fold_of[id_][1]}")
            if id_ not in items and not present_only:
                raise DatasetError(f"{path} line {line}: id {id_} is not a train id of {dataset_dir} "
                                   "(pass present_only / --present-only for a reduced dataset)")
            fold_of[id_] = (k, str(path))
    fold_of = {id_: v for id_, v in fold_of.items() if id_ in items}
    unlisted = sorted(set(items) - set(fold_of))
    if unlisted:
        raise DatasetError(f"train ids of {dataset_dir} in no validation list: {id_listing(unlisted)}")
    for k, path in enumerate(train_lists or []):
        listed = {id_ for _, id_ in read_id_list(path) if id_ in items}
        expected = {id_ for id_, (fold, _) in fold_of.items() if fold != k}
        if listed != expected:
            wrong = sorted(listed ^ expected)
            raise DatasetError(f"{path}: the training list of fold {k} is not the ids of the other folds' validation "
                               f"lists (differs in {id_listing(wrong)})")
    ids = sorted(fold_of)
    classes = coverage_class(np.array([load_mask(items[i]["label"]).mean() for i in ids]))
    df = pd.DataFrame({"id": ids, "fold": [fold_of[i][0] for i in ids], "coverage_class": classes})
    _check_folds(df, "the validation lists", len(valid_lists))
    return df


def default_folds_csv(dataset_dir, num_folds: int, root: str | Path = "runs") -> str:
    """`runs/folds/<dataset folder name>-<hash of its absolute path>-k<K>.csv`.

    Beside the runs rather than inside the dataset (the shipped sample may be read-only); the hash keeps the
    splits of different datasets with the same folder name apart.

    Args:
        dataset_dir: the dataset folder in the competition layout.
        num_folds: the number of folds K.
        root: the folder of the runs.
    """
    path = Path(str(dataset_dir)).resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return str(Path(root) / "folds" / f"{path.name}-{digest}-k{num_folds}.csv")


def fold_split(dataset_dir, folds_csv, fold: int, num_folds: int) -> tuple[list[dict], list[dict]]:
    """(train items, validation items) of `fold`; the folds CSV is created on first use (rank 0 writes it).

    Args:
        dataset_dir: the dataset folder in the competition layout.
        folds_csv: the id,fold CSV of the split, written when missing.
        fold: the fold held out for validation, 0..num_folds-1.
        num_folds: the number of folds K.
    """
    folds_csv = Path(str(folds_csv))
    if idist.get_rank() == 0:
        folds_csv.parent.mkdir(parents=True, exist_ok=True)
        ensure_folds(dataset_dir, folds_csv, k=num_folds)
    if idist.get_world_size() > 1:
        idist.barrier()  # the other ranks read the file rank 0 wrote
    try:
        folds = ensure_folds(dataset_dir, folds_csv, k=num_folds)
        return split_items(train_items(dataset_dir), folds, fold)
    except DatasetError as e:
        raise ConfigError(f"config keys 'folds_csv' / 'fold': {e}") from None
