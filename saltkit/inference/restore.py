"""Undo the training-time spatial transform: network maps (128 x 128) back to 101 x 101 tiles."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saltkit.geometry import TILE_SIZE, center_crop

VARIANTS = ("pad", "resize")


def restore_tiles(x: torch.Tensor, variant: str, size: int = TILE_SIZE) -> torch.Tensor:
    """`(B, C, H, W)` maps at network resolution -> `(B, C, size, size)` maps on the tile grid.

    `variant="pad"`: the central `size` x `size` window (inverse of `BorderPadd` with `pad_widths`);
    `variant="resize"`: bilinear resize back (align_corners=False, as MONAI's `Resized` used going in).
    """
    if variant == "pad":
        return center_crop(x, size)
    if variant == "resize":
        if x.shape[-2:] == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    raise ValueError(f"config key 'variant' must be one of {VARIANTS}, got {variant!r}")
