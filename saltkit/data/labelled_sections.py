"""Labelled seismic sections as training data: a folder of `NAME.png` (or `.tif`, `.npy`) sections, each with
`NAME_mask.png` beside it (0 background, 255 salt, 128 not interpreted: `saltkit.labels.MASK_IMAGE_VALUES`), as
`saltkit mosaic` writes them or a geoscientist draws them.

Here: the folder listed (`list_sections`; sections without a mask are skipped and counted), a mask read and
checked (`read_section_mask`), folds by section (`section_folds`: never windows of one section on both sides,
balanced by labelled pixel count) stored as a `name,fold` CSV, and the fold split train.json asks for
(`training_split`). Reading the section images and drawing training windows from them is
`saltkit.seismic.training_sections` (the section readers of `saltkit predict` live in that layer).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from saltkit.config import ConfigError, none_if_null
from saltkit.data.layout import DatasetError, csv_line, id_listing
from saltkit.io import atomic_write
from saltkit.labels import MASK_IMAGE_VALUES, labels_from_values

MASK_SUFFIX = "_mask.png"
SECTION_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
SECTION_FOLD_COLUMNS = ["name", "fold"]


@dataclass(frozen=True)
class SectionFiles:
    """One labelled section of a sections folder: its name, image file and mask file."""

    name: str
    image: Path
    mask: Path

    def item(self) -> dict:
        """The data dict of the section as train.json's items carry it ("id" is the section's name)."""
        return {"id": self.name, "image": str(self.image), "label": str(self.mask)}


def list_sections(folder: str | Path) -> tuple[list[SectionFiles], list[str]]:
    """(the labelled sections of `folder` sorted by name, the names of sections without a mask, skipped).

    DatasetError naming the file for a mask without its section, two images of one name (`a.png` and `a.npy`) or a
    folder with no labelled section.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder; expected sections NAME.png (.tif, .npy) with NAME_mask.png "
                           "beside each (saltkit mosaic writes such a folder)")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    masks = {p.name[: -len(MASK_SUFFIX)]: p for p in files if p.name.endswith(MASK_SUFFIX)}
    images: dict[str, Path] = {}
    for p in files:
        if p.suffix.lower() not in SECTION_SUFFIXES or p.name.endswith(MASK_SUFFIX):
            continue
        if p.stem in images:
            raise DatasetError(f"{p}: a second section named {p.stem} (also {images[p.stem].name}); keep one file "
                               "per section name")
        images[p.stem] = p
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DatasetError(f"{masks[orphans[0]]}: a mask without its section {orphans[0]}.png (.tif, .npy); add "
                           "the section or remove the mask")
    sections = [SectionFiles(name, images[name], masks[name]) for name in sorted(images) if name in masks]
    if not sections:
        raise DatasetError(f"{folder}: no labelled section (NAME.png, .tif or .npy with NAME_mask.png beside it); "
                           "saltkit mosaic DATA NAME --out DIR writes such pairs")
    return sections, sorted(set(images) - set(masks))


def read_section_mask(path: str | Path) -> np.ndarray:
    """`(H, W)` float32 labels of a mask PNG: 0 background, 1 salt, IGNORE_LABEL where it holds 128 (not
    interpreted); DatasetError naming the file for another kind of image or another value."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            values = np.asarray(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot read the mask ({e})") from None
    if values.ndim != 2 or values.dtype != np.uint8:
        raise DatasetError(f"{path}: mask is {values.dtype} with shape {values.shape}; expected a single-channel "
                           "8-bit PNG holding 0 (background), 255 (salt) and 128 (not interpreted)")
    try:
        return labels_from_values(values, MASK_IMAGE_VALUES, path)
    except ValueError as e:
        raise DatasetError(str(e)) from None


def files_fingerprint(sections: list[SectionFiles]) -> str:
    """SHA-256 (hex, first 16 digits) of sections: name, image bytes and mask bytes of each, in name order."""
    digest = hashlib.sha256()
    for s in sorted(sections, key=lambda s: s.name):
        digest.update(f"{s.name}:{section_fingerprint(s)}\n".encode())
    return digest.hexdigest()[:16]


def section_fingerprint(section: SectionFiles) -> str:
    """SHA-256 (hex, first 16 digits) of one section's image and mask bytes."""
    digest = hashlib.sha256()
    for path in (section.image, section.mask):
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- folds by section


def section_folds(names, labelled_pixels, k: int = 5, seed: int = 0) -> pd.DataFrame:
    """Folds of whole sections -> DataFrame(name, fold) sorted by name.

    Balanced by labelled pixel count: the sections, shuffled with `seed` and then sorted largest first, go one by
    one to the fold with the fewest labelled pixels so far (the lower fold number on a tie). Every fold gets at
    least one section. Depends only on the (name, count) pairs, not on their order.
    """
    names = [str(n) for n in names]
    counts = np.asarray(labelled_pixels, dtype=np.int64)
    if len(counts) != len(names):
        raise ValueError(f"{len(names)} names but {len(counts)} labelled pixel counts")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate section names: {id_listing(sorted(n for n in set(names) if names.count(n) > 1))}")
    if not 2 <= k <= len(names):
        raise ValueError(f"k={k} folds needs 2 <= k <= number of sections ({len(names)}); lower num_folds or add "
                         "sections")
    order = np.argsort(np.array(names, dtype=object), kind="stable")
    shuffled = order[np.random.default_rng(seed).permutation(len(order))]
    dealt = shuffled[np.argsort(-counts[shuffled], kind="stable")]
    totals, sizes = np.zeros(k, np.int64), np.zeros(k, np.int64)
    fold = np.empty(len(names), np.int64)
    for rank, i in enumerate(dealt):
        remaining_empty = int((sizes == 0).sum())
        choices = np.flatnonzero(sizes == 0) if len(dealt) - rank <= remaining_empty else np.arange(k)
        f = int(choices[np.argmin(totals[choices])])
        fold[i] = f
        totals[f] += counts[i]
        sizes[f] += 1
    df = pd.DataFrame({"name": np.array(names, dtype=object)[order].astype(str), "fold": fold[order]})
    return df


