"""Map section values (image grey levels, SEG-Y amplitudes) onto the training tiles' [0, 1] intensity scale.

The training tiles are 8-bit grey PNGs read as `grey / 255` (`saltkit.transforms.LoadTiled`); their seismic
amplitudes were already mapped to grey with zero amplitude near mid-grey and a few per cent of pixels at black
and white. So pictures that are already grey levels are divided by their full scale (255 or 65535), and raw
amplitudes (float arrays, SEG-Y samples) are clipped at robust percentiles and scaled linearly:
`(a - lo) / (hi - lo)` clipped to [0, 1], `lo`, `hi` the 1st and 99th percentiles by default (on the training
tiles about 1 % of pixels are black and the mean grey is 0.48).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from saltkit.seismic.validity import fill_no_data

MODES = ("auto", "dtype", "percentile")


@dataclass(frozen=True)
class Normalization:
    """How section values become [0, 1] intensities.

    mode: "auto" (8/16-bit grey by full scale, float already in [0, 1] as is, anything else by percentiles),
    "dtype" (by full scale only; other arrays are an error), "percentile" (always the robust clip).
    percentiles: (low, high) in per cent for the clip. value_range: a fixed (low, high) clip in input units
    that overrides both (the same mapping for every section of a survey, or to reproduce a run).
    """

    mode: str = "auto"
    percentiles: tuple[float, float] = (1.0, 99.0)
    value_range: tuple[float, float] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"normalize must be one of {list(MODES)}, got {self.mode!r}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"clip percentiles must satisfy 0 <= low < high <= 100, got {lo} and {hi}")
        if self.value_range is not None and not self.value_range[0] < self.value_range[1]:
            raise ValueError(f"clip range must have low < high, got {self.value_range}")


FULL_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def percentile_range(values: np.ndarray, percentiles: tuple[float, float], source: str = "input") -> tuple[float, float]:
    """(low, high) percentiles of the finite `values`; an error when they are equal (a constant section)."""
    finite = np.asarray(values, dtype=np.float64).ravel()
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise ValueError(f"{source}: no finite values to normalise")
    lo, hi = (float(v) for v in np.percentile(finite, percentiles))
    if not hi > lo:
        raise ValueError(f"{source}: values between the {percentiles[0]} and {percentiles[1]} percentiles are all "
                         f"{lo}; cannot stretch a constant section (pass a clip range)")
    return lo, hi


def scale_to_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float32 `(values - lo) / (hi - lo)` clipped to [0, 1]; NaN (no data) becomes the mid value of zero input.
    float64 values are scaled in float64 first (they may lie beyond float32's range, ~3.4e38)."""
    values = np.asarray(values)
    work = np.float64 if values.dtype == np.float64 else np.float32
    out = (values.astype(work, copy=False) - work(lo)) / work(hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    out = out.astype(np.float32, copy=False)
    if np.isnan(out).any():
        out[np.isnan(out)] = np.clip(-lo / (hi - lo), 0.0, 1.0)
    return out


def unit_range(arr: np.ndarray, norm: Normalization, source: str = "input") -> tuple[str, float, float]:
    """The mapping `normalize_section` applies to `arr`: (method, low, high) so that low -> 0 and high -> 1."""
    if norm.value_range is not None:
        return "range", float(norm.value_range[0]), float(norm.value_range[1])
    dtype = np.asarray(arr).dtype
    if norm.mode != "percentile":
        if dtype in FULL_SCALE:
            return "dtype", 0.0, FULL_SCALE[dtype]
        if dtype.kind == "f" and np.nanmin(arr) >= 0 and np.nanmax(arr) <= 1:
            return "dtype", 0.0, 1.0
        if norm.mode == "dtype":
            raise ValueError(f"{source}: normalize 'dtype' takes 8-bit or 16-bit grey or floats in [0, 1], got "
                             f"{dtype} values in [{np.nanmin(arr):g}, {np.nanmax(arr):g}]; use normalize "
                             "'percentile' or a clip range")
    if dtype.kind == "b":
        raise ValueError(f"{source}: a boolean array is a mask, not a seismic section")
    lo, hi = percentile_range(arr, norm.percentiles, source)
    return "percentile", lo, hi


def normalize_section(arr: np.ndarray, norm: Normalization = Normalization(), source: str = "input",
                      valid: np.ndarray | None = None):
    """`(H, W)` section values -> (`(H, W)` float32 in [0, 1], {"method", "range"} describing the mapping).

    valid: (H, W) bool, False where there is no data: the mapping is taken from the valid pixels only, and
    no-data pixels are filled from the data around them (`saltkit.seismic.validity.fill_no_data`).
    """
    if valid is None or valid.all():
        method, lo, hi = unit_range(arr, norm, source)
        return scale_to_unit(arr, lo, hi), {"method": method, "range": [lo, hi]}
    if not valid.any():
        raise ValueError(f"{source}: no pixel holds data (every pixel is NaN, the fill value, transparent or outside "
                         "the valid-data mask); check --fill-value and --valid-mask")
    method, lo, hi = unit_range(arr[valid], norm, source)
    return fill_no_data(scale_to_unit(arr, lo, hi), valid), {"method": method, "range": [lo, hi]}
