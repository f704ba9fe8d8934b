"""QC pictures of a predicted SEG-Y volume, written beside the output (`OUT.sgy` -> folder `OUT_qc/`): a few
inlines and crosslines (the amplitude in grey, the salt probability over it, the salt boundary at the threshold,
axes in the volume's inline / crossline numbers and sample times), a map of the maximum salt probability down each
trace (not for a 2-D line), `index.html` showing them and `qc.json` listing what was written (a rerun may replace those files, and only
those).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saltkit.io import OutputClashError, atomic_write, check_outputs
from saltkit.seismic.figures import Axis, volume_map_figure, volume_section_figure
from saltkit.seismic.segy import Geometry, SegyError, SegyLayout, read_traces
from saltkit.seismic.validity import salt_share, trace_valid

DEFAULT_QC = 3  # inlines and crosslines pictured by default, evenly spaced
QC_LISTING = "qc.json"
TIME_AXIS = "time (ms)"


def qc_dir(out: str | Path) -> Path:
    """The folder of QC pictures beside the output volume: OUT.sgy -> OUT_qc."""
    out = Path(out)
    return out.parent / f"{out.stem}_qc"


def section_numbers(value, option: str) -> list[int] | None:
    """`--qc-inlines 120,125` (text, or a list from a config) as numbers; None when not given."""
    if value in (None, "", "null"):
        return None
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) \
        else [value]
    try:
        return [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise ValueError(f"{option} takes inline / crossline numbers separated by commas (e.g. 120,125), got "
                         f"{value!r}") from None


@dataclass
class QcPlan:
    """Which sections to picture: indices into the geometry's inlines and crosslines, and whether to draw any."""

    inline: list[int] = field(default_factory=list)
    crossline: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.inline or self.crossline)


def _evenly(n: int, count: int) -> list[int]:
    """`count` indices spread evenly over 0..n-1, away from the edges (all of them when n <= count)."""
    if count >= n:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, count + 2)[1:-1]})


def _indices(numbers: np.ndarray, wanted: list[int], what: str, option: str, path) -> list[int]:
    missing = [v for v in wanted if v not in set(numbers.tolist())]
    if missing:
        raise SegyError(f"{path}: {option} {','.join(map(str, missing))}: no such {what} (the volume has {what}s "
                        f"{numbers[0]} to {numbers[-1]}); pass numbers from that range")
    return sorted({int(np.flatnonzero(numbers == v)[0]) for v in wanted})


def plan_qc(geometry: Geometry, count: int = DEFAULT_QC, inlines=None, crosslines=None, path="volume") -> QcPlan:
    """The sections to picture: the listed inline / crossline numbers when either list is given, else `count`
    evenly spaced inlines and crosslines (0: none). A direction one trace wide (a 2-D line's crosslines) is left
    out."""
    inlines, crosslines = section_numbers(inlines, "--qc-inlines"), section_numbers(crosslines, "--qc-crosslines")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"--qc must be a whole number >= 0 (sections pictured per direction), got {count!r}")
    n_il, n_xl = len(geometry.ilines), len(geometry.xlines)
    if inlines is not None or crosslines is not None:
        plan = QcPlan(_indices(geometry.ilines, inlines or [], "inline", "--qc-inlines", path),
                      _indices(geometry.xlines, crosslines or [], "crossline", "--qc-crosslines", path))
    else:
        plan = QcPlan(_evenly(n_il, count), _evenly(n_xl, count))
    if n_xl == 1:
        plan.inline = []
    if n_il == 1:
        plan.crossline = []
    return plan


def check_qc_outputs(src: Path, out: Path, plan: QcPlan) -> None:
    """Refuse, before any work, a QC folder that is the input or holds files an earlier predict did not write."""
    if plan.empty:
        return
    folder = qc_dir(out)
    check_outputs({"the QC folder": folder}, {"input": src})
    if folder.exists() and not folder.is_dir():
        raise OutputClashError(f"{folder} exists and is not a folder; the QC pictures of {out.name} go there: "
                               "remove it, pass another --out, or --qc 0")
    if not folder.is_dir():
        return
    ours = {QC_LISTING, *_listed_files(folder)}
    others = sorted(p.name for p in folder.iterdir() if p.name not in ours and not p.name.startswith("."))
    if others:
        raise OutputClashError(f"{folder} holds {others[0]}" + (f" and {len(others) - 1} more files" if
                                                                len(others) > 1 else "")
                               + " that saltkit predict did not write; pass another --out, or --qc 0 for no "
                                 "QC pictures")


