"""The recipe's training augmentation where MONAI has no transform with the same distribution.

The chain itself is spelled out in `train#random_transforms` of bundles/saltnet/configs/train.json, in the
recipe's order, on tiles scaled to [0, 1] (image (C, 101, 101) float, label (1, 101, 101) {0, 1}):
cutout (`RandCutoutd`) -> horizontal flip (MONAI RandFlipd) -> crop-and-rescale (`RandCropRescaled`), horizontal
shear (`RandHorizontalSheard`), rotation (MONAI RandRotated), grid distortion (`RandSeparableGridDistortiond`) ->
brightness shift and scale (MONAI RandShiftIntensityd / RandScaleIntensityd, each clipped to [0, 1]), gamma
(`RandGammad`). Coordinates are pixel indices (pixel centres at integers); every warp reflects at the border
without repeating the edge pixel (OpenCV's BORDER_REFLECT_101), images bilinear, labels nearest so they stay binary.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import ensure_tuple_rep

# The original recipe fills a hole with the ImageNet mean per channel (what the encoder's input normalisation maps
# to zero); the transforms stay below the networks, so the three numbers are spelt here.
CUTOUT_FILL = (0.485, 0.456, 0.406)


def remap(image: torch.Tensor, src_y: torch.Tensor, src_x: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """`out[c, i, j] = image[c, src_y[i, j], src_x[i, j]]`, interpolated (`mode` bilinear or nearest).

    image (C, H, W); src_y, src_x (H', W') source coordinates in pixels. Outside the tile the image is reflected
    about the edge pixel centres (reflect-101: grid_sample's reflection with align_corners=True).
    """
    h, w = image.shape[-2:]
    grid = torch.stack((src_x * (2.0 / max(w - 1, 1)) - 1.0, src_y * (2.0 / max(h - 1, 1)) - 1.0), dim=-1)
    out = F.grid_sample(image[None].float(), grid[None].to(image.device, torch.float32), mode=mode,
                        padding_mode="reflection", align_corners=True)
    return out[0].to(image.dtype)


class _PairedRandom(RandomizableTransform, MapTransform):
    """A random transform that draws once per call and applies the same draw to every key (image and label)."""

    def __init__(self, keys: KeysCollection, prob: float, mode, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.mode = ensure_tuple_rep(mode, len(self.keys))

    def draw(self, shape: tuple[int, int]) -> None:
        """Draw this call's parameters for a tile of `shape` (H, W) (only called when the transform fires)."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        self.draw(tuple(d[first].shape[-2:]))
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.apply(torch.as_tensor(d[key]), mode)
        return d


class RandCutoutd(RandomizableTransform, MapTransform):
    """Cutout: one square hole of side `size` px filled with `fill` (one value per channel), with probability `prob`.

    The hole's centre (cy, cx) is uniform over the tile's pixels; the hole is rows [cy - size//2, cy - size//2 +
    size) and the same columns, clipped at the borders (so holes near a border are smaller). It is skipped when it
    would cover more than `max_label_fraction` of the label's salt pixels. The label is not changed.
    Ours: MONAI's RandCoarseDropout keeps holes inside the tile, fills all channels alike and ignores the label.

    Args:
        keys: the image keys to cut (each (C, H, W), values in [0, 1]).
        label_key: the label (1, H, W) {0, 1} whose salt the hole may not mostly hide; None: no such check.
        size: side of the square hole, in pixels (>= 1).
        fill: the value put in the hole, one per channel or one for all (default the ImageNet mean).
        max_label_fraction: skip the hole when it would cover more than this fraction (0..1) of the salt
            pixels.
        prob: probability (0..1) that a call cuts a hole.
        allow_missing_keys: do not fail when a key is missing from the data.
    """

    def __init__(self, keys: KeysCollection = "image", label_key: str | None = "label", size: int = 30,
                 fill: float | Sequence[float] = CUTOUT_FILL, max_label_fraction: float = 0.5, prob: float = 0.5,
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if size < 1:
            raise ValueError(f"cutout size must be >= 1 px, got {size}")
        self.label_key = label_key
        self.size = int(size)
        self.fill = tuple(float(v) for v in (fill if isinstance(fill, Sequence) else (fill,)))
        self.max_label_fraction = float(max_label_fraction)
        self.centre: tuple[int, int] | None = None
        self.hole: tuple[int, int, int, int] | None = None  # y0, y1, x0, x1 of the last drawn hole
        self.applied = False  # whether the last call filled its hole (False: not drawn, or skipped for the salt)

    def draw(self, shape: tuple[int, int]) -> None:
        h, w = shape
        cy, cx = int(self.R.randint(h)), int(self.R.randint(w))
        before = self.size // 2
        self.centre = (cy, cx)
        self.hole = (max(cy - before, 0), min(cy - before + self.size, h),
                     max(cx - before, 0), min(cx - before + self.size, w))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        self.applied = False
        if not self._do_transform:
            return d
        first = next(self.key_iterator(d), None)
        if first is None:
            return d
        self.draw(tuple(d[first].shape[-2:]))
        y0, y1, x0, x1 = self.hole
        if self.label_key is not None and self.label_key in d:
            label = torch.as_tensor(d[self.label_key])
            salt = float((label > 0.5).sum())  # IGNORE_LABEL pixels are no salt
            if salt > 0 and float((label[..., y0:y1, x0:x1] > 0.5).sum()) / salt > self.max_label_fraction:
                return d  # the recipe never hides more than half of the salt
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key]).clone()
            if len(self.fill) not in (1, img.shape[0]):
                raise ValueError(f"cutout fill has {len(self.fill)} values but {key!r} has {img.shape[0]} channels")
            fill = torch.tensor(self.fill, dtype=img.dtype, device=img.device).expand(img.shape[0])
            img[:, y0:y1, x0:x1] = fill[:, None, None]
            d[key] = img
        self.applied = True
        return d


