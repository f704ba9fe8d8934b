"""Predict an MDIO volume (`pip install 'saltkit[mdio]'`) into an MDIO volume of salt probability, over Dask.

The output is the input dataset with its amplitude variable replaced by `salt_probability` (float32, NaN where
there is no data): the same dimensions, coordinates, chunk shape, trace headers, trace mask and SEG-Y file headers
(data sample format IEEE float, saltkit's lines in the text header), so `mdio.mdio_to_segy` with `segy_spec()`
writes a SEG-Y with the input's headers. Paths are local or fsspec URLs (`s3://...`, `memory://...`).

Work is split along the store's chunks: one task per block of inlines one chunk thick (crossline predictions: per
block of crosslines), reading its amplitudes and writing whole output chunks, so no two tasks write one chunk and
no lock is needed; a task run twice (its worker died and Dask ran it again) writes the same values again. Each
worker process loads the network once (`worker_predictor`). `direction="both"`: the inline pass writes a scratch
array, which the crossline pass averages with into the output; then the scratch is removed. Sections are predicted
by `saltkit.seismic.sections.predict_traces`, as the SEG-Y path predicts them, with one amplitude clip for the
volume taken from evenly spread live traces (`sampled_clip`).

The dataset is written under a temporary name beside the output (`.NAME.<pid>@<host>.<random>-partial.tmp`) and
renamed at the end; its attribute `attributes.saltkit.complete` stays false until after the rename, and readers
check it (`check_complete`): on object stores a rename is a copy that a kill can interrupt.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from saltkit import __version__
from saltkit.io import OutputClashError, host_name, stale_temporary
from saltkit.logs import progress_bars
from saltkit.seismic.normalize import Normalization
from saltkit.seismic.sections import predict_traces
from saltkit.seismic.segy import annotate_text_header, sample_trace_indices
from saltkit.seismic.volume import DEFAULT_CLIP_TRACES, AmplitudeClip, probability_header_lines, sampled_clip

PROBABILITY = "salt_probability"
SCRATCH = "saltkit_inline_probability"  # the inline pass of direction "both", removed before the rename
INSTALL_HINT = "pip install 'saltkit[mdio]'"
IEEE_FLOAT = 5  # SEG-Y data sample format code of the output's binary header

logger = logging.getLogger(__name__)


def is_mdio_path(path) -> bool:
    """Whether `path` (a path or URL) names an MDIO dataset: it ends in .mdio."""
    return str(path).rstrip("/").lower().endswith(".mdio")


def require_mdio() -> None:
    """Import the optional packages MDIO prediction needs; a one-line error naming the extra when one is missing."""
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
        import fsspec  # noqa: F401
        import mdio  # noqa: F401
    except ImportError as e:
        raise ImportError(f"MDIO volumes need the optional packages multidimio and dask[distributed] ({e.name} is "
                          f"not installed): {INSTALL_HINT}") from None


# ---------------------------------------------------------------- paths and stores


def _fs(url: str):
    """(fsspec file system, path within it) of a local path or URL."""
    import fsspec

    return fsspec.core.url_to_fs(str(url))


def _sibling(url: str, name: str) -> str:
    """The URL of `name` in the folder holding `url`."""
    url = str(url).rstrip("/")
    head, _, _ = url.rpartition("/")
    return f"{head}/{name}" if head else name


def _basename(url: str) -> str:
    return str(url).rstrip("/").rpartition("/")[2]


def remove_stale_outputs(out: str) -> None:
    """Remove the temporaries of `out` left beside it by killed runs of this host (their process is gone); the
    same names as `saltkit.io.atomic_write`'s, here whole datasets."""
    fs, path = _fs(out)
    parent, name = path.rstrip("/").rpartition("/")[0], _basename(path)
    try:
        entries = fs.ls(parent or ".", detail=False)
    except (FileNotFoundError, OSError):
        return
    for entry in entries:
        if stale_temporary(_basename(entry), name):
            fs.rm(entry, recursive=True)


