"""Side-by-side benchmarks: each case times our implementation and its baseline in the same process.

    python benchmarks/run.py [NAME ...] [--repeat N] [--out benchmarks/results/latest.json]

Cases live in `benchmarks/bench_*.py` modules, each exposing `CASES`: a list of `Case`. Besides the JSON, the run
writes a Markdown table (same name, .md) of each case, its baseline and the median per-round ratio, with the
machine's load average when the case ran (other processes on the cores depress the figures).

Data: the cases run on the shipped sample unless the environment variable SALTKIT_DATA names a dataset folder
in the competition layout (train/, test/, train.csv, mosaics.csv for the section cases), e.g.
`SALTKIT_DATA=/data/tgs python benchmarks/run.py`; each case records which data it ran on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA_ENV = "SALTKIT_DATA"


def benchmark_data() -> Path | None:
    """The dataset folder named by $SALTKIT_DATA, or None when it is not set (the cases use the shipped
    sample). A name that is no folder ends the run with one line saying what to set."""
    value = os.environ.get(DATA_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise SystemExit(f"{DATA_ENV}={value} is not a folder: set {DATA_ENV} to a dataset folder in the "
                         "competition layout (train/, test/, train.csv), or unset it to use the shipped "
                         "sample")
    return path


@dataclass
class Case:
    """`setup()` returns the shared inputs; `ours(inputs)` and `baseline(inputs)` do the timed work."""

    name: str
    setup: Callable[[], object]
    ours: Callable[[object], object]
    baseline: Callable[[object], object]
    unit: str = "s"
    notes: str = ""
    # what the baseline is, for the table ("the original's algorithm" where the original recipe's code is the baseline)
    baseline_name: str = ""
    # optional: (ours_result, baseline_result) -> dict of extra figures (e.g. max abs diff, peak memory)
    compare: Callable[[object, object], dict] | None = None
    # optional: inputs -> dict of figures that describe the setup (data source, sizes)
    describe: Callable[[object], dict] | None = None
    repeat: int = 3
    extra: dict = field(default_factory=dict)
    # optional: more sides {name: inputs -> result}, timed in the same interleaved rounds as ours and the baseline;
    # each gets its own table row `case[name]` with its ratio to the same baseline
    others: dict = field(default_factory=dict)


def interleaved_times(ours: Callable[[], object], baseline: Callable[[], object], repeat: int):
    """Time the two sides alternately (after one warm-up each), so a machine that speeds up or slows down during
    the run affects both alike. Returns both time lists and the last results."""
    r_ours, r_base = ours(), baseline()
    t_ours, t_base = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r_ours = ours()
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r_base = baseline()
        t_base.append(time.perf_counter() - t0)
    return t_ours, t_base, r_ours, r_base


def interleaved_sides(sides: dict[str, Callable[[], object]], repeat: int):
    """`interleaved_times` for any number of sides: one warm-up each, then each round runs every side once, in
    the order given. Returns {name: time list} and {name: last result}."""
    results = {name: run() for name, run in sides.items()}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeat):
        for name, run in sides.items():
            t0 = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - t0)
    return times, results


def load_cases() -> list[Case]:
    cases: list[Case] = []
    sys.path.insert(0, str(HERE.parent))
    for f in sorted(HERE.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(f.stem, f)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cases.extend(mod.CASES)
    return cases


def run_case(case: Case, repeat: int | None) -> dict:
    inputs = case.setup()
    n = repeat or case.repeat
    others = []
    if case.others:
        sides = {"ours": case.ours, "baseline": case.baseline, **case.others}
        times, results = interleaved_sides({k: (lambda f=f: f(inputs)) for k, f in sides.items()}, n)
        t_ours, t_base, r_ours, r_base = times["ours"], times["baseline"], results["ours"], results["baseline"]
        others = [{"name": k, "best_s": min(times[k]), "median_round_ratio": statistics.median(
            b / o for o, b in zip(times[k], t_base, strict=True))} for k in case.others]
    else:
        t_ours, t_base, r_ours, r_base = interleaved_times(lambda: case.ours(inputs), lambda: case.baseline(inputs), n)
    # reported: the best time of each side, their ratio, and the median of the per-round ratios (robust to drift)
    row = {"case": case.name, "ours_s": min(t_ours), "baseline_s": min(t_base), "ratio": min(t_base) / min(t_ours),
           "median_round_ratio": statistics.median(b / o for o, b in zip(t_ours, t_base, strict=True)),
           "baseline_name": case.baseline_name, "notes": case.notes}
    if case.compare is not None:
        row.update(case.compare(r_ours, r_base))
    if case.describe is not None:
        row.update(case.describe(inputs))
    row.update(case.extra)
    if others:
        row["others"] = others
    row["load_avg_1min"] = os.getloadavg()[0]
    return row


def processor_name() -> str:
    """The processor's model name as /proc/cpuinfo gives it (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown processor"


