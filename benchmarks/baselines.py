"""The original recipe's own algorithms, written from their descriptions: the baselines of the benchmarks and the
references of the value-equality tests (tests/test_baselines.py). Not part of the saltkit package.

- `rle_encode_original`: flatten column-major, pad a 0 at both ends, the positions where the value changes are
  run starts and ends, lengths = ends - starts, joined as a string.
- `competition_metric_original`: per tile count_nonzero of truth * pred and truth + pred in a list comprehension, IoU,
  the ten thresholds compared in one vectorised step, empty truths fixed afterwards.
- `symmetric_lovasz_original`: a Python loop over images, the elu + 1 Lovasz hinge of each flattened image, mean
  over images; symmetric = the mean of that on (logits, labels) and on (-logits, 1 - labels).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

THRESHOLDS = np.arange(0.5, 1.0, 0.05)


def rle_encode_original(masks: np.ndarray) -> list[str]:
    """(N, H, W) masks (nonzero = salt) -> N competition RLE strings, one mask at a time."""
    out = []
    for mask in masks:
        pixels = np.concatenate([[0], mask.flatten(order="F"), [0]])
        runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
        runs[1::2] -= runs[::2]
        out.append(" ".join(str(x) for x in runs))
    return out


def competition_metric_original(preds: np.ndarray, truths: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 / bool predictions and truths -> float64 (N,) competition scores."""

    def iou(truth: np.ndarray, pred: np.ndarray) -> float:
        intersection = np.count_nonzero(truth * pred)
        union = np.count_nonzero(truth + pred)
        return intersection / union if union else 0.0

    ious = np.array([iou(t, p) for t, p in zip(truths, preds, strict=True)])
    scores = (ious[:, None] > THRESHOLDS[None, :]).mean(axis=1)
    truth_empty = np.array([np.count_nonzero(t.flatten()) == 0 for t in truths])
    pred_empty = np.array([np.count_nonzero(p.flatten()) == 0 for p in preds])
    scores[truth_empty] = pred_empty[truth_empty]
    return scores


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. errors sorted in descending order."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def _lovasz_hinge_flat(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """elu + 1 Lovasz hinge of one flattened image: (P,) logits and {0, 1} labels -> scalar."""
    signs = 2.0 * labels - 1.0
    errors = 1.0 - logits * signs
    errors_sorted, perm = torch.sort(errors, dim=0, descending=True)
    grad = _lovasz_grad(labels[perm])
    return torch.dot(F.elu(errors_sorted) + 1, grad)


def lovasz_hinge_original(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over images of the per-image elu + 1 Lovasz hinge: (B, ...) logits and {0, 1} labels -> scalar."""
    losses = [_lovasz_hinge_flat(x.reshape(-1), t.reshape(-1)) for x, t in zip(logits, labels, strict=True)]
    return torch.stack(losses).mean()


def symmetric_lovasz_original(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(lovasz_hinge(logits, labels) + lovasz_hinge(-logits, 1 - labels)) / 2, each a per-image loop."""
    return (lovasz_hinge_original(logits, labels) + lovasz_hinge_original(-logits, 1.0 - labels)) / 2
