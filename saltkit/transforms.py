"""MONAI transform pieces of the training chain (the chain itself is spelled out in the bundle's train.json).

Data dicts flow as: {"image": path, "label": path, ...} -> LoadTiled -> image float (3, 101, 101) in [0, 1] (the
grey tile repeated), label float (1, 101, 101) in {0, 1} -> random augmentation (train only, saltkit.augmentation) ->
CopyItemsd (`tile_label_copy`: keeps the 101 x 101 label for the metric) -> the variant's spatial transform (configs/pad.json:
reflect pad to 128; configs/resize.json: resize to 128; `network_input_transform`) -> network. After the network,
`TilePredictiond` maps the prediction back onto the 101 x 101 tile grid, so metrics always compare tiles, whatever
the variant; inference does the same per tile with `tile_output_transform`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import BorderPadd, Compose, CopyItemsd, EnsureTyped, MapTransform, Resized, SpatialCropd

from saltkit.config import ConfigError
from saltkit.data.layout import load_image, load_mask
from saltkit.geometry import NETWORK_SIZE, TILE_SIZE, check_variant, pad_widths, restore_tiles
from saltkit.labels import IGNORE_LABEL

TILE_LABEL_KEY = "label_tile"
PROB_THRESHOLD = 0.5
VALIDATION_SIZES = ("tile", "network")


def network_input_transform(variant: str, keys: KeysCollection = ("image", "label")) -> MapTransform:
    """The variant's tile -> network transform: reflect pad 101 -> 128 (pad) or resize to 128 (resize; bilinear
    image, nearest mask: a key named "label" gets nearest). Missing keys are allowed (test tiles have no
    label).

    Args:
        variant: config key `variant` (pad / resize).
        keys: the keys of `(C, 101, 101)` tiles to bring to `(C, 128, 128)`.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    if check_variant(variant) == "pad":
        before, after = pad_widths(TILE_SIZE, NETWORK_SIZE)
        return BorderPadd(keys, spatial_border=[before, after, before, after], mode="reflect", allow_missing_keys=True)
    modes = ["nearest" if k.startswith("label") else "bilinear" for k in keys]
    return Resized(keys, spatial_size=[NETWORK_SIZE, NETWORK_SIZE], mode=modes, allow_missing_keys=True)


def tile_output_transform(variant: str, keys: KeysCollection = ("prob",)) -> MapTransform:
    """The variant's network -> tile transform for `(C, 128, 128)` maps: central 101 x 101 crop (pad) or bilinear
    resize to 101 (resize); the inverse of `network_input_transform` (as `geometry.restore_tiles` on batches).

    Args:
        variant: config key `variant` (pad / resize).
        keys: the keys of `(C, 128, 128)` maps to bring to `(C, 101, 101)`.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    if check_variant(variant) == "pad":
        # not CenterSpatialCropd: its centre (64 - 50 = 14) is one pixel off the padding's 13 px before
        before, _ = pad_widths(TILE_SIZE, NETWORK_SIZE)
        return SpatialCropd(keys, roi_start=[before, before], roi_end=[before + TILE_SIZE] * 2, allow_missing_keys=True)
    return Resized(keys, spatial_size=[TILE_SIZE, TILE_SIZE], mode="bilinear", allow_missing_keys=True)


def tile_inputs(variant: str, keys: KeysCollection = ("image", "label")) -> Compose:
    """The deterministic pipeline of the workflows that read tiles from disk (evaluate, inference, SWA): LoadTiled
    (3 channels), the variant's tile -> network transform of the image (labels stay on the 101 x 101 tile grid, where
    the metric is scored), EnsureTyped without metadata. One definition instead of a copy in each bundle file.

    Args:
        variant: config key `variant` (pad / resize).
        keys: the keys holding PNG paths ("image", and "label" for labelled tiles).
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    return Compose([LoadTiled(keys, channels=3), network_input_transform(variant, "image"),
                    EnsureTyped(keys, track_meta=False)])


