"""Batched prediction over a MONAI DataLoader: network -> (flip TTA) -> probabilities on the 101 x 101 grid."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from saltkit.inference.restore import restore_tiles
from saltkit.inference.tta import flip_predict


@dataclass
class TilePredictions:
    """Per-tile outputs in loader order.

    ids (N,) str; probs (N, 101, 101) float32 salt probability (flip-averaged when TTA was on);
    image_probs (N,) float32 or None (network without image head);
    plain_probs / plain_image_probs: the same without TTA (only when asked for with `keep_plain`).
    """

    ids: np.ndarray
    probs: np.ndarray
    image_probs: np.ndarray | None = None
    plain_probs: np.ndarray | None = None
    plain_image_probs: np.ndarray | None = None


def _plain_tensor(x) -> torch.Tensor:
    """Drop MONAI's MetaTensor wrapper: the network needs only the pixels and runs faster on a plain tensor."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def _cat(chunks: list) -> np.ndarray | None:
    return None if not chunks or chunks[0] is None else np.concatenate(chunks)


@torch.no_grad()
def predict_tiles(
    network: nn.Module,
    loader: Iterable[dict],
    variant: str,
    tta: bool = True,
    device: str | torch.device = "cpu",
    keep_plain: bool = False,
    progress: bool = True,
    desc: str = "predict",
) -> TilePredictions:
    """Predict every batch `{"image": (B, 3, H, W), "id": [B str]}` of `loader`.

    The network output is restored to 101 x 101 according to `variant` ("pad": centre crop, "resize": bilinear).
    Shows a tqdm progress bar (on stderr) unless `progress=False`.
    """
    network.eval()
    ids, probs, image_probs, plain, plain_image = [], [], [], [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc=desc, unit="batch", disable=not progress, leave=False):
        images = _plain_tensor(batch["image"]).to(device, non_blocking=True).float()
        pred = flip_predict(network, images, tta)
        prob, image_prob = pred.tta()
        ids.extend(str(i) for i in batch["id"])
        probs.append(restore_tiles(prob, variant)[:, 0].cpu().numpy())
        image_probs.append(None if image_prob is None else image_prob.cpu().numpy())
        if keep_plain:
            plain.append(restore_tiles(pred.prob, variant)[:, 0].cpu().numpy())
            plain_image.append(None if pred.image_prob is None else pred.image_prob.cpu().numpy())
    if not ids:
        raise ValueError("nothing to predict: the loader yielded no tiles")
    return TilePredictions(
        ids=np.asarray(ids),
        probs=np.concatenate(probs).astype(np.float32),
        image_probs=_cat(image_probs),
        plain_probs=_cat(plain),
        plain_image_probs=_cat(plain_image),
    )