def check_mdio_output(src: str, out: str, overwrite: bool = False) -> None:
    """Before any work: `out` names an MDIO dataset (.mdio) other than the input, in an existing folder when local,
    and does not exist unless `overwrite`."""
    if not is_mdio_path(out):
        raise ValueError(f"output {out}: an MDIO input is predicted into an MDIO dataset; name it .mdio")
    fs_in, p_in = _fs(src)
    fs_out, p_out = _fs(out)
    if type(fs_in) is type(fs_out) and p_in.rstrip("/") == p_out.rstrip("/"):
        raise OutputClashError(f"output {out} is the input; choose another name")
    parent = p_out.rstrip("/").rpartition("/")[0]
    if "://" not in str(out) and parent and not fs_out.isdir(parent):
        raise FileNotFoundError(f"cannot write {out}: folder {parent} does not exist")
    if fs_out.exists(p_out) and not overwrite:
        raise OutputClashError(f"output {out} exists; pass --overwrite to replace it, or another --out")


def check_complete(path: str) -> dict:
    """The `attributes.saltkit` record of the saltkit prediction at `path`; an error when its run did not finish
    (a killed run leaves `complete: false`) or it is not a saltkit prediction."""
    import mdio

    record = mdio.open_mdio(path).attrs.get("attributes", {}).get("saltkit")
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a saltkit prediction (no attributes.saltkit); predict it with saltkit predict")
    if not record.get("complete"):
        raise ValueError(f"{path} is incomplete: its run was killed before the end; predict it again with --overwrite")
    return record


# ---------------------------------------------------------------- the input


def open_volume(src: str):
    """(the lazily opened MDIO dataset at `src`, the name of its amplitude variable); a one-line error when it is
    missing or not a 3-D volume (inline, crossline, samples)."""
    import mdio

    fs, path = _fs(src)
    if not fs.exists(path):
        raise FileNotFoundError(f"MDIO volume not found: {src}")
    try:
        ds = mdio.open_mdio(src)
    except Exception as e:  # zarr and xarray raise many types for a store that is not a dataset
        raise ValueError(f"{src} cannot be opened as an MDIO dataset ({type(e).__name__}: {e})") from None
    name = ds.attrs.get("attributes", {}).get("defaultVariableName", "amplitude")
    if name not in ds:
        raise ValueError(f"{src} has no variable {name!r} (its attributes.defaultVariableName); variables: "
                         f"{sorted(ds.data_vars)}")
    dims = ds[name].dims
    if len(dims) != 3 or dims[:2] != ("inline", "crossline"):
        raise ValueError(f"{src}: {name} has dimensions {dims}; saltkit predicts post-stack 3-D volumes (inline, "
                         "crossline, time or depth), as mdio's PostStack3DTime / PostStack3DDepth templates store them")
    return ds, name


def live_traces(ds) -> np.ndarray:
    """(inlines, crosslines) bool: the grid cells that hold a trace (the dataset's trace_mask; all when absent)."""
    if "trace_mask" in ds:
        return np.asarray(ds["trace_mask"].values, bool)
    return np.ones((ds["inline"].size, ds["crossline"].size), bool)


def volume_clip(ds, name: str, normalization: Normalization, clip_traces: int = DEFAULT_CLIP_TRACES,
                fill_value: float | None = None, source: str = "volume") -> AmplitudeClip:
    """The amplitude clip of the volume, as the SEG-Y path takes it: the fixed range of `normalization`, else its
    percentiles of up to `clip_traces` live traces spread evenly in inline-major order (the order of an
    inline-sorted SEG-Y file)."""
    import xarray as xr

    if normalization.value_range is not None:
        return AmplitudeClip(float(normalization.value_range[0]), float(normalization.value_range[1]), "range")
    live = np.flatnonzero(live_traces(ds))
    if live.size == 0:
        raise ValueError(f"{source}: no live trace (trace_mask is false everywhere); nothing to predict")
    cells = live[sample_trace_indices(live.size, clip_traces)]
    il, xl = np.unravel_index(cells, (ds["inline"].size, ds["crossline"].size))
    traces = ds[name].isel(inline=xr.DataArray(il, dims="trace"), crossline=xr.DataArray(xl, dims="trace"))
    return sampled_clip(np.asarray(traces.values), normalization, fill_value, source)


# ---------------------------------------------------------------- the network on the workers


