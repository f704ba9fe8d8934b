"""Saved predictions: per-tile salt probabilities quantised to uint16 in a compressed .npz, keyed by tile id.

A file holds `ids` (N,) str, `probs` (N, 101, 101) uint16 (probability * 65535, rounded) and optionally
`image_probs` (N,) uint16; quantisation error is below 1e-5, far under any threshold's sensitivity.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from saltkit.io import atomic_write
from saltkit.rle import TILE_SHAPE

SCALE = 65535


@dataclass
class Probabilities:
    """`ids` (N,), `probs` (N, H, W) float32 in [0, 1], `image_probs` (N,) float32 or None."""

    ids: np.ndarray
    probs: np.ndarray
    image_probs: np.ndarray | None = None

    def __post_init__(self):
        self.ids = np.asarray(self.ids).astype(str)
        if self.probs.ndim != 3 or len(self.probs) != len(self.ids):
            raise ValueError(f"probs must be (N={len(self.ids)}, H, W), got shape {self.probs.shape}")
        if self.image_probs is not None and self.image_probs.shape != (len(self.ids),):
            raise ValueError(f"image_probs must be ({len(self.ids)},), got shape {self.image_probs.shape}")


def quantise(p: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> uint16 (clipped, rounded to the nearest of 65536 levels)."""
    return np.rint(np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0) * SCALE).astype(np.uint16)


def dequantise(q: np.ndarray) -> np.ndarray:
    """uint16 levels -> float32 probabilities in [0, 1]."""
    return (q.astype(np.float32) / np.float32(SCALE)).astype(np.float32)


def write_probabilities(f: BinaryIO, pred: Probabilities) -> None:
    """Write `pred` as a compressed .npz into the open binary file `f` (see `save_probabilities`)."""
    arrays = {"ids": pred.ids, "probs": quantise(pred.probs)}
    if pred.image_probs is not None:
        arrays["image_probs"] = quantise(pred.image_probs)
    np.savez_compressed(f, **arrays)


def save_probabilities(path: str | Path, pred: Probabilities) -> Path:
    """Write `pred` to `path` (compressed .npz, atomically: a kill never leaves a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        write_probabilities(f, pred)
    return path


def load_probabilities(path: str | Path) -> Probabilities:
    """Read a file written by `save_probabilities`; errors name the file and the missing or bad array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"probabilities file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read probabilities, not an .npz file ({e})") from e
    except MemoryError as e:
        raise ValueError(f"{path}: its arrays declare more than this machine's memory ({e}); not a probabilities "
                         "file saltkit wrote, or a damaged one") from None
    missing = {"ids", "probs"} - set(arrays)
    if missing:
        raise ValueError(f"{path}: not a saltkit probabilities file, missing arrays {sorted(missing)}")
    probs, ids = arrays["probs"], arrays["ids"]
    if probs.dtype != np.uint16:
        raise ValueError(f"{path}: 'probs' must be uint16, got {probs.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != TILE_SHAPE:
        raise ValueError(f"{path}: 'probs' must be (N, {TILE_SHAPE[0]}, {TILE_SHAPE[1]}) tiles, got shape {probs.shape}")
    if ids.shape != (len(probs),):
        raise ValueError(f"{path}: 'ids' must be ({len(probs)},), one per tile of 'probs', got shape {ids.shape}")
    if len(probs) == 0:
        raise ValueError(f"{path}: holds no tiles (0 ids); nothing to predict from it")
    if "image_probs" in arrays and arrays["image_probs"].shape != (len(probs),):
        raise ValueError(f"{path}: 'image_probs' must be ({len(probs)},), got shape {arrays['image_probs'].shape}")
    image = dequantise(arrays["image_probs"]) if "image_probs" in arrays else None
    return Probabilities(ids, dequantise(probs), image)
