"""Dataset layout: discovery on the shipped sample, PNG loading, CSV readers and every kind of bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from saltkit.data import layout
from saltkit.data.layout import (
    DatasetError,
    check_dataset,
    copy_subset,
    load_image,
    load_mask,
    read_depths,
    read_rle_csv,
    read_rle_masks,
    sample_dir,
    train_items,
)
from saltkit.rle import rle_encode

EMPTY_ID, SALT_ID = "005b452274", "057eae4f34"  # first sample tiles: an 8-bit empty mask, a 16-bit salt mask


@pytest.fixture
def tiny(tmp_path):
    """Six labelled sample tiles and two test tiles copied into a fresh folder."""
    ids = [it["id"] for it in train_items(sample_dir())][:6]
    tests = [it["id"] for it in layout.test_items(sample_dir())][:2]
    return copy_subset(sample_dir(), tmp_path / "tgs", ids, tests)


def _ids(root):
    return [it["id"] for it in train_items(root)]


def test_sample_discovery(sample_dir):
    # the installed package (not only the checkout) ships every sample file
    shipped = sorted(p.relative_to(layout.sample_dir()) for p in layout.sample_dir().rglob("*") if p.is_file())
    assert shipped == sorted(p.relative_to(sample_dir) for p in sample_dir.rglob("*") if p.is_file())
    assert (layout.sample_dir() / "train.csv").is_file()
    items = train_items(sample_dir)
    assert len(items) == 100 and [it["id"] for it in items] == sorted(it["id"] for it in items)
    assert set(items[0]) == {"image", "label", "id", "depth"}
    assert all(math.isfinite(it["depth"]) for it in items)
    assert items[0]["image"].endswith(f"train/images/{items[0]['id']}.png")
    assert items[0]["label"].endswith(f"train/masks/{items[0]['id']}.png")
    tests = layout.test_items(sample_dir)
    assert len(tests) == 20 and set(tests[0]) == {"image", "id", "depth"}
    assert check_dataset(sample_dir) == []


def test_load_mask_8_and_16_bit(sample_dir):
    for mask_id, mode in ((EMPTY_ID, "L"), (SALT_ID, "I;16")):
        path = sample_dir / "train" / "masks" / f"{mask_id}.png"
        assert Image.open(path).mode == mode
        mask = load_mask(path)
        assert mask.dtype == np.uint8 and mask.shape == (101, 101) and set(np.unique(mask)) <= {0, 1}
    df = read_rle_csv(sample_dir / "train.csv").set_index("id")
    assert rle_encode(load_mask(sample_dir / "train" / "masks" / f"{SALT_ID}.png")) == df.loc[SALT_ID, "rle_mask"]


def test_load_image_rgb_and_grey(sample_dir, tmp_path):
    path = sample_dir / "train" / "images" / f"{SALT_ID}.png"
    image = load_image(path)
    assert image.dtype == np.uint8 and image.shape == (101, 101)
    np.testing.assert_array_equal(image, np.asarray(Image.open(path))[..., 0])
    Image.fromarray(image).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(load_image(tmp_path / "grey.png"), image)


def test_8bit_salt_mask(tmp_path):
    m = np.zeros((101, 101), np.uint8)
    m[10:20, 30:40] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png").sum() == 100


# ---------------------------------------------------------------- bad input


def test_missing_folders(tmp_path, tiny):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nope'}: dataset folder not found"):
        train_items(tmp_path / "nope")
    assert check_dataset(tmp_path / "nope") == [f"{tmp_path / 'nope'}: dataset folder not found"]
    for p in (tiny / "train" / "masks").iterdir():
        p.unlink()
    (tiny / "train" / "masks").rmdir()
    with pytest.raises(DatasetError, match="train/masks: train masks folder not found"):
        train_items(tiny)
    assert any("train masks folder not found" in p for p in check_dataset(tiny))
    with pytest.raises(DatasetError, match="test images folder not found"):
        layout.test_items(tmp_path)


def test_train_id_without_mask(tiny):
    (tiny / "train" / "masks" / f"{SALT_ID}.png").unlink()
    with pytest.raises(DatasetError, match=f"no mask for train id {SALT_ID}.*{SALT_ID}.png"):
        train_items(tiny)
    problems = check_dataset(tiny)
    assert any(f"no mask for train id {SALT_ID}" in p for p in problems)


def test_mask_without_image(tiny):
    (tiny / "train" / "images" / f"{SALT_ID}.png").unlink()
    problems = check_dataset(tiny)
    assert any(f"no image for mask id {SALT_ID}" in p for p in problems)
    assert any(f"ids with no train image: {SALT_ID}" in p for p in problems)


def test_image_not_101(tiny):
    bad = tiny / "train" / "images" / f"{SALT_ID}.png"
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(bad)
    with pytest.raises(DatasetError, match=f"{bad}: image is 128x128 pixels \\(HxW\\); expected 101x101"):
        load_image(bad)
    assert any(str(bad) in p and "128x128" in p for p in check_dataset(tiny))


def test_image_not_grey_or_not_png(tiny):
    colour = np.zeros((101, 101, 3), np.uint8)
    colour[..., 0] = 7
    bad = tiny / "test" / "images" / "colour.png"
    Image.fromarray(colour).save(bad)
    with pytest.raises(DatasetError, match="channels differ"):
        load_image(bad)
    junk = tiny / "train" / "images" / f"{SALT_ID}.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=f"{junk}: cannot read the image"):
        load_image(junk)
    problems = check_dataset(tiny)
    assert any(str(bad) in p for p in problems) and any(str(junk) in p for p in problems)


@pytest.mark.parametrize(
    "values, dtype, message",
    [
        ((0, 1, 255), np.uint8, "values 0, 1, 255; expected only 0 \\(background\\) and 255 \\(salt\\)"),
        ((0, 1), np.uint8, "values 0, 1; expected only 0"),
        ((0, 300, 65535), np.uint16, "values 0, 300, 65535; expected only 0 \\(background\\) and 65535"),
    ],
)
def test_mask_values(tiny, values, dtype, message):
    m = np.zeros((101, 101), dtype)
    for k, v in enumerate(values):
        m[k] = v
    bad = tiny / "train" / "masks" / f"{SALT_ID}.png"
    Image.fromarray(m).save(bad)
    with pytest.raises(DatasetError, match=message):
        load_mask(bad)
    assert any(str(bad) in p and "expected only 0" in p for p in check_dataset(tiny))


def test_mask_rgb_or_wrong_size(tmp_path):
    Image.fromarray(np.zeros((101, 101, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DatasetError, match="single-channel"):
        load_mask(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((100, 101), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(DatasetError, match="mask is 100x101"):
        load_mask(tmp_path / "small.png")
    assert load_mask(tmp_path / "small.png", shape=None).shape == (100, 101)


def test_depths(tiny):
    path = tiny / "depths.csv"
    lines = path.read_text().splitlines()
    # A train id missing from depths.csv gets NaN; it is not an error.
    path.write_text("\n".join(line for line in lines if not line.startswith(SALT_ID)) + "\n")
    depth = {it["id"]: it["depth"] for it in train_items(tiny)}
    assert math.isnan(depth[SALT_ID]) and math.isfinite(depth[EMPTY_ID])
    assert check_dataset(tiny) == []
    path.unlink()
    assert all(math.isnan(it["depth"]) for it in train_items(tiny))
    path.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(DatasetError, match=f"{path}: id {lines[1].split(',')[0]} appears 2 times \\(lines 2, "):
        read_depths(path)
    with pytest.raises(DatasetError, match="appears 2 times"):
        train_items(tiny)
    path.write_text("id,depth\na,1\n")
    with pytest.raises(DatasetError, match=f"{path}: header is id,depth; expected id,z"):
        read_depths(path)
    path.write_text("id,z\na,1\nb,deep\n")
    with pytest.raises(DatasetError, match=f"{path} line 3 \\(id b\\): depth z='deep' is not a number"):
        read_depths(path)
    assert any(str(path) in p for p in check_dataset(tiny))


def test_train_csv_errors(tiny):
    path = tiny / "train.csv"
    text = path.read_text()
    rows = text.splitlines()
    path.write_text(text.replace("id,rle_mask", "id,mask", 1))
    with pytest.raises(DatasetError, match=f"{path}: header is id,mask; expected id,rle_mask"):
        read_rle_csv(path)
    path.write_text("")
    with pytest.raises(DatasetError, match="empty file"):
        read_rle_csv(path)
    path.write_text("\n".join([*rows, rows[2]]) + "\n")
    with pytest.raises(DatasetError, match=f"id {rows[2].split(',')[0]} appears 2 times \\(lines 3, 8\\)"):
        read_rle_csv(path)
    bad_rows = [*rows]
    bad_rows[3] = bad_rows[3].split(",")[0] + ",10200 5"
    path.write_text("\n".join(bad_rows) + "\n")
    bad_id = bad_rows[3].split(",")[0]
    with pytest.raises(DatasetError, match=f"{path} line 4 \\(id {bad_id}\\): RLE run 1 .* past the 10201 pixels"):
        read_rle_masks(path)
    assert any(f"line 4 (id {bad_id})" in p for p in check_dataset(tiny))
    with pytest.raises(DatasetError, match="file not found"):
        read_rle_csv(tiny / "missing.csv")


def test_train_csv_disagrees_with_masks(tiny):
    path = tiny / "train.csv"
    rows = path.read_text().splitlines()
    empty_row = next(k for k, r in enumerate(rows) if r.startswith(EMPTY_ID))
    rows[empty_row] = f"{EMPTY_ID},1 10"
    rows.append("ffffffffff,")
    path.write_text("\n".join(rows) + "\n")
    problems = check_dataset(tiny)
    assert any(f"line {empty_row + 1} (id {EMPTY_ID}): RLE differs from" in p and "in 10 pixels" in p
               for p in problems)
    assert any("ids with no train image: ffffffffff" in p for p in problems)
    (tiny / "train.csv").unlink()
    assert any("train.csv: file not found" in p for p in check_dataset(tiny))


def test_copy_subset_round_trip(tiny):
    assert len(train_items(tiny)) == 6 and len(layout.test_items(tiny)) == 2
    df, masks = read_rle_masks(tiny / "train.csv")
    assert masks.shape == (6, 101, 101)
    assert df["id"].tolist() == _ids(tiny)
