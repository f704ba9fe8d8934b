"""Labelled sections (config key `sections_dir`) as the training data of train.json, in place of tiles.

- `training_sections`: the sections of the fold split read and checked (`load_section`: the image read and
  normalised as `saltkit predict` reads it, mask of the same size, no-data pixels IGNORE_LABEL) with what a run
  records about them (`SectionSet`: fingerprints, windows per epoch);
- training: `SectionWindows`, a dataset of `windows_per_epoch` windows of the tile size drawn at random positions
  of the training sections (`RandSectionWindow`; a window with no labelled pixel is drawn again), each then going
  through the tiles' own pipeline and augmentation (image `(1, 101, 101)` in [0, 1], label `(1, 101, 101)` in
  {0, 1, IGNORE_LABEL}; `saltkit.transforms.LoadTiled` takes them as it takes tile files);
- validation: `SectionImages`, each held-out section whole, predicted by the section inferer (sliding window +
  flip TTA, as `saltkit predict`) and scored per 101 x 101 cell of a grid from its origin (`SectionCellsd`; cells
  with no labelled pixel skipped), so the tile metrics, `val_metric` included, read sections as they read tiles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Randomizable, apply_transform
from torch.utils.data import Dataset

from saltkit.config import ConfigError, none_if_null, require_int
from saltkit.data.labelled_sections import (
    SectionFiles,
    files_fingerprint,
    list_sections,
    read_section_mask,
    section_fingerprint,
)
from saltkit.data.layout import DatasetError
from saltkit.geometry import TILE_SIZE
from saltkit.labels import IGNORE_LABEL, labelled
from saltkit.seismic.normalize import Normalization, normalize_section
from saltkit.seismic.section_files import read_section_with_alpha
from saltkit.seismic.validity import section_valid

logger = logging.getLogger(__name__)

MAX_TRIES = 10  # random windows drawn before one is placed over a labelled pixel


@dataclass
class Section:
    """A labelled section in memory: grey `(H, W)` float32 in [0, 1] (no-data pixels filled as `saltkit predict`
    fills them), labels `(H, W)` float32 in {0, 1, IGNORE_LABEL} (IGNORE_LABEL where the mask holds 128 or the
    section has no data), its files' fingerprint and how its values were scaled."""

    name: str
    grey: np.ndarray
    labels: np.ndarray
    fingerprint: str
    scaling: dict = field(default_factory=dict)

    @property
    def labelled_pixels(self) -> int:
        return int(labelled(self.labels).sum())

    def record(self) -> dict:
        h, w = self.labels.shape
        return {"name": self.name, "fingerprint": self.fingerprint, "height": h, "width": w,
                "labelled_pixels": self.labelled_pixels, "scaling": self.scaling}


def load_section(files: SectionFiles) -> Section:
    """A section and its mask read and checked; DatasetError naming the file when the mask is not the section's
    size, holds a value other than 0 / 128 / 255 or labels no pixel that has data."""
    raw, alpha = read_section_with_alpha(files.image)
    labels = read_section_mask(files.mask)
    if labels.shape != raw.shape:
        raise DatasetError(f"{files.mask}: mask is {labels.shape[0]}x{labels.shape[1]} pixels but {files.image.name} "
                           f"is {raw.shape[0]}x{raw.shape[1]}; a mask must be the size of its section")
    valid = section_valid(raw, alpha=alpha, source=str(files.image))
    labels[~valid] = IGNORE_LABEL
    if not labelled(labels).any():
        raise DatasetError(f"{files.mask}: labels no pixel of {files.image.name} that has data (all 128 or "
                           "transparent); mark salt (255) and background (0), or move the section out of the folder")
    grey, scaling = normalize_section(raw, Normalization(), str(files.image), valid)
    return Section(files.name, np.ascontiguousarray(grey, np.float32), labels, section_fingerprint(files), scaling)


def window_counts(labelled_pixels, total: int | None = None, size: int = TILE_SIZE) -> list[int]:
    """Windows per section in an epoch: each section's labelled pixels / size^2 rounded (at least 1); with `total`,
    `total` windows shared out in proportion to the labelled pixels (largest remainders), at least 1 each."""
    counts = np.asarray(labelled_pixels, dtype=np.float64)
    if total is None:
        return [max(1, int(round(c / size**2))) for c in counts]
    extra = total - len(counts)
    share = counts / counts.sum() * extra
    out = np.floor(share).astype(np.int64)
    rest = extra - int(out.sum())
    out[np.argsort(-(share - out), kind="stable")[:rest]] += 1
    return (out + 1).tolist()


