"""A SEG-Y volume with a mask volume of the same geometry (1 salt, 0 background, -1 not interpreted) as a labelled
sections folder that training on sections (config key `sections_dir`) reads, with folds by inline range.

`volume_to_sections(volume, mask, out)` writes

    OUT/<volume>_inline_<n>.png (+ _mask.png)                     every inline with data, grey as the network sees it
    OUT/<volume>_crossline_<n>_inlines_<a>-<b>.png (+ _mask.png)   with --direction crossline / both: each crossline
                                                                   cut at the folds' inline ranges, one piece per fold
    OUT/folds-k<K>.csv                                             name,fold: fold j holds the j-th inline range
    OUT/manifest.json                                              both files, the clip, every section's line(s)

Folds split the inlines into K contiguous ranges, so no pixel of a held-out range is in a training section (the
crossline pieces of a range belong to its fold): pass the CSV as `folds_csv` with `num_folds` K. Mask pixels of
missing traces or without data in the volume are written 128 (not interpreted), like the 128 of a mask image.
The folder appears complete or not at all.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from saltkit.data.labelled_sections import write_section_folds
from saltkit.inference.pseudo_labels import check_output_folder
from saltkit.io import atomic_folder
from saltkit.labels import IGNORE_LABEL, MASK_VOLUME_VALUES, labels_from_values
from saltkit.seismic.pseudo_sections import (
    BACKGROUND,
    NOT_INTERPRETED,
    SALT,
    volume_sections,
    write_section_pair,
)

FORMAT = "saltkit labelled volume sections"


def inline_ranges(count: int, k: int) -> list[range]:
    """`count` inline indices in `k` contiguous ranges of near-equal size (the folds)."""
    if not 2 <= k <= count:
        raise ValueError(f"--k must be between 2 and the number of inlines ({count}), got {k}")
    edges = np.linspace(0, count, k + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def mask_image(labels: np.ndarray) -> np.ndarray:
    """Labels in {0, 1, IGNORE_LABEL} -> uint8 mask image (255 salt, 0 background, 128 not interpreted)."""
    out = np.full(labels.shape, NOT_INTERPRETED, np.uint8)
    out[labels == 1] = SALT
    out[labels == 0] = BACKGROUND
    return out


class MaskVolume:
    """The mask volume, read section by section on the volume's grid; its geometry must be the volume's."""

    def __init__(self, path: Path, geometry, samples: int, iline_byte: int, xline_byte: int):
        from saltkit.seismic.segy import open_segy, read_geometry, read_layout

        self.path = path
        self.layout = read_layout(path)
        self._open = open_segy(self.layout)
        self.f = self._open.__enter__()
        mine = read_geometry(self.f, self.layout, iline_byte, xline_byte)
        differ = []
        if self.layout.samples != samples:
            differ.append(f"{self.layout.samples} samples per trace, not {samples}")
        if not np.array_equal(mine.ilines, geometry.ilines) or not np.array_equal(mine.xlines, geometry.xlines):
            differ.append(f"inlines {mine.ilines[0]}-{mine.ilines[-1]} x crosslines {mine.xlines[0]}-"
                          f"{mine.xlines[-1]}, not {geometry.ilines[0]}-{geometry.ilines[-1]} x "
                          f"{geometry.xlines[0]}-{geometry.xlines[-1]}")
        elif not np.array_equal(mine.traces >= 0, geometry.traces >= 0):
            differ.append("traces at other inline / crossline cells")
        if differ:
            self.close()
            raise ValueError(f"{path}: the mask volume's geometry differs from the volume's ({'; '.join(differ)}); "
                             "a mask volume holds one mask trace per volume trace")
        self.geometry = mine

    def labels(self, direction: str, k: int) -> np.ndarray:
        """`(samples, traces)` labels of section `k`: IGNORE_LABEL where a trace is missing."""
        from saltkit.seismic.segy import read_traces

        values = read_traces(self.f, self.geometry.section_traces(direction, k), self.layout.samples).T
        values = np.where(np.isnan(values), -1, values)
        return labels_from_values(values, MASK_VOLUME_VALUES, self.path)

    def close(self) -> None:
        self._open.__exit__(None, None, None)


def volume_to_sections(volume: str | Path, mask: str | Path, out: str | Path, direction: str = "inline", k: int = 5,
                       iline_byte: int = 189, xline_byte: int = 193, fill_value: float | None = None,
                       command: Sequence[str] | None = None) -> dict:
    """Write the labelled sections folder `out` of `volume` and its `mask` volume (see the module docstring).
    Returns a summary: out, sections, folds csv, labelled pixels."""
    from saltkit.seismic.segy import open_segy, read_geometry, read_layout

    volume, mask = Path(volume), Path(mask)
    for p, key in ((volume, "volume"), (mask, "--mask")):
        if not p.is_file():
            raise FileNotFoundError(f"{key} {p} does not exist; give the SEG-Y file's path")
    out = check_output_folder(out, volume.parent / f".{volume.name}")
    layout = read_layout(volume)
    with open_segy(layout) as f:
        geometry = read_geometry(f, layout, iline_byte, xline_byte)
    ranges = inline_ranges(len(geometry.ilines), k)
    fold_of_inline = np.empty(len(geometry.ilines), dtype=int)
    for j, r in enumerate(ranges):
        fold_of_inline[list(r)] = j
    masks = MaskVolume(mask, geometry, layout.samples, iline_byte, xline_byte)
    items, folds, labelled_pixels = [], [], 0
    clip: dict = {}
    try:
        with atomic_folder(out) as partial:
            for s in volume_sections(volume, direction, iline_byte, xline_byte, fill_value=fill_value, clip_out=clip):
                labels = masks.labels(s.source["direction"], s.source["index"])
                labels[~s.valid] = IGNORE_LABEL
                if s.source["direction"] == "inline":
                    pieces = [(s.name, slice(None), int(fold_of_inline[s.source["index"]]))]
                else:  # columns are inlines in ascending order: one piece per fold's inline range
                    pieces = [(f"{s.name}_inlines_{geometry.ilines[r.start]}-{geometry.ilines[r.stop - 1]}",
                               slice(r.start, r.stop), j) for j, r in enumerate(ranges)]
                for name, cols, fold in pieces:
                    piece = labels[:, cols]
                    if not (piece != IGNORE_LABEL).any():
                        continue
                    write_section_pair(partial, name, s.grey[:, cols], mask_image(piece))
                    count = int((piece != IGNORE_LABEL).sum())
                    labelled_pixels += count
                    items.append({"name": name, **s.source, "fold": fold, "labelled_pixels": count,
                                  "shape": list(piece.shape)})
                    folds.append((name, fold))
            if not items:
                raise ValueError(f"{mask}: no section has a labelled (0 or 1) pixel where {volume} has data")
            missing = sorted(set(range(k)) - {f for _, f in folds})
            if missing:
                raise ValueError(f"{mask}: inline range(s) of fold(s) {missing} hold no labelled pixel; lower --k or "
                                 "interpret lines there")
            folds_csv = partial / f"folds-k{k}.csv"
            write_section_folds(pd.DataFrame(folds, columns=["name", "fold"]), folds_csv)
            manifest = {
                "format": FORMAT, "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": list(sys.argv if command is None else command),
                "volume": str(volume.resolve()), "mask": str(mask.resolve()), "direction": direction, "clip": clip,
                "folds": {"k": k, "csv": folds_csv.name,
                          "inline_ranges": [[int(geometry.ilines[r.start]), int(geometry.ilines[r.stop - 1])]
                                            for r in ranges]},
                "items": items,
            }
            (partial / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    finally:
        masks.close()
    return {"out": str(out), "sections": len(items), "folds_csv": str(out / folds_csv.name),
            "labelled_pixels": labelled_pixels, "inline_ranges": manifest["folds"]["inline_ranges"]}
