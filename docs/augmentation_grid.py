"""Draw the training augmentation of the bundle on real tiles: bundles/saltnet/docs/augmentation.png.

Rows are labelled tiles; columns are the tile, each transform of `train#random_transforms` alone (forced to fire),
and three draws of the whole chain at the recipe's probabilities. The salt mask is outlined in green.

    python docs/augmentation_grid.py [--dataset_dir DIR] [--rows 6] [--seed 0] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import set_track_meta
from PIL import Image, ImageDraw

from saltkit.data import sample_dir
from saltkit.data.layout import load_mask, train_items

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "bundles/saltnet/configs/train.json", REPO / "configs/pad.json"]
NAMES = {"RandCutoutd": "cutout", "RandFlipd": "flip", "RandCropRescaled": "crop+rescale",
         "RandHorizontalSheard": "shear", "RandRotated": "rotation", "RandSeparableGridDistortiond": "grid",
         "RandShiftIntensityd": "shift", "RandScaleIntensityd": "scale", "RandGammad": "gamma"}
SCALE, GAP, HEADER = 2, 4, 16


def bundle_transforms(dataset_dir: Path) -> tuple[list, list]:
    """(deterministic, random) transforms of `train#...` exactly as the bundle builds them."""
    parser = ConfigParser()
    parser.read_config([str(c) for c in CONFIGS])
    parser["dataset_dir"] = str(dataset_dir)
    parser["folds_csv"] = str(Path(tempfile.gettempdir()) / "augmentation_grid_folds.csv")  # never written here
    parser.parse()
    return parser.get_parsed_content("train#deterministic_transforms"), parser.get_parsed_content(
        "train#random_transforms")


def pick_tiles(dataset_dir: Path, rows: int) -> list[dict]:
    """`rows` labelled tiles with 10-70 % salt, spread over the (sorted) ids."""
    items = [it for it in train_items(dataset_dir) if 0.1 < load_mask(it["label"]).mean() < 0.7]
    if len(items) < rows:
        raise SystemExit(f"{dataset_dir}: only {len(items)} tiles with 10-70 % salt, need {rows}")
    step = len(items) // rows
    return [items[k * step] for k in range(rows)]


def render(image: torch.Tensor, label: torch.Tensor) -> Image.Image:
    """(3, H, W) image in [0, 1] and (1, H, W) {0, 1} mask -> RGB tile with the mask outline in green."""
    rgb = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    mask = label[0].numpy() > 0.5
    inner = mask.copy()
    inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    rgb[mask & ~inner] = (0, 230, 0)
    tile = Image.fromarray(rgb)
    return tile.resize((tile.width * SCALE, tile.height * SCALE), Image.NEAREST)


def columns(randoms: list, seed: int) -> list[tuple[str, list]]:
    """(header, chain) per column: the tile, each transform alone at p 1, three draws of the recipe chain."""
    cols = [("tile", [])]
    for k, t in enumerate(randoms):
        name = type(t).__name__
        if name not in NAMES:
            continue  # the clips to [0, 1] that follow the intensity changes
        alone = copy.deepcopy(t)
        alone.prob = 1.0
        alone.set_random_state(seed + k)
        following_clip = randoms[k + 1:k + 2] if name in ("RandShiftIntensityd", "RandScaleIntensityd") else []
        cols.append((NAMES[name], [alone, *following_clip]))
    for d in range(3):
        chain = copy.deepcopy(randoms)
        for k, t in enumerate(chain):
            if hasattr(t, "set_random_state"):
                t.set_random_state(seed + 100 * (d + 1) + k)
        cols.append((f"recipe #{d + 1}", chain))
    return cols


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset_dir", type=Path, default=sample_dir())
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bundles/saltnet/docs/augmentation.png")
    args = ap.parse_args(argv)
    set_track_meta(False)
    deterministic, randoms = bundle_transforms(args.dataset_dir)
    cols = columns(randoms, args.seed)
    tiles = pick_tiles(args.dataset_dir, args.rows)
    side = 101 * SCALE
    sheet = Image.new("RGB", (len(cols) * (side + GAP) - GAP, HEADER + len(tiles) * (side + GAP) - GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (name, _) in enumerate(cols):
        draw.text((c * (side + GAP) + 4, 2), name, fill="black")
    for r, item in enumerate(tiles):
        loaded = dict(item)
        for t in deterministic:
            loaded = t(loaded)
        for c, (_, chain) in enumerate(cols):
            d = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in loaded.items()}
            for t in chain:
                d = t(d)
            sheet.paste(render(d["image"], d["label"]), (c * (side + GAP), HEADER + r * (side + GAP)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out}: {len(tiles)} tiles x {len(cols)} columns")
    return args.out


if __name__ == "__main__":
    main()