@dataclass
class SectionSet:
    """The sections of a run: the folder, the fold's training and validation sections, the fingerprint of every
    labelled section of the folder, and the training windows per section in an epoch."""

    root: Path
    train: list
    val: list
    fingerprint: str
    windows: list
    skipped: list = field(default_factory=list)
    pseudo: list = field(default_factory=list)
    pseudo_windows: list = field(default_factory=list)

    @property
    def windows_per_epoch(self) -> int:
        return int(sum(self.windows))

    def identity(self) -> dict:
        """What a run records about its sections and a resume must match: the folder and the fingerprint."""
        return {"dir": str(self.root.resolve()), "fingerprint": self.fingerprint}

    def record(self) -> dict:
        """The run record's view: folder, fingerprint, windows per epoch, and each section (training sections with
        their windows)."""
        train = [{**s.record(), "windows": n} for s, n in zip(self.train, self.windows, strict=True)]
        pseudo = [{**s.record(), "windows": n} for s, n in zip(self.pseudo, self.pseudo_windows, strict=True)]
        return {**self.identity(), "windows_per_epoch": self.windows_per_epoch, "train": train,
                "val": [s.record() for s in self.val], "skipped_without_mask": self.skipped,
                "pseudo": pseudo or None}

    def summary(self) -> str:
        return (f"{self.windows_per_epoch} windows of {len(self.train)} training sections, "
                f"validating {len(self.val)} sections")


def training_sections(sections_dir, split, batch_size: int, windows_per_epoch=None, pseudo=None) -> SectionSet | None:
    """Config key `sections_dir` (null: None, tile training): the fold's sections read and checked, and the
    pseudo-labelled sections to train beside them; ConfigError naming the key for a section or mask that cannot be
    used, or too few windows to fill a batch.

    Args:
        sections_dir: config key `sections_dir`, a folder of NAME.png (.tif, .npy) with NAME_mask.png.
        split: the fold's (train items, validation items) of sections (`saltkit.data.labelled_sections.training_split`).
        batch_size: config key `batch_size`; an epoch's windows must fill one batch.
        windows_per_epoch: config key `section_windows_per_epoch`; null: the training sections' labelled pixels /
            101^2, at least one per section.
        pseudo: the pseudo-labelled set (`saltkit.data.pseudo.training_pseudo_set`): with sections, its sections
            give windows of their own (labelled pixels / 101^2 each, at least as many as the labelled sections
            give), which the sampler mixes into every batch.
    """
    folder = none_if_null(sections_dir)
    if folder is None:
        return None
    root = Path(str(folder))
    try:
        files, skipped = list_sections(root)
        by_name = {f.name: f for f in files}
        train = [load_section(by_name[it["id"]]) for it in split[0]]
        val = [load_section(by_name[it["id"]]) for it in split[1]]
        fingerprint = files_fingerprint(files)
    except (DatasetError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"config key 'sections_dir': {e}") from None
    if not train:
        raise ConfigError(f"config key 'sections_dir': {root} leaves no training section beside fold's validation "
                          "sections; add sections or lower num_folds")
    total = none_if_null(windows_per_epoch)
    if total is not None:
        require_int("section_windows_per_epoch", total, len(train))
    windows = window_counts([s.labelled_pixels for s in train], total)
    if sum(windows) < batch_size:
        raise ConfigError(f"config key 'batch_size' = {batch_size} is larger than the {sum(windows)} windows an epoch "
                          f"draws from the training sections of {root}; lower batch_size or raise "
                          "section_windows_per_epoch")
    if skipped:
        logger.info(f"sections_dir {root}: {len(skipped)} section(s) without a mask skipped")
    extra, extra_windows = [], []
    if pseudo is not None and pseudo.kind == "sections":
        try:
            extra = [load_section(SectionFiles(it["id"], Path(it["image"]), Path(it["label"]))) for it in pseudo.items]
        except (DatasetError, ValueError, FileNotFoundError) as e:
            raise ConfigError(f"config key 'pseudo_dir': {e}") from None
        pixels = [s.labelled_pixels for s in extra]  # as many windows as the labelled sections give, at least
        extra_windows = window_counts(pixels, max(sum(window_counts(pixels)), sum(windows)))
    return SectionSet(root, train, val, fingerprint, windows, skipped, extra, extra_windows)


# ---------------------------------------------------------------- training windows


