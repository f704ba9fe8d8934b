"""The training augmentation against the recipe's definitions: many draws of each transform's parameters (ranges and
distributions) and what each transform does to coordinate ramps and real tiles, as the bundle configures it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import set_track_meta
from scipy import ndimage, stats

from saltkit.augmentation import (
    RandCropRescaled,
    RandCutoutd,
    RandGammad,
    RandHorizontalSheard,
    RandSeparableGridDistortiond,
    remap,
    stretched_axis,
)
from saltkit.data.layout import load_mask, train_items
from saltkit.networks.encoders import IMAGENET_MEAN
from saltkit.transforms import LoadTiled

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "bundles/saltnet/configs/train.json"
TILE = 101
P_VALUE = 1e-3  # seeded draws: a distribution test either passes or fails every time


@pytest.fixture(autouse=True)
def _plain_tensors():
    set_track_meta(False)
    yield
    set_track_meta(True)


def random_transforms(tmp_path, *overrides: str) -> list:
    parser = ConfigParser()
    parser.read_config([str(TRAIN), str(REPO / "configs/pad.json"), *(str(REPO / o) for o in overrides)])
    parser["folds_csv"] = str(tmp_path / "folds.csv")
    parser.parse()
    return parser.get_parsed_content("train#random_transforms")


def ramp(axis: int, channels: int = 1) -> torch.Tensor:
    """(channels, 101, 101) image whose value is the pixel's column (axis 1) or row (axis 0) index."""
    r = torch.arange(TILE, dtype=torch.float32)
    grid = r[None, :].expand(TILE, TILE) if axis == 1 else r[:, None].expand(TILE, TILE)
    return grid[None].repeat(channels, 1, 1)


def seeded(t, seed: int = 0):
    t.set_random_state(seed)
    return t


def uniform_ks(values, low: float, high: float) -> float:
    return stats.kstest(np.asarray(values), stats.uniform(loc=low, scale=high - low).cdf).pvalue


@pytest.fixture(scope="module")
def salty_tile(sample_dir):
    for it in train_items(sample_dir):
        if 500 < load_mask(it["label"]).sum() < 5000:
            return LoadTiled(channels=3)(it)
    pytest.skip("no partly salty tile in the sample")


# ---------------------------------------------------------------- the chain as the bundle spells it


def test_bundle_chain_is_the_recipe_in_order(tmp_path):
    t = random_transforms(tmp_path)
    names = [type(x).__name__ for x in t]
    assert names == ["RandCutoutd", "RandFlipd", "RandCropRescaled", "RandHorizontalSheard", "RandRotated",
                     "RandSeparableGridDistortiond", "RandShiftIntensityd", "ScaleIntensityRanged",
                     "RandScaleIntensityd", "ScaleIntensityRanged", "RandGammad"]
    cutout, flip, crop, shear, rotate, grid, shift, _, scale, _, gamma = t
    assert (cutout.prob, cutout.size, cutout.fill, cutout.max_label_fraction) == (0.5, 30, IMAGENET_MEAN, 0.5)
    assert flip.flipper.spatial_axis == 1 and flip.prob == 0.5  # (C, H, W): axis 1 of the spatial dims = columns
    assert [x.prob for x in (crop, shear, rotate, grid)] == [0.125] * 4
    assert (crop.max_margin, shear.max_shear, grid.cell, grid.max_distort) == (20, 0.07, 10, 0.15)
    assert rotate.rand_rotate.range_x == pytest.approx((-math.radians(15), math.radians(15)))
    assert set(rotate.padding_mode) == {"reflection"} and set(rotate.align_corners) == {True}
    for x in (crop, shear, grid):
        assert x.mode == ("bilinear", "nearest")
    assert tuple(rotate.mode) == ("bilinear", "nearest")
    assert [x.prob for x in (shift, scale, gamma)] == [0.165] * 3
    assert shift.shifter.offsets == pytest.approx((-0.1, 0.1))
    assert scale.scaler.factors == pytest.approx((-0.08, 0.08))
    assert gamma.gamma == (0.92, 1.08)


def test_cpu_recipe_keeps_its_lighter_probabilities(tmp_path):
    t = random_transforms(tmp_path, "configs/cpu.json")
    assert t[0].prob == 0.0 and t[1].prob == 0.5
    assert [t[i].prob for i in (2, 3, 4, 5)] == [0.0625] * 4
    assert [t[i].prob for i in (6, 8, 10)] == [0.0825] * 3