class LoadTiled(MapTransform):
    """Load a tile PNG (key "image") and its mask PNG (key "label") -> float tensors, channel first.

    image -> (channels, H, W) float32 in [0, 1] (the grey tile repeated); label -> (1, H, W) float32 in {0, 1}.
    Custom rather than LoadImaged: masks are 0/255 or 0/65535 PNGs depending on the file and must end as {0, 1}
    with checked values and sizes (saltkit.data.layout does that, naming the file on error). A key that already
    holds a tensor (a window of a section, `saltkit.seismic.training_sections`: image (1, H, W) in [0, 1], label
    (1, H, W) in {0, 1, IGNORE_LABEL}) is taken as read: the image's grey repeated, the label as it is.

    Args:
        keys: the keys holding PNG paths ("image", "label").
        channels: how many times the grey tile is repeated (3 for the ImageNet encoders).
        allow_missing_keys: do not fail on a missing key (test tiles have no label).
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), channels: int = 1, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], torch.Tensor):  # already read: a training window of a section
                value = d[key].float()
                d[key] = value if key == "label" else value[:1].expand(self.channels, -1, -1).contiguous()
            elif key == "label":
                d[key] = torch.from_numpy(load_mask(d[key])).float()[None]
            else:
                grey = torch.from_numpy(load_image(d[key])).float().div_(255.0)
                d[key] = grey[None].expand(self.channels, -1, -1).contiguous()
        return d


def tile_label_copy(key: str = "label") -> CopyItemsd:
    """MONAI's CopyItemsd keeping `key` as `label_tile` before the spatial transform: the metric compares against
    the true 101 x 101 tile whatever the variant does to the label."""
    return CopyItemsd(keys=key, names=TILE_LABEL_KEY, allow_missing_keys=True)


def check_validation_size(value) -> str:
    """`value` when it is one of VALIDATION_SIZES; ConfigError naming config key 'validation_size' otherwise."""
    if value not in VALIDATION_SIZES:
        raise ConfigError(f"config key 'validation_size' must be one of {', '.join(VALIDATION_SIZES)}, got {value!r}")
    return value


class TilePredictiond:
    """Engine postprocessing: add `tile_pred` (B, 1, 101, 101) binary salt masks and `tile_label` (B, 1, 101, 101).

    Called by MONAI engines (decollate=False) on the merged batch + output dict. `pred` is what the engine's
    network or inferer returned at network resolution: a SaltOutput or logit tensor (training: salt where the
    logit is > 0) or the probability dict of `FlipTTAInferer` (validation: salt where "prob" > 0.5). pad: central
    crop; resize: bilinear resize back to 101 (as inference does). The label is the copy `tile_label_copy` kept before
    the spatial transform.

    validation_size: "tile" (default) scores the 101 x 101 tile, what the leaderboard scores; "network" scores the
    resize variant as the original recipe validated it, the 128 x 128 prediction against the nearest-resized label
    (the pad variant is scored on its tile either way, as in the original).

    Args:
        variant: config key `variant`: "pad" (central crop) or "resize" (bilinear resize back).
        size: the tile side, in pixels (101).
        validation_size: "tile" or "network", see above.
    """

    def __init__(self, variant: str, size: int = TILE_SIZE, validation_size: str = "tile"):
        self.variant = check_variant(variant)
        self.size = size
        self.at_network_size = check_validation_size(validation_size) == "network" and self.variant == "resize"

    def __call__(self, data: dict) -> dict:
        if self.at_network_size:
            data["tile_pred"] = salt_map(data["pred"], lambda x: x)
            data["tile_label"] = binary_label(torch.as_tensor(data["label"]).float()).to(data["tile_pred"].device)
            return data
        data["tile_pred"] = salt_map(data["pred"], lambda x: restore_tiles(x, self.variant, self.size))
        device = data["tile_pred"].device
        if TILE_LABEL_KEY in data:
            data["tile_label"] = torch.as_tensor(data[TILE_LABEL_KEY]).to(device)
        else:  # no copy kept: undo the spatial transform on the label itself, re-binarised
            data["tile_label"] = binary_label(restore_tiles(data["label"].float(), self.variant, self.size))
        return data


def binary_label(label: torch.Tensor) -> torch.Tensor:
    """A label map brought back to {0, 1, IGNORE_LABEL}: salt above 0.5, IGNORE_LABEL wherever it is negative
    (a pixel a resize blended with an ignored one stays ignored), background elsewhere."""
    return torch.where(label < 0, IGNORE_LABEL, (label > 0.5).float())


def salt_map(pred, restore) -> torch.Tensor:
    """Binary salt map of an engine's `pred` after `restore` (a map -> map function): the probability dict of
    `FlipTTAInferer` (salt where "prob" > 0.5), or a SaltOutput / logit tensor (salt where the logit is > 0)."""
    if isinstance(pred, dict):
        return (restore(pred["prob"].detach().float()) > PROB_THRESHOLD).float()
    logit = pred if isinstance(pred, torch.Tensor) else pred.logit
    return (restore(logit.detach().float()) > 0).float()
