"""The evaluate workflow's pieces: which labelled tiles to score, the per-tile table and the worst-tiles picture.

The evaluate bundle (bundles/saltnet/configs/evaluate.json) runs a MONAI SupervisedEvaluator with flip TTA and
`saltkit.inference.EvaluationReport`, which writes `tiles.csv` (id, coverage, iou, metric, iou_tta, metric_tta, and
metric_tuned when it tunes the post-processing; one row per tile), `coverage.csv` (the means per coverage class) and
`worst_tiles.png` (the lowest TTA metric) with these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from saltkit.io import atomic_write
from saltkit.metrics import competition_metric

EVAL_SETS = ("fold", "all")


def labelled_items(dataset_dir, eval_set: str = "fold", folds_csv=None, num_folds: int = 10, fold: int = 0) -> list:
    """Data dicts to evaluate: the validation items of `fold` ("fold") or every train tile of `dataset_dir`
    ("all").

    Args:
        dataset_dir: the dataset folder in the competition layout.
        eval_set: "fold" (the validation tiles of `fold`) or "all" (every labelled tile).
        folds_csv: the fold file (needed with "fold").
        num_folds: the number of folds K.
        fold: the validation fold, 0..num_folds-1.
    """
    from saltkit.data import train_items
    from saltkit.data.folds import fold_split

    if eval_set == "all":
        return train_items(dataset_dir)
    if eval_set != "fold":
        raise ValueError(f"config key 'eval_set' must be one of {EVAL_SETS}, got {eval_set!r}")
    if folds_csv is None:
        raise ValueError("config key 'folds_csv' is needed with eval_set 'fold'")
    return fold_split(dataset_dir, folds_csv, fold, num_folds)[1]


def iou_per_tile(preds: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """IoU of `(N, H, W)` binary predictions vs truths -> float64 `(N,)`; 1.0 when both are empty."""
    p = np.asarray(preds, dtype=bool).reshape(len(preds), -1)
    t = np.asarray(truths, dtype=bool).reshape(len(truths), -1)
    inter = (p & t).sum(axis=1)
    union = (p | t).sum(axis=1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def tile_table(ids: Sequence[str], truths: np.ndarray, plain: np.ndarray, tta: np.ndarray,
               tuned: np.ndarray | None = None) -> pd.DataFrame:
    """Per-tile DataFrame: id, coverage (salt fraction of the truth), iou, metric (no TTA), iou_tta, metric_tta, and
    metric_tuned (TTA, tuned post-processing) when `tuned` masks are given."""
    table = pd.DataFrame(
        {
            "id": list(ids),
            "coverage": truths.reshape(len(truths), -1).mean(axis=1),
            "iou": iou_per_tile(plain, truths),
            "metric": competition_metric(plain, truths),
            "iou_tta": iou_per_tile(tta, truths),
            "metric_tta": competition_metric(tta, truths),
        }
    )
    if tuned is not None:
        table["metric_tuned"] = competition_metric(tuned, truths)
    return table


# Salt cover of the truth: empty, then [0, 5 %), [5 %, 20 %), [20 %, 50 %), [50 %, 100 %]. On 101 x 101 tiles no
# tile sits exactly on a bound (5 % of 10201 pixels is 510.05), so the half-open ends never matter.
COVERAGE_CLASSES = ("empty", "<5%", "5-20%", "20-50%", ">50%")
COVERAGE_BOUNDS = (0.05, 0.20, 0.50)
COVERAGE_TAGS = ("empty", "under5", "5to20", "20to50", "over50")  # TensorBoard tag names


def coverage_class(coverage) -> np.ndarray:
    """Index into COVERAGE_CLASSES of each tile's truth salt cover (fraction of the tile, `(N,)`) -> int `(N,)`."""
    coverage = np.asarray(coverage, dtype=np.float64)
    return np.where(coverage == 0, 0, 1 + np.searchsorted(COVERAGE_BOUNDS, coverage, side="right"))


def coverage_table(table: pd.DataFrame, predicted_empty: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per coverage class and over "all" tiles: tile count, the mean of each metric column of `table` (metric,
    metric_tta, metric_tuned when present; NaN for a class without tiles) and, per `predicted_empty` entry
    (name -> `(N,)` bool), the number of tiles predicted empty."""
    classes = coverage_class(table["coverage"].to_numpy())
    columns = [c for c in ("metric", "metric_tta", "metric_tuned") if c in table]
    rows = []
    for k, name in [*enumerate(COVERAGE_CLASSES), (None, "all")]:
        member = np.ones(len(table), dtype=bool) if k is None else classes == k
        row = {"class": name, "tiles": int(member.sum())}
        row.update({c: float(table[c].to_numpy()[member].mean()) if member.any() else float("nan") for c in columns})
        row.update({n: int(np.asarray(e)[member].sum()) for n, e in predicted_empty.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def coverage_records(coverage: pd.DataFrame) -> list[dict]:
    """Rows of `coverage_table` as plain dicts, None for the means of a class without tiles (JSON has no NaN)."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            for row in coverage.to_dict(orient="records")]


def markdown_table(table: pd.DataFrame, digits: int = 4) -> str:
    """`table` as a markdown table (floats with `digits` decimals, "-" for NaN), e.g. for TensorBoard's text tab."""
    def cell(v):
        if isinstance(v, float):
            return "-" if v != v else f"{v:.{digits}f}"
        return str(v)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write an 8-bit grey `(H, W)` or RGB `(H, W, 3)` image atomically."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")
    return path
