"""SEG-Y volumes: layout and geometry of the input, section reads, and the probability volume written in its shape.

segyio (the optional extra `saltkit[segy]`) reads headers words and decodes samples of every format. The output is
written here with plain file I/O: the input's 3200-byte text header (two lines changed to say what the file is),
its 400-byte binary header (only the sample format code changed), extended text headers and every 240-byte trace
header copied byte for byte, and the salt probability as samples. segyio's writer rebuilds headers from known
fields, which would not keep unassigned bytes, and its geometry inference needs complete, sorted grids.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SEGY_SUFFIXES = (".sgy", ".segy")
TEXT_BYTES, BINARY_BYTES, TRACE_HEADER_BYTES = 3200, 400, 240
HEADER_BYTES = TEXT_BYTES + BINARY_BYTES
FORMAT_OFFSET = 3224  # sample format code, bytes 3225-3226 of the file (2-byte integer)
REVISION_OFFSET = 3500  # SEG-Y revision, major number: byte 3501
EXT_HEADERS_OFFSET = 3504  # extended text headers, bytes 3505-3506 (-1: a variable number ended by an EndText stanza)
EXTRA_TRACE_HEADERS_OFFSET = 3506  # revision 2: additional 240-byte trace headers per trace, bytes 3507-3508
TRACE_SAMPLES_BYTE, OFFSET_BYTE = 115, 37  # trace header words: samples in this trace, source-receiver offset
# Sample format code -> bytes per sample, for the formats segyio decodes.
SAMPLE_BYTES = {1: 4, 2: 4, 3: 2, 5: 4, 6: 8, 8: 1, 9: 8, 10: 4, 11: 2, 12: 8, 16: 1}
# Output sample type -> (SEG-Y format code, numpy kind): 5 = IEEE float, 16 = 1-byte unsigned (probability * 255).
OUTPUT_FORMATS = {"float32": (5, "f4"), "uint8": (16, "u1")}
# The sample value written where there is no data (dead or missing trace, fill-value or NaN sample): NaN for
# float; 0 for uint8, which has no spare value (the OUT.json sidecar counts the no-data samples).
NO_DATA = {"float32": float("nan"), "uint8": 0}
DIRECTIONS = ("inline", "crossline", "both")
SEGYIO_HINT = "pip install 'saltkit[segy]' (or pip install segyio)"


class SegyError(ValueError):
    """A SEG-Y file saltkit cannot read as asked; the message names the file and what to pass or fix."""


class SegyioMissing(ImportError):
    """segyio, the optional extra for SEG-Y, is not installed."""


def require_segyio():
    """The segyio module, or a SegyioMissing error that names the extra to install."""
    try:
        import segyio
    except ImportError as e:
        raise SegyioMissing(f"reading SEG-Y needs the optional package segyio: {SEGYIO_HINT}") from e
    return segyio


def is_segy_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SEGY_SUFFIXES


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class SegyLayout:
    """Where things are in a fixed-trace-length SEG-Y file.

    endian: "big" or "little"; format: sample format code; samples: samples per trace; ext_headers: extended
    3200-byte text headers after the binary header; tracecount: number of traces.
    """

    path: Path
    endian: str
    format: int
    samples: int
    ext_headers: int
    tracecount: int
    sample_axis: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @property
    def byteorder(self) -> str:
        return ">" if self.endian == "big" else "<"

    @property
    def data_offset(self) -> int:
        return HEADER_BYTES + TEXT_BYTES * self.ext_headers

    @property
    def trace_bytes(self) -> int:
        return TRACE_HEADER_BYTES + self.samples * SAMPLE_BYTES[self.format]


def _format_codes(binary_header: bytes) -> tuple[int, int]:
    at = FORMAT_OFFSET - TEXT_BYTES
    return struct.unpack(">h", binary_header[at:at + 2])[0], struct.unpack("<h", binary_header[at:at + 2])[0]


def read_layout(path: str | Path) -> SegyLayout:
    """Check that `path` is a SEG-Y file segyio can read and return its layout (endianness from the format code)."""
    segyio = require_segyio()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SEG-Y file not found: {path}")
    size = path.stat().st_size
    if size < HEADER_BYTES + TRACE_HEADER_BYTES:
        raise SegyError(f"{path}: not a SEG-Y file ({size} bytes, shorter than the 3600 bytes of text and binary "
                        "header plus one trace header)")
    with open(path, "rb") as f:
        f.seek(TEXT_BYTES)
        binary = f.read(BINARY_BYTES)
    big, little = _format_codes(binary)
    if big in SAMPLE_BYTES:
        endian, fmt = "big", big
    elif little in SAMPLE_BYTES:
        endian, fmt = "little", little
    else:
        raise SegyError(f"{path}: bytes 3225-3226 hold sample format code {big} (big-endian) / {little} "
                        f"(little-endian); expected one of {sorted(SAMPLE_BYTES)}: not a SEG-Y file, or a sample "
                        "format segyio cannot decode")
    check_header_counts(path, binary, endian)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with segyio.open(path, "r", ignore_geometry=True, endian=endian) as f:
                layout = SegyLayout(path, endian, fmt, len(f.samples), int(f.ext_headers), int(f.tracecount),
                                    tuple(float(s) for s in f.samples))
    except (RuntimeError, OSError) as e:
        raise SegyError(f"{path}: not a readable SEG-Y file ({e}); a truncated file or traces of different "
                        "lengths give this too") from None
    if layout.samples < 1 or layout.tracecount < 1:
        raise SegyError(f"{path}: {layout.tracecount} traces of {layout.samples} samples; nothing to predict")
    expected = layout.data_offset + layout.tracecount * layout.trace_bytes
    if size != expected:
        raise SegyError(f"{path}: {size} bytes, but {layout.tracecount} traces of {layout.samples} samples in "
                        f"format {fmt} after the headers make {expected}: truncated, or traces of different lengths")
    return layout


def check_header_counts(path: Path, binary: bytes, endian: str) -> None:
    """Refuse, naming the binary header bytes, the layouts segyio cannot find the traces of: a variable number of
    extended text headers (-1 at bytes 3505-3506) and revision-2 trace header extensions (bytes 3507-3508)."""
    order = ">" if endian == "big" else "<"

    def word(offset: int) -> int:
        at = offset - TEXT_BYTES
        return struct.unpack(order + "h", binary[at:at + 2])[0]

    ext = word(EXT_HEADERS_OFFSET)
    if ext < 0:
        raise SegyError(f"{path}: bytes 3505-3506 give {ext} extended text headers (a variable number, ended by an "
                        "EndText stanza), which segyio cannot locate the traces behind; write the file with the "
                        "number of extended text headers in the binary header")
    extra = word(EXTRA_TRACE_HEADERS_OFFSET)
    if binary[REVISION_OFFSET - TEXT_BYTES] >= 2 and extra > 0:
        raise SegyError(f"{path}: a SEG-Y revision 2 file with {extra} additional 240-byte trace header(s) per "
                        "trace (bytes 3507-3508), which segyio does not read; write the volume with the standard "
                        "240-byte trace header only")


def check_trace_lengths(f, layout: SegyLayout) -> None:
    """The trace headers that state their number of samples (bytes 115-116; 0: not stated) state one number (a crop
    may keep its survey's, so it need not be the binary header's): several numbers mean the bytes read as trace
    headers are sample data, or traces of different lengths."""
    stated = header_words(f, TRACE_SAMPLES_BYTE, "samples in this trace", layout.path)
    values, first = np.unique(stated[stated != 0], return_index=True)
    if len(values) > 1:
        traces = np.flatnonzero(stated != 0)[np.sort(first)[:2]]
        a, b = (int(t) for t in traces)
        raise SegyError(f"{layout.path}: trace {a}'s header gives {stated[a]} samples and trace {b}'s {stated[b]} "
                        f"(bytes 115-116; {len(values)} different numbers in all): the trace headers are not where "
                        "SEG-Y puts them, or the traces differ in length; saltkit reads fixed-length SEG-Y")


def read_text_header(layout: SegyLayout) -> bytes:
    """The 3200 bytes of the (first) text header, as stored."""
    with open(layout.path, "rb") as f:
        return f.read(TEXT_BYTES)


def open_segy(layout: SegyLayout):
    """segyio handle on the layout's file (no geometry inference: `read_geometry` builds the grid)."""
    segyio = require_segyio()
    return segyio.open(layout.path, "r", ignore_geometry=True, endian=layout.endian)


