"""Tile pictures: outlines of real masks in two colours, captions, the grid's layout, and the script that
draws the bundle docs' picture."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saltkit.data import load_image, load_mask, train_items
from saltkit.data.layout import copy_subset
from saltkit.pictures import BOTH_RGB, PRED_RGB, TRUTH_RGB, inner_outline, outline_tile, tile_grid

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiles(sample_dir):
    """Six real tiles with salt, their masks, and predictions shifted 4 pixels to the right."""
    items = [it for it in train_items(sample_dir) if 500 < load_mask(it["label"]).sum() < 9000][:6]
    images = np.stack([load_image(it["image"]) for it in items])
    truths = np.stack([load_mask(it["label"]) for it in items])
    preds = np.zeros_like(truths)
    preds[:, :, 4:] = truths[:, :, :-4]
    return images, truths, preds, [it["id"] for it in items]


def test_outline_is_the_mask_edge(tiles):
    _, truths, _, _ = tiles
    edge = inner_outline(truths[0])
    inside = truths[0].astype(bool)
    assert edge.any() and not (edge & ~inside).any()  # on the salt side of the edge
    interior = inside.copy()
    interior[1:-1, 1:-1] &= inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    interior[[0, -1], :] = interior[:, [0, -1]] = False
    assert not (edge & interior).any()  # not inside the salt
    full = inner_outline(np.ones((101, 101)))
    assert full.sum() == 4 * 100 and full[0].all()  # salt filling the tile is outlined along the tile's border


def test_outline_tile_colours(tiles):
    images, truths, preds, _ = tiles
    rgb = outline_tile(images[0], truths[0], preds[0], scale=2)
    assert rgb.shape == (202, 202, 3) and rgb.dtype == np.uint8
    t, p = inner_outline(truths[0]), inner_outline(preds[0])
    for colour, where in ((TRUTH_RGB, t & ~p), (PRED_RGB, p & ~t), (BOTH_RGB, t & p)):
        assert (rgb == colour).all(-1).sum() == 4 * where.sum()
    grey = ~(t | p)
    np.testing.assert_array_equal(rgb[::2, ::2][grey], np.repeat(images[0][grey][:, None], 3, axis=1))


def test_tile_grid_layout_and_captions(tiles):
    images, truths, preds, ids = tiles
    scores = np.linspace(0.0, 0.5, len(ids))
    grid = tile_grid(images, truths, preds, ids, scores, columns=4)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    assert 4 * 202 < grid.shape[1] < 4 * 202 + 60 and 2 * 202 < grid.shape[0] < 2 * 202 + 120  # 2 rows of 4
    assert (grid == TRUTH_RGB).all(-1).any() and (grid == PRED_RGB).all(-1).any()
    # a caption (dark text on white) under each tile, nothing in the two empty cells of the second row
    bare = tile_grid(images, truths, preds, ids, scores, columns=4, legend=False)
    gap, size = 6, 202
    text_h = (bare.shape[0] - gap) // 2 - size - gap
    for k in range(8):
        x, y = gap + (k % 4) * (size + gap), gap + (k // 4) * (size + text_h + gap) + size
        strip = bare[y : y + text_h, x : x + size].min(-1)
        assert (strip.min() < 100) == (k < 6), k
    one = tile_grid(images[:1], truths[:1], preds[:1], ids[:1], scores[:1], columns=4, legend=False)
    assert one.shape[1] < 202 + 40  # a single tile: one column
    with pytest.raises(ValueError, match="6 tiles, 6 truths, 6 predictions, 5 ids"):
        tile_grid(images, truths, preds, ids[:5], scores)


def test_docs_pictures_script_runs_on_a_run_folder(sample_dir, tmp_path):
    """`python bundles/saltnet/docs/make_pictures.py RUN/best_metric.pt`, as its docstring writes it, on a
    tiny run: a small network's checkpoint beside the run record of a 12-tile dataset."""
    from saltkit.networks import SaltUNet

    data = copy_subset(sample_dir, tmp_path / "tgs", [it["id"] for it in train_items(sample_dir)][:12])
    run = tmp_path / "runs" / "pad_fold0"
    run.mkdir(parents=True)
    record = {"dataset_dir": str(data), "folds_csv": str(tmp_path / "folds.csv"), "fold": 0, "num_folds": 3,
              "variant": "pad"}
    (run / "config.json").write_text(json.dumps({"resolved": record}))
    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False).eval()
    torch.save({"network": net.state_dict(), "arch": net.arch, "variant": "pad"}, run / "best_metric.pt")
    out = tmp_path / "worst_tiles.png"
    done = subprocess.run([sys.executable, str(REPO / "bundles/saltnet/docs/make_pictures.py"),
                           str(run / "best_metric.pt"), "--out", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"wrote {out}"
    assert Image.open(out).mode == "RGB"
