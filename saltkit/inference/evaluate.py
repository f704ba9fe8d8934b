"""The evaluate bundle's entry point: score a checkpoint on labelled tiles, with and without flip TTA.

Writes `tiles.csv` (id, coverage, iou, score, iou_tta, score_tta; one row per tile) and `worst_tiles.png`
(rows of tile | truth | prediction for the lowest TTA scores) to `output_dir`, and prints the means.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from saltkit.data import load_image, load_mask
from saltkit.inference.postprocess import PostProcessing, postprocess
from saltkit.inference.predict import predict_tiles
from saltkit.io import atomic_write
from saltkit.metrics import kaggle_scores

TILES_CSV = "tiles.csv"
WORST_PNG = "worst_tiles.png"
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


def worst_grid(images: np.ndarray, truths: np.ndarray, preds: np.ndarray, columns: int = 4, gap: int = 2) -> np.ndarray:
    """uint8 grey grid of [image | truth | prediction] triplets, `columns` triplets per row, in input order.

    images `(N, H, W)` uint8, truths / preds `(N, H, W)` {0, 1}; panels are separated by `gap` grey pixels.
    """
    n, h, w = images.shape
    rows = -(-n // columns)
    cols = min(n, columns)
    grid = np.full((rows * (h + gap), cols * 3 * (w + gap)), 128, dtype=np.uint8)
    for k in range(n):
        y = (k // columns) * (h + gap)
        for p, panel in enumerate((images[k], truths[k] * 255, preds[k] * 255)):
            x = ((k % columns) * 3 + p) * (w + gap)
            grid[y : y + h, x : x + w] = panel
    return grid


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write an 8-bit grey image atomically."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")
    return path


def run_evaluate(
    network: nn.Module,
    loader: Iterable[dict],
    items: Sequence[dict],
    variant: str,
    output_dir: str | Path,
    postprocessing: PostProcessing | None = None,
    device: str | torch.device = "cpu",
    worst: int = 16,
    progress: bool = True,
) -> dict:
    """Score the network on the labelled `items` (their "label" PNGs are the truth at 101 x 101).

    `loader` yields the same tiles prepared as for training (no augmentation). Returns the mean scores
    {"score", "score_tta", "iou", "iou_tta", "tiles"}.
    """
    settings = postprocessing or PostProcessing()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    preds = predict_tiles(network.to(device), loader, variant, tta=True, device=device, keep_plain=True,
                          progress=progress, desc="evaluate")
    by_id = {str(it["id"]): it for it in items}
    missing = [i for i in preds.ids if i not in by_id]
    if missing:
        raise ValueError(f"predicted ids without a labelled item: {missing[:5]}")
    truths = np.stack([load_mask(by_id[i]["label"]) for i in preds.ids])
    tta = postprocess(preds.probs, preds.image_probs, settings)
    plain = postprocess(preds.plain_probs, preds.plain_image_probs, settings)
    table = tile_table(preds.ids, truths, plain, tta)
    csv_path = output_dir / TILES_CSV
    with atomic_write(csv_path) as f:
        table.to_csv(f, index=False, float_format="%.6g")
    order = np.argsort(table["score_tta"].to_numpy(), kind="stable")[: max(worst, 0)]
    png_path = None
    if len(order):
        images = np.stack([load_image(by_id[preds.ids[k]]["image"]) for k in order])
        png_path = save_png(output_dir / WORST_PNG, worst_grid(images, truths[order], tta[order]))
    means = {
        "tiles": len(table),
        "score": float(table["score"].mean()),
        "score_tta": float(table["score_tta"].mean()),
        "iou": float(table["iou"].mean()),
        "iou_tta": float(table["iou_tta"].mean()),
    }
    print(f"evaluate: {means['tiles']} tiles, {settings}")
    print(f"evaluate: wrote {csv_path}" + (f" and {png_path}" if png_path else ""))
    print(f"evaluate: mean IoU {means['iou']:.4f} without TTA, {means['iou_tta']:.4f} with TTA")
    print(f"evaluate: competition metric {means['score']:.4f} without TTA, {means['score_tta']:.4f} with TTA")
    return means