# ---------------------------------------------------------------- geometry


@dataclass
class Geometry:
    """The (inline, crossline) grid of a volume.

    ilines (n_il,), xlines (n_xl,) sorted numbers; traces (n_il, n_xl) int64 trace index of each cell, -1 where
    the file has no trace; iline_byte, xline_byte: the trace header bytes they were read from.
    """

    ilines: np.ndarray
    xlines: np.ndarray
    traces: np.ndarray
    iline_byte: int = 189
    xline_byte: int = 193

    @property
    def missing(self) -> int:
        return int((self.traces < 0).sum())

    def count(self, direction: str) -> int:
        """Number of sections along `direction` ("inline": one per inline number)."""
        return len(self.ilines) if direction == "inline" else len(self.xlines)

    def section_traces(self, direction: str, k: int) -> np.ndarray:
        """Trace indices (-1: no trace) of section `k`, in section column order (crossline / inline ascending)."""
        return self.traces[k] if direction == "inline" else self.traces[:, k]


def header_words(f, byte: int, what: str, path) -> np.ndarray:
    """The header word starting at trace header `byte` (1-based) of every trace, as int64."""
    try:
        return np.asarray(f.attributes(int(byte))[:], dtype=np.int64)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise SegyError(f"{path}: byte {byte} ({what}) is not the first byte of a SEG-Y trace header word ({e}); "
                        "inline and crossline numbers usually sit at 189 and 193, or 9 and 21") from None


