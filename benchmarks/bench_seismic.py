"""Seismic sections and volumes: section throughput against the tile path, and a SEG-Y volume's peak memory.

Section cases: one ~1000 x 1000 real section (mosaic_94_2 of $SALTKIT_DATA/mosaics.csv, 1010 x 1010, its
absent cells at mean grey; a 10 x 10 grid of the shipped sample tiles when SALTKIT_DATA is not set), predicted
whole by
the section inferer (sliding 128 px windows, Gaussian blending; TTA on / off, overlap 0.25 / 0.5) vs the tile path on
the same pixels (its 100 tiles of 101 x 101 through the same inferer, one window each). Network: the CPU recipe's
SaltUNet with random weights, in channels_last layout as `saltkit predict` runs it on the CPU.
samples/s = 1010 * 1010 / time for both sides.

Volume case: a generated SEG-Y (IEEE float, 500 crosslines x 500 samples per inline, sections made of real tiles)
of 1000 inlines (1.1 GB) vs 250 inlines (0.28 GB), predicted end to end by `predict_volume` (inline sections, no TTA,
overlap 0.25, to keep the 1 GB run short) in a fresh process each; reported: each run's peak resident memory. The network there is a 3-layer
convolution stand-in, not SaltUNet: with SaltUNet the 1 GB run takes hours on 2 CPU cores, and the network's own
memory (weights + one window batch) is the same for both sizes.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.bench_inference import recipe_arch, recipe_network
from benchmarks.run import Case, benchmark_data

REPO = Path(__file__).resolve().parents[1]
MOSAIC = "mosaic_94_2"
VOLUME_SHAPE = (500, 500)  # crosslines, samples per inline section
VOLUME_INLINES = {"1GB": 1000, "0.25GB": 250}


# ---------------------------------------------------------------- sections


def real_section() -> tuple[np.ndarray, str]:
    """A 1010 x 1010 uint8 real section and where it comes from."""
    from saltkit.seismic.mosaics import assemble_mosaic, read_mosaics

    data = benchmark_data()
    if data is not None and (data / "mosaics.csv").is_file():
        return assemble_mosaic(data, MOSAIC, read_mosaics(data / "mosaics.csv")).image, MOSAIC
    return sample_grid(10, 10), "10 x 10 sample tiles"


def sample_grid(rows: int, cols: int) -> np.ndarray:
    """`(rows * 101, cols * 101)` uint8: the shipped sample's train tiles side by side (repeated as needed)."""
    from saltkit.data.layout import load_image, sample_dir, train_items

    tiles = [load_image(it["image"]) for it in train_items(sample_dir())]
    grid = [np.hstack([tiles[(r * cols + c) % len(tiles)] for c in range(cols)]) for r in range(rows)]
    return np.vstack(grid)


@functools.lru_cache(maxsize=1)
def section_inputs():
    image, source = real_section()
    net = recipe_network()  # channels_last, as `saltkit predict` runs it on the CPU
    grey = image.astype(np.float32) / 255
    tiles = grey.reshape(10, 101, 10, 101).transpose(0, 2, 1, 3).reshape(100, 101, 101)
    tiles = torch.from_numpy(np.ascontiguousarray(tiles))[:, None].expand(-1, 3, -1, -1).contiguous()
    return {"net": net, "grey": grey, "tiles": tiles, "source": source}


def section_case(tta: bool, overlap: float) -> Case:
    def ours(inputs):
        from saltkit.inference import section_inferer
        from saltkit.seismic.sections import predict_section

        return predict_section(inputs["net"], section_inferer("pad", tta=tta, overlap=overlap), inputs["grey"])

    @torch.no_grad()
    def tiles(inputs):
        from saltkit.inference import section_inferer

        return section_inferer("pad", tta=tta, overlap=overlap)(inputs["tiles"], inputs["net"])["prob"]

    def compare(section, tile_probs):
        return {"samples": section.size, "source": section_inputs()["source"], "arch": str(recipe_arch())}

    name = f"section_{'tta' if tta else 'plain'}_overlap{overlap}_vs_tiles"
    return Case(name, section_inputs, ours, tiles, compare=compare, repeat=1,
                notes=f"1010x1010 section, sliding window (TTA {'on' if tta else 'off'}, overlap {overlap}) vs its "
                      "100 tiles one window each; samples/s = 1010*1010 / time")


# ---------------------------------------------------------------- volume


