"""Run-length encoding as the TGS competition defines it.

Pixels are numbered column-major (top to bottom, then left to right) from 1; a mask is written as
space-separated `start length` pairs of its salt runs, and an empty mask as the empty string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

TILE_SHAPE = (101, 101)
# Masks per chunk when encoding a batch: keeps the packed bits and the change lists in cache-friendly sizes.
_ENCODE_CHUNK = 2048
# Tokens are ASCII digits (a minus sign is let through to be reported as a start or length < 1); int() alone would
# also take '1_0', '+5' and non-ASCII digits, which the competition's parser rejects.
_TOKEN = re.compile(r"-?[0-9]+")
_RLE_TEXT = re.compile(r"\s*(?:-?[0-9]+(?:\s+-?[0-9]+)*)?\s*")


class RLEError(ValueError):
    """A run-length string that is malformed or does not fit the mask; `index` is its position in a batch."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def _set_bits(words: np.ndarray) -> np.ndarray:
    """Positions of the set bits of a uint64 bit stream (bit p is bit p % 64 of word p // 64), ascending."""
    word_idx = np.flatnonzero(words != 0)
    word_bytes = words[word_idx].view(np.uint8)
    byte_idx = np.flatnonzero(word_bytes != 0)
    byte_pos = (word_idx[byte_idx >> 3] << 3) + (byte_idx & 7)
    bits = np.flatnonzero(np.unpackbits(word_bytes[byte_idx], bitorder="little").view(bool))
    return (byte_pos[bits >> 3] << 3) + (bits & 7)


def _vertical_changes(masks: np.ndarray) -> np.ndarray:
    """Flat row-major indices (ascending) of the pixels of (K, H, W) masks that differ from the pixel above (salt =
    nonzero); the first row of each mask is compared with the previous mask's last row (callers drop it)."""
    _, _, w = masks.shape
    # Pack 8 pixels per byte (one read of the masks), then compare the bit stream with itself shifted by W.
    packed = np.packbits(masks.reshape(-1), bitorder="little")
    if len(packed) % 8:
        packed = np.concatenate([packed, np.zeros(-len(packed) % 8, np.uint8)])
    words = packed.view(np.uint64)
    n, (q, s) = len(words), divmod(w, 64)
    # Word j of `above` holds bits 64 (j + q) .. 64 (j + q) + 63 of the stream shifted by W (the pixels above);
    # the first q words (inside the first mask's first row) are left out.
    above = words[: max(n - q, 0)] << np.uint64(s)
    if s and len(above) > 1:
        above[1:] |= words[: len(above) - 1] >> np.uint64(64 - s)
    above ^= words[q:]
    return _set_bits(above) + 64 * q


def _run_keys(masks: np.ndarray) -> np.ndarray:
    """Sorted keys mask index * (H*W + 2) + 1-based column-major position of every run start and end of (K, H, W)
    masks; each mask has an even count (fenced by background: start, end, start, end, ...)."""
    k, h, w = masks.shape
    hw, stride = h * w, h * w + 2
    dtype = np.int32 if k * stride < 2**31 else np.int64
    p = _vertical_changes(masks)
    p = p[: np.searchsorted(p, k * hw)].astype(dtype)  # bits past the last mask are padding
    row = p // w  # row of the whole stack: which mask * H + row in the mask
    which = row // h
    # key = which * stride + col * H + (row in the mask) + 1, rows in the mask > 0 (row 0 is compared across masks)
    key = which * (stride - h) + (p - row * w) * h + row + 1
    vertical = key[row != which * h]
    # Column-major, pixel (0, c) follows (H-1, c-1), and (0, 0) follows background; after (H-1, W-1) comes background.
    top, bottom = masks[:, 0, :] != 0, masks[:, h - 1, :] != 0
    top[:, 1:] ^= bottom[:, :-1]
    t = np.flatnonzero(top).astype(dtype)
    which_t = t // w
    first_row = which_t * stride + (t - which_t * w) * h + 1
    last_pixel = np.flatnonzero(bottom[:, w - 1]).astype(dtype) * stride + (hw + 1)
    keys = np.concatenate([vertical, first_row, last_pixel])
    keys.sort()
    return keys


def _number_table(max_value: int) -> np.ndarray:
    """(2 * (max_value + 1),) records of 8 bytes (16 past 7 digits): the ASCII digits of 0..max_value right-aligned
    after NUL padding, followed by a space (first half) or a newline (second half)."""
    values = np.arange(max_value + 1)
    digits = len(str(max_value))
    width = 8 if digits < 8 else 16  # uint64 records gather several times faster than odd-sized ones
    table = np.zeros((2, len(values), width), np.uint8)
    for j in range(digits):
        power = 10 ** (digits - 1 - j)
        table[:, :, j] = np.where(values >= power, 48 + values // power % 10, 0)
    table[:, 0, digits - 1] = 48  # "0"
    table[0, :, digits], table[1, :, digits] = ord(" "), ord("\n")
    return table.reshape(-1, width).view(np.uint64 if width == 8 else "V16").ravel()


def rle_encode(mask) -> str | list[str]:
    """Encode one mask (H, W) -> str, or a batch (N, H, W) -> list of N str. Nonzero pixels are salt.

    Accepts numpy arrays or CPU tensors of any dtype; the batch is encoded without a Python loop per pixel or run.
    """
    masks = np.asarray(mask)
    if masks.ndim == 2:
        return rle_encode(masks[None])[0]
    if masks.ndim != 3:
        raise ValueError(f"rle_encode expects a (H, W) mask or a (N, H, W) batch, got shape {masks.shape}")
    n, h, w = masks.shape
    if n == 0:
        return []
    if masks.dtype.kind not in "bui":
        masks = masks != 0  # packbits takes bool and integer arrays (nonzero = 1)
    stride = h * w + 2
    tokens, mask_of_run = [], []
    for lo in range(0, n, _ENCODE_CHUNK):
        keys = _run_keys(masks[lo : lo + _ENCODE_CHUNK])
        which = keys // stride  # floor_divide by a scalar is vectorised; divmod and % are not
        pos = keys - which * stride
        chunk_tokens = np.empty(len(pos), pos.dtype)
        chunk_tokens[0::2], chunk_tokens[1::2] = pos[0::2], pos[1::2] - pos[0::2]
        tokens.append(chunk_tokens)
        mask_of_run.append(which[0::2] + lo)
    tokens, mask_of_run = np.concatenate(tokens), np.concatenate(mask_of_run)
    # A str() per number and a join per mask would cost more than finding the runs: the text of every mask is
    # one byte buffer gathered from a table of the numbers' digits, the last length of a mask ending in a newline.
    last_run = np.append(mask_of_run[1:] != mask_of_run[:-1], True)[: len(mask_of_run)]
    tokens[1::2] += last_run * (h * w + 2)
    text = np.take(_number_table(h * w + 1), tokens).tobytes().translate(None, b"\0").decode("ascii")
    out = [""] * n
    for i, line in zip(mask_of_run[last_run].tolist(), text.split("\n")[:-1], strict=True):
        out[i] = line
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
