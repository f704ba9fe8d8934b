"""Peak memory of `saltkit predict` on one section image, by size: what the up-front memory check assumes.

Each size runs the command in a fresh process (the bundle's model, flip TTA, overlap 0.5, the default outputs) on a
float32 `.npy` of random amplitudes, and reports the process's peak resident memory, the increase over the
smallest size per pixel (`saltkit.seismic.predict.SECTION_BYTES_PER_PIXEL` is set from it), the wall time and the
exit code: a section larger than the memory available is refused before it is read, and then its peak is the
process's without the section.

    python benchmarks/section_memory.py                 # 500, 1000, 2000 and 20000 pixels a side
    python benchmarks/section_memory.py 500 4000
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, resource, sys
from saltkit.cli import main
code = main(["predict", sys.argv[1], "--out", sys.argv[2], "--no-progress", "--qc", "0"])
print(json.dumps({"code": code, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def section_file(folder: Path, side: int) -> Path:
    """A side x side float32 .npy: random amplitudes, written in blocks of rows (a sparse file would read as zeros,
    a constant section, which predict refuses)."""
    path = folder / f"section{side}.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(side, side))
    rng = np.random.default_rng(side)
    for start in range(0, side, 1000):
        array[start:start + 1000] = rng.normal(size=(min(1000, side - start), side)).astype(np.float32)
    array.flush()
    del array
    return path


def measure(section: Path, out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(section), str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{section}: the child failed: {proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    refused = [line for line in proc.stderr.splitlines() if "needs about" in line]
    return {**result, "wall_s": wall, "refused": refused[-1] if refused else None}


def main(argv: list[str]) -> None:
    sides = [int(a) for a in argv] or [500, 1000, 2000, 20000]
    print(f"processor: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d')}")
    print("| side | pixels | exit | peak RSS | above the first, per pixel | wall |")
    print("| --- | --- | --- | --- | --- | --- |")
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for side in sides:
            section = section_file(tmp, side)
            result = measure(section, tmp / f"out{side}")
            section.unlink()
            pixels = side * side
            first = first or (result["peak_mib"], pixels)
            extra = (result["peak_mib"] - first[0]) * 2**20 / (pixels - first[1]) if pixels > first[1] else None
            per_pixel = f"{extra:.0f} bytes" if extra is not None and result["code"] == 0 else "-"
            print(f"| {side} | {pixels / 1e6:.2f} M | {result['code']} | {result['peak_mib']:.0f} MiB | {per_pixel} "
                  f"| {result['wall_s']:.0f} s |")
            if result["refused"]:
                print(f"  refused up front: {result['refused']}")


if __name__ == "__main__":
    main(sys.argv[1:])