@dataclass(frozen=True)
class PredictorSettings:
    """How each worker loads the network: `saltkit.seismic.predict.load_predictor`'s arguments. Called on a
    worker it returns (network, inferer); `threads`: torch (and ONNX Runtime) threads of each worker."""

    ckpt: str
    device: str = "cpu"
    tta: bool = True
    overlap: float = 0.5
    sw_batch_size: int = 16
    variant: str | None = None
    runtime: str = "torch"
    threads: int | None = None
    amp: str | bool = False
    onnx_path: str | None = None

    def __call__(self):
        import torch

        from saltkit.seismic.predict import load_predictor

        if self.threads:
            torch.set_num_threads(self.threads)
        return load_predictor(self.ckpt, self.device, self.tta, self.overlap, self.sw_batch_size, self.variant,
                              runtime=self.runtime, threads=self.threads, amp=self.amp, onnx_path=self.onnx_path)


@functools.cache
def worker_predictor(load: Callable[[], tuple]):
    """(network, inferer) of `load` in this process, loaded on its first call only: a worker runs many tasks."""
    return load()


# ---------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class VolumeJob:
    """What every task of one prediction shares (pickled to the workers)."""

    src: str
    partial: str
    variable: str
    low: float
    high: float
    fill_value: float | None
    threshold: float
    predictor: Callable
    device: str = "cpu"


def _zarr_array(store: str, name: str, mode: str = "r+"):
    import zarr

    return zarr.open_array(store=f"{str(store).rstrip('/')}/{name}", mode=mode)


def predict_block(job: VolumeJob, axis: int, start: int, stop: int, target: str,
                  average_with: str | None = None) -> tuple[int, int]:
    """Predict the sections `start:stop` along `axis` (0 inlines, 1 crosslines) and write them into whole chunks
    of `target` (averaged with the same block of `average_with` when given). Returns (salt samples, data samples)."""
    import mdio

    network, inferer = worker_predictor(job.predictor)
    dim = ("inline", "crossline")[axis]
    ds = mdio.open_mdio(job.src).isel({dim: slice(start, stop)})
    amplitudes = ds[job.variable].values.astype(np.float32, copy=False)  # writable: its own read
    amplitudes[~live_traces(ds)] = np.nan  # a hole in the grid is a missing trace, as in a SEG-Y
    prob = np.empty(amplitudes.shape, np.float32)
    for k in range(stop - start):
        index = (k, slice(None)) if axis == 0 else (slice(None), k)
        prob[index], _ = predict_traces(network, inferer, amplitudes[index], job.low, job.high, job.fill_value,
                                        job.device)
    block = (slice(start, stop), slice(None)) if axis == 0 else (slice(None), slice(start, stop))
    if average_with is not None:
        prob = (_zarr_array(job.partial, average_with, "r")[block] + prob) / 2
    _zarr_array(job.partial, target)[block] = prob
    known = np.isfinite(prob)
    return int((prob[known] > job.threshold).sum()), int(known.sum())


def blocks(size: int, chunk: int) -> list[tuple[int, int]]:
    """(start, stop) of the chunks of an axis of `size` cut every `chunk`."""
    return [(a, min(a + chunk, size)) for a in range(0, size, chunk)]


# ---------------------------------------------------------------- the output dataset


def _text_header(text: str, lines: list[str]) -> str:
    """mdio's text header (40 cards of 80 characters, one a line) with saltkit's `lines` written as cards."""
    cards = text.split("\n")
    if len(cards) != 40 or any(len(c) != 80 for c in cards):
        logger.warning("the input's text header is not 40 cards of 80 characters; saltkit's lines are not added")
        return text
    annotated, _ = annotate_text_header("".join(cards).encode("latin-1", errors="replace"), lines)
    flat = annotated.decode("latin-1")
    return "\n".join(flat[i * 80:(i + 1) * 80] for i in range(40))


