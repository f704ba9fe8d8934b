"""TGS competition metric and pixel accuracy, per tile and vectorised over the batch, plus Ignite wrappers.

Competition metric of one tile: IoU of prediction and truth, then the fraction of the thresholds
0.50, 0.55, ..., 0.95 that the IoU strictly exceeds; a tile whose truth is empty scores 1 when the
prediction is empty too, else 0. The leaderboard figure is the mean over tiles.

One name throughout: `competition_metric` (per-tile values) and `CompetitionMetric` (the Ignite mean) here; `metric`
for short in engine metrics, files and columns (`train_metric`, `val_metric`, `best_metric.pt`, `metric_tta`).
"""

from __future__ import annotations

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

# Tiles per chunk when packing masks into bits: keeps the packed rows in cache.
_PACK_CHUNK = 1024


def _flat_numpy(x, name: str) -> np.ndarray:
    """(N, H, W) or (N, 1, H, W) numpy/torch of bool/int/binary float -> numpy (N, H*W), dtype unchanged."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) or (N, 1, H, W), got shape {a.shape}")
    # Float masks must already be binary; thresholding logits or probabilities is the caller's choice.
    if a.dtype.kind == "f" and not ((a == 0) | (a == 1)).all():
        raise ValueError(f"{name} is floating point with values other than 0 and 1; binarise it first")
    return a.reshape(len(a), -1)


def pixel_counts(preds, truths) -> np.ndarray:
    """Per-tile pixel counts -> int64 (4, N): intersection, prediction, truth, and differing pixels.

    Inputs: numpy or torch, (N, H, W) or (N, 1, H, W), nonzero = salt; no Python loop per tile.
    """
    p, t = _flat_numpy(preds, "preds"), _flat_numpy(truths, "truths")
    if p.shape != t.shape:
        raise ValueError(f"preds {p.shape} and truths {t.shape} differ in shape (after flattening)")
    # Packing 8 pixels per byte reads the masks once (several times faster than a row reduction); popcounts of the
    # packed rows give the counts. packbits takes bool and integer arrays, nonzero = 1.
    if p.dtype.kind not in "bui":
        p = p != 0
    if t.dtype.kind not in "bui":
        t = t != 0
    acc = np.uint16 if p.shape[1] < 2**16 else np.uint64
    counts = np.empty((4, len(p)), dtype=np.int64)
    for lo in range(0, len(p), _PACK_CHUNK):
        pp, pt = np.packbits(p[lo : lo + _PACK_CHUNK], axis=1), np.packbits(t[lo : lo + _PACK_CHUNK], axis=1)
        for row, bits in enumerate((pp & pt, pp, pt)):
            counts[row, lo : lo + _PACK_CHUNK] = np.bitwise_count(bits).sum(1, dtype=acc)
    counts[3] = counts[1] + counts[2] - 2 * counts[0]  # |p xor t| = |p| + |t| - 2 |p and t|
    return counts


def scores_from_counts(inter: np.ndarray, union: np.ndarray, pred_pixels: np.ndarray,
                       truth_pixels: np.ndarray) -> np.ndarray:
    """Competition metric per tile from its pixel counts (int arrays (N,)) -> float64 (N,)."""
    inter, union = np.asarray(inter, np.int64), np.asarray(union, np.int64)
    # Thresholds 0.50..0.95 as k / 20: IoU > k / 20  <=>  20 * inter > k * union, exact in integers.
    twentieths = np.arange(10, 20, dtype=np.int64)
    hits = (20 * inter[:, None] > twentieths[None, :] * union[:, None]).sum(1)
    scores = hits / len(twentieths)
    truth_empty = np.asarray(truth_pixels) == 0
    return np.where(truth_empty, (np.asarray(pred_pixels) == 0).astype(np.float64), scores)


def competition_metric(preds, truths) -> np.ndarray:
    """Competition metric per tile -> float64 (N,). Inputs: numpy or torch, (N, H, W) or (N, 1, H, W), nonzero = salt."""
    inter, pred_pixels, truth_pixels, _ = pixel_counts(preds, truths)
    return scores_from_counts(inter, pred_pixels + truth_pixels - inter, pred_pixels, truth_pixels)


def pixel_accuracy(preds, truths) -> np.ndarray:
    """Fraction of equal pixels per tile -> float64 (N,). Same inputs as `competition_metric`."""
    differ = pixel_counts(preds, truths)[3]
    h, w = np.shape(preds)[-2:]
    return (h * w - differ) / (h * w)


class _TileMean(Metric):
    """Mean over tiles of a per-tile value of (y_pred > logit_threshold) vs y; sums are all-reduced under DDP.

    y_pred holds logits, so the default cut 0 is probability 0.5 (post-processing's `threshold` is a probability);
    0/1 masks pass through the default cut unchanged.
    """

    def __init__(self, logit_threshold: float = 0.0, output_transform=lambda x: x, device="cpu"):
        self.logit_threshold = logit_threshold
        super().__init__(output_transform=output_transform, device=device)

    def _per_tile(self, preds: torch.Tensor, truths: torch.Tensor) -> np.ndarray:
        """bool (B, P) tensors on any device -> float64 (B,) scores."""
        raise NotImplementedError

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._num_tiles = 0

    @reinit__is_reduced
    def update(self, output) -> None:
        """`output` = (y_pred logits (B, 1, H, W), y binary (B, 1, H, W)); lists of `(1, H, W)` tiles (a decollated
        engine output) are stacked."""
        y_pred, y = (torch.stack(list(v)) if isinstance(v, (list, tuple)) else v for v in output[:2])
        y_pred, y = y_pred.detach(), y.detach()
        if y_pred.shape != y.shape or y.ndim not in (3, 4):
            raise ValueError(f"{type(self).__name__}: y_pred {tuple(y_pred.shape)} and y {tuple(y.shape)} must "
                             "have the same (B, 1, H, W) shape")
        preds = (y_pred > self.logit_threshold).reshape(len(y_pred), -1)
        truths = (y > 0.5).reshape(len(y), -1)
        self._sum += float(self._per_tile(preds, truths).sum())
        self._num_tiles += len(preds)

    @sync_all_reduce("_sum", "_num_tiles")
    def compute(self) -> float:
        if self._num_tiles == 0:
            raise NotComputableError(f"{type(self).__name__} needs at least one batch before compute()")
        return self._sum.item() / self._num_tiles


class CompetitionMetric(_TileMean):
    """Ignite metric: mean competition metric of `y_pred > logit_threshold` against binary `y`.

    Args:
        logit_threshold: salt where the logit is above this (0.0: probability 0.5; 0/1 masks pass unchanged).
        output_transform: the engine's output -> (y_pred logits (B, 1, H, W), y binary (B, 1, H, W)).
        device: where the running sums are kept (a torch device or its name).
    """

    def _per_tile(self, preds, truths):
        # Count on the tensors' device; only four (B,) count vectors reach the CPU.
        counts = torch.stack([(preds & truths).sum(1), (preds | truths).sum(1), preds.sum(1), truths.sum(1)])
        return scores_from_counts(*counts.cpu().numpy())


class PixelAccuracy(_TileMean):
    """Ignite metric: mean per-tile pixel accuracy of `y_pred > logit_threshold` against binary `y`.

    Args:
        logit_threshold: salt where the logit is above this (0.0: probability 0.5; 0/1 masks pass unchanged).
        output_transform: the engine's output -> (y_pred logits (B, 1, H, W), y binary (B, 1, H, W)).
        device: where the running sums are kept (a torch device or its name).
    """

    def _per_tile(self, preds, truths):
        return (preds == truths).sum(1).cpu().numpy() / preds.shape[1]
