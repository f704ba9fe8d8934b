"""MONAI transform pieces of the training chain (the chain itself is spelled out in the bundle's train.json).

Data dicts flow as: {"image": path, "label": path, ...} -> LoadTiled -> image float (3, 101, 101) in [0, 1] (the
grey tile repeated), label float (1, 101, 101) in {0, 1} -> random augmentation (train only, saltkit.augmentation) ->
TileLabeld (keeps the 101 x 101 label for the metric) -> the variant's spatial transform (configs/pad.json:
reflect pad to 128; configs/resize.json: resize to 128) -> network. After the network, `TilePredictiond` maps the
logits back onto the 101 x 101 tile grid, so metrics always compare tiles, whatever the variant.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from saltkit.data.layout import load_image, load_mask
from saltkit.geometry import TILE_SIZE
from saltkit.inference.restore import VARIANTS, restore_tiles

FLIP_KEY = "flipped"
TILE_LABEL_KEY = "label_tile"


class LoadTiled(MapTransform):
    """Load a tile PNG (key "image") and its mask PNG (key "label") -> float tensors, channel first.

    image -> (channels, H, W) float32 in [0, 1] (the grey tile repeated); label -> (1, H, W) float32 in {0, 1}.
    Custom rather than LoadImaged: masks are 0/255 or 0/65535 PNGs depending on the file and must end as {0, 1}
    with checked values and sizes (saltkit.data.layout does that, naming the file on error).
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), channels: int = 1, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if key == "label":
                d[key] = torch.from_numpy(load_mask(d[key])).float()[None]
            else:
                grey = torch.from_numpy(load_image(d[key])).float().div_(255.0)
                d[key] = grey[None].expand(self.channels, -1, -1).contiguous()
        return d


class TileLabeld(MapTransform):
    """Copy the label as `label_tile` before the spatial transform: the metric compares against the true tile."""

    def __init__(self, keys: KeysCollection = "label", name: str = TILE_LABEL_KEY, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.name = name

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.name] = d[key].clone() if isinstance(d[key], torch.Tensor) else d[key]
        return d


class FlipFlaggedd(MapTransform):
    """Horizontally flip `keys` of the items whose `flag` key is true (the flipped copies of flip validation)."""

    def __init__(self, keys: KeysCollection = ("image", "label"), flag: str = FLIP_KEY, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.flag = flag

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(self.flag, False):
            for key in self.key_iterator(d):
                d[key] = torch.flip(torch.as_tensor(d[key]), dims=(-1,))
        return d


def with_flipped_copies(items: Sequence[dict], enabled: bool = True) -> list[dict]:
    """Items plus, when `enabled`, a copy of each marked `flipped=True` (the recipe's flip-augmented validation).

    Every item gets the `flipped` key so batches collate the same way.
    """
    plain = [{**it, FLIP_KEY: False} for it in items]
    return plain + [{**it, FLIP_KEY: True} for it in items] if enabled else plain


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"config key 'variant' must be one of {list(VARIANTS)}, got {variant!r}")
    return variant


class TilePredictiond:
    """Engine postprocessing: add `tile_pred` (B, 1, 101, 101) logits and `tile_label` (B, 1, 101, 101) {0, 1}.

    Called by MONAI engines (decollate=False) on the merged batch + output dict; `pred` is a SaltOutput (its
    `.logit` is used) or a (B, 1, H, W) tensor at network resolution. pad: central crop; resize: bilinear resize
    back to 101 (as inference does). The label is the copy `TileLabeld` kept before the spatial transform.
    """

    def __init__(self, variant: str, size: int = TILE_SIZE):
        self.variant = check_variant(variant)
        self.size = size

    def __call__(self, data: dict) -> dict:
        pred = data["pred"]
        logit = pred if isinstance(pred, torch.Tensor) else pred.logit
        data["tile_pred"] = restore_tiles(logit.detach().float(), self.variant, self.size)
        if TILE_LABEL_KEY in data:
            data["tile_label"] = torch.as_tensor(data[TILE_LABEL_KEY]).to(logit.device)
        else:  # no copy kept: undo the spatial transform on the label itself, re-binarised
            data["tile_label"] = (restore_tiles(data["label"].float(), self.variant, self.size) > 0.5).float()
        return data