def machine_line() -> str:
    return f"Machine: {processor_name()}, {os.cpu_count()} CPU cores"


def markdown_table(rows: list[dict]) -> str:
    """The README's benchmark table: case, what ours does, the baseline, the median per-round ratio, best times."""
    lines = [f"{machine_line()}; ratio = median over rounds of baseline time / our time.", "",
             "| case | ours | baseline | ratio | best times (ours / baseline) | load |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        times = f"{r['ours_s']:.3g} s / {r['baseline_s']:.3g} s"
        if "per_round" in r:
            unit = r.get("per_round_unit", "items")
            times += f" ({r['per_round'] / r['ours_s']:.3g} / {r['per_round'] / r['baseline_s']:.3g} {unit}/s)"
        what = r["notes"].split(";")[0]
        lines.append(f"| `{r['case']}` | {what} | {r['baseline_name'] or '-'} | {r['median_round_ratio']:.2f}x | "
                     f"{times} | {r['load_avg_1min']:.1f} |")
        for o in r.get("others", []):  # more sides of the same rounds, against the same baseline
            times = f"{o['best_s']:.3g} s / {r['baseline_s']:.3g} s"
            if "per_round" in r:
                times += (f" ({r['per_round'] / o['best_s']:.3g} / {r['per_round'] / r['baseline_s']:.3g} "
                          f"{r.get('per_round_unit', 'items')}/s)")
            what = r.get("side_notes", {}).get(o["name"], o["name"])
            lines.append(f"| `{r['case']}[{o['name']}]` | {what} | {r['baseline_name'] or '-'} | "
                         f"{o['median_round_ratio']:.2f}x | {times} | {r['load_avg_1min']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="case names or prefixes (default: all)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per side (default: per case)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)
    cases = load_cases()
    if args.list:
        for c in cases:
            print(f"{c.name:40s} {c.notes}")
        return 0
    if args.names:
        cases = [c for c in cases if any(c.name.startswith(n) for n in args.names)]
        if not cases:
            p.error(f"no case matches {args.names}; see --list")
    rows = []
    print(machine_line())
    print(f"{'case':38s} {'ours':>10s} {'baseline':>10s} {'ratio':>7s}  extra")
    for c in cases:
        row = run_case(c, args.repeat)
        rows.append(row)
        extra = {k: v for k, v in row.items()
                 if k not in {"case", "ours_s", "baseline_s", "ratio", "notes", "others", "side_notes"}}
        extra_s = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
        print(f"{c.name:38s} {row['ours_s']:10.4f} {row['baseline_s']:10.4f} {row['ratio']:6.2f}x  {extra_s}", flush=True)
        for o in row.get("others", []):
            print(f"{'  [' + o['name'] + ']':38s} {o['best_s']:10.4f} {row['baseline_s']:10.4f} "
                  f"{o['median_round_ratio']:6.2f}x (median round ratio)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(args.out)
    table = markdown_table(rows)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
