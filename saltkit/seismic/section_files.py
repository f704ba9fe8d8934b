"""Seismic sections as image files: read PNG / TIFF / .npy of any size, write probability, mask and overlay images.

Reading is Pillow's (grey "L", 16-bit "I;16", float "F", grey repeated in RGB or with alpha) plus numpy for
`.npy`; MONAI's image readers transpose 2-D pictures and do not check that RGB channels hold one grey image.
Every write goes through `saltkit.io.atomic_write`.
"""

from __future__ import annotations

import html
import os
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion

from saltkit.io import atomic_write

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
SALT_RGB = np.array([255, 64, 0], dtype=np.float32)  # orange fill
OUTLINE_RGB = np.array([255, 255, 0], dtype=np.uint8)  # yellow outline
FILL_ALPHA = 0.35


def is_section_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_section_files(path: str | Path) -> list[Path]:
    """The section image itself, or the section images in a folder (sorted by name; not recursive)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and is_section_file(p))
        if not files:
            raise ValueError(f"{path}: no section images in the folder (expected {', '.join(IMAGE_SUFFIXES)})")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    if not is_section_file(path):
        raise ValueError(f"{path}: unknown input type; expected a section image ({', '.join(IMAGE_SUFFIXES)}), a "
                         "folder of them, or a SEG-Y volume (.sgy, .segy)")
    return [path]


def _grey_of(arr: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) grey from (H, W), (H, W, 1), grey + alpha (H, W, 2) or grey repeated in RGB(A) (H, W, 3|4)."""
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"{path}: section has shape {arr.shape}; expected a 2-D grey image (H, W)")
    if arr.shape[2] <= 2:
        return arr[..., 0]
    rgb = arr[..., :3]
    if not ((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()):
        raise ValueError(f"{path}: RGB image whose channels differ; expected a grey section (or grey repeated in "
                         "R, G and B): export the seismic in grey, not through a colour map")
    return rgb[..., 0]


def section_shape(path: str | Path) -> tuple[int, int] | None:
    """`(H, W)` of a section file from its header alone (nothing decoded); None when the header does not say (the
    full read then says what is wrong)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape = read_header(f)[0]
        else:
            with Image.open(path) as im:
                shape = (im.height, im.width)
    except (ValueError, OSError, SyntaxError, Image.DecompressionBombError, MemoryError):
        return None
    return (int(shape[0]), int(shape[1])) if len(shape) >= 2 else None


def read_section(path: str | Path) -> np.ndarray:
    """Section values as stored: `(H, W)` uint8 / uint16 grey, or float / int from `.npy` and float TIFF."""
    return read_section_with_alpha(path)[0]


def read_section_with_alpha(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(`read_section`'s values, the image's `(H, W)` alpha channel or None when it has none); alpha 0 marks
    pixels without data (`saltkit mosaic` writes its absent cells so)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"section not found: {path}")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: not a readable .npy array ({e})") from None
        except MemoryError as e:
            raise ValueError(f"{path}: the array it declares does not fit in memory ({e}); predict it in "
                             "pieces, or pass a smaller crop") from None
    else:
        try:
            with Image.open(path) as im:
                arr = np.asarray(im)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{path}: cannot read the image ({e})") from None
        except MemoryError as e:
            raise ValueError(f"{path}: the image does not fit in memory ({e}); predict it in pieces") from None
        if arr.dtype == np.int32:  # older Pillow reads 16-bit grey PNGs as 32-bit "I"
            arr = arr.astype(np.uint16)
    if not arr.dtype.isnative:  # a big-endian 16-bit TIFF ("I;16B"), a .npy of '>u2': the same numbers, native
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype.kind not in "uif" and arr.dtype != bool:
        raise ValueError(f"{path}: section values are {arr.dtype}; expected numbers")
    alpha = arr[..., -1] if path.suffix.lower() != ".npy" and arr.ndim == 3 and arr.shape[2] in (2, 4) else None
    arr = _grey_of(arr, path)
    if arr.size == 0:
        raise ValueError(f"{path}: empty section ({arr.shape[0]}x{arr.shape[1]} pixels)")
    return np.ascontiguousarray(arr), None if alpha is None else np.ascontiguousarray(alpha)


def outline_overlay(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`(H, W, 3)` uint8 picture: the `(H, W)` [0, 1] section in grey, salt (`mask` > 0) tinted, outlined in yellow."""
    rgb = np.repeat((np.clip(grey, 0, 1) * 255)[..., None], 3, axis=2).astype(np.float32)
    salt = mask.astype(bool)
    rgb[salt] = (1 - FILL_ALPHA) * rgb[salt] + FILL_ALPHA * SALT_RGB
    out = np.rint(rgb).astype(np.uint8)
    out[salt & ~binary_erosion(salt, border_value=1)] = OUTLINE_RGB  # salt pixels with a background neighbour
    return out


def write_png(path: str | Path, arr: np.ndarray) -> Path:
    """Write a uint8 `(H, W)` grey, `(H, W, 2)` grey + alpha or `(H, W, 3)` RGB array as PNG, atomically."""
    with atomic_write(path, "wb") as f:
        Image.fromarray(arr).save(f, format="PNG")
    return Path(path)


def write_npy(path: str | Path, arr: np.ndarray) -> Path:
    with atomic_write(path, "wb") as f:
        np.save(f, arr)
    return Path(path)


def write_section_outputs(out_dir: str | Path, stem: str, grey: np.ndarray, prob: np.ndarray,
                          threshold: float = 0.5, caption: str | None = None) -> dict[str, Path]:
    """Write `stem`'s outputs into `out_dir`; returns their paths by kind.

    prob (`_prob.npy` float32, NaN where there is no data), mask (`_mask.png`, 0 / 255 where prob > threshold),
    probability picture (`_prob.png`: a colour map with its scale) and overlay (`_overlay.png`: the section with
    the predicted salt tinted and outlined, and a legend), both with axes and `caption` (threshold, model, version).
    """
    from saltkit.seismic.figures import caption_text, section_overlay_figure, section_probability_figure

    paths = section_output_paths(out_dir, stem)
    mask = prob > threshold
    caption = caption or caption_text(threshold, None)
    return {
        "prob_npy": write_npy(paths["prob_npy"], prob.astype(np.float32)),
        "prob_png": section_probability_figure(paths["prob_png"], prob, threshold, caption,
                                               f"{shown_name(stem)}: salt probability"),
        "mask": write_png(paths["mask"], mask.astype(np.uint8) * 255),
        "overlay": section_overlay_figure(paths["overlay"], grey, prob, threshold, caption, f"{shown_name(stem)}: salt"),
    }


def section_output_paths(out_dir: str | Path, stem: str) -> dict[str, Path]:
    """The files `write_section_outputs` writes for section `stem`, by kind."""
    out_dir = Path(out_dir)
    return {"prob_npy": out_dir / f"{stem}_prob.npy", "prob_png": out_dir / f"{stem}_prob.png",
            "mask": out_dir / f"{stem}_mask.png", "overlay": out_dir / f"{stem}_overlay.png"}


def shown_name(name: str) -> str:
    """A file name for text: bytes that are not UTF-8 (kept by Python as surrogates) shown as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _href(path, out_dir: Path) -> str:
    """A link to `path` from `out_dir/index.html`, percent-encoded from the file name's own bytes."""
    return html.escape(urllib.parse.quote(os.fsencode(os.path.relpath(path, out_dir))))


def write_index_html(out_dir: str | Path, rows: list[dict], failed: list[dict] = ()) -> Path:
    """`out_dir/index.html`: one figure per section (its overlay, size, salt share, links to the other outputs),
    then the sections that could not be read, with why.

    rows: {"name", "shape": (H, W), "salt_share": float, "outputs": {kind: Path}} per section; failed: {"name",
    "error"} per section.
    """
    out_dir = Path(out_dir)
    figures = []
    for row in rows:
        links = " ".join(f'<a href="{_href(p, out_dir)}">{html.escape(kind)}</a>' for kind, p in row["outputs"].items())
        overlay = _href(row["outputs"]["overlay"], out_dir)
        h, w = row["shape"]
        data = row.get("valid_share", 1.0)
        share = f"salt {row['salt_share']:.1%}" + (f" of the {data:.0%} with data" if data < 1 else "")
        figures.append(f'<figure><a href="{overlay}"><img src="{overlay}" loading="lazy"></a><figcaption>'
                       f'<b>{html.escape(shown_name(row["name"]))}</b> {h}&times;{w}, {share}<br>{links}'
                       "</figcaption></figure>")
    page = ("<!doctype html><meta charset=utf-8><title>saltkit predictions</title><style>"
            "body{font-family:sans-serif} figure{display:inline-block;margin:8px;vertical-align:top}"
            "img{max-width:480px;max-height:360px;border:1px solid #888}</style>"
            f"<h1>saltkit predictions ({len(rows)} sections)</h1>\n" + "\n".join(figures) + "\n")
    if failed:
        items = "".join(f"<li><b>{html.escape(shown_name(r['name']))}</b>: {html.escape(shown_name(r['error']))}</li>"
                        for r in failed)
        page += f"<h2>Not predicted ({len(failed)} sections could not be read)</h2><ul>{items}</ul>\n"
    path = out_dir / "index.html"
    with atomic_write(path) as f:
        f.write(page)
    return path
