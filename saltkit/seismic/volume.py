"""Predict a whole SEG-Y volume section by section, streaming, into a SEG-Y of the same shape and headers.

Samples without data (dead or missing traces, NaN or `fill_value` samples: `saltkit.seismic.validity`) are not
predicted: they hold `NO_DATA` in the output (NaN for float32, 0 for uint8) and NaN in OUT.npy, and are left out of
the salt share and the amplitude clip. QC pictures go to the folder beside the output (`saltkit.seismic.qc`).

Memory holds a few sections (the one being predicted, its 3-channel input and the sliding window's output maps)
whatever the number of inlines: traces are read per section and written in place into the output, which is
created under a temporary name beside it and renamed at the end. Under torchrun the sections are dealt out to the
ranks (section k to rank k mod world size); every rank writes its own traces, the crossline pass of
`direction="both"` starts when all inline writes are done.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from monai.inferers import Inferer
from torch import nn
from tqdm.auto import tqdm

from saltkit.io import atomic_write, host_name, remove_stale_temporaries
from saltkit.logs import progress_bars
from saltkit.seismic.normalize import Normalization, percentile_range
from saltkit.seismic.qc import DEFAULT_QC, check_qc_outputs, plan_qc, qc_dir, trace_peaks, write_volume_qc
from saltkit.seismic.sections import predict_traces
from saltkit.seismic.segy import (
    NO_DATA,
    Geometry,
    ProbabilityVolumeFile,
    SegyError,
    SegyLayout,
    annotate_text_header,
    check_direction,
    open_segy,
    read_geometry,
    read_layout,
    read_text_header,
    read_traces,
    sample_trace_indices,
)
from saltkit.seismic.validity import dead_traces, trace_valid

DEFAULT_CLIP_TRACES = 2000

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AmplitudeClip:
    """Amplitudes `low` -> 0 and `high` -> 1 (clipped); from `percentiles` of `traces` sampled traces, or given."""

    low: float
    high: float
    method: str
    percentiles: tuple[float, float] | None = None
    traces: int = 0

    def describe(self) -> str:
        if self.method == "percentile":
            p0, p1 = self.percentiles
            return f"AMPLITUDE CLIP {self.low:.6g} TO {self.high:.6g} = P{p0:g}-P{p1:g} OF {self.traces} TRACES"
        return f"AMPLITUDE CLIP {self.low:.6g} TO {self.high:.6g} (GIVEN)"

    def as_dict(self) -> dict:
        return {"method": self.method, "range": [self.low, self.high],
                "percentiles": None if self.percentiles is None else list(self.percentiles), "traces": self.traces}


def amplitude_clip(f, layout: SegyLayout, normalization: Normalization, clip_traces: int,
                   fill_value: float | None = None) -> AmplitudeClip:
    """The clip of `normalization` for this volume: its fixed range, else percentiles of evenly spread traces
    (their samples with data: dead traces and fill values left out)."""
    if normalization.value_range is not None:
        return AmplitudeClip(float(normalization.value_range[0]), float(normalization.value_range[1]), "range")
    idx = sample_trace_indices(layout.tracecount, clip_traces)
    return sampled_clip(read_traces(f, idx, layout.samples), normalization, fill_value, str(layout.path))


def sampled_clip(amplitudes: np.ndarray, normalization: Normalization, fill_value: float | None = None,
                 source: str = "volume") -> AmplitudeClip:
    """The percentile clip of `normalization` from the `(traces, samples)` sampled `amplitudes` (NaN rows:
    missing traces), their samples with data only (dead traces and fill values left out)."""
    amplitudes = np.array(amplitudes, dtype=np.result_type(amplitudes, np.float32))
    amplitudes[~trace_valid(amplitudes, fill_value)] = np.nan
    lo, hi = percentile_range(amplitudes, normalization.percentiles, source)
    return AmplitudeClip(lo, hi, "percentile", tuple(normalization.percentiles), len(amplitudes))


class NpyVolumeFile:
    """`(n_il, n_xl, samples)` float32 .npy written in place, trace by trace (NaN where the SEG-Y has no trace)."""

    def __init__(self, path: str | Path, geometry: Geometry, samples: int):
        self.path, self.geometry, self.samples = Path(path), geometry, samples
        self.shape = (len(geometry.ilines), len(geometry.xlines), samples)
        self.dtype = np.dtype("<f4")
        self.header_bytes = 0
        self._file = None

    def create(self) -> None:
        with open(self.path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": self.dtype.str, "fortran_order": False, "shape": self.shape})
            self.header_bytes = f.tell()
            f.truncate(self.header_bytes + int(np.prod(self.shape)) * self.dtype.itemsize)
            nan = np.full(self.samples, np.nan, self.dtype).tobytes()
            for cell in np.flatnonzero(self.geometry.traces.ravel() < 0):
                f.seek(self.header_bytes + int(cell) * len(nan))
                f.write(nan)

    def __enter__(self):
        self._file = open(self.path, "r+b", buffering=0)
        self._file.seek(0)
        np.lib.format.read_magic(self._file)
        np.lib.format.read_array_header_1_0(self._file)
        self.header_bytes = self._file.tell()
        return self

    def __exit__(self, *exc):
        self._file.close()

    def write(self, direction: str, k: int, prob: np.ndarray) -> None:
        """Store the `(n, samples)` probabilities of section `k` along `direction` (cells without trace skipped)."""
        n_il, n_xl, _ = self.shape
        cells = k * n_xl + np.arange(n_xl) if direction == "inline" else np.arange(n_il) * n_xl + k
        traces = self.geometry.section_traces(direction, k)
        values = prob.astype(self.dtype)
        for cell, trace, row in zip(cells, traces, values, strict=True):
            if trace >= 0:
                self._file.seek(self.header_bytes + int(cell) * self.samples * self.dtype.itemsize)
                self._file.write(row.tobytes())


def sidecar_path(out: str | Path) -> Path:
    """The JSON written beside an output volume: OUT.sgy -> OUT.json."""
    return Path(out).with_suffix(".json")


def npy_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".npy")


def _partial(path: Path, token: str) -> Path:
    """The temporary an output is written under: in its folder (the final rename stays on one disk) and named as
    atomic_write names its temporaries (`.NAME.<pid>@<host>.<random>-partial.tmp`), so two runs never share one
    and the next write into the folder removes those of a killed run."""
    return path.parent / f".{path.name}.{token}.tmp"


def _partial_token() -> str:
    """`<pid>@<host>.<random>-partial` of rank 0, the same in every process of a torchrun."""
    token = f"{os.getpid()}@{host_name()}.{secrets.token_hex(4)}-partial" if idist.get_rank() == 0 else None
    return idist.broadcast(token, src=0, safe_mode=True) if idist.get_world_size() > 1 else token


def probability_header_lines(dtype: str, direction: str, clip: AmplitudeClip) -> list[str]:
    what = "IEEE FLOAT" if dtype == "float32" else "1-BYTE UNSIGNED = P * 255"
    how = {"inline": "INLINE SECTIONS", "crossline": "CROSSLINE SECTIONS", "both": "MEAN OF INLINE+CROSSLINE"}
    no_data = "NAN" if dtype == "float32" else NO_DATA[dtype]
    return [f"SALTKIT SALT PROBABILITY 0-1 ({what}), {how[direction]}", f"SALTKIT {clip.describe()}",
            f"SALTKIT NO DATA (DEAD OR MISSING TRACE, FILL OR NAN SAMPLE) = {no_data}"]


def check_output_path(src: Path, out: Path, save_npy: bool = False) -> None:
    """Before any work: `out` names a SEG-Y file in an existing folder, is not the input, and neither it nor the
    files written beside it (OUT.json, OUT.npy with `save_npy`) is a folder."""
    if out.suffix.lower() not in (".sgy", ".segy"):
        raise SegyError(f"output {out}: a SEG-Y input is predicted into a SEG-Y file; name it .sgy or .segy")
    if out.exists() and out.resolve() == src.resolve():
        raise SegyError(f"output {out} is the input; choose another file name")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: folder {out.parent} does not exist")
    for path in (out, sidecar_path(out), *([npy_path(out)] if save_npy else [])):
        if path.is_dir():
            raise SegyError(f"output {path} is a folder; name another output file, or move the folder")


def predict_volume(
    src: str | Path,
    out: str | Path,
    network: nn.Module,
    inferer: Inferer,
    direction: str = "inline",
    dtype: str = "float32",
    iline_byte: int = 189,
    xline_byte: int = 193,
    normalization: Normalization = Normalization(mode="percentile"),
    clip_traces: int = DEFAULT_CLIP_TRACES,
    save_npy: bool = False,
    device="cpu",
    progress: bool = True,
    provenance: dict | None = None,
    fill_value: float | None = None,
    threshold: float = 0.5,
    qc: int = DEFAULT_QC,
    qc_inlines=None,
    qc_crosslines=None,
) -> dict:
    """Salt probability of every sample of the SEG-Y `src`, written to `out` (plus `OUT.json`, `OUT.npy` when
    `save_npy`, and the QC pictures in `OUT_qc/`: `qc` evenly spaced inlines and crosslines, or the numbers listed
    in `qc_inlines` / `qc_crosslines`; `qc` 0 and no list: none). Returns the summary stored in `OUT.json`.

    fill_value: amplitude that marks samples without data (as do dead traces, missing traces and NaN);
    threshold: the salt boundary drawn in the QC pictures and the salt share's cut; provenance["model"] is named in
    the pictures' caption.

    direction: "inline", "crossline" or "both" (the mean of the two; with dtype "uint8" the inline half is
    stored as 8 bits in between). Sections are `(samples, traces)` images: time / depth down, traces across in
    increasing crossline (inline) number; no-data samples are filled from the data around them for the network
    (`fill_no_data`) and written as no data. Every check runs before anything is written; on an error the
    temporary files are removed and `out` is left as it was.
    """
    src, out = Path(src), Path(out)
    check_output_path(src, out, save_npy)
    layout = read_layout(src)
    rank, world = idist.get_rank(), idist.get_world_size()
    with open_segy(layout) as f:
        geometry = read_geometry(f, layout, iline_byte, xline_byte)
        check_direction(geometry, direction, src)
        plan = plan_qc(geometry, qc, qc_inlines, qc_crosslines, src)
        check_qc_outputs(src, out, plan)
        clip = amplitude_clip(f, layout, normalization, clip_traces, fill_value)
        text, cards = annotate_text_header(read_text_header(layout), probability_header_lines(dtype, direction, clip))
        token, started = _partial_token(), time.time()
        if rank == 0:
            remove_stale_temporaries(out.parent, out.name)
            remove_stale_temporaries(out.parent, npy_path(out).name)
        volume = ProbabilityVolumeFile(_partial(out, token), layout, dtype)
        npy = NpyVolumeFile(_partial(npy_path(out), token), geometry, layout.samples) if save_npy else None
        passes = ["inline", "crossline"] if direction == "both" else [direction]
        mine = {d: range(rank, geometry.count(d), world) for d in passes}  # section k goes to rank k mod world
        # per trace of the final pass: maximum probability (-1: not this rank's, -0.5: no data), for the map;
        # salt, data samples and dead traces counted for the summary
        peaks = np.full(geometry.traces.shape, -1.0, np.float32)
        counts = np.zeros(3, np.float64)
        try:
            if rank == 0:
                volume.create(text)
                if npy is not None:
                    npy.create()
            idist.barrier()
            bar = tqdm(total=sum(map(len, mine.values())), unit="section", desc=f"predict {src.name}",
                       disable=not progress_bars(progress) or rank != 0, leave=False)
            with volume, (npy if npy is not None else nullcontext()):
                for p, d in enumerate(passes):
                    for k in mine[d]:
                        traces = geometry.section_traces(d, k)
                        amplitudes = read_traces(f, traces, layout.samples)
                        prob, valid = predict_traces(network, inferer, amplitudes, clip.low, clip.high, fill_value,
                                                     device)
                        if p == 1:  # "both": average with the inline pass stored in the output
                            prob = (volume.read(traces) + prob) / 2
                        prob[~valid] = np.nan
                        volume.write(traces, prob)
                        if p == len(passes) - 1:
                            if npy is not None:
                                npy.write(d, k, prob)
                            peak = np.nan_to_num(trace_peaks(prob), nan=-0.5)
                            if d == "inline":
                                peaks[k] = peak
                            else:
                                peaks[:, k] = peak
                            counts += [(prob > threshold).sum(), valid.sum(),
                                       (dead_traces(amplitudes) & (traces >= 0)).sum()]
                        bar.update()
                    idist.barrier()  # the crossline pass reads what every rank wrote in the inline pass
            bar.close()
            if world > 1:  # every trace's peak comes from one rank; the counts add up
                peaks = idist.all_reduce(torch.from_numpy(peaks), op="MAX").cpu().numpy()
                counts = idist.all_reduce(torch.from_numpy(counts), op="SUM").cpu().numpy()
            peaks = np.where(peaks < 0, np.nan, peaks)
            salt, data, dead = (int(v) for v in counts)
            summary = {
                "input": str(src), "output": str(out), "npy": str(npy_path(out)) if save_npy else None,
                "direction": direction, "dtype": dtype, "format_code": volume.format,
                "endian": layout.endian, "samples": layout.samples,
                "sample_axis": [layout.sample_axis[0], layout.sample_axis[-1]],
                "ilines": _axis(geometry.ilines), "xlines": _axis(geometry.xlines),
                "iline_byte": iline_byte, "xline_byte": xline_byte, "traces": layout.tracecount,
                "missing_traces": geometry.missing, "dead_traces": dead, "fill_value": fill_value,
                "no_data": {"value": "NaN" if dtype == "float32" else NO_DATA[dtype],
                            "samples": geometry.traces.size * layout.samples - data},
                "threshold": threshold, "salt_share": salt / data if data else 0.0,
                "clip": clip.as_dict(), "text_header_cards": cards,
                "qc": None if plan.empty else str(qc_dir(out) / "index.html"),
                "processes": world, **(provenance or {}),
            }
            if rank == 0:
                volume.sync()
                if not plan.empty:
                    from saltkit.seismic.figures import caption_text

                    caption = caption_text(threshold, (provenance or {}).get("model"),
                                           f"grey: amplitude clipped at {clip.low:.4g} .. {clip.high:.4g}")
                    with volume:
                        write_volume_qc(qc_dir(out), src, out, f, layout, geometry, volume, plan, peaks,
                                        (clip.low, clip.high), threshold, caption, fill_value)
                if out.exists() and out.stat().st_mtime > started:
                    logger.warning(f"{out} was written by another run while this one ran; replacing it with this "
                                   "run's result")
                with atomic_write(sidecar_path(out)) as fj:  # renamed into place last: it describes these files
                    json.dump(summary, fj, indent=2)
                    if npy is not None:
                        npy.path.replace(npy_path(out))
                    volume.path.replace(out)
            idist.barrier()
        except BaseException:
            if rank == 0:
                volume.path.unlink(missing_ok=True)
                if npy is not None:
                    npy.path.unlink(missing_ok=True)
            raise
    return summary


def _axis(numbers: np.ndarray) -> dict:
    return {"first": int(numbers[0]), "last": int(numbers[-1]), "count": len(numbers)}