def read_geometry(f, layout: SegyLayout, iline_byte: int = 189, xline_byte: int = 193) -> Geometry:
    """The grid from the inline / crossline numbers in every trace header (any trace order, holes allowed)."""
    path = layout.path
    check_trace_lengths(f, layout)
    il = header_words(f, iline_byte, "--iline-byte", path)
    xl = header_words(f, xline_byte, "--xline-byte", path)
    ilines, il_pos = np.unique(il, return_inverse=True)
    xlines, xl_pos = np.unique(xl, return_inverse=True)
    hint = (f"pass --iline-byte and --xline-byte with the trace header bytes where this file stores them (read "
            f"here: {iline_byte} and {xline_byte})")
    cells = len(ilines) * len(xlines)
    if len(ilines) > 1 and len(xlines) > 1 and cells > 4 * layout.tracecount:
        raise SegyError(f"{path}: the numbers at bytes {iline_byte} / {xline_byte} spread {layout.tracecount} traces "
                        f"over {len(ilines)} x {len(xlines)} grid cells; they do not look like inline / crossline "
                        f"numbers: {hint}")
    flat = il_pos.astype(np.int64) * len(xlines) + xl_pos
    order = np.argsort(flat, kind="stable")
    dup = np.flatnonzero(np.diff(flat[order]) == 0)
    if len(dup):
        a, b = order[dup[0]], order[dup[0] + 1]
        shared = f"{path}: traces {a} and {b} (and {len(dup) - 1} more pairs) share inline {il[a]} and crossline {xl[a]}"
        offsets = header_words(f, OFFSET_BYTE, "offset", path)
        if offsets[a] != offsets[b]:
            raise SegyError(f"{shared} at offsets {offsets[a]} and {offsets[b]} (bytes 37-40): a pre-stack file "
                            "(gathers); saltkit predicts post-stack volumes, one trace per inline and crossline: "
                            "stack the gathers (or keep one offset) first")
        raise SegyError(f"{shared}; saltkit predicts post-stack volumes, one trace per inline and crossline: {hint}")
    traces = np.full(cells, -1, dtype=np.int64)
    traces[flat] = np.arange(layout.tracecount)
    return Geometry(ilines, xlines, traces.reshape(len(ilines), len(xlines)), iline_byte, xline_byte)