def trace_peaks(prob: np.ndarray) -> np.ndarray:
    """(n,) maximum of `(n, samples)` probabilities per trace, NaN where a trace has no data."""
    known = np.isfinite(prob)
    peaks = np.where(known, prob, -np.inf).max(axis=1)
    return np.where(known.any(axis=1), peaks, np.nan).astype(np.float32)


def write_volume_qc(folder: Path, src: Path, out: Path, f, layout: SegyLayout, geometry: Geometry, volume,
                    plan: QcPlan, peaks: np.ndarray, clip: tuple[float, float], threshold: float, caption: str,
                    fill_value: float | None = None) -> dict:
    """Draw the planned sections (amplitudes read from the input `f`, probabilities from `volume`, a
    `ProbabilityVolumeFile` open for reading), the map of `peaks` ((inlines, crosslines) maximum probability) and
    the index page into `folder`; returns the listing written to `qc.json`."""
    folder.mkdir(exist_ok=True)
    times = Axis(TIME_AXIS, layout.sample_axis)
    il_axis, xl_axis = Axis("inline", geometry.ilines.tolist()), Axis("crossline", geometry.xlines.tolist())
    rows = []
    for direction, indices in (("inline", plan.inline), ("crossline", plan.crossline)):
        numbers = geometry.ilines if direction == "inline" else geometry.xlines
        for k in indices:
            traces = geometry.section_traces(direction, k)
            amplitudes = read_traces(f, traces, layout.samples)
            prob = volume.read(traces)
            prob[~trace_valid(amplitudes, fill_value)] = np.nan
            share = salt_share(prob, threshold)
            name = f"{direction}_{numbers[k]}.png"
            volume_section_figure(folder / name, amplitudes.T, prob.T, threshold, clip, caption,
                                  f"{src.name}: {direction} {numbers[k]} (salt in {share:.1%} of the samples "
                                  "with data)", xl_axis if direction == "inline" else il_axis, times)
            rows.append({"file": name, "direction": direction, "number": int(numbers[k]), "salt_share": share})
    if min(peaks.shape) > 1:  # a 2-D line has no map
        volume_map_figure(folder / "map.png", peaks, threshold, caption,
                          f"{src.name}: map of the maximum salt probability down each trace", xl_axis, il_axis,
                          plan.inline, plan.crossline)
        known = peaks[np.isfinite(peaks)]
        rows.append({"file": "map.png", "direction": "map", "number": None,
                     "salt_share": float(np.mean(known > threshold)) if known.size else 0.0})
    _write_index(folder, src, out, rows, caption)
    listing = {"input": str(src), "output": str(out), "files": [r["file"] for r in rows] + ["index.html"],
               "pictures": rows}
    stale = set(_listed_files(folder)) - set(listing["files"]) - {QC_LISTING}
    with atomic_write(folder / QC_LISTING) as fj:
        json.dump(listing, fj, indent=2)
    for name in stale:  # an earlier run's pictures of other sections would show an older prediction
        (folder / name).unlink(missing_ok=True)
    return listing


def _listed_files(folder: Path) -> list[str]:
    """The files an earlier predict wrote into the QC `folder`, by its qc.json ([] when there is none)."""
    listing = folder / QC_LISTING
    if not listing.is_file():
        return []
    try:
        files = json.loads(listing.read_text(encoding="utf-8"))["files"]
        if not all(isinstance(f, str) and Path(f).name == f for f in files):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise OutputClashError(f"{listing} is not a saltkit QC listing; pass another --out, or --qc 0") from None
    return files


def _write_index(folder: Path, src: Path, out: Path, rows: list[dict], caption: str) -> Path:
    figures = []
    for row in rows:
        name = html.escape(row["file"])
        what = "map" if row["direction"] == "map" else f"{row['direction']} {row['number']}"
        share = (f"traces with salt {row['salt_share']:.1%}" if row["direction"] == "map"
                 else f"salt {row['salt_share']:.1%} of the samples with data")
        figures.append(f'<figure><a href="{name}"><img src="{name}" loading="lazy"></a>'
                       f"<figcaption><b>{html.escape(what)}</b>, {share}</figcaption></figure>")
    page = ("<!doctype html><meta charset=utf-8><title>saltkit QC</title><style>"
            "body{font-family:sans-serif} figure{display:inline-block;margin:8px;vertical-align:top}"
            "img{max-width:560px;max-height:520px;border:1px solid #888}</style>"
            f"<h1>saltkit QC: {html.escape(src.name)} &rarr; {html.escape(out.name)}</h1>\n"
            f"<p>{html.escape(caption)}</p>\n" + "\n".join(figures) + "\n")
    path = folder / "index.html"
    with atomic_write(path) as fh:
        fh.write(page)
    return path