def write_section_folds(df: pd.DataFrame, path: str | Path) -> None:
    """Write a `name,fold` table as CSV, atomically."""
    if list(df.columns) != SECTION_FOLD_COLUMNS:
        raise ValueError(f"section folds table columns are {list(df.columns)}; expected {SECTION_FOLD_COLUMNS}")
    with atomic_write(path) as f:
        df.to_csv(f, index=False)


def read_section_folds(path: str | Path, k: int | None = None) -> pd.DataFrame:
    """A `name,fold` CSV -> DataFrame(name: str, fold: int64); DatasetError naming the file and line when the
    header, a name or a fold is wrong (folds 0..k-1, each holding a section)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (expected a CSV with header {','.join(SECTION_FOLD_COLUMNS)})")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not a readable CSV ({e}); expected header name,fold") from None
    if list(df.columns) != SECTION_FOLD_COLUMNS:
        raise DatasetError(f"{path}: header is {','.join(map(str, df.columns))}; expected name,fold (a section "
                           "folds file; tile folds are id,fold,coverage_class)")
    dup = np.flatnonzero(df["name"].duplicated().to_numpy())
    if len(dup):
        raise DatasetError(f"{path} line {csv_line(dup[0])}: section {df['name'].iloc[dup[0]]} is listed twice")
    folds = pd.to_numeric(df["fold"], errors="coerce")
    n = k if k is not None else (int(folds.max()) + 1 if len(folds) and folds.notna().all() else 0)
    bad = np.flatnonzero((folds.isna() | (folds != folds.round()) | (folds < 0) | (folds >= n)).to_numpy())
    if len(bad):
        raise DatasetError(f"{path} line {csv_line(bad[0])} (section {df['name'].iloc[bad[0]]}): fold "
                           f"{df['fold'].iloc[bad[0]]!r} is not an integer in 0..{n - 1}")
    out = pd.DataFrame({"name": df["name"], "fold": folds.astype(np.int64)})
    empty = sorted(set(range(n)) - set(out["fold"].tolist()))
    if empty:
        raise DatasetError(f"{path}: fold(s) {', '.join(map(str, empty))} hold no section; folds must be 0..{n - 1}")
    return out


def labelled_pixel_counts(sections: list[SectionFiles]) -> list[int]:
    """Labelled (salt or background) pixels of each section's mask (no-data pixels of the section not removed:
    `saltkit mosaic` marks its absent cells 128 in the mask as well)."""
    return [int((read_section_mask(s.mask) >= 0).sum()) for s in sections]


def folds_for_sections(folder: str | Path, k: int = 5, seed: int = 0) -> pd.DataFrame:
    """`section_folds` of the labelled sections of `folder`."""
    sections, _ = list_sections(folder)
    try:
        return section_folds([s.name for s in sections], labelled_pixel_counts(sections), k, seed)
    except ValueError as e:
        raise DatasetError(f"{folder}: {e}") from None


def ensure_section_folds(folder: str | Path, path: str | Path, k: int = 5, seed: int = 0) -> pd.DataFrame:
    """Folds of the sections of `folder` stored at `path`: written when missing, else read and checked against
    the folder's section names."""
    path = Path(path)
    if not path.exists():
        df = folds_for_sections(folder, k, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_section_folds(df, path)
        return df
    df = read_section_folds(path, k)
    names = {s.name for s in list_sections(folder)[0]}
    listed = set(df["name"])
    if names != listed:
        differ = sorted(names ^ listed)
        raise DatasetError(f"{path}: its sections differ from those of {folder} (in {id_listing(differ)}); delete "
                           "it to regenerate, or point folds_csv at the right file")
    return df


def training_split(dataset_dir, folds_csv, fold: int, num_folds: int, sections_dir=None):
    """(train items, validation items) of `fold`: the tiles of `dataset_dir` (`saltkit.data.folds.fold_split`),
    or, with `sections_dir`, its labelled sections ({"id": name, "image", "label"}), split by section.

    Args:
        dataset_dir: the dataset folder in the competition layout (tile training).
        folds_csv: the fold file, written when missing: id,fold,coverage_class of tiles or name,fold of sections.
        fold: the fold held out for validation, 0..num_folds-1.
        num_folds: the number of folds K.
        sections_dir: config key `sections_dir`: a folder of sections with masks; null: tiles.
    """
    from saltkit.data.folds import fold_split

    folder = none_if_null(sections_dir)
    if folder is None:
        return fold_split(dataset_dir, folds_csv, fold, num_folds)
    import ignite.distributed as idist

    try:
        if idist.get_rank() == 0:
            ensure_section_folds(str(folder), str(folds_csv), k=num_folds)
        if idist.get_world_size() > 1:
            idist.barrier()
        folds = ensure_section_folds(str(folder), str(folds_csv), k=num_folds)
        sections, _ = list_sections(str(folder))
    except DatasetError as e:
        raise ConfigError(f"config keys 'sections_dir' / 'folds_csv' / 'num_folds': {e}") from None
    fold_of = dict(zip(folds["name"], folds["fold"].tolist(), strict=True))
    train = [s.item() for s in sections if fold_of[s.name] != fold]
    val = [s.item() for s in sections if fold_of[s.name] == fold]
    return train, val