def check_direction(geometry: Geometry, direction: str, path) -> None:
    """Fail on a direction that does not exist or cannot work (crossline sections of a 2-D line)."""
    if direction not in DIRECTIONS:
        raise SegyError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
    if direction != "inline" and len(geometry.ilines) == 1:
        raise SegyError(f"{path} is a 2-D line (one inline, {geometry.ilines[0]}): its crossline sections are one "
                        "trace wide; pass --direction inline")
    if direction != "crossline" and len(geometry.xlines) == 1 and len(geometry.ilines) > 1:
        raise SegyError(f"{path} has one crossline ({geometry.xlines[0]}): its inline sections are one trace wide; "
                        "pass --direction crossline")


# ---------------------------------------------------------------- reading sections


def read_traces(f, indices: np.ndarray, samples: int) -> np.ndarray:
    """`(len(indices), samples)` float32 samples of the traces at `indices`; rows of index -1 are NaN."""
    out = np.full((len(indices), samples), np.nan, dtype=np.float32)
    present = np.flatnonzero(indices >= 0)
    if len(present) == 0:
        return out
    idx = indices[present]
    steps = np.diff(idx)
    if len(idx) > 1 and steps[0] > 0 and (steps == steps[0]).all():  # a regular run: one strided read
        out[present] = f.trace.raw[int(idx[0]):int(idx[-1]) + 1:int(steps[0])]
    else:
        for row, i in zip(present, idx, strict=True):
            out[row] = f.trace[int(i)]
    return out


def sample_trace_indices(tracecount: int, limit: int) -> np.ndarray:
    """Up to `limit` trace indices spread evenly over the file (the sample the amplitude clip is taken from)."""
    if limit < 1:
        raise ValueError(f"clip_traces must be >= 1, got {limit}")
    return np.unique(np.linspace(0, tracecount - 1, min(limit, tracecount)).round().astype(np.int64))


# ---------------------------------------------------------------- text header


def is_ebcdic(text: bytes) -> bool:
    """Whether a 3200-byte text header is EBCDIC (cards start with EBCDIC 'C', 0xC3) rather than ASCII."""
    starts = text[0:TEXT_BYTES:80]
    return starts.count(0xC3) > starts.count(ord("C"))


def annotate_text_header(text: bytes, lines: list[str]) -> tuple[bytes, list[int]]:
    """The 3200-byte text header with `lines` written as cards (1-based numbers returned), in its own encoding.

    They go to the last blank cards before card 40 (kept: it often says END TEXTUAL HEADER), or to the cards just
    before it when too few are blank; every other byte is unchanged.
    """
    if len(text) != TEXT_BYTES:
        raise ValueError(f"a SEG-Y text header has {TEXT_BYTES} bytes, got {len(text)}")
    codec = "cp037" if is_ebcdic(text) else "latin-1"
    cards = [text[i * 80:(i + 1) * 80].decode(codec, errors="replace") for i in range(40)]
    blank = [n for n in range(2, 40) if not cards[n - 1][4:].strip()]
    chosen = blank[-len(lines):] if len(blank) >= len(lines) else list(range(40 - len(lines), 40))
    out = bytearray(text)
    for n, line in zip(chosen, lines, strict=True):
        card = f"C{n:2d} {line}"[:80].ljust(80)
        out[(n - 1) * 80:n * 80] = card.encode(codec, errors="replace")
    return bytes(out), chosen


# ---------------------------------------------------------------- the probability volume


