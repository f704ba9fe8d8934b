"""No-data areas: which pixels of a section, or samples of a volume, hold data to predict.

A pixel has no data when its value is NaN, equals the fill value (`--fill-value`), is transparent (the image's
alpha channel, as `saltkit mosaic` writes for absent cells) or is zero in a valid-data mask image
(`--valid-mask`, non-zero = valid). In a SEG-Y volume a missing trace (a hole in the inline / crossline grid) and a
dead trace (every sample zero) have no data, and so do NaN and fill-value samples. No-data pixels are fed to the
network as the data mirrored across their edge (`fill_no_data`), so that they do not disturb their neighbours,
and their probability is NaN: they are not predicted, not counted in the salt share, and drawn hatched in the
pictures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from saltkit.seismic.section_files import read_section


def read_valid_mask(path: str | Path) -> np.ndarray:
    """(H, W) bool of a valid-data mask image (PNG / TIFF / .npy, grey or grey in RGB): non-zero = valid."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"valid-data mask not found: {path} (--valid-mask); pass an image the size of the "
                                "section, non-zero where there is data")
    values = read_section(path)
    return np.nan_to_num(values.astype(np.float64), nan=0.0) != 0


def section_valid(raw: np.ndarray, fill_value: float | None = None, alpha: np.ndarray | None = None,
                  mask: np.ndarray | None = None, source: str = "section") -> np.ndarray:
    """(H, W) bool: pixels of the (H, W) section values `raw` that hold data (see the module docstring).

    alpha: the image's alpha channel (0 = transparent = no data); mask: a valid-data mask of the same size.
    """
    valid = np.isfinite(raw) if raw.dtype.kind == "f" else np.ones(raw.shape, bool)
    if fill_value is not None:
        valid &= raw != fill_value
    if alpha is not None:
        valid &= alpha > 0
    if mask is not None:
        if mask.shape != raw.shape:
            raise ValueError(f"{source}: the valid-data mask is {mask.shape[0]}x{mask.shape[1]} pixels but the "
                             f"section is {raw.shape[0]}x{raw.shape[1]}; pass a --valid-mask of the section's size")
        valid &= mask
    return valid


def fill_no_data(grey: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H, W) float32 network input with the no-data pixels filled: each takes the value of its mirror image across
    the nearest valid pixel (the reflection training pads tiles with), or, where the mirror has no data either, the
    mean grey of the valid pixels. A flat fill would read as salt and bleed into the edges of the data."""
    from scipy.ndimage import distance_transform_edt

    grey = np.asarray(grey, dtype=np.float32)
    if valid.all() or not valid.any():
        return grey
    near_y, near_x = distance_transform_edt(~valid, return_distances=False, return_indices=True)
    rows, cols = np.indices(valid.shape)
    my, mx = 2 * near_y - rows, 2 * near_x - cols
    inside = (my >= 0) & (my < valid.shape[0]) & (mx >= 0) & (mx < valid.shape[1])
    my, mx = np.where(inside, my, near_y), np.where(inside, mx, near_x)
    mirrored = inside & valid[my, mx]
    out = np.where(mirrored, grey[my, mx], np.float32(grey[valid].mean()))
    out[valid] = grey[valid]
    return out.astype(np.float32)


def dead_traces(amplitudes: np.ndarray) -> np.ndarray:
    """(n,) bool: the rows of `(n, samples)` amplitudes that are dead (every sample zero) or missing (all NaN)."""
    values = np.nan_to_num(amplitudes, nan=0.0)
    return ~values.any(axis=1)


def trace_valid(amplitudes: np.ndarray, fill_value: float | None = None) -> np.ndarray:
    """(n, samples) bool: the samples of `(n, samples)` SEG-Y amplitudes (NaN rows: missing traces) that hold
    data: not in a dead or missing trace, not NaN, not the fill value."""
    valid = np.isfinite(amplitudes) & ~dead_traces(amplitudes)[:, None]
    if fill_value is not None:
        valid &= amplitudes != fill_value
    return valid


def salt_share(prob: np.ndarray, threshold: float) -> float:
    """Share of the pixels with data (finite probability) whose probability is above `threshold` (0 when none)."""
    known = np.isfinite(prob)
    count = int(known.sum())
    return float((prob[known] > threshold).sum() / count) if count else 0.0
