"""The evaluate workflow's pieces: which labelled tiles to score, the per-tile table and the worst-tiles picture.

The evaluate bundle (bundles/saltnet/configs/evaluate.json) runs a MONAI SupervisedEvaluator with flip TTA and
`saltkit.inference.EvaluationReport`, which writes `tiles.csv` (id, coverage, iou, score, iou_tta, score_tta; one
row per tile) and `worst_tiles.png` (the lowest TTA scores) with these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from saltkit.io import atomic_write
from saltkit.metrics import kaggle_scores

EVAL_SETS = ("fold", "all")


def labelled_items(dataset_dir, eval_set: str = "fold", folds_csv=None, num_folds: int = 10, fold: int = 0) -> list:
    """Data dicts to evaluate: the validation items of `fold` ("fold") or every train tile of `dataset_dir` ("all")."""
    from saltkit.data import train_items
    from saltkit.training import fold_split

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


def tile_table(ids: Sequence[str], truths: np.ndarray, plain: np.ndarray, tta: np.ndarray) -> pd.DataFrame:
    """Per-tile DataFrame: id, coverage (salt fraction of the truth), iou, score (no TTA), iou_tta, score_tta."""
    return pd.DataFrame(
        {
            "id": list(ids),
            "coverage": truths.reshape(len(truths), -1).mean(axis=1),
            "iou": iou_per_tile(plain, truths),
            "score": kaggle_scores(plain, truths),
            "iou_tta": iou_per_tile(tta, truths),
            "score_tta": kaggle_scores(tta, truths),
        }
    )


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write an 8-bit grey `(H, W)` or RGB `(H, W, 3)` image atomically."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")
    return path
