"""Probabilities -> binary masks: threshold, drop small components, empty tiles judged salt-free.

All rules are off by default except the 0.5 threshold, so the defaults reproduce a plain thresholded
prediction; `saltkit.inference.postprocess_search` searches them on a validation fold and the workflows use
the tuned values stored in the checkpoint (`saltkit.inference.postprocess_tuned`).
Two forms of the same rules: `postprocess` on stacked numpy arrays (ensembles of saved probabilities), and
`mask_transforms`, the MONAI post transforms the inference and evaluate engines run on each decollated tile.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import AsDiscreted, Compose, CopyItemsd, MapTransform
from scipy import ndimage


@dataclass(frozen=True)
class PostProcessingSettings:
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
    probs: np.ndarray, image_probs: np.ndarray | None = None, settings: PostProcessingSettings | None = None
) -> np.ndarray:
    """`(N, H, W)` float probabilities (+ `(N,)` image probabilities) -> `(N, H, W)` uint8 {0, 1} masks."""
    s = settings or PostProcessingSettings()
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


class RemoveSmallComponentsd(MapTransform):
    """Drop 4-connected salt components of fewer than `min_size` pixels from `(1, H, W)` binary masks.

    Ours, not MONAI's RemoveSmallObjectsd: that follows scikit-image, whose size rule changed in 0.26 (it now
    also removes components of exactly `min_size` pixels); this keeps the recipe's rule on every version.
    """

    def __init__(self, keys, min_size: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.min_size = int(min_size)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = torch.as_tensor(d[key])
            kept = remove_small_components(mask.detach().cpu().numpy().reshape(-1, *mask.shape[-2:]), self.min_size)
            d[key] = torch.from_numpy(kept.reshape(mask.shape)).to(mask.dtype)
        return d


class EmptyTilesd(MapTransform):
    """Empty a `(1, H, W)` mask when its tile's image-level salt probability is below `image_threshold`, or when
    fewer than `min_area` pixels are salt. No MONAI transform works at the level of a whole tile."""

    def __init__(self, keys, image_prob_keys: Sequence[str] | str | None = None, image_threshold: float | None = None,
                 min_area: int = 0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        names = [image_prob_keys] if isinstance(image_prob_keys, str) else image_prob_keys
        self.image_prob_keys = list(names) if names is not None else [None] * len(self.keys)
        self.image_threshold = image_threshold
        self.min_area = int(min_area)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, prob_key in self.key_iterator(d, self.image_prob_keys):
            mask = d[key]
            empty = self.min_area > 0 and float(mask.sum()) < self.min_area
            if self.image_threshold is not None:
                if prob_key is None or prob_key not in d:
                    raise ValueError("config key 'image_threshold' is set but the network gives no image-level "
                                     "probability (no image head in the prediction)")
                # compared in the probability's own precision, as `postprocess` compares a float32 array
                empty = empty or bool(torch.as_tensor(d[prob_key]).reshape(-1)[0] < self.image_threshold)
            if empty:
                d[key] = torch.zeros_like(mask)
        return d


def mask_transforms(settings: PostProcessingSettings, prob_keys: Sequence[str] = ("prob",),
                    mask_keys: Sequence[str] = ("mask",), image_prob_keys: Sequence[str] = ("image_prob",)) -> Compose:
    """MONAI post transforms that add binary `mask_keys` `(1, H, W)` uint8 from probability `prob_keys`
    (copy, `AsDiscreted` threshold, small components, tile-level emptying); the probabilities stay as they
    are.

    Args:
        settings: the post-processing (threshold, min_component_size, image_threshold, min_area).
        prob_keys: the probability keys, each `(1, H, W)` in [0, 1].
        mask_keys: the mask keys to add, one per probability key.
        image_prob_keys: the image-head probability keys `(1,)`, read when `settings` empties tiles.
    """
    prob_keys, mask_keys = list(prob_keys), list(mask_keys)
    # AsDiscrete keeps p >= t; the next float32 above t makes that the recipe's p > t for float32 probabilities
    above = float(np.nextafter(np.float32(settings.threshold), np.float32(np.inf)))
    steps = [CopyItemsd(keys=prob_keys, names=mask_keys),
             AsDiscreted(keys=mask_keys, threshold=above, dtype=torch.uint8)]
    if settings.min_component_size > 1:
        steps.append(RemoveSmallComponentsd(mask_keys, settings.min_component_size))
    if settings.image_threshold is not None or settings.min_area > 0:
        steps.append(EmptyTilesd(mask_keys, list(image_prob_keys), settings.image_threshold, settings.min_area,
                                 allow_missing_keys=False))
    return Compose(steps)