def test_chain_keeps_images_in_unit_range_and_masks_binary(tmp_path, salty_tile):
    t = random_transforms(tmp_path)
    for x in t:
        if hasattr(x, "prob"):
            x.prob = 1.0
        if hasattr(x, "set_random_state"):
            x.set_random_state(3)
    for _ in range(40):
        d = dict(salty_tile)
        for x in t:
            d = x(d)
            assert 0.0 <= float(d["image"].min()) and float(d["image"].max()) <= 1.0, type(x).__name__
        assert d["image"].shape == (3, TILE, TILE) and d["label"].shape == (1, TILE, TILE)
        assert set(torch.unique(d["label"]).tolist()) <= {0.0, 1.0}


# ---------------------------------------------------------------- cutout


def hole_of(out: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the filled rectangle of a cutout applied to a zero image, None when nothing was cut."""
    filled = out[0] != 0
    if not filled.any():
        return None
    rows, cols = filled.any(1).nonzero()[:, 0], filled.any(0).nonzero()[:, 0]
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    assert bool(filled[y0:y1, x0:x1].all()) and int(filled.sum()) == (y1 - y0) * (x1 - x0), "hole not a rectangle"
    return y0, y1, x0, x1


def test_cutout_hole_is_30px_clipped_with_a_uniform_centre_and_imagenet_fill():
    t = seeded(RandCutoutd(label_key=None, prob=1.0))
    zero = {"image": torch.zeros(3, TILE, TILE)}
    centres, sides = [], []
    for _ in range(2000):
        out = t(zero)["image"]
        y0, y1, x0, x1 = hole_of(out)
        for c in range(3):
            assert torch.all(out[c, y0:y1, x0:x1] == torch.tensor(IMAGENET_MEAN[c], dtype=torch.float32))
        # a hole that touches no border is 30 px; the centre is recovered from the side that is not clipped
        centres.append((y0 + 15 if y0 > 0 else y1 - 15, x0 + 15 if x0 > 0 else x1 - 15))
        sides += [y1 - y0, x1 - x0]
        if 0 < y0 and y1 < TILE:
            assert y1 - y0 == 30
    centres = np.array(centres)
    assert centres.min() == 0 and centres.max() == TILE - 1
    for axis in (0, 1):
        counts = np.bincount(centres[:, axis], minlength=TILE)
        assert stats.chisquare(counts).pvalue > P_VALUE
    assert min(sides) == 15 and max(sides) == 30  # centre at row 0: rows 0..14; centre at row 100: rows 85..100


def test_cutout_never_hides_more_than_half_the_salt():
    label = torch.zeros(1, TILE, TILE)
    label[:, 40:60, 40:60] = 1  # 400 salt px: a centred 30 px hole covers all of it
    t = seeded(RandCutoutd(prob=1.0), 1)
    applied = skipped = 0
    for _ in range(2000):
        out = t({"image": torch.zeros(3, TILE, TILE), "label": label})
        y0, y1, x0, x1 = t.hole
        covered = float(label[0, y0:y1, x0:x1].sum()) / 400
        hole = hole_of(out["image"])
        assert torch.equal(out["label"], label)
        if covered > 0.5:
            assert hole is None
            skipped += 1
        else:
            assert hole == (y0, y1, x0, x1)
            applied += 1
    assert skipped > 100 and applied > 500
    # an empty mask never stops the hole
    t.prob = 1.0
    assert hole_of(t({"image": torch.zeros(3, TILE, TILE), "label": torch.zeros(1, TILE, TILE)})["image"])


def test_cutout_fires_with_its_probability():
    t = seeded(RandCutoutd(label_key=None, prob=0.5), 2)
    fired = sum(hole_of(t({"image": torch.zeros(3, TILE, TILE)})["image"]) is not None for _ in range(4000))
    assert abs(fired / 4000 - 0.5) < 4 * math.sqrt(0.25 / 4000)


# ---------------------------------------------------------------- geometric


def test_crop_rescale_margins_and_sides():
    t = seeded(RandCropRescaled(prob=1.0))
    margins = []
    for _ in range(20000):
        t.draw((TILE, TILE))
        margins.append(t.margins)
    margins = np.array(margins)  # (draws, 4): x0, y0, dx1, dy1
    assert margins.min() == 0 and margins.max() == 19
    for k in range(4):
        assert stats.chisquare(np.bincount(margins[:, k], minlength=20)).pvalue > P_VALUE
    sides = TILE - margins[:, 0] - margins[:, 2]
    assert sides.min() == 63 and sides.max() == TILE
    # two independent margins: a triangular distribution of sides with its peak in the middle, mean 82
    assert abs(sides.mean() - 82) < 0.2 and (sides == 82).mean() > 3 * (sides == 64).mean()


def test_crop_rescale_maps_the_crop_onto_the_tile():
    t = seeded(RandCropRescaled(keys=("image", "label"), prob=1.0), 4)
    cols, rows = ramp(1), ramp(0)
    for _ in range(50):
        out = t({"image": cols, "label": rows})
        x0, y0, dx1, dy1 = t.margins
        w, h = TILE - x0 - dx1, TILE - y0 - dy1
        # nearest (label): output row i shows source row y0 + floor(i * h / 101)
        expected_rows = y0 + torch.floor(torch.arange(TILE) * h / TILE)
        assert torch.equal(out["label"][0, :, 0], expected_rows)
        # bilinear (image) on a ramp: half-pixel centres, clamped to the crop's first and last column
        src = ((torch.arange(TILE) + 0.5) * w / TILE - 0.5).clamp(0, w - 1) + x0
        assert torch.allclose(out["image"][0, 0], src, atol=1e-4)


def test_shear_displacement_reaches_seven_px_at_the_edges():
    t = seeded(RandHorizontalSheard(prob=1.0))
    shears, dxs = [], []
    for _ in range(20000):
        t.draw((TILE, TILE))
        shears.append(t.shear)
        dxs.append(t.displacement)
    assert max(np.abs(shears)) < 0.07 and uniform_ks(shears, -0.07, 0.07) > P_VALUE
    dxs = np.array(dxs)
    assert set(dxs.tolist()) == set(range(-7, 8))  # int(s * 101): whole pixels up to 0.07 * 101 = 7.07
    # truncation toward zero: dx = 0 for |s| < 1/101, twice as often as any other value
    assert abs((dxs == 0).mean() - 2 / (0.14 * TILE)) < 0.01


def test_shear_moves_top_right_and_bottom_left_with_reflect_101():
    t = seeded(RandHorizontalSheard(keys="image", mode="bilinear", prob=1.0), 5)
    image = ramp(1)
    for _ in range(100):
        out = t({"image": image})["image"][0]
        dx = t.displacement
        y = torch.arange(TILE, dtype=torch.float32)[:, None]
        src = torch.arange(TILE, dtype=torch.float32)[None, :] - dx + 2 * dx * y / TILE
        reflected = torch.where(src < 0, -src, torch.where(src > TILE - 1, 2 * (TILE - 1) - src, src))
        assert torch.allclose(out, reflected, atol=1e-3)  # row 0 samples x - dx: the top edge moves by +dx


def test_rotation_angle_and_reflect_101_about_the_centre(tmp_path):
    rotate = random_transforms(tmp_path)[4]
    rotate.prob = 1.0
    rotate.set_random_state(6)
    image = torch.rand(1, TILE, TILE, generator=torch.Generator().manual_seed(0))
    for _ in range(5):  # reference: scipy's linear interpolation, 'mirror' = reflect-101, about pixel (50, 50)
        out = rotate({"image": image, "label": (image > 0.5).float()})
        a, c = rotate.rand_rotate.x, (TILE - 1) / 2
        yy, xx = np.mgrid[0:TILE, 0:TILE].astype(np.float64)
        sy = np.cos(a) * (yy - c) - np.sin(a) * (xx - c) + c
        sx = np.sin(a) * (yy - c) + np.cos(a) * (xx - c) + c
        ref = ndimage.map_coordinates(image[0].double().numpy(), [sy, sx], order=1, mode="mirror")
        assert np.abs(ref - out["image"][0].numpy()).max() < 1e-4
        assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}
    angles = []
    for _ in range(5000):
        rotate.rand_rotate.randomize()
        angles.append(rotate.rand_rotate.x)
    limit = math.radians(15)
    assert max(np.abs(angles)) < limit and uniform_ks(angles, -limit, limit) > P_VALUE


def test_grid_distortion_draws():
    t = seeded(RandSeparableGridDistortiond(prob=1.0))
    limits, scaled = [], []
    for _ in range(5000):
        t.draw((TILE, TILE))
        ys, xs = t.factors
        assert len(ys) == len(xs) == 10  # ten full 10 px cells per axis; the 101st pixel is a partial cell
        u = np.array(ys + xs)
        assert np.all(np.abs(u) < t.distort)
        limits.append(t.distort)
        scaled += (u / t.distort).tolist()
    assert max(limits) < 0.15 and uniform_ks(limits, 0.0, 0.15) > P_VALUE
    assert uniform_ks(scaled, -1.0, 1.0) > P_VALUE  # each cell uniform in (-d, d) given d


def test_grid_distortion_map():
    flat = stretched_axis(TILE, 10, [0.0] * 10)
    # every cell spans cell + 1 source px, both ends included: 0, 10/9, ..., 10 | 10, ... | ... 100 | 100
    assert torch.allclose(flat[:10], torch.linspace(0, 10, 10, dtype=torch.float64))
    assert flat[9] == flat[10] == 10 and flat[99] == flat[100] == 100
    u = [0.1, -0.05, 0.0, 0.15, -0.15, 0.02, 0.0, 0.0, -0.1, 0.05]
    ends = 10 * np.cumsum(1 + np.array(u))
    warped = stretched_axis(TILE, 10, u)
    assert np.allclose(warped[9::10][:10].numpy(), ends) and warped[100] == pytest.approx(ends[-1])
    t = seeded(RandSeparableGridDistortiond(keys=("image", "label"), prob=1.0), 7)
    for _ in range(20):
        out = t({"image": ramp(1), "label": ramp(0)})
        xs = stretched_axis(TILE, 10, t.factors[1]).float()
        ys = stretched_axis(TILE, 10, t.factors[0])
        reflected = torch.where(xs > TILE - 1, 2 * (TILE - 1) - xs, xs)  # reflect-101 past the last column
        assert torch.allclose(out["image"][0, 0], reflected, atol=1e-3)
        assert torch.equal(out["label"][0, :, 0], torch.where(ys > 100, 200 - ys, ys).round().float())


def test_remap_identity_and_reflect_101():
    image = torch.rand(3, TILE, TILE, generator=torch.Generator().manual_seed(1))
    ys, xs = torch.meshgrid(torch.arange(TILE).float(), torch.arange(TILE).float(), indexing="ij")
    assert torch.allclose(remap(image, ys, xs), image, atol=1e-4)
    assert torch.equal(remap(image, ys, xs, "nearest"), image)
    # one column left of the tile is column 1 (reflect-101), not column 0 again
    assert torch.allclose(remap(image, ys, xs - 1)[..., 0], image[..., 1], atol=1e-4)


# ---------------------------------------------------------------- intensity


def test_intensity_draws_and_clipping(tmp_path, salty_tile):
    shift, clip, scale, _, gamma = random_transforms(tmp_path)[6:]
    image = salty_tile["image"].clone()
    image[0, 0, :2] = torch.tensor([0.0, 1.0])  # both ends of the range present
    for x in (shift, scale, gamma):
        x.prob = 1.0
        x.set_random_state(8)
    for _ in range(20):  # what each does, clipped as the recipe clips
        shifted = clip({"image": shift({"image": image})["image"]})["image"]
        assert torch.allclose(shifted, (image + shift.shifter._offset).clamp(0, 1), atol=1e-6)
        scaled = clip({"image": scale({"image": image})["image"]})["image"]
        assert torch.allclose(scaled, (image * (1 + scale.scaler.factor)).clamp(0, 1), atol=1e-6)
        out = gamma({"image": image})["image"]
        assert torch.allclose(out, image ** (1 / gamma.value), atol=1e-6)
        assert 0 <= float(out.min()) and float(out.max()) <= 1
    offsets, factors, gammas = [], [], []
    small = {"image": torch.zeros(1, 1, 1)}
    for _ in range(5000):
        shift.shifter.randomize()
        offsets.append(shift.shifter._offset)
        scale.scaler.randomize()
        factors.append(1 + scale.scaler.factor)
        gamma(small)
        gammas.append(gamma.value)
    assert uniform_ks(offsets, -0.1, 0.1) > P_VALUE and max(np.abs(offsets)) < 0.1
    assert uniform_ks(factors, 0.92, 1.08) > P_VALUE
    assert uniform_ks(gammas, 0.92, 1.08) > P_VALUE
    assert RandGammad(prob=1.0)({"image": torch.tensor([[[-0.5, 2.0]]])})["image"].tolist() == [[[0.0, 1.0]]]
