"""Data-layer cases: batch RLE encoding and the competition score, against per-pixel / per-tile Python loops."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.run import Case
from saltkit.data.layout import load_mask, sample_dir
from saltkit.metrics import kaggle_scores
from saltkit.rle import rle_encode

FULL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tgs"


def real_masks(n: int) -> np.ndarray:
    """n real masks (N, 101, 101) uint8: the full train set when beside the checkout, else the sample, repeated."""
    root = FULL_DATA if (FULL_DATA / "train" / "masks").is_dir() else sample_dir()
    files = sorted((root / "train" / "masks").glob("*.png"))
    masks = np.stack([load_mask(f) for f in files])
    return np.resize(masks, (n, *masks.shape[1:]))


def rle_encode_pixel_loop(masks: np.ndarray) -> list[str]:
    """Baseline: walk each mask's pixels in column-major order in Python, opening and closing runs."""
    out = []
    for mask in masks:
        words, start = [], 0
        # Python ints from tolist(): the fastest honest per-pixel loop (numpy indexing per pixel is ~3x slower).
        for pos, v in enumerate(mask.T.ravel().tolist(), start=1):
            if v:
                if not start:
                    start = pos
            elif start:
                words += [str(start), str(pos - start)]
                start = 0
        if start:
            words += [str(start), str(mask.size + 1 - start)]
        out.append(" ".join(words))
    return out


def kaggle_scores_tile_loop(preds: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """Baseline: one tile at a time, IoU then a loop over the ten thresholds (the usual notebook version)."""
    scores = []
    for p, t in zip(preds, truths, strict=True):
        p, t = p > 0, t > 0
        if not t.any():
            scores.append(float(not p.any()))
            continue
        iou = np.logical_and(p, t).sum() / np.logical_or(p, t).sum()
        scores.append(np.mean([iou > th for th in np.arange(0.5, 1.0, 0.05)]))
    return np.array(scores)


def _score_inputs(n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    truths = real_masks(n)
    rng = np.random.default_rng(0)
    # Predictions: the truth shifted by a few pixels, with some tiles emptied (realistic IoU spread).
    preds = np.stack([np.roll(t, rng.integers(-4, 5), axis=rng.integers(0, 2)) for t in truths])
    preds[rng.random(n) < 0.1] = 0
    return preds, truths


def _same_strings(ours: list[str], baseline: list[str]) -> dict:
    return {"identical": ours == baseline}


def _max_diff(ours: np.ndarray, baseline: np.ndarray) -> dict:
    return {"max_abs_diff": float(np.abs(ours - baseline).max())}


CASES = [
    Case(
        name="rle_encode_18000",
        setup=lambda: real_masks(18000),
        ours=rle_encode,
        baseline=rle_encode_pixel_loop,
        compare=_same_strings,
        repeat=1,
        notes="18000 real masks (101x101) -> RLE strings; baseline: per-pixel Python loop over all 18000",
    ),
    Case(
        name="kaggle_score_4000",
        setup=_score_inputs,
        ours=lambda x: kaggle_scores(*x),
        baseline=lambda x: kaggle_scores_tile_loop(*x),
        compare=_max_diff,
        notes="4000 real masks vs shifted/emptied predictions; baseline: per-tile loop with a threshold loop",
    ),
]
