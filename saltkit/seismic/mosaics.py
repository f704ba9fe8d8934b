"""Real seismic sections rebuilt from competition tiles: `mosaics.csv` (mosaic,row,col,id) puts tiles back on the
101-pixel grid of the larger image they were cut from (row r+1 directly below row r, col c+1 right of col c).

Cells whose tile is not in the data set are absent; in an assembled section they hold `fill` (by default the mean
grey of the present tiles) and are marked in `present`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from saltkit.data.layout import load_image, load_mask, read_id_csv
from saltkit.geometry import TILE_SIZE

PLAIN_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
MAX_MOSAIC_PIXELS = 400_000_000  # the largest mosaics of the competition are a few megapixels; 400 Mpx: 1.6 GB


@dataclass
class Mosaic:
    """One assembled section.

    name; image (H, W) uint8 grey; mask (H, W) uint8 {0, 1} (0 where unknown); present / labelled (H, W) bool:
    pixels of a tile in the data set / of a labelled (train) tile; cells: DataFrame row, col, id, y, x (top-left
    pixel), labelled.
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    present: np.ndarray
    labelled: np.ndarray
    cells: pd.DataFrame

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape


def read_mosaics(path: str | Path) -> pd.DataFrame:
    """The `mosaic,row,col,id` table; errors name the file and row (negative or repeated cells, repeated ids)."""
    df = read_id_csv(path, ["mosaic", "row", "col", "id"])
    for col in ("row", "col"):
        bad = pd.to_numeric(df[col], errors="coerce")
        wrong = bad.isna() | (bad < 0) | (bad != bad.round())  # 1.5 was truncated to 1
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise ValueError(f"{path}: row {i + 2}: {col} must be a non-negative integer, got {df[col].iloc[i]!r}")
        df[col] = bad.astype(int)
    for col, use in (("id", "a tile file name"), ("mosaic", "an output file name")):
        # ids become paths inside the dataset and names files inside --out: `../x` must not leave either folder
        wrong = ~df[col].astype(str).str.fullmatch(PLAIN_NAME) | df[col].astype(str).str.contains(r"\.\.")
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            raise ValueError(f"{path}: row {i + 2}: {col} {df[col].iloc[i]!r} is not a plain name (letters, digits, "
                             f"'_', '-', '.'; no folders): it is used as {use}")
    dup = df.duplicated(["mosaic", "row", "col"], keep=False)
    if dup.any():
        r = df[dup].iloc[0]
        raise ValueError(f"{path}: mosaic {r['mosaic']} cell ({r['row']}, {r['col']}) is listed more than once")
    return df


def mosaic_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per mosaic: grid rows, cols, tiles, height and width in pixels, filled share; largest first."""
    g = df.groupby("mosaic").agg(rows=("row", "max"), cols=("col", "max"), tiles=("id", "size"))
    g["rows"] += 1
    g["cols"] += 1
    g["height"], g["width"] = g["rows"] * TILE_SIZE, g["cols"] * TILE_SIZE
    g["filled"] = g["tiles"] / (g["rows"] * g["cols"])
    return g.sort_values(["tiles", "filled"], ascending=False)


def assemble_mosaic(dataset_dir: str | Path, name: str, table: pd.DataFrame, fill: int | None = None,
                    crop: bool = True) -> Mosaic:
    """Place mosaic `name`'s tiles (train or test images of `dataset_dir`) on its grid.

    crop: drop empty grid rows / columns at the edges (the grid then starts at the first listed cell).
    """
    root = Path(dataset_dir)
    cells = table[table["mosaic"] == name].copy()
    if cells.empty:
        raise ValueError(f"mosaic {name!r} is not in the mosaics table")
    if crop:
        cells["row"] -= cells["row"].min()
        cells["col"] -= cells["col"].min()
    h, w = (cells["row"].max() + 1) * TILE_SIZE, (cells["col"].max() + 1) * TILE_SIZE
    if h * w > MAX_MOSAIC_PIXELS:
        raise ValueError(f"mosaic {name!r}: rows up to {cells['row'].max()} and columns up to {cells['col'].max()} "
                         f"make a {h} x {w} image ({h * w / 1e6:.0f} megapixels, more than "
                         f"{MAX_MOSAIC_PIXELS / 1e6:.0f}); the mosaics table's row and col count grid cells of "
                         "101-pixel tiles: check those rows")
    image = np.zeros((h, w), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    present = np.zeros((h, w), bool)
    labelled = np.zeros((h, w), bool)
    cells["y"], cells["x"] = cells["row"] * TILE_SIZE, cells["col"] * TILE_SIZE
    is_labelled = []
    for tile_id, y, x in zip(cells["id"], cells["y"], cells["x"], strict=True):
        window = np.s_[y:y + TILE_SIZE, x:x + TILE_SIZE]
        train = root / "train" / "images" / f"{tile_id}.png"
        path = train if train.is_file() else root / "test" / "images" / f"{tile_id}.png"
        image[window] = load_image(path)
        present[window] = True
        mask_path = root / "train" / "masks" / f"{tile_id}.png"
        is_labelled.append(train.is_file() and mask_path.is_file())
        if is_labelled[-1]:
            mask[window] = load_mask(mask_path)
            labelled[window] = True
    cells["labelled"] = is_labelled
    if fill is None:
        fill = int(round(float(image[present].mean())))
    image[~present] = fill
    return Mosaic(name, image, mask, present, labelled, cells.reset_index(drop=True))


def crop_tiles(section: np.ndarray, cells: pd.DataFrame) -> np.ndarray:
    """`(N, 101, 101)` windows of an `(H, W)` section map at the cells' top-left pixels `y`, `x`."""
    return np.stack([section[y:y + TILE_SIZE, x:x + TILE_SIZE] for y, x in zip(cells["y"], cells["x"], strict=True)])