def padded_to(section: Section, size: int = TILE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(grey, labels) of a section reflect-padded at the far sides to at least `size` in each direction; labels
    IGNORE_LABEL in the padding."""
    h, w = section.labels.shape
    pads = ((0, max(0, size - h)), (0, max(0, size - w)))
    if pads == ((0, 0), (0, 0)):
        return section.grey, section.labels
    return (np.pad(section.grey, pads, mode="reflect"),
            np.pad(section.labels, pads, mode="constant", constant_values=IGNORE_LABEL))


class WindowSource:
    """A training section ready to cut windows from: padded to the window at least, with a summed-area table of
    its labelled pixels (a window's count in four look-ups)."""

    def __init__(self, section: Section, size: int = TILE_SIZE):
        self.name, self.size = section.name, size
        self.grey, self.labels = padded_to(section, size)
        known = labelled(self.labels)
        self.table = np.pad(known.cumsum(0, dtype=np.int64).cumsum(1), ((1, 0), (1, 0)))
        self.known = np.flatnonzero(known)

    def labelled_in(self, y: int, x: int) -> int:
        s, t = self.size, self.table
        return int(t[y + s, x + s] - t[y, x + s] - t[y + s, x] + t[y, x])

    def window(self, y: int, x: int) -> dict:
        s = self.size
        return {"id": f"{self.name}@{y},{x}",
                "image": torch.from_numpy(self.grey[None, y:y + s, x:x + s].copy()),
                "label": torch.from_numpy(self.labels[None, y:y + s, x:x + s].copy())}


class RandSectionWindow(Randomizable):
    """The top-left corner of a random window of a `WindowSource`: uniform over the section; a window with no
    labelled pixel is drawn again, up to `max_tries` times, then one is placed at random over a random labelled
    pixel (so a window is never all IGNORE_LABEL)."""

    def __init__(self, max_tries: int = MAX_TRIES):
        self.max_tries = int(max_tries)

    def randomize(self, data=None) -> None:
        pass

    def __call__(self, source: WindowSource) -> tuple[int, int]:
        h, w = source.labels.shape
        s = source.size
        for _ in range(self.max_tries):
            y, x = int(self.R.randint(0, h - s + 1)), int(self.R.randint(0, w - s + 1))
            if source.labelled_in(y, x):
                return y, x
        py, px = divmod(int(source.known[self.R.randint(len(source.known))]), w)
        y = int(self.R.randint(max(0, py - s + 1), min(py, h - s) + 1))
        x = int(self.R.randint(max(0, px - s + 1), min(px, w - s) + 1))
        return y, x


class SectionWindows(Dataset):
    """`sum(windows)` training items per epoch: item i is a random window of the section it belongs to (the first
    `windows[0]` items of the first section, and so on; the sampler shuffles them), through `transform` (the
    tiles' training pipeline). Random under MONAI's seeding of the DataLoader, like the transforms. The first
    `n_labelled` items are windows of labelled sections, the rest of pseudo-labelled ones (`n_pseudo`), which
    `saltkit.data.pseudo.training_sampler` mixes into every batch.

    Args:
        sections: the training sections (`Section`), labelled first.
        windows: windows per section in an epoch (`window_counts`).
        transform: the training pipeline of the tiles (LoadTiled first: it takes the window's tensors).
        size: the window side (the tile size, 101).
        n_labelled: items that are windows of labelled sections (None: all).
    """

    unit = "section windows"

    def __init__(self, sections, windows, transform=None, size: int = TILE_SIZE, n_labelled: int | None = None):
        self.sources = [WindowSource(s, size) for s in sections]
        self.owner = np.repeat(np.arange(len(self.sources)), windows)
        self.n_labelled = len(self.owner) if n_labelled is None else int(n_labelled)
        self.n_pseudo = len(self.owner) - self.n_labelled
        self.draw = RandSectionWindow()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, index: int):
        source = self.sources[self.owner[index]]
        item = source.window(*self.draw(source))
        return item if self.transform is None else apply_transform(self.transform, item)


def training_dataset(items, transform, cache_rate, sections: SectionSet | None = None):
    """train#dataset: MONAI's CacheDataset of the tile items, or, with sections, `SectionWindows` of the training
    sections through the same `transform`.

    Args:
        items: the training tiles (labelled, then pseudo-labelled).
        transform: the training pipeline (train#preprocessing).
        cache_rate: config key `cache_rate` (tiles only: the sections are held in memory).
        sections: the run's sections (`training_sections`), or None: windows of its training sections, then of
            its pseudo-labelled sections.
    """
    if sections is None:
        from monai.data import CacheDataset

        return CacheDataset(items, transform, cache_rate=cache_rate, progress=False)
    return SectionWindows(sections.train + sections.pseudo, sections.windows + sections.pseudo_windows, transform,
                          n_labelled=sections.windows_per_epoch)


# ---------------------------------------------------------------- validation on whole sections


class SectionImages(Dataset):
    """The validation sections whole: {"id": name, "image": `(3, H, W)` network input (grey repeated), "label":
    `(1, H, W)` labels}; batch them one by one (sizes differ)."""

    unit = "whole sections"

    def __init__(self, sections):
        self.sections = list(sections)

    def __len__(self) -> int:
        return len(self.sections)

    def __getitem__(self, index: int) -> dict:
        s = self.sections[index]
        grey = torch.from_numpy(s.grey)
        return {"id": s.name, "image": grey[None].expand(3, -1, -1).contiguous(),
                "label": torch.from_numpy(s.labels)[None].clone()}


def validation_dataset(items, transform, cache_rate, sections: SectionSet | None = None):
    """validate#dataset: MONAI's CacheDataset of the validation tiles, or, with sections, `SectionImages` of the
    held-out sections (no transform: the section inferer pads them itself).

    Args:
        items: the validation tiles.
        transform: their pipeline (validate#preprocessing).
        cache_rate: config key `cache_rate`.
        sections: the run's sections (`training_sections`), or None.
    """
    if sections is None:
        from monai.data import CacheDataset

        return CacheDataset(items, transform, cache_rate=cache_rate, progress=False)
    return SectionImages(sections.val)


def grid_cells(x: torch.Tensor, size: int = TILE_SIZE, fill: float = 0.0) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B * rows * cols, C, size, size)`: the cells of a grid of `size` from the origin, row by
    row; the last row and column are padded with `fill` where the map ends inside them."""
    b, c, h, w = x.shape
    rows, cols = -(-h // size), -(-w // size)
    x = F.pad(x, (0, cols * size - w, 0, rows * size - h), value=fill)
    return x.reshape(b, c, rows, size, cols, size).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, size, size)


class SectionCellsd:
    """Evaluator postprocessing on whole sections: the prediction and labels cut into the 101 x 101 cells of a
    grid from each section's origin, for the tile metrics: `tile_pred` (salt where "prob" > 0.5; 0 on pixels that
    carry no label, so they count for neither side) and `tile_label` in {0, 1, IGNORE_LABEL}, `(N, 1, 101, 101)`;
    `image` becomes the cells' `(N, 3, 101, 101)` input and `id` "NAME cell ROW,COL" (the worst-tiles grid reads
    both); cells with no labelled pixel are left out. `section_bce`: the binary cross-entropy of the probability on
    the labelled pixels (the sections' `val_loss`).

    Args:
        size: the cell side (the tile size, 101).
        threshold: salt where the probability is above this.
    """

    def __init__(self, size: int = TILE_SIZE, threshold: float = 0.5):
        self.size, self.threshold = size, threshold

    def __call__(self, data: dict) -> dict:
        prob = data["pred"]["prob"].detach().float()
        label = torch.as_tensor(data["label"]).float().to(prob.device)
        known = labelled(label)
        data["section_bce"] = F.binary_cross_entropy(prob[known].clamp(1e-6, 1 - 1e-6), label[known])
        cells_label = grid_cells(label, self.size, IGNORE_LABEL)
        keep = labelled(cells_label).flatten(1).any(1)
        cells_pred = (grid_cells(prob, self.size) > self.threshold).float()
        data["tile_label"] = cells_label[keep]
        data["tile_pred"] = torch.where(labelled(data["tile_label"]), cells_pred[keep], 0.0)
        data["image"] = grid_cells(torch.as_tensor(data["image"]).float(), self.size)[keep.to(data["image"].device)]
        names = cell_names(data.get("id"), label.shape, self.size)
        data["id"] = [n for n, k in zip(names, keep.tolist(), strict=True) if k]
        return data


def cell_names(ids, shape, size: int = TILE_SIZE) -> list[str]:
    """'NAME cell ROW,COL' of every grid cell of a `(B, C, H, W)` batch of sections named `ids`, row by row."""
    b, _, h, w = shape
    ids = list(ids) if isinstance(ids, (list, tuple)) else ["?"] * b
    rows, cols = -(-h // size), -(-w // size)
    return [f"{name} cell {r},{c}" for name in ids for r in range(rows) for c in range(cols)]
