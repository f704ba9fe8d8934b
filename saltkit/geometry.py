"""Tile geometry shared by the data, loss and inference stages: 101x101 tiles <-> 128x128 network inputs.

The `variant` decides it all: "pad" reflect-pads a tile 101 -> 128 (13 px before, 14 after) and scores the loss
on the central 101 x 101; "resize" resizes the tile to 128 (bilinear image, nearest mask) and scores the loss on
the whole map. Network maps go back to the tile grid by a central crop (pad) or a bilinear resize (resize).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TILE_SIZE = 101
NETWORK_SIZE = 128
VARIANTS = ("pad", "resize")


def check_variant(variant: str) -> str:
    """`variant` itself when it is one of VARIANTS; else an error naming the config key."""
    if variant not in VARIANTS:
        raise ValueError(f"config key 'variant' must be one of {list(VARIANTS)}, got {variant!r}")
    return variant


def pad_widths(size: int = TILE_SIZE, target: int = NETWORK_SIZE) -> tuple[int, int]:
    """(before, after) padding that takes `size` to `target`; the extra pixel goes after (13, 14 for 101->128)."""
    if target < size:
        raise ValueError(f"cannot pad {size} px to a smaller {target} px")
    before = (target - size) // 2
    return before, target - size - before


def center_crop(x: torch.Tensor, size: int = TILE_SIZE) -> torch.Tensor:
    """Central `size` x `size` window of `(..., H, W)`; the inverse of padding with `pad_widths(size, H)`."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from a {h}x{w} map")
    top, _ = pad_widths(size, h)
    left, _ = pad_widths(size, w)
    return x[..., top : top + size, left : left + size]


def loss_center_crop(variant: str) -> int | None:
    """The central window the loss is scored on: the tile for pad, the whole map (None) for resize.

    Args:
        variant: config key `variant`, "pad" (101 px tiles padded to 128) or "resize" (scaled to 128).
    """
    return TILE_SIZE if check_variant(variant) == "pad" else None


def restore_tiles(x: torch.Tensor, variant: str, size: int = TILE_SIZE) -> torch.Tensor:
    """`(B, C, H, W)` maps at network resolution -> `(B, C, size, size)` maps on the tile grid.

    `variant="pad"`: the central `size` x `size` window (inverse of the tile padding);
    `variant="resize"`: bilinear resize back (align_corners=False, as MONAI's `Resized` used going in).
    """
    if check_variant(variant) == "pad":
        return center_crop(x, size)
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
