"""The competition's folder layout: discovery of train/test tiles, their CSVs, and checked PNG loading.

    <root>/train/images/<id>.png   101x101 seismic tile, 8-bit grey (often stored as RGB with grey repeated)
    <root>/train/masks/<id>.png    binary salt mask, 8-bit 0/255 or 16-bit 0/65535
    <root>/train.csv               id,rle_mask (empty rle_mask = no salt)
    <root>/depths.csv              id,z (optional; a missing id gets depth NaN)
    <root>/test/images/<id>.png    unlabelled tiles

File names end in .png in any case (.PNG too); a name that is not valid UTF-8 is refused (ids go into UTF-8 CSVs).
Palette PNGs are read through their palette (grey palettes only), never as raw palette indices.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from saltkit.rle import TILE_SHAPE, RLEError, rle_decode_many


class DatasetError(ValueError):
    """A dataset file or folder that is missing or malformed; the message names the file and the id or line."""


def sample_dir() -> Path:
    """The 100-tile labelled sample (and 20 test tiles) shipped inside the package, in the competition layout."""
    return Path(__file__).resolve().parents[1] / "sample_data" / "tgs"


def id_listing(ids: Iterable[str], limit: int = 5) -> str:
    """'a, b, c' or 'a, b, ... (12 in all)' for error messages."""
    ids = list(ids)
    shown = ", ".join(ids[:limit])
    return shown if len(ids) <= limit else f"{shown}, ... ({len(ids)} in all)"


def printable(path: str | Path) -> str:
    """`path` as text that prints anywhere: bytes of a name that are not valid UTF-8 appear as \\xNN escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def csv_line(row: int) -> int:
    """File line number of data row `row` (0-based) in a CSV with one header line."""
    return row + 2


# ---------------------------------------------------------------- CSV files


