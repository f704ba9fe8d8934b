"""Does section context help? The competition metric of a fold's labelled validation tiles that sit in mosaics,
predicted (a) inside their section and cropped back to the tile, and (b) one by one as tiles.

    python benchmarks/section_vs_tiles.py CKPT --dataset_dir DATA --fold 0 [--context 1] [--out x.csv]

DATA: a dataset folder in the competition layout with its mosaics.csv (the shipped sample has none); without
--dataset_dir, the environment variable SALTKIT_DATA names it.

(a) Each tile is predicted within the section around it: the `--context` cells of its mosaic on every side (where
the mosaic has no tile, the tile's own reflection, as the tile path pads it), through the section inferer; a pixel's prediction only sees windows within one
window (128 px) of it, so one cell of context (101 px) is nearly all a whole-mosaic prediction would give it
(`--context 0`: whole mosaics, absent cells at the mosaic's mean grey, which the network reads as salt). (b) The same tiles through the same inferer, alone (the tile path). Both use the
checkpoint's variant, flip TTA and a 0.5 threshold. The folds CSV is the run's (from its config.json) unless given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from saltkit.data.folds import read_folds  # noqa: E402
from saltkit.geometry import TILE_SIZE  # noqa: E402
from saltkit.metrics import competition_metric  # noqa: E402
from saltkit.seismic.mosaics import assemble_mosaic, read_mosaics  # noqa: E402
from saltkit.seismic.predict import load_predictor  # noqa: E402
from saltkit.seismic.sections import predict_section  # noqa: E402


def run_folds_csv(ckpt: Path) -> Path | None:
    """The folds CSV recorded in the run's config.json beside the checkpoint (relative to the repository)."""
    record = ckpt.parent / "config.json"
    if not record.is_file():
        return None
    resolved = json.loads(record.read_text()).get("resolved", {})
    path = Path(resolved.get("folds_csv", ""))
    return path if path.is_absolute() else REPO / path


def neighbours_present(cells: pd.DataFrame, row: int, col: int) -> int:
    """How many of the 4 edge neighbours of cell (row, col) hold a tile."""
    have = set(zip(cells["row"], cells["col"], strict=True))
    return sum((row + dr, col + dc) in have for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)))


def context_region(m, cell, context: int) -> np.ndarray:
    """The tile with `context` cells on every side: the mosaic's real neighbours where it has them, and elsewhere
    the tile's own reflection (what the tile path sees beyond its edges). Flat grey in place of absent cells
    would not do: featureless grey looks like salt to the network, and its false salt bleeds into the tile."""
    y, x, c = int(cell["y"]), int(cell["x"]), context * TILE_SIZE
    tile = m.image[y:y + TILE_SIZE, x:x + TILE_SIZE]
    region = np.pad(tile, c, mode="symmetric" if c > TILE_SIZE - 1 else "reflect")
    for nb in m.cells.itertuples():
        dr, dc = nb.row - cell["row"], nb.col - cell["col"]
        if (dr or dc) and abs(dr) <= context and abs(dc) <= context:
            ry, rx = c + dr * TILE_SIZE, c + dc * TILE_SIZE
            region[ry:ry + TILE_SIZE, rx:rx + TILE_SIZE] = m.image[nb.y:nb.y + TILE_SIZE, nb.x:nb.x + TILE_SIZE]
    return region


def compare(ckpt, dataset_dir, folds_csv, fold, context, tta=True, overlap=0.5, threshold=0.5, limit=None):
    network, inferer = load_predictor(ckpt, "cpu", tta=tta, overlap=overlap)
    folds = read_folds(folds_csv)
    val = set(folds.loc[folds["fold"] == fold, "id"])
    table = read_mosaics(Path(dataset_dir) / "mosaics.csv")
    rows, section_probs, tile_probs, truths = [], [], [], []
    for name in sorted(table.loc[table["id"].isin(val), "mosaic"].unique())[:limit]:
        m = assemble_mosaic(dataset_dir, name, table)
        targets = m.cells[m.cells["id"].isin(val) & m.cells["labelled"]]
        whole = predict_section(network, inferer, m.image.astype(np.float32) / 255) if context == 0 else None
        for _, cell in targets.iterrows():
            y, x = cell["y"], cell["x"]
            if whole is None:
                region = context_region(m, cell, context)
                prob = predict_section(network, inferer, region.astype(np.float32) / 255)
                c0 = context * TILE_SIZE
                section_probs.append(prob[c0:c0 + TILE_SIZE, c0:c0 + TILE_SIZE])
            else:
                section_probs.append(whole[y:y + TILE_SIZE, x:x + TILE_SIZE])
            tile = m.image[y:y + TILE_SIZE, x:x + TILE_SIZE].astype(np.float32) / 255
            tile_probs.append(predict_section(network, inferer, tile))
            truths.append(m.mask[y:y + TILE_SIZE, x:x + TILE_SIZE])
            rows.append({"id": cell["id"], "mosaic": name, "row": cell["row"], "col": cell["col"],
                         "neighbours": neighbours_present(m.cells, cell["row"], cell["col"])})
        print(f"{name}: {len(targets)} validation tile(s)", file=sys.stderr, flush=True)
    truths = np.stack(truths)
    table = pd.DataFrame(rows)
    table["metric_section"] = competition_metric(np.stack(section_probs) > threshold, truths)
    table["metric_tile"] = competition_metric(np.stack(tile_probs) > threshold, truths)
    table["truth_empty"] = ~truths.reshape(len(truths), -1).any(1)
    return table


def summary(table: pd.DataFrame) -> str:
    lines = [f"{'subset':34s} {'tiles':>5s} {'section':>8s} {'tile':>8s}"]
    subsets = {"all": table, "with >= 1 edge neighbour": table[table["neighbours"] > 0],
               "no edge neighbour": table[table["neighbours"] == 0], "truth empty": table[table["truth_empty"]],
               "truth with salt": table[~table["truth_empty"]]}
    for name, t in subsets.items():
        if len(t):
            lines.append(f"{name:34s} {len(t):5d} {t['metric_section'].mean():8.4f} {t['metric_tile'].mean():8.4f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", type=Path)
    p.add_argument("--dataset_dir", type=Path, default=os.environ.get("SALTKIT_DATA") or None,
                   help="dataset folder with mosaics.csv (default: $SALTKIT_DATA)")
    p.add_argument("--folds_csv", type=Path, default=None, help="default: the run's, from config.json")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--context", type=int, default=1, help="cells of context on each side (0: whole mosaics)")
    p.add_argument("--tta", type=int, default=1)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="per-tile CSV")
    p.add_argument("--limit", type=int, default=None, help="only the first N mosaics (a quick check)")
    args = p.parse_args(argv)
    if args.dataset_dir is None:
        raise SystemExit("section_vs_tiles.py: error: no dataset: pass --dataset_dir DATA (a dataset folder "
                         "with mosaics.csv) or set SALTKIT_DATA")
    torch.set_num_threads(args.threads)
    folds_csv = args.folds_csv or run_folds_csv(args.ckpt)
    if folds_csv is None:
        p.error("no --folds_csv and no config.json beside the checkpoint")
    table = compare(args.ckpt, args.dataset_dir, folds_csv, args.fold, args.context, bool(args.tta), args.overlap,
                    limit=args.limit)
    if args.out is not None:
        table.to_csv(args.out, index=False)
    print(summary(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
