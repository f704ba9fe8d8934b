"""Data-layer cases: batch RLE encoding and the competition score, against the original recipe's algorithms
(benchmarks/baselines.py), on the train masks of $SALTKIT_DATA when set (`benchmarks.run.benchmark_data`),
else on the shipped sample's, repeated."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.baselines import competition_metric_original, rle_encode_original
from benchmarks.run import Case, benchmark_data
from saltkit.data.layout import load_mask, sample_dir
from saltkit.metrics import competition_metric
from saltkit.rle import rle_encode


def data_with(part: str) -> Path:
    """$SALTKIT_DATA when it holds `part` (e.g. "train/masks"), else the shipped sample."""
    data = benchmark_data()
    return data if data is not None and (data / part).is_dir() else sample_dir()


def real_masks(n: int) -> np.ndarray:
    """n real masks (N, 101, 101) uint8: the train masks of $SALTKIT_DATA or of the sample, repeated."""
    root = data_with("train/masks")
    files = sorted((root / "train" / "masks").glob("*.png"))
    masks = np.stack([load_mask(f) for f in files])
    return np.resize(masks, (n, *masks.shape[1:]))


def _score_inputs(n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    truths = real_masks(n)
    rng = np.random.default_rng(0)
    # Predictions: the truth shifted by a few pixels, with some tiles emptied (realistic IoU spread).
    preds = np.stack([np.roll(t, rng.integers(-4, 5), axis=rng.integers(0, 2)) for t in truths])
    preds[rng.random(n) < 0.1] = 0
    return preds, truths


def _data() -> str:
    root = data_with("train/masks")
    return "sample masks" if root == sample_dir() else f"train masks of {root}"


def _same_strings(ours: list[str], baseline: list[str]) -> dict:
    return {"identical": ours == baseline, "data": _data()}


def _same_scores(ours: np.ndarray, baseline: np.ndarray) -> dict:
    return {"identical": bool(np.array_equal(ours, baseline)), "data": _data()}


CASES = [
    Case(
        name="rle_encode_18000",
        setup=lambda: real_masks(18000),
        ours=rle_encode,
        baseline=rle_encode_original,
        compare=_same_strings,
        baseline_name="the original's algorithm",
        repeat=5,
        notes="18000 real masks (101x101) -> RLE strings; ours: bit-packed changes + digit table; baseline: the "
              "original's algorithm (per mask: pad, diff, str of each number, join)",
    ),
    Case(
        name="competition_metric_4000",
        setup=_score_inputs,
        ours=lambda x: competition_metric(*x),
        baseline=lambda x: competition_metric_original(*x),
        compare=_same_scores,
        baseline_name="the original's algorithm",
        repeat=5,
        notes="4000 real masks vs shifted/emptied predictions; ours: popcounts of bit-packed masks; baseline: the "
              "original's algorithm (per-tile count_nonzero, vectorised thresholds)",
    ),
]
