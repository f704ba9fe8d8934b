"""Horizontal-flip test-time augmentation on probabilities.

The network sees the batch and its mirror image in one forward pass; the mirrored prediction is flipped back and
the two probabilities are averaged (the original recipe's TTA).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class FlipPrediction(NamedTuple):
    """Sigmoid probabilities of one forward pass over a batch and its mirror image.

    `prob`, `flipped_prob`: `(B, 1, H, W)`, the latter already flipped back onto the original grid.
    `image_prob`, `flipped_image_prob`: `(B,)` probability that the tile has salt (None when the network has
    no image head).
    """

    prob: torch.Tensor
    flipped_prob: torch.Tensor | None
    image_prob: torch.Tensor | None
    flipped_image_prob: torch.Tensor | None

    def tta(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flip-averaged `(B, 1, H, W)` probability and `(B,)` image probability."""
        if self.flipped_prob is None:
            return self.prob, self.image_prob
        prob = (self.prob + self.flipped_prob) / 2
        if self.image_prob is None:
            return prob, None
        return prob, (self.image_prob + self.flipped_image_prob) / 2


def split_output(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final `(B, 1, H, W)` logit and `(B, 1)` image logit (or None) of a SaltOutput, tuple or bare tensor."""
    if isinstance(output, torch.Tensor):
        return output, None
    if hasattr(output, "logit"):
        return output.logit, getattr(output, "image_logit", None)
    if isinstance(output, (tuple, list)):
        # TorchScript turns the SaltOutput NamedTuple into a plain tuple: (logit, pixel_logits, image_logit)
        return output[0], output[-1] if len(output) == 3 else None
    raise TypeError(f"network output must be a tensor or SaltOutput, got {type(output).__name__}")


@torch.no_grad()
def flip_predict(network: nn.Module, images: torch.Tensor, tta: bool = True) -> FlipPrediction:
    """Run `network` on `(B, 3, H, W)` images (and their horizontal mirror when `tta`) in one batch.

    The caller puts the network in eval mode; BN uses running statistics, so the doubled batch changes nothing.
    """
    batch = torch.cat([images, images.flip(-1)]) if tta else images
    logit, image_logit = split_output(network(batch))
    prob = torch.sigmoid(logit.float())
    image_prob = None if image_logit is None else torch.sigmoid(image_logit.float()).reshape(-1)
    if not tta:
        return FlipPrediction(prob, None, image_prob, None)
    b = images.shape[0]
    return FlipPrediction(
        prob=prob[:b],
        flipped_prob=prob[b:].flip(-1),
        image_prob=None if image_prob is None else image_prob[:b],
        flipped_image_prob=None if image_prob is None else image_prob[b:],
    )


def tta_probabilities(
    network: nn.Module, images: torch.Tensor, tta: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(B, 1, H, W)` salt probability and `(B,)` image probability, flip-averaged when `tta`."""
    return flip_predict(network, images, tta).tta()
