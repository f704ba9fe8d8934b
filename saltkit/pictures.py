"""Pictures of tiles for people: a grid of tiles, each with its truth and prediction outlined and its id and score
underneath (the TensorBoard worst-tiles image, evaluate's worst_tiles.png, the docs)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

TRUTH_RGB = (0, 210, 0)  # green
PRED_RGB = (255, 40, 40)  # red
BOTH_RGB = (255, 230, 0)  # yellow: truth and prediction outlines coincide
BACKGROUND_RGB = (255, 255, 255)
TEXT_RGB = (0, 0, 0)
LEGEND = "outlines: truth green, prediction red, both yellow"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def inner_outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the mask's pixels next to background, the tile's border counting as background (so salt that
    fills the tile is still outlined)."""
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    return find_boundaries(padded, mode="inner")[1:-1, 1:-1]


def outline_tile(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, scale: int = 2) -> np.ndarray:
    """(H, W) uint8 grey tile with the inner outlines of `truth` and `pred` ((H, W) {0, 1}) in colour
    -> (scale H, scale W, 3) uint8 RGB; outlines are one tile pixel wide."""
    rgb = np.repeat(np.asarray(image, dtype=np.uint8)[..., None], 3, axis=-1)
    t, p = inner_outline(truth), inner_outline(pred)
    rgb[t & ~p] = TRUTH_RGB
    rgb[p & ~t] = PRED_RGB
    rgb[t & p] = BOTH_RGB
    return rgb.repeat(scale, axis=0).repeat(scale, axis=1)


def caption(tile_id: str, score: float, width: int, draw: ImageDraw.ImageDraw, font) -> str:
    """"id  0.40", the id shortened with "…" when the text would be wider than `width` pixels (the score kept)."""
    text, short = f"{tile_id}  {score:.2f}", tile_id
    while draw.textlength(text, font=font) > width and short:
        short = short[:-1]
        text = f"{short}…  {score:.2f}"
    return text


def tile_grid(images: np.ndarray, truths: np.ndarray, preds: np.ndarray, ids: Sequence[str], scores: Sequence[float],
              columns: int = 4, scale: int = 2, gap: int = 6, legend: bool = True) -> np.ndarray:
    """Tiles in a grid, `columns` per row in the given order, each outlined (`outline_tile`) above "id  score".

    images (N, H, W) uint8, truths / preds (N, H, W) {0, 1}, ids N strings, scores (N,) floats
    -> (H', W', 3) uint8 RGB on white, with a line naming the outline colours on top when `legend`.
    """
    images, truths, preds = np.asarray(images), np.asarray(truths), np.asarray(preds)
    n = len(images)
    if not (len(truths) == len(preds) == len(ids) == len(scores) == n) or n == 0:
        raise ValueError(f"tile_grid needs as many truths, predictions, ids and scores as tiles (>= 1); got "
                         f"{n} tiles, {len(truths)} truths, {len(preds)} predictions, {len(ids)} ids, "
                         f"{len(scores)} scores")
    h, w = images.shape[1] * scale, images.shape[2] * scale
    font = _font(max(10, 6 * scale))
    text_h = font.getbbox("Ag0")[3] + 4
    top = text_h + gap if legend else 0
    cols, rows = min(n, columns), -(-n // columns)
    cell_w, cell_h = w + gap, h + text_h + gap
    canvas = Image.new("RGB", (gap + cols * cell_w, top + gap + rows * cell_h), BACKGROUND_RGB)
    draw = ImageDraw.Draw(canvas)
    if legend:
        draw.text((gap, gap), LEGEND, fill=TEXT_RGB, font=font)
    for k in range(n):
        x, y = gap + (k % columns) * cell_w, top + gap + (k // columns) * cell_h
        canvas.paste(Image.fromarray(outline_tile(images[k], truths[k], preds[k], scale)), (x, y))
        draw.text((x, y + h + 2), caption(str(ids[k]), float(scores[k]), w, draw, font), fill=TEXT_RGB, font=font)
    return np.asarray(canvas)