def output_dataset(ds, name: str, header_lines: list[str], record: dict):
    """The output's xarray dataset: `ds` (opened with dask chunks) with `name` replaced by a placeholder
    `salt_probability` of its shape and chunks (all NaN: not stored, zarr leaves out chunks of the fill value),
    the SEG-Y file headers saying IEEE float, and `record` as `attributes.saltkit`."""
    import dask.array as da
    from zarr.codecs import BloscCodec

    amplitude = ds[name]
    chunks = amplitude.encoding.get("chunks") or tuple(c[0] for c in amplitude.data.chunks)
    placeholder = da.full(amplitude.shape, np.nan, dtype=np.float32, chunks=chunks)
    prob = amplitude.copy(data=placeholder)
    prob.attrs = {"long_name": "salt probability", "description": "0-1, NaN where there is no data"}
    # lossless whatever the input's compression: a lossy codec tuned to amplitudes would blur probabilities
    prob.encoding = {"chunks": chunks, "compressors": (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),),
                     "_FillValue": np.float32(np.nan)}
    out = ds.drop_vars(name).assign({PROBABILITY: prob})
    if "segy_file_header" in out:
        attrs = dict(out["segy_file_header"].attrs)
        attrs["binaryHeader"] = {**attrs.get("binaryHeader", {}), "data_sample_format": IEEE_FLOAT}
        if isinstance(attrs.get("textHeader"), str):
            attrs["textHeader"] = _text_header(attrs["textHeader"], header_lines)
        out["segy_file_header"].attrs = attrs
    attributes = {**ds.attrs.get("attributes", {}), "defaultVariableName": PROBABILITY, "saltkit": record}
    out.attrs = {**ds.attrs, "attributes": attributes}
    return out


def _set_record(path: str, record: dict) -> None:
    """Rewrite `attributes.saltkit` of the dataset at `path` (its root metadata only)."""
    import zarr

    group = zarr.open_group(store=path, mode="r+")
    attributes = dict(group.attrs.get("attributes", {}))
    attributes["saltkit"] = record
    group.attrs["attributes"] = attributes


def _move_into_place(partial: str, out: str, token: str) -> None:
    """Rename the finished `partial` onto `out`; an existing `out` (--overwrite) is moved aside first and removed
    after, so `out` never holds a mix of the two."""
    fs, p_out = _fs(out)
    _, p_partial = _fs(partial)
    old = None
    if fs.exists(p_out):
        old = _sibling(p_out, f".{_basename(p_out)}.{token.replace('-partial', '-old')}.tmp")
        fs.mv(p_out, old, recursive=True)
    fs.mv(p_partial, p_out, recursive=True)
    if old is not None:
        fs.rm(old, recursive=True)


# ---------------------------------------------------------------- the workflow