class ConvStandIn(nn.Module):
    """(B, 3, H, W) -> (B, 1, H, W) logit through three 3x3 convolutions (a cheap network for the memory case)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x):
        return self.body(x)


def write_volume(path: Path, inlines: int, crosslines: int, samples: int, coordinate_scalar: int = 0) -> Path:
    """A SEG-Y (big-endian, IEEE float, inline-sorted, inline/crossline at 189/193) streamed to `path`: inline k
    is a section of real tiles rolled by k traces, amplitudes grey - 128 (`coordinate_scalar` at byte 71: mdio's
    import wants one that is not 0)."""
    section = sample_grid(-(-samples // 101), -(-crosslines // 101))[:samples, :crosslines].astype(np.float32) - 128
    text = "".join(f"C{n:2d} saltkit benchmark volume".ljust(80) for n in range(1, 41)).encode("cp037")
    binary = bytearray(400)
    struct.pack_into(">h", binary, 16, 4000)  # sample interval, us
    struct.pack_into(">h", binary, 20, samples)
    struct.pack_into(">h", binary, 24, 5)  # IEEE float
    struct.pack_into(">h", binary, 28, 2)  # inline sorting
    headers = np.zeros((crosslines, 240), np.uint8)
    headers[:, 70:72] = np.frombuffer(struct.pack(">h", coordinate_scalar), np.uint8)
    headers[:, 114:116] = np.frombuffer(struct.pack(">h", samples), np.uint8)
    headers[:, 116:118] = np.frombuffer(struct.pack(">h", 4000), np.uint8)
    headers[:, 192:196] = np.arange(1, crosslines + 1, dtype=">i4").view(np.uint8).reshape(-1, 4)
    with open(path, "wb") as f:
        f.write(text + bytes(binary))
        for k in range(inlines):
            headers[:, 188:192] = np.frombuffer(struct.pack(">i", k + 1), np.uint8)
            traces = np.ascontiguousarray(np.roll(section, k, axis=1).T, dtype=">f4").view(np.uint8)
            f.write(np.hstack([headers, traces]).tobytes())
    return path


def predict_child(src: str, out: str) -> None:
    """Run in a fresh process: predict `src` into `out`, print the peak resident memory (MiB) as JSON."""
    import resource
    import time

    from saltkit.inference import section_inferer
    from saltkit.seismic.volume import predict_volume

    torch.set_num_threads(2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # imports and the network
    t0 = time.perf_counter()
    predict_volume(src, out, ConvStandIn().eval(), section_inferer("pad", tta=False, overlap=0.25), progress=False)
    print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_before_mib": before, "seconds": time.perf_counter() - t0}))


@functools.lru_cache(maxsize=1)
def volume_inputs():
    folder = Path(tempfile.mkdtemp(prefix="saltkit-bench-volume-"))
    atexit.register(shutil.rmtree, folder, True)  # 2.8 GB of inputs and outputs
    crosslines, samples = VOLUME_SHAPE
    return {name: write_volume(folder / f"{name}.sgy", n, crosslines, samples)
            for name, n in VOLUME_INLINES.items()}


def run_child(src: Path) -> dict:
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.bench_seismic import predict_child; " \
           f"predict_child({str(src)!r}, {str(src.with_name(src.stem + '_prob.sgy'))!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"volume prediction of {src} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "gib": src.stat().st_size / 2**30}


def volume_compare(big: dict, small: dict) -> dict:
    """Peak RSS of each run (and before predicting: imports and network), their ratio, each run's seconds."""
    return {"big_gib": round(big["gib"], 3), "big_peak_rss_mib": round(big["peak_rss_mib"]),
            "small_gib": round(small["gib"], 3), "small_peak_rss_mib": round(small["peak_rss_mib"]),
            "rss_ratio": round(big["peak_rss_mib"] / small["peak_rss_mib"], 3),
            "rss_before_predicting_mib": round(small["rss_before_mib"]),
            "big_s": round(big["seconds"], 1), "small_s": round(small["seconds"], 1)}


CASES = [
    *(section_case(tta, overlap) for tta in (True, False) for overlap in (0.5, 0.25)),
    Case("segy_volume_1gb_vs_0.25gb", volume_inputs, lambda v: run_child(v["1GB"]), lambda v: run_child(v["0.25GB"]),
         compare=volume_compare, repeat=1,
         notes="streamed SEG-Y prediction, 1.1 GB vs 0.28 GB (conv stand-in network); peak RSS must not grow "
               "(the time ratio is ~0.25 by design)"),
]