class RandCropRescaled(_PairedRandom):
    """Crop `[x0, W - dx1) x [y0, H - dy1)` and resize it back to (H, W), with probability `prob`.

    x0, y0, dx1, dy1 are independent integers uniform in [0, max_margin), so for 101 px tiles and max_margin 20 the
    crop sides run from 63 to 101 (their distribution is triangular, not uniform). Bilinear (half-pixel centres,
    no antialiasing) for the image, nearest (source index floor(i * side / H)) for the label.
    Ours: MONAI's RandSpatialCrop draws a side and then a position, a different distribution of crops.

    Args:
        keys: the keys cropped with the same draw (image and label, each (C, H, W)).
        max_margin: each of the four margins is drawn from [0, max_margin) pixels (>= 1).
        prob: probability (0..1) that a call crops.
        mode: interpolation per key ("bilinear" for images, "nearest" for labels), or one for all.
        allow_missing_keys: do not fail when a key is missing from the data.
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), max_margin: int = 20, prob: float = 0.125,
                 mode: str | Sequence[str] = ("bilinear", "nearest"), allow_missing_keys: bool = False):
        super().__init__(keys, prob, mode, allow_missing_keys)
        if max_margin < 1:
            raise ValueError(f"crop max_margin must be >= 1 px, got {max_margin}")
        self.max_margin = int(max_margin)
        self.margins: tuple[int, int, int, int] | None = None  # x0, y0, dx1, dy1 of the last draw

    def draw(self, shape: tuple[int, int]) -> None:
        x0, y0, dx1, dy1 = (int(v) for v in self.R.randint(0, self.max_margin, size=4))
        self.margins = (x0, y0, dx1, dy1)

    def apply(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        h, w = x.shape[-2:]
        x0, y0, dx1, dy1 = self.margins
        crop = x[..., y0:h - dy1, x0:w - dx1][None].float()
        extra = {"align_corners": False} if mode == "bilinear" else {}
        return F.interpolate(crop, size=(h, w), mode=mode, **extra)[0].to(x.dtype)


class RandHorizontalSheard(_PairedRandom):
    """Horizontal shear, with probability `prob`: the top edge moves right by dx px and the bottom edge left by dx.

    s is uniform in (-max_shear, max_shear) and dx = s * W truncated to whole pixels (as the recipe does), so for
    101 px tiles and 0.07 dx runs over -7..7. Output pixel (x, y) samples the input at (x - dx + 2 dx y / H, y),
    border reflect-101.
    Ours: MONAI's RandAffine draws a continuous shear about the centre pixel, not whole-pixel edge displacements.

    Args:
        keys: the keys sheared with the same draw (image and label, each (C, H, W)).
        max_shear: the shear s is uniform in (-max_shear, max_shear), a fraction of the tile width.
        prob: probability (0..1) that a call shears.
        mode: interpolation per key ("bilinear" for images, "nearest" for labels), or one for all.
        allow_missing_keys: do not fail when a key is missing from the data.
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), max_shear: float = 0.07, prob: float = 0.125,
                 mode: str | Sequence[str] = ("bilinear", "nearest"), allow_missing_keys: bool = False):
        super().__init__(keys, prob, mode, allow_missing_keys)
        self.max_shear = float(max_shear)
        self.shear: float | None = None
        self.displacement: int | None = None

    def draw(self, shape: tuple[int, int]) -> None:
        self.shear = float(self.R.uniform(-self.max_shear, self.max_shear))
        self.displacement = int(self.shear * shape[1])

    def apply(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        h, w = x.shape[-2:]
        dx = float(self.displacement)
        ys = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
        xs = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
        return remap(x, ys, xs - dx + 2.0 * dx * ys / h, mode)


def stretched_axis(size: int, cell: int, factors: Sequence[float]) -> torch.Tensor:
    """Source coordinate of each of `size` output pixels along one axis of the recipe's grid distortion.

    The axis is cut into cells of `cell` px; cell k's output pixels sample linearly (both ends included) from the
    end of cell k-1 to that end plus cell * (1 + factors[k]); a last partial cell ends at `size`. With all factors 0
    this is not the identity: each cell spans cell + 1 source px (the recipe's map, kept as it is).
    """
    out = torch.zeros(size, dtype=torch.float64)
    prev = 0.0
    for k, start in enumerate(range(0, size, cell)):
        end = start + cell
        if end > size:
            end, cur = size, float(size)
        else:
            cur = prev + cell * (1.0 + float(factors[k]))
        out[start:end] = torch.linspace(prev, cur, end - start, dtype=torch.float64)
        prev = cur
    return out


class RandSeparableGridDistortiond(_PairedRandom):
    """The recipe's grid distortion, with probability `prob`: cells of `cell` px stretched separably in x and y.

    Per call d is uniform in (0, max_distort); each full cell of each axis gets its own factor u uniform in (-d, d)
    and spans cell * (1 + u) source px (`stretched_axis`). Border reflect-101.
    Ours: MONAI's RandGridDistortion counts cells instead of their size and has no per-call distortion limit d.

    Args:
        keys: the keys distorted with the same draw (image and label, each (C, H, W)).
        cell: side of a grid cell, in pixels (>= 2).
        max_distort: the per-call limit d is uniform in (0, max_distort), a fraction of a cell.
        prob: probability (0..1) that a call distorts.
        mode: interpolation per key ("bilinear" for images, "nearest" for labels), or one for all.
        allow_missing_keys: do not fail when a key is missing from the data.
    """

    def __init__(self, keys: KeysCollection = ("image", "label"), cell: int = 10, max_distort: float = 0.15,
                 prob: float = 0.125, mode: str | Sequence[str] = ("bilinear", "nearest"),
                 allow_missing_keys: bool = False):
        super().__init__(keys, prob, mode, allow_missing_keys)
        if cell < 2:
            raise ValueError(f"grid distortion cell must be >= 2 px, got {cell}")
        self.cell = int(cell)
        self.max_distort = float(max_distort)
        self.distort: float | None = None
        self.factors: tuple[list[float], list[float]] | None = None  # (y factors, x factors) of the last draw

    def draw(self, shape: tuple[int, int]) -> None:
        self.distort = float(self.R.uniform(0.0, self.max_distort))
        h, w = shape
        x_factors = [float(v) for v in self.R.uniform(-self.distort, self.distort, size=w // self.cell)]
        y_factors = [float(v) for v in self.R.uniform(-self.distort, self.distort, size=h // self.cell)]
        self.factors = (y_factors, x_factors)

    def apply(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        h, w = x.shape[-2:]
        ys = stretched_axis(h, self.cell, self.factors[0]).float()
        xs = stretched_axis(w, self.cell, self.factors[1]).float()
        return remap(x, ys[:, None].expand(h, w), xs[None, :].expand(h, w), mode)


class RandGammad(RandomizableTransform, MapTransform):
    """Gamma change `x ** (1 / g)`, g uniform in `gamma`, on values clipped to [0, 1], with probability `prob`.

    Ours: MONAI's RandAdjustContrast rescales by the image's own min and range and raises to g, not 1 / g.

    Args:
        keys: the image keys to change (values clipped to [0, 1] first).
        gamma: (low, high), positive and increasing: g is uniform in this range.
        prob: probability (0..1) that a call changes the gamma.
        allow_missing_keys: do not fail when a key is missing from the data.
    """

    def __init__(self, keys: KeysCollection = "image", gamma: Sequence[float] = (0.92, 1.08), prob: float = 0.165,
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        low, high = (float(g) for g in gamma)
        if not 0 < low <= high:
            raise ValueError(f"gamma range must be positive and increasing, got {tuple(gamma)}")
        self.gamma = (low, high)
        self.value: float | None = None

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.value = float(self.R.uniform(*self.gamma))
        for key in self.key_iterator(d):
            d[key] = torch.as_tensor(d[key]).clamp(0.0, 1.0) ** (1.0 / self.value)
        return d
