"""TGS competition metric and pixel accuracy, per tile and vectorised over the batch, plus Ignite wrappers.

Competition metric of one tile: IoU of prediction and truth, then the fraction of the thresholds
0.50, 0.55, ..., 0.95 that the IoU strictly exceeds; a tile whose truth is empty scores 1 when the
prediction is empty too, else 0. The leaderboard figure is the mean over tiles.

Not interpreted pixels: a truth pixel labelled IGNORE_LABEL (-1, `saltkit.labels`) is left out of the counts,
whatever the prediction there; a tile's IoU, "empty truth" and pixel accuracy are those of its labelled pixels. A
tile without any labelled pixel has no score: the per-tile functions give NaN for it (average them with
np.nanmean), and the Ignite means leave it out (it counts neither as 1 nor as 0). Truths without -1 take the
unchanged (packed-bit) path.

One name throughout: `competition_metric` (per-tile values) and `CompetitionMetric` (the Ignite mean) here; `metric`
for short in engine metrics, files and columns (`train_metric`, `val_metric`, `best_metric.pt`, `metric_tta`).
"""

from __future__ import annotations

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from .labels import IGNORE_LABEL

# Tiles per chunk when packing masks into bits: keeps the packed rows in cache.
_PACK_CHUNK = 1024


def _flat_numpy(x, name: str, truth: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, H, W) or (N, 1, H, W) numpy/torch of bool/int/binary float -> (numpy (N, H*W), dtype unchanged; bool
    (N, H*W) map of the IGNORE_LABEL pixels, or None when there is none). Only truths (truth=True) may hold -1."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) or (N, 1, H, W), got shape {a.shape}")
    a = a.reshape(len(a), -1)
    ignored = None
    # Float masks must already be binary; thresholding logits or probabilities is the caller's choice.
    if a.dtype.kind == "f":
        binary = (a == 0) | (a == 1)
        if not binary.all():
            ignored = a == IGNORE_LABEL if truth else None
            if ignored is None or not (binary | ignored).all():
                allowed = "0, 1 and -1 (not interpreted)" if truth else "0 and 1"
                raise ValueError(f"{name} is floating point with values other than {allowed}; binarise it first")
    elif truth and a.dtype.kind == "i" and a.size and a.min() < 0:
        ignored = a == IGNORE_LABEL
        if not ignored.any():
            ignored = None
    return a, ignored


def _counts(preds, truths) -> tuple[np.ndarray, np.ndarray | None]:
    """`pixel_counts` and the labelled pixels per tile: int64 (N,), or None when every truth pixel is labelled."""
    (p, _), (t, ignored) = _flat_numpy(preds, "preds"), _flat_numpy(truths, "truths", truth=True)
    if p.shape != t.shape:
        raise ValueError(f"preds {p.shape} and truths {t.shape} differ in shape (after flattening)")
    # Packing 8 pixels per byte reads the masks once (several times faster than a row reduction); popcounts of the
    # packed rows give the counts. packbits takes bool and integer arrays, nonzero = 1.
    labelled = None
    if ignored is not None:  # only labelled pixels count: the prediction and the salt masked by the labelled map
        labelled = ~ignored
        p = (p != 0) & labelled
        t = (t != 0) & labelled
    if p.dtype.kind not in "bui":
        p = p != 0
    if t.dtype.kind not in "bui":
        t = t != 0
    acc = np.uint16 if p.shape[1] < 2**16 else np.uint64
    counts = np.empty((4 if labelled is None else 5, len(p)), dtype=np.int64)
    for lo in range(0, len(p), _PACK_CHUNK):
        pp, pt = np.packbits(p[lo : lo + _PACK_CHUNK], axis=1), np.packbits(t[lo : lo + _PACK_CHUNK], axis=1)
        for row, bits in enumerate((pp & pt, pp, pt)):
            counts[row, lo : lo + _PACK_CHUNK] = np.bitwise_count(bits).sum(1, dtype=acc)
        if labelled is not None:
            bits = np.packbits(labelled[lo : lo + _PACK_CHUNK], axis=1)
            counts[4, lo : lo + _PACK_CHUNK] = np.bitwise_count(bits).sum(1, dtype=acc)
    counts[3] = counts[1] + counts[2] - 2 * counts[0]  # |p xor t| = |p| + |t| - 2 |p and t|
    return counts[:4], None if labelled is None else counts[4]


def pixel_counts(preds, truths) -> np.ndarray:
    """Per-tile pixel counts -> int64 (4, N): intersection, prediction, truth, and differing pixels, over the
    labelled truth pixels (a truth pixel IGNORE_LABEL is counted nowhere).

    Inputs: numpy or torch, (N, H, W) or (N, 1, H, W), nonzero = salt (truths: -1 = not interpreted); no Python
    loop per tile.
    """
    return _counts(preds, truths)[0]


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
    """Competition metric per tile -> float64 (N,), over the labelled truth pixels; NaN for a tile without any (no
    score: average with np.nanmean). Inputs: numpy or torch, (N, H, W) or (N, 1, H, W), nonzero = salt; in truths
    IGNORE_LABEL (-1) = not interpreted."""
    (inter, pred_pixels, truth_pixels, _), labelled = _counts(preds, truths)
    scores = scores_from_counts(inter, pred_pixels + truth_pixels - inter, pred_pixels, truth_pixels)
    if labelled is not None:
        scores[labelled == 0] = np.nan
    return scores