class ProbabilityVolumeFile:
    """The output SEG-Y: the input's headers, `dtype` samples ("float32": IEEE float probability, "uint8":
    probability * 255 as 1-byte unsigned), the input's byte order. Writes and reads whole traces in place."""

    def __init__(self, path: str | Path, layout: SegyLayout, dtype: str = "float32"):
        if dtype not in OUTPUT_FORMATS:
            raise ValueError(f"dtype must be one of {list(OUTPUT_FORMATS)}, got {dtype!r}")
        self.path, self.layout, self.dtype = Path(path), layout, dtype
        self.format, kind = OUTPUT_FORMATS[dtype]
        self.sample_dtype = np.dtype(layout.byteorder + kind)
        self.trace_bytes = TRACE_HEADER_BYTES + layout.samples * self.sample_dtype.itemsize
        self._file = None

    def offset(self, trace: int) -> int:
        return self.layout.data_offset + int(trace) * self.trace_bytes

    @property
    def size(self) -> int:
        return self.offset(self.layout.tracecount)

    def create(self, text_header: bytes, chunk_bytes: int = 1 << 24) -> None:
        """Write headers (text: `text_header`; binary: the input's with the new format code; extended text headers
        and trace headers: the input's) and zero samples, streaming `chunk_bytes` of input at a time."""
        src, lay = self.layout.path, self.layout
        with open(src, "rb") as fin, open(self.path, "wb") as fout:
            fin.seek(TEXT_BYTES)
            binary = bytearray(fin.read(BINARY_BYTES))
            at = FORMAT_OFFSET - TEXT_BYTES
            binary[at:at + 2] = struct.pack(lay.byteorder + "h", self.format)
            fout.write(text_header)
            fout.write(binary)
            fout.write(fin.read(TEXT_BYTES * lay.ext_headers))
            per_chunk = max(1, chunk_bytes // lay.trace_bytes)
            for start in range(0, lay.tracecount, per_chunk):
                n = min(per_chunk, lay.tracecount - start)
                raw = np.frombuffer(fin.read(n * lay.trace_bytes), np.uint8).reshape(n, lay.trace_bytes)
                chunk = np.zeros((n, self.trace_bytes), np.uint8)
                chunk[:, :TRACE_HEADER_BYTES] = raw[:, :TRACE_HEADER_BYTES]
                fout.write(chunk.tobytes())

    def __enter__(self):
        self._file = open(self.path, "r+b", buffering=0)
        return self

    def __exit__(self, *exc):
        self._file.close()
        self._file = None

    def encode(self, prob: np.ndarray) -> np.ndarray:
        """`(..., samples)` probabilities -> sample values of the output type (uint8: rounded probability * 255);
        NaN (no data) -> `NO_DATA`."""
        if self.dtype == "uint8":
            scaled = np.rint(np.clip(np.nan_to_num(prob, nan=NO_DATA["uint8"]), 0, 1) * 255)
            return scaled.astype(self.sample_dtype)
        return prob.astype(self.sample_dtype)

    def write(self, traces: np.ndarray, prob: np.ndarray) -> None:
        """Write `(n, samples)` probabilities into the traces at indices `traces` (n,); rows of index -1 are skipped."""
        values = self.encode(prob)
        for i, row in zip(traces, values, strict=True):
            if i >= 0:
                self._file.seek(self.offset(i) + TRACE_HEADER_BYTES)
                self._file.write(row.tobytes())

    def read(self, traces: np.ndarray) -> np.ndarray:
        """`(n, samples)` float32 probabilities stored at `traces` (NaN for index -1)."""
        ns = self.layout.samples
        out = np.full((len(traces), ns), np.nan, np.float32)
        nbytes = ns * self.sample_dtype.itemsize
        for row, i in enumerate(traces):
            if i >= 0:
                self._file.seek(self.offset(i) + TRACE_HEADER_BYTES)
                out[row] = np.frombuffer(self._file.read(nbytes), self.sample_dtype)
        return out / 255 if self.dtype == "uint8" else out

    def sync(self) -> None:
        with open(self.path, "r+b") as f:
            os.fsync(f.fileno())
