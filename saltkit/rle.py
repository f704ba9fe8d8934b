"""Run-length encoding as the TGS competition defines it.

Pixels are numbered column-major (top to bottom, then left to right) from 1; a mask is written as
space-separated `start length` pairs of its salt runs, and an empty mask as the empty string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

TILE_SHAPE = (101, 101)
# Masks per chunk when encoding a batch: keeps the (chunk, H*W) temporaries in cache-friendly sizes.
_ENCODE_CHUNK = 256
# Tokens are ASCII digits (a minus sign is let through to be reported as a start or length < 1); int() alone would
# also take '1_0', '+5' and non-ASCII digits, which the competition's parser rejects.
_TOKEN = re.compile(r"-?[0-9]+")
_RLE_TEXT = re.compile(r"\s*(?:-?[0-9]+(?:\s+-?[0-9]+)*)?\s*")


class RLEError(ValueError):
    """A run-length string that is malformed or does not fit the mask; `index` is its position in a batch."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def _run_bounds(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of (N, H, W) masks (nonzero = salt) as (mask index, 1-based start, length), each (R,), in RLE order."""
    n, h, w = masks.shape
    stride = h * w + 1
    # One 1-D line: a background pixel, mask 0 in column-major order, a background pixel, mask 1, ..., background.
    line = np.zeros(n * stride + 1, dtype=bool)
    body = line[1:].reshape(n, stride)[:, : h * w]
    body.reshape(n, w, h)[...] = masks.transpose(0, 2, 1)
    # Changes pair up as (first salt pixel, first background pixel after it) since every mask is fenced by background.
    changes = np.flatnonzero(line[1:] != line[:-1]) + 1
    starts, ends = changes[0::2], changes[1::2]
    return starts // stride, starts % stride, ends - starts


def rle_encode(mask) -> str | list[str]:
    """Encode one mask (H, W) -> str, or a batch (N, H, W) -> list of N str. Nonzero pixels are salt.

    Accepts numpy arrays or CPU tensors of any dtype; the batch is encoded without a per-pixel Python loop.
    """
    masks = np.asarray(mask)
    if masks.ndim == 2:
        return rle_encode(masks[None])[0]
    if masks.ndim != 3:
        raise ValueError(f"rle_encode expects a (H, W) mask or a (N, H, W) batch, got shape {masks.shape}")
    out: list[str] = []
    # Numbers never exceed H*W, so a lookup table of their strings replaces one str() call per number.
    table = [str(i) for i in range(masks.shape[1] * masks.shape[2] + 1)]
    for lo in range(0, masks.shape[0], _ENCODE_CHUNK):
        chunk = masks[lo : lo + _ENCODE_CHUNK]
        which, starts, lengths = _run_bounds(chunk)
        tokens = np.empty(2 * len(starts), dtype=np.int64)
        tokens[0::2], tokens[1::2] = starts, lengths
        words = list(map(table.__getitem__, tokens.tolist()))
        # Token range of mask i is [b[i], b[i + 1]); one join per mask.
        b = (2 * np.searchsorted(which, np.arange(chunk.shape[0] + 1))).tolist()
        out.extend(" ".join(words[b[i] : b[i + 1]]) for i in range(chunk.shape[0]))
    return out


def rle_runs(rle: str | None, shape: tuple[int, int] = TILE_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Parse and check `rle` against a mask of `shape`; returns (starts, lengths), 1-based int64 (R,).

    Raises RLEError naming the token or run that is wrong: a token that is not ASCII digits, odd count, start or
    length < 1, starts not ascending, overlapping runs, or a run past the H*W pixels.
    """
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):
        rle = ""
    if not isinstance(rle, str):
        raise RLEError(f"RLE must be a string, got {type(rle).__name__}")
    words = rle.split()
    if not _RLE_TEXT.fullmatch(rle):
        bad = next(w for w in words if not _TOKEN.fullmatch(w))
        raise RLEError(f"RLE token {bad!r} is not an integer (ASCII digits 0-9 only)")
    try:
        values = np.array(words, dtype=np.int64)
    except OverflowError:
        bad = next(w for w in words if abs(int(w)) > np.iinfo(np.int64).max)
        raise RLEError(f"RLE token {bad!r} is far larger than any pixel number") from None
    if len(values) % 2:
        raise RLEError(f"RLE has {len(values)} numbers; expected an even count of 'start length' pairs")
    starts, lengths = values[0::2], values[1::2]
    n_pixels = shape[0] * shape[1]
    if len(starts) == 0:
        return starts, lengths
    bad = np.flatnonzero((starts < 1) | (lengths < 1))
    if len(bad):
        i = bad[0]
        raise RLEError(f"RLE run {i + 1} (start {starts[i]}, length {lengths[i]}): start and length must be >= 1")
    ends = starts + lengths - 1
    bad = np.flatnonzero(starts[1:] <= starts[:-1])
    if len(bad):
        i = bad[0] + 1
        raise RLEError(f"RLE run {i + 1} starts at {starts[i]}, not after run {i}'s start {starts[i - 1]}: "
                       "starts must ascend")
    bad = np.flatnonzero(starts[1:] <= ends[:-1])
    if len(bad):
        i = bad[0] + 1
        raise RLEError(f"RLE run {i + 1} (start {starts[i]}) overlaps run {i} (pixels {starts[i - 1]}..{ends[i - 1]})")
    if ends[-1] > n_pixels:
        raise RLEError(f"RLE run {len(starts)} (start {starts[-1]}, length {lengths[-1]}) ends at pixel {ends[-1]}, "
                       f"past the {n_pixels} pixels of a {shape[0]}x{shape[1]} mask")
    return starts, lengths


def rle_decode(rle: str | None, shape: tuple[int, int] = TILE_SHAPE) -> np.ndarray:
    """Decode one RLE string into a uint8 {0, 1} mask of `shape` (H, W); '' / None / NaN give an empty mask."""
    starts, lengths = rle_runs(rle, shape)
    # +1 at each run start and -1 after each run end; the running sum marks the salt pixels.
    edges = np.zeros(shape[0] * shape[1] + 1, dtype=np.int32)
    edges[starts - 1] += 1
    edges[starts - 1 + lengths] -= 1
    flat = np.cumsum(edges[:-1], dtype=np.int32).astype(np.uint8)
    return flat.reshape(shape[1], shape[0]).T.copy()


def rle_decode_many(rles: Sequence[str | None], shape: tuple[int, int] = TILE_SHAPE) -> np.ndarray:
    """Decode N RLE strings into a uint8 (N, H, W) batch; an RLEError carries the failing `index`."""
    out = np.zeros((len(rles), *shape), dtype=np.uint8)
    for i, rle in enumerate(rles):
        try:
            out[i] = rle_decode(rle, shape)
        except RLEError as e:
            raise RLEError(str(e), index=i) from None
    return out
