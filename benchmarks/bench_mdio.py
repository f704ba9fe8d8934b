"""MDIO prediction over Dask, 2 worker processes against 1 (one thread each), and the same volume through the SEG-Y
path, on the 0.25 GB volume of `benchmarks/mdio_workers.py` (which also runs the 1 GB one and explains the set-up).
Each side's time includes starting its local cluster and loading the network on its workers (a few seconds).
No case without the optional extra (`pip install 'saltkit[mdio]'`)."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

from benchmarks.run import Case

SIZE = "0.25gb"


@functools.lru_cache(maxsize=1)
def volume_inputs() -> dict:
    from benchmarks.mdio_workers import StandIn, make_volume

    folder = Path(tempfile.mkdtemp(prefix="saltkit-bench-mdio-"))
    atexit.register(shutil.rmtree, folder, True)
    sgy, volume = make_volume(folder, SIZE)
    return {"sgy": sgy, "mdio": volume, "predictor": StandIn()}


def workers(n: int):
    def run(inputs):
        from benchmarks.mdio_workers import run_workers

        return run_workers(inputs["mdio"], n, inputs["predictor"])
    return run


def segy(inputs):
    from benchmarks.mdio_workers import run_segy

    return run_segy(inputs["sgy"])


def peaks(two: dict, one: dict) -> dict:
    return {"peak_rss_mib_2_workers": two["worker_peak_rss_mib"], "peak_rss_mib_1_worker": one["worker_peak_rss_mib"]}


HAS_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("mdio", "distributed"))
CASES = [
    Case(f"mdio_2_workers_vs_1_{SIZE}", volume_inputs, workers(2), workers(1), compare=peaks, repeat=1,
         others={"segy_path": segy}, baseline_name="1 worker",
         notes="MDIO volume (250 x 500 x 500) predicted by 2 Dask worker processes vs 1, one thread each (conv "
               "stand-in network); other side: the SEG-Y path, one process, one thread"),
] if HAS_EXTRA else []
