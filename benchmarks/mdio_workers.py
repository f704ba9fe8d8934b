"""MDIO prediction over Dask: 1 worker against 2 (processes, one thread each), and the same volume through the SEG-Y
path, for volumes of a given size.

    python benchmarks/mdio_workers.py [--sizes 1gb 0.25gb] [--ckpt CKPT] [--out FILE.json]

Each size is generated as a SEG-Y (`bench_seismic.write_volume`: inlines of real sample tiles, IEEE float) and
converted to MDIO by mdio's own import (PostStack3DTime template, chunks `CHUNKS`). Each worker count gets a fresh
local cluster whose workers load the network before the clock starts; the SEG-Y path runs `predict_volume` in a
fresh process with one torch thread. The network is bench_seismic's 3-layer convolution stand-in (no TTA, overlap
0.25), as in its SEG-Y memory case: SaltUNet makes the 1 GB run take hours on 2 cores (`--ckpt` uses a
checkpoint instead). Printed per size: seconds and samples/s of each, the 2-worker / 1-worker throughput ratio, and
the peak resident memory of each worker (a high-water mark of the process: imports and network included) and of
the SEG-Y process. Sizes: 1gb (1000 inlines x 500 crosslines x 500 samples, float32), 0.25gb (250 inlines),
tiny (8 x 101 x 101, a check that the script runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {"1gb": ((1000, 500, 500), (32, 128, 128)), "0.25gb": ((250, 500, 500), (32, 128, 128)),
         "tiny": ((8, 101, 101), (2, 128, 128))}


@dataclass(frozen=True)
class StandIn:
    """A worker's predictor: bench_seismic's convolution stand-in, no TTA, overlap 0.25, one torch thread."""

    def __call__(self):
        import torch

        from benchmarks.bench_seismic import ConvStandIn
        from saltkit.inference import section_inferer

        torch.set_num_threads(1)
        return ConvStandIn().eval(), section_inferer("pad", tta=False, overlap=0.25)


def make_volume(folder: Path, size: str) -> tuple[Path, Path]:
    """(SEG-Y, MDIO) of `size` in `folder`; the MDIO by mdio's SEG-Y import (it needs a __main__ guard: its scan
    runs in worker processes)."""
    from mdio import segy_to_mdio
    from mdio.builder.template_registry import get_template

    from benchmarks.bench_seismic import write_volume
    from saltkit.seismic.mdio_volume import segy_spec

    (inlines, crosslines, samples), chunks = SIZES[size]
    sgy = write_volume(folder / f"{size}.sgy", inlines, crosslines, samples, coordinate_scalar=1)
    template = get_template("PostStack3DTime")
    template.full_chunk_shape = chunks  # mdio's import takes the chunk shape from its template
    os.environ.setdefault("MDIO__IMPORT__SAVE_SEGY_FILE_HEADER", "true")
    segy_to_mdio(segy_spec(float_samples=True), template, sgy, folder / f"{size}.mdio")
    return sgy, folder / f"{size}.mdio"


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_workers(volume: Path, workers: int, predictor) -> dict:
    """Predict `volume` on a fresh local cluster of `workers` processes (one thread each), the network loaded on
    every worker first; seconds of the prediction and each worker's peak RSS."""
    from distributed import Client, LocalCluster

    from saltkit.seismic.mdio_volume import predict_mdio, worker_predictor

    out = volume.with_name(f"{volume.stem}_w{workers}.mdio")
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(worker_predictor, predictor)
        before = client.run(peak_rss_mib)
        t0 = time.perf_counter()
        predict_mdio(str(volume), str(out), predictor, client=client, overwrite=True, progress=False)
        seconds = time.perf_counter() - t0
        peaks = client.run(peak_rss_mib)
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "worker_peak_rss_mib": sorted(round(v) for v in peaks.values()),
            "worker_rss_before_mib": sorted(round(v) for v in before.values())}


def segy_child(src: str, out: str) -> None:
    """Run in a fresh process: the SEG-Y path with the stand-in, one thread; prints seconds and peak RSS."""
    from saltkit.seismic.volume import predict_volume

    network, inferer = StandIn()()
    t0 = time.perf_counter()
    predict_volume(src, out, network, inferer, qc=0, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": round(peak_rss_mib())}))


def run_segy(sgy: Path) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.mdio_workers import segy_child; "
            f"segy_child({str(sgy)!r}, {str(sgy.with_name(sgy.stem + '_prob.sgy'))!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"SEG-Y prediction of {sgy} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_size(size: str, predictor, folder: Path) -> dict:
    sgy, volume = make_volume(folder, size)
    (inlines, crosslines, samples), chunks = SIZES[size]
    n = inlines * crosslines * samples
    one, two = run_workers(volume, 1, predictor), run_workers(volume, 2, predictor)
    segy = run_segy(sgy)
    row = {"size": size, "shape": [inlines, crosslines, samples], "chunks": list(chunks),
           "gib": round(n * 4 / 2**30, 3), "workers_1": one, "workers_2": two, "segy": segy,
           "throughput_ratio_2_vs_1": one["seconds"] / two["seconds"],
           "samples_per_s": {"workers_1": n / one["seconds"], "workers_2": n / two["seconds"],
                             "segy": n / segy["seconds"]}}
    print(f"{size}: {inlines} x {crosslines} x {samples} ({n * 4 / 2**20:.1f} MiB of float32), chunks {chunks}\n"
          f"  1 worker : {one['seconds']:.1f} s, {row['samples_per_s']['workers_1']:.3g} samples/s, peak RSS "
          f"{one['worker_peak_rss_mib']} MiB ({one['worker_rss_before_mib']} with the network loaded)\n"
          f"  2 workers: {two['seconds']:.1f} s, {row['samples_per_s']['workers_2']:.3g} samples/s, peak RSS "
          f"{two['worker_peak_rss_mib']} MiB per worker ({two['worker_rss_before_mib']} with the network loaded)\n"
          f"  throughput 2 workers / 1 worker: {row['throughput_ratio_2_vs_1']:.2f}x\n"
          f"  SEG-Y path (1 process, 1 thread): {segy['seconds']:.1f} s, {row['samples_per_s']['segy']:.3g} "
          f"samples/s, peak RSS {segy['peak_rss_mib']} MiB", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["1gb", "0.25gb"])
    p.add_argument("--ckpt", default=None, help="predict with this checkpoint (flip TTA, overlap 0.5) instead")
    p.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--keep", type=Path, default=None, help="generate the volumes in this folder and keep them")
    args = p.parse_args(argv)
    # the workers import benchmarks.* (the stand-in) from the repository
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(0, str(REPO))
    from saltkit.seismic.mdio_volume import PredictorSettings

    predictor = StandIn() if args.ckpt is None else PredictorSettings(str(args.ckpt), threads=1)
    print(f"{os.cpu_count()} CPU cores, 1-minute load average {os.getloadavg()[0]:.1f}; network: "
          f"{'convolution stand-in' if args.ckpt is None else args.ckpt}", flush=True)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="saltkit-bench-mdio-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        rows = [bench_size(size, predictor, folder) for size in args.sizes]
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
