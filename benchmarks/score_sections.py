"""Score checkpoints on the held-out sections of a sections fold: each section predicted whole (section inferer,
flip TTA, 0.5 threshold, as the training's validation on sections), then the competition metric per 101 x 101
cell of a grid from the section's origin, over the labelled pixels (128 in a mask is left out; cells without a
labelled pixel are not scored).

    python benchmarks/score_sections.py --sections DIR --folds_csv DIR/folds.csv --fold 0 CKPT [CKPT ...]

Prints, per checkpoint: the cells scored, the mean metric, and the mean over cells with salt and over empty cells.
The before / after of a fine-tuning on sections is this script on the starting checkpoint and on the fine-tuned
one (docs/results.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from saltkit.data.labelled_sections import list_sections, read_section_folds  # noqa: E402
from saltkit.metrics import competition_metric  # noqa: E402
from saltkit.seismic.predict import load_predictor  # noqa: E402
from saltkit.seismic.sections import predict_section  # noqa: E402
from saltkit.seismic.training_sections import grid_cells, load_section  # noqa: E402


def cell_scores(prob: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(scores, has_salt) of the cells with a labelled pixel: `(H, W)` probability and labels in {0, 1, -1}."""
    cells_label = grid_cells(torch.from_numpy(labels)[None, None], fill=-1.0)[:, 0].numpy()
    cells_pred = grid_cells(torch.from_numpy(prob)[None, None])[:, 0].numpy() > threshold
    keep = (cells_label >= 0).reshape(len(cells_label), -1).any(1)
    truth = cells_label[keep]
    return competition_metric(cells_pred[keep], truth), (truth == 1).reshape(len(truth), -1).any(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpts", nargs="+", type=Path)
    p.add_argument("--sections", type=Path, required=True, help="sections folder (NAME.png with NAME_mask.png)")
    p.add_argument("--folds_csv", type=Path, required=True, help="name,fold of the sections")
    p.add_argument("--fold", type=int, default=0, help="the held-out fold scored (0)")
    p.add_argument("--tta", type=int, default=1, help="flip TTA, 1 or 0 (1)")
    args = p.parse_args(argv)
    folds = read_section_folds(args.folds_csv)
    held_out = set(folds["name"][folds["fold"] == args.fold])
    sections = [load_section(s) for s in list_sections(args.sections)[0] if s.name in held_out]
    print(f"{len(sections)} held-out sections of fold {args.fold} in {args.sections}")
    print("| checkpoint | cells | metric | cells with salt | empty cells |")
    print("| --- | --- | --- | --- | --- |")
    for ckpt in args.ckpts:
        network, inferer = load_predictor(ckpt, tta=bool(args.tta), amp=False)
        scores, salt = [], []
        with torch.no_grad():
            for s in sections:
                sc, has = cell_scores(predict_section(network, inferer, s.grey), s.labels)
                scores.append(sc)
                salt.append(has)
        scores, salt = np.concatenate(scores), np.concatenate(salt)
        print(f"| {ckpt} | {len(scores)} | {np.nanmean(scores):.4f} | {np.nanmean(scores[salt]):.4f} "
              f"({int(salt.sum())}) | {np.nanmean(scores[~salt]):.4f} ({int((~salt).sum())}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