def read_id_csv(path: str | Path, columns: list[str]) -> pd.DataFrame:
    """Read a CSV whose header must be exactly `columns` (first one `id`) as strings; ids non-empty and unique."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (expected a CSV with header {','.join(columns)})")
    try:
        # Strings throughout: ids such as '1e0123' must not turn into numbers, empty cells stay ''.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: empty file; expected header {','.join(columns)}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not a readable CSV ({e})") from None
    if list(df.columns) != columns:
        raise DatasetError(f"{path}: header is {','.join(map(str, df.columns))}; expected {','.join(columns)}")
    empty = np.flatnonzero(df["id"].str.strip().eq("").to_numpy())
    if len(empty):
        raise DatasetError(f"{path} line {csv_line(empty[0])}: empty id")
    dup = df["id"].duplicated(keep=False).to_numpy()
    if dup.any():
        first = df["id"].iloc[np.flatnonzero(dup)[0]]
        lines = [csv_line(i) for i in np.flatnonzero(df["id"].eq(first).to_numpy())]
        raise DatasetError(f"{path}: id {first} appears {len(lines)} times (lines {', '.join(map(str, lines))}); "
                           "each id must appear once")
    return df


def read_rle_csv(path: str | Path) -> pd.DataFrame:
    """Read an `id,rle_mask` CSV (train.csv or a submission) -> DataFrame(id, rle_mask), empty mask = ''.

    Checks the header and that ids are unique; the RLE strings are checked by `read_rle_masks`.
    """
    return read_id_csv(path, ["id", "rle_mask"])


def decode_rle_column(df: pd.DataFrame, path: str | Path, shape: tuple[int, int] = TILE_SHAPE) -> np.ndarray:
    """Decode the `rle_mask` column of a frame read from `path` -> uint8 (N, H, W); errors name line and id."""
    try:
        return rle_decode_many(df["rle_mask"].tolist(), shape)
    except RLEError as e:
        raise DatasetError(f"{path} line {csv_line(e.index)} (id {df['id'].iloc[e.index]}): {e}") from None


def read_rle_masks(path: str | Path, shape: tuple[int, int] = TILE_SHAPE) -> tuple[pd.DataFrame, np.ndarray]:
    """Read and decode an `id,rle_mask` CSV -> (DataFrame(id, rle_mask), uint8 (N, H, W) masks in file order)."""
    df = read_rle_csv(path)
    return df, decode_rle_column(df, path, shape)


def read_depths(path: str | Path) -> pd.DataFrame:
    """Read depths.csv -> DataFrame(id: str, z: float64). Header must be `id,z`, ids unique, z numeric."""
    df = read_id_csv(path, ["id", "z"])
    z = pd.to_numeric(df["z"], errors="coerce")
    bad = np.flatnonzero(z.isna().to_numpy())
    if len(bad):
        i = bad[0]
        raise DatasetError(f"{path} line {csv_line(i)} (id {df['id'].iloc[i]}): depth z={df['z'].iloc[i]!r} "
                           "is not a number")
    return pd.DataFrame({"id": df["id"], "z": z.astype(np.float64)})


def depth_lookup(root: str | Path) -> dict[str, float]:
    """id -> depth from `<root>/depths.csv`; an empty dict when the file is absent (depths are optional)."""
    path = Path(root) / "depths.csv"
    if not path.exists():
        return {}
    df = read_depths(path)
    return dict(zip(df["id"], df["z"].tolist(), strict=True))


# ---------------------------------------------------------------- PNG files


def _read_png(path: str | Path, what: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Pixels of a PNG; the size is checked against `shape` (H, W) before decoding, a palette image is mapped
    through its palette (which must be grey) to 8-bit grey."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{printable(path)}: {what} file not found")
    try:
        with Image.open(path) as im:
            if shape is not None and (im.height, im.width) != tuple(shape):
                raise DatasetError(f"{printable(path)}: {what} is {im.height}x{im.width} pixels (HxW); "
                                   f"expected {shape[0]}x{shape[1]}")
            if im.mode in ("P", "PA"):
                return _grey_from_palette(np.asarray(im.convert("RGB")), path, what)
            return np.asarray(im)
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{printable(path)}: {what} is far too large to read ({e}); expected a "
                           f"{TILE_SHAPE[0]}x{TILE_SHAPE[1]} tile") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{printable(path)}: cannot read the {what} ({e})") from None


def _grey_from_palette(rgb: np.ndarray, path: Path, what: str) -> np.ndarray:
    """(H, W, 3) colours of a palette PNG -> (H, W) uint8 grey; DatasetError when a used colour is not grey."""
    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
        raise DatasetError(f"{printable(path)}: palette {what} with colours that are not grey; expected a grey PNG")
    return np.ascontiguousarray(rgb[..., 0])


def load_image(path: str | Path, shape: tuple[int, int] | None = TILE_SHAPE) -> np.ndarray:
    """Load a seismic tile -> uint8 (H, W). Accepts 8-bit grey or RGB(A) with equal channels; checks (H, W) = shape."""
    arr = _read_png(path, "image", shape)
    if arr.dtype != np.uint8:
        raise DatasetError(f"{path}: image has {arr.dtype} pixels; expected 8-bit grey or RGB")
    if arr.ndim == 3:
        if arr.shape[2] not in (3, 4):
            raise DatasetError(f"{path}: image has {arr.shape[2]} channels; expected 1 (grey) or 3 (RGB)")
        rgb = arr[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
            raise DatasetError(f"{path}: RGB image whose channels differ; expected grey repeated in R, G and B")
        arr = rgb[..., 0]
    return np.ascontiguousarray(arr)


def mask_foreground(arr: np.ndarray) -> int:
    """Stored salt value for a mask array's dtype: 255 for 8-bit, 65535 for 16-bit, 1 for bilevel."""
    if arr.dtype == bool:
        return 1
    if arr.dtype == np.uint8:
        return 255
    # Pillow reads 16-bit grey PNGs as uint16 ('I;16') or, in older versions, int32 ('I').
    return 65535


