"""Tile geometry shared by the data, loss and inference stages: 101x101 tiles <-> 128x128 network inputs."""

from __future__ import annotations

import torch

TILE_SIZE = 101


def pad_widths(size: int = TILE_SIZE, target: int = 128) -> tuple[int, int]:
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