def dask_client(workers: int = 1, scheduler: str | None = None):
    """(client, cluster or None): a client of the Dask scheduler at `scheduler`, else of a new local cluster of
    `workers` processes, one thread each (torch threads: `PredictorSettings.threads`)."""
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def predict_mdio(
    src: str,
    out: str,
    predictor: Callable,
    direction: str = "inline",
    normalization: Normalization = Normalization(mode="percentile"),
    clip_traces: int = DEFAULT_CLIP_TRACES,
    fill_value: float | None = None,
    threshold: float = 0.5,
    client=None,
    workers: int = 1,
    scheduler: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    provenance: dict | None = None,
) -> dict:
    """Salt probability of every sample of the MDIO volume `src`, written as the MDIO dataset `out` (see the module
    docstring). Returns the summary also stored as the output's `attributes.saltkit`.

    Args:
        src: the input MDIO dataset, a local path or an fsspec URL.
        out: the output MDIO dataset (.mdio), local or URL; refused when it exists unless `overwrite`.
        predictor: a picklable callable returning (network, inferer) on a worker (`PredictorSettings`).
        direction: "inline", "crossline" or "both" (their mean, as the SEG-Y path averages them).
        normalization: the amplitude clip: percentiles of sampled traces, or its fixed `value_range`.
        clip_traces: live traces sampled for the clip percentiles.
        fill_value: the amplitude that marks no data (NaN, dead and missing traces always do).
        threshold: the salt share's cut, recorded in the summary.
        client: a `distributed.Client` to run on; None: `scheduler`'s, else a local cluster of `workers`.
        workers: processes of the local cluster (one thread each).
        scheduler: the address of a running Dask scheduler (tcp://HOST:8786).
        overwrite: replace an existing `out`.
        device: the torch device of the network on the workers.
        progress: a progress bar over the tasks (drawn only on a terminal).
        provenance: checkpoint and settings recorded in the output's attributes."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    require_mdio()
    if direction not in ("inline", "crossline", "both"):
        raise ValueError(f"direction must be inline, crossline or both, got {direction!r}")
    src, out = str(src), str(out)
    check_mdio_output(src, out, overwrite)
    ds, name = open_volume(src)
    clip = volume_clip(ds, name, normalization, clip_traces, fill_value, src)
    started = time.time()
    token = f"{os.getpid()}@{host_name()}.{secrets.token_hex(4)}-partial"
    partial = _sibling(out, f".{_basename(out)}.{token}.tmp")
    record = {"version": __version__, "complete": False, "input": src, "direction": direction,
              "clip": clip.as_dict(), "fill_value": fill_value, "threshold": threshold,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **(provenance or {})}
    own_client = client is None
    cluster = None
    if own_client:
        client, cluster = dask_client(workers, scheduler)
    remove_stale_outputs(out)
    try:
        import mdio
        import zarr

        lazy = mdio.open_mdio(src, chunks={})
        shaped = output_dataset(lazy, name, probability_header_lines("float32", direction, clip), record)
        # headers, mask and coordinates copied by the client's cluster (dask's default scheduler while it is
        # open); the placeholder's chunks equal the fill value and are not written
        with client.as_current():
            mdio.to_mdio(shaped, partial, mode="w-")
        chunks = shaped[PROBABILITY].encoding["chunks"]
        n_il, n_xl, _ = ds[name].shape
        if direction == "both":
            zarr.create_array(store=f"{partial}/{SCRATCH}", shape=ds[name].shape, chunks=chunks, dtype="float32",
                              fill_value=np.nan)
        job = VolumeJob(src, partial, name, clip.low, clip.high, fill_value, threshold, predictor, str(device))
        passes = {"inline": [(0, PROBABILITY, None)], "crossline": [(1, PROBABILITY, None)],
                  "both": [(0, SCRATCH, None), (1, PROBABILITY, SCRATCH)]}[direction]
        salt = data = 0
        bar = tqdm(total=sum(len(blocks((n_il, n_xl)[a], chunks[a])) for a, _, _ in passes), unit="block",
                   desc=f"predict {_basename(src)}", disable=not progress_bars(progress), leave=False)
        for axis, target, average in passes:
            futures = [client.submit(predict_block, job, axis, a, b, target, average, pure=False)
                       for a, b in blocks((n_il, n_xl)[axis], chunks[axis])]
            for future in as_completed(futures):
                s, d = future.result()
                if target == PROBABILITY:
                    salt, data = salt + s, data + d
                bar.update()
        bar.close()
        if direction == "both":
            fs, path = _fs(partial)
            fs.rm(f"{path}/{SCRATCH}", recursive=True)
        record.update({"salt_share": salt / data if data else 0.0, "seconds": round(time.time() - started, 1),
                       "workers": len(client.scheduler_info()["workers"])})
        _set_record(partial, record)
        _move_into_place(partial, out, token)
        record["complete"] = True
        _set_record(out, record)  # after the rename: a copy cut short by a kill never says complete
    except BaseException:
        fs, path = _fs(partial)
        if fs.exists(path):
            fs.rm(path, recursive=True)
        raise
    finally:
        if own_client:
            client.close()
            if cluster is not None:
                cluster.close()
    return {**record, "output": out, "shape": list(ds[name].shape), "dims": list(ds[name].dims)}


# ---------------------------------------------------------------- back to SEG-Y


def segy_spec(iline_byte: int = 189, xline_byte: int = 193, float_samples: bool = True):
    """The SEG-Y spec for mdio's import (`mdio.segy_to_mdio` with the PostStack3DTime template) and export
    (`mdio.mdio_to_segy` of a saltkit prediction: `float_samples`, IEEE float as its binary header says): SEG-Y
    rev 1 with the inline and crossline numbers at these bytes, CDP X / Y at 181 / 185 and the coordinate scalar
    at 71."""
    from segy.schema import HeaderField, ScalarType, TraceDataSpec
    from segy.standards import get_segy_standard

    fields = [HeaderField(name="inline", byte=iline_byte, format="int32"),
              HeaderField(name="crossline", byte=xline_byte, format="int32"),
              HeaderField(name="cdp_x", byte=181, format="int32"),
              HeaderField(name="cdp_y", byte=185, format="int32"),
              HeaderField(name="coordinate_scalar", byte=71, format="int16")]
    data = TraceDataSpec(format=ScalarType.FLOAT32) if float_samples else None
    return get_segy_standard(1.0).customize(trace_header_fields=fields, trace_data_spec=data)