def load_mask(path: str | Path, shape: tuple[int, int] | None = TILE_SHAPE) -> np.ndarray:
    """Load a salt mask PNG -> uint8 (H, W) in {0, 1}. Only 0 and the full-scale value (255 / 65535) are allowed."""
    arr = _read_png(path, "mask", shape)
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16, np.int32, bool):
        raise DatasetError(f"{path}: mask is {arr.dtype} with shape {arr.shape}; expected a single-channel "
                           "8-bit (0/255) or 16-bit (0/65535) PNG")
    fg = mask_foreground(arr)
    salt = arr == fg
    if not (salt | (arr == 0)).all():
        values = np.unique(arr)
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        raise DatasetError(f"{path}: mask has values {shown}; expected only 0 (background) and {fg} (salt)")
    return salt.astype(np.uint8)


# ---------------------------------------------------------------- discovery


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} folder not found")


def png_files(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """({id: path} of the .png files in `folder`, any case of the suffix; [problems]): a name that is not valid
    UTF-8, or two files of one id (a.png and a.PNG), is a problem and left out."""
    ids: dict[str, Path] = {}
    problems: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() != ".png" or not p.is_file():
            continue
        try:
            p.name.encode("utf-8")
        except UnicodeEncodeError:
            problems.append(f"{printable(p)}: file name is not valid UTF-8; rename it (ids are written to UTF-8 CSVs)")
            continue
        if p.stem in ids:
            problems.append(f"{p}: id {p.stem} has two files ({ids[p.stem].name} and {p.name}); keep one")
            del ids[p.stem]
            continue
        ids[p.stem] = p
    return ids, problems


def _png_ids(folder: Path) -> dict[str, Path]:
    """{id: path} of the .png files in `folder`; DatasetError on a problem of `png_files`."""
    ids, problems = png_files(folder)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DatasetError(problems[0] + more)
    return ids


def train_items(root: str | Path) -> list[dict]:
    """Labelled tiles of `<root>/train` sorted by id -> [{"image": str, "label": str, "id": str, "depth": float}].

    Every image needs a mask of the same name; depth is NaN when depths.csv lacks the id (or is absent).
    Files are not opened here (see `check_dataset`).
    """
    root = Path(root)
    _require_dir(root, "dataset")
    images_dir, masks_dir = root / "train" / "images", root / "train" / "masks"
    _require_dir(images_dir, "train images")
    _require_dir(masks_dir, "train masks")
    images = _png_ids(images_dir)
    if not images:
        raise DatasetError(f"{images_dir}: no .png train images")
    masks = _png_ids(masks_dir)
    missing = [i for i in images if i not in masks]
    if missing:
        raise DatasetError(f"{masks_dir}: no mask for train id {id_listing(missing)} "
                           f"(expected {masks_dir / (missing[0] + '.png')})")
    depths = depth_lookup(root)
    return [{"image": str(images[i]), "label": str(masks[i]), "id": i, "depth": depths.get(i, math.nan)}
            for i in images]


def test_items(root: str | Path) -> list[dict]:
    """Unlabelled tiles of `<root>/test/images` sorted by id -> [{"image": str, "id": str, "depth": float}]."""
    root = Path(root)
    _require_dir(root, "dataset")
    images_dir = root / "test" / "images"
    _require_dir(images_dir, "test images")
    images = _png_ids(images_dir)
    if not images:
        raise DatasetError(f"{images_dir}: no .png test images")
    depths = depth_lookup(root)
    return [{"image": str(images[i]), "id": i, "depth": depths.get(i, math.nan)} for i in images]


def check_dataset(root: str | Path, shape: tuple[int, int] = TILE_SHAPE) -> list[str]:
    """Check a dataset folder thoroughly -> list of problems (empty when fine); opens every file.

    Checks: folders present; every train image has a mask and every mask an image; images are grey `shape`
    tiles; masks binary; train.csv (required) has the right header, unique ids, valid RLE, the same ids as the
    images and RLE equal to the mask PNGs; depths.csv (optional) well formed; test images (optional) valid.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: dataset folder not found"]
    problems: list[str] = []
    images_dir, masks_dir = root / "train" / "images", root / "train" / "masks"
    for folder, what in ((images_dir, "train images"), (masks_dir, "train masks")):
        if not folder.is_dir():
            problems.append(f"{folder}: {what} folder not found")
    if problems:
        return problems
    (images, image_problems), (masks, mask_problems) = png_files(images_dir), png_files(masks_dir)
    problems += image_problems + mask_problems
    if not images:
        problems.append(f"{images_dir}: no .png train images")
    no_mask = [i for i in images if i not in masks]
    if no_mask:
        problems.append(f"{masks_dir}: no mask for train id {id_listing(no_mask)}")
    no_image = [i for i in masks if i not in images]
    if no_image:
        problems.append(f"{images_dir}: no image for mask id {id_listing(no_image)}")
    for path in images.values():
        problems += _problem(load_image, path, shape)
    loaded: dict[str, np.ndarray] = {}
    for i, path in masks.items():
        try:
            loaded[i] = load_mask(path, shape)
        except DatasetError as e:
            problems.append(str(e))
    problems += _train_csv_problems(root / "train.csv", images, masks, loaded, shape)
    if (root / "depths.csv").exists():
        problems += _problem(read_depths, root / "depths.csv")
    test_dir = root / "test" / "images"
    if test_dir.is_dir():
        test_images, test_problems = png_files(test_dir)
        problems += test_problems
        for path in test_images.values():
            problems += _problem(load_image, path, shape)
    return problems


def _problem(fn, *args) -> list[str]:
    """[] when fn(*args) succeeds, else [its DatasetError message]."""
    try:
        fn(*args)
    except DatasetError as e:
        return [str(e)]
    return []


def _train_csv_problems(path: Path, images: dict, masks: dict, loaded: dict, shape) -> list[str]:
    try:
        df, rle_masks = read_rle_masks(path, shape)
    except DatasetError as e:
        return [str(e)]
    problems = []
    ids = df["id"].tolist()
    unknown = [i for i in ids if i not in images]
    if unknown:
        problems.append(f"{path}: ids with no train image: {id_listing(unknown)}")
    absent = sorted(set(images) - set(ids))
    if absent:
        problems.append(f"{path}: train images missing from the CSV: {id_listing(absent)}")
    for row, i in enumerate(ids):
        if i in loaded:
            differ = int((loaded[i] != rle_masks[row]).sum())
            if differ:
                problems.append(f"{path} line {csv_line(row)} (id {i}): RLE differs from {masks[i]} "
                                f"in {differ} pixels")
    return problems


def copy_subset(root: str | Path, dest: str | Path, train_ids: Iterable[str], test_ids: Iterable[str] = ()) -> Path:
    """Copy some tiles of a dataset into a new folder in the same layout (train.csv / depths.csv rows included).

    For quick runs and tests on a few tiles: `copy_subset(sample_dir(), tmp_path / "tgs", ids[:8])`.
    """
    import shutil

    from saltkit.io import atomic_write

    root, dest = Path(root), Path(dest)
    train_ids, test_ids = list(train_ids), list(test_ids)
    for sub in ("train/images", "train/masks", "test/images"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for i in train_ids:
        shutil.copyfile(root / "train" / "images" / f"{i}.png", dest / "train" / "images" / f"{i}.png")
        shutil.copyfile(root / "train" / "masks" / f"{i}.png", dest / "train" / "masks" / f"{i}.png")
    for i in test_ids:
        shutil.copyfile(root / "test" / "images" / f"{i}.png", dest / "test" / "images" / f"{i}.png")
    train = read_rle_csv(root / "train.csv").set_index("id")
    with atomic_write(dest / "train.csv") as f:
        train.loc[train_ids].reset_index().to_csv(f, index=False)
    if (root / "depths.csv").exists():
        depths = read_id_csv(root / "depths.csv", ["id", "z"])
        with atomic_write(dest / "depths.csv") as f:
            depths[depths["id"].isin(set(train_ids) | set(test_ids))].to_csv(f, index=False)
    return dest