def pixel_accuracy(preds, truths) -> np.ndarray:
    """Fraction of equal pixels per tile among the labelled truth pixels -> float64 (N,); NaN for a tile without
    any. Same inputs as `competition_metric`."""
    (*_, differ), labelled = _counts(preds, truths)
    if labelled is None:
        h, w = np.shape(preds)[-2:]
        return (h * w - differ) / (h * w)
    with np.errstate(invalid="ignore"):  # 0 / 0 -> NaN: no labelled pixel
        return (labelled - differ) / labelled


class _TileMean(Metric):
    """Mean over tiles of a per-tile value of (y_pred > logit_threshold) vs y; sums are all-reduced under DDP.

    y holds 0, 1 or IGNORE_LABEL (not interpreted, left out of each tile's value); a tile without a labelled pixel
    is left out of the mean.

    y_pred holds logits, so the default cut 0 is probability 0.5 (post-processing's `threshold` is a probability);
    0/1 masks pass through the default cut unchanged.
    """

    def __init__(self, logit_threshold: float = 0.0, output_transform=lambda x: x, device="cpu"):
        self.logit_threshold = logit_threshold
        super().__init__(output_transform=output_transform, device=device)

    def _per_tile(self, preds: torch.Tensor, truths: torch.Tensor,
                  labelled: torch.Tensor | None = None) -> np.ndarray:
        """bool (B, P) tensors on any device (truths: labelled salt; labelled: the labelled pixels, None when all
        are) -> float64 (B,) scores, NaN for a tile without labelled pixels."""
        raise NotImplementedError

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._num_tiles = 0

    @reinit__is_reduced
    def update(self, output) -> None:
        """`output` = (y_pred logits (B, 1, H, W), y (B, 1, H, W) in {0, 1, IGNORE_LABEL}); lists of `(1, H, W)`
        tiles (a decollated engine output) are stacked."""
        y_pred, y = (torch.stack(list(v)) if isinstance(v, (list, tuple)) else v for v in output[:2])
        y_pred, y = y_pred.detach(), y.detach()
        if y_pred.shape != y.shape or y.ndim not in (3, 4):
            raise ValueError(f"{type(self).__name__}: y_pred {tuple(y_pred.shape)} and y {tuple(y.shape)} must "
                             "have the same (B, 1, H, W) shape")
        preds = (y_pred > self.logit_threshold).reshape(len(y_pred), -1)
        truths = (y > 0.5).reshape(len(y), -1)
        ignored = (y == IGNORE_LABEL).reshape(len(y), -1)
        if not bool(ignored.any()):
            self._sum += float(self._per_tile(preds, truths).sum())
            self._num_tiles += len(preds)
            return
        scores = self._per_tile(preds, truths, ~ignored)
        scored = ~np.isnan(scores)
        self._sum += float(scores[scored].sum())
        self._num_tiles += int(scored.sum())

    @sync_all_reduce("_sum", "_num_tiles")
    def compute(self) -> float:
        if self._num_tiles == 0:
            raise NotComputableError(f"{type(self).__name__} needs at least one tile with a labelled pixel "
                                     "before compute()")
        return self._sum.item() / self._num_tiles


class CompetitionMetric(_TileMean):
    """Ignite metric: mean competition metric of `y_pred > logit_threshold` against `y`, over the labelled pixels
    of `y` (IGNORE_LABEL: not interpreted) and the tiles that have one.

    Args:
        logit_threshold: salt where the logit is above this (0.0: probability 0.5; 0/1 masks pass unchanged).
        output_transform: the engine's output -> (y_pred logits (B, 1, H, W), y (B, 1, H, W) in {0, 1, -1}).
        device: where the running sums are kept (a torch device or its name).
    """

    def _per_tile(self, preds, truths, labelled=None):
        # Count on the tensors' device; only four (B,) count vectors reach the CPU.
        if labelled is None:
            counts = torch.stack([(preds & truths).sum(1), (preds | truths).sum(1), preds.sum(1), truths.sum(1)])
            return scores_from_counts(*counts.cpu().numpy())
        preds = preds & labelled
        counts = torch.stack([(preds & truths).sum(1), (preds | truths).sum(1), preds.sum(1), truths.sum(1),
                              labelled.sum(1)]).cpu().numpy()
        return np.where(counts[4] == 0, np.nan, scores_from_counts(*counts[:4]))


class PixelAccuracy(_TileMean):
    """Ignite metric: mean per-tile pixel accuracy of `y_pred > logit_threshold` against `y`, over the labelled
    pixels of `y` (IGNORE_LABEL: not interpreted) and the tiles that have one.

    Args:
        logit_threshold: salt where the logit is above this (0.0: probability 0.5; 0/1 masks pass unchanged).
        output_transform: the engine's output -> (y_pred logits (B, 1, H, W), y (B, 1, H, W) in {0, 1, -1}).
        device: where the running sums are kept (a torch device or its name).
    """

    def _per_tile(self, preds, truths, labelled=None):
        if labelled is None:
            return (preds == truths).sum(1).cpu().numpy() / preds.shape[1]
        counts = torch.stack([((preds == truths) & labelled).sum(1), labelled.sum(1)]).cpu().numpy()
        with np.errstate(invalid="ignore"):  # 0 / 0 -> NaN: no labelled pixel
            return counts[0] / counts[1]
