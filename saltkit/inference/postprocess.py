"""Probabilities -> binary masks: threshold, drop small components, empty tiles judged salt-free.

All rules are off by default except the 0.5 threshold, so the defaults reproduce a plain thresholded prediction;
tune them on a validation fold with the evaluate bundle before switching them on for a submission.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class PostProcessing:
    """Settings of `postprocess` (bundle keys: threshold, min_component_size, image_threshold, min_area).

    threshold: a pixel is salt when its probability is > threshold.
    min_component_size: 4-connected salt components with fewer pixels are removed (0: off).
    image_threshold: a tile is emptied when its image-head probability (sigmoid of the image logit) is below
        this (None: off).
    min_area: a tile is emptied when fewer than this many pixels remain salt (0: off).
    """

    threshold: float = 0.5
    min_component_size: int = 0
    image_threshold: float | None = None
    min_area: int = 0

    def __post_init__(self):
        if isinstance(self.image_threshold, str) and self.image_threshold.strip().lower() in ("null", "none"):
            object.__setattr__(self, "image_threshold", None)  # `--image_threshold null` from the command line
        check_fraction("threshold", self.threshold)
        check_count("min_component_size", self.min_component_size)
        check_count("min_area", self.min_area)
        if self.image_threshold is not None:
            check_fraction("image_threshold", self.image_threshold, " or null")


def check_fraction(key: str, value, alternative: str = "") -> None:
    """ValueError naming config `key` unless `value` is a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 <= value <= 1:
        raise ValueError(f"config key '{key}' must be a number in [0, 1]{alternative}, got {value!r}")


def check_count(key: str, value) -> None:
    """ValueError naming config `key` unless `value` is an integer >= 0 (a pixel count; 0 switches the rule off)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"config key '{key}' must be an integer >= 0 (pixels; 0: off), got {value!r}")


def remove_small_components(masks: np.ndarray, min_size: int) -> np.ndarray:
    """`(N, H, W)` binary masks without the 4-connected components of fewer than `min_size` pixels.

    One labelling over the whole stack (a structuring element that never links two tiles), no per-tile loop.
    """
    masks = np.asarray(masks, dtype=bool)
    if min_size <= 1 or not masks.any():
        return masks.copy()
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(masks, structure=structure)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def postprocess(
    probs: np.ndarray, image_probs: np.ndarray | None = None, settings: PostProcessing | None = None
) -> np.ndarray:
    """`(N, H, W)` float probabilities (+ `(N,)` image probabilities) -> `(N, H, W)` uint8 {0, 1} masks."""
    s = settings or PostProcessing()
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"probabilities must be (N, H, W), got shape {probs.shape}")
    masks = probs > s.threshold
    if s.min_component_size > 1:
        masks = remove_small_components(masks, s.min_component_size)
    empty = np.zeros(len(masks), dtype=bool)
    if s.image_threshold is not None:
        if image_probs is None:
            raise ValueError("config key 'image_threshold' is set but the prediction has no image probabilities")
        empty |= np.asarray(image_probs).reshape(-1) < s.image_threshold
    if s.min_area > 0:
        empty |= masks.sum(axis=(1, 2)) < s.min_area
    masks[empty] = False
    return masks.astype(np.uint8)
