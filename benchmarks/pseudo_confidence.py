"""Does the pseudo-label confidence pick the good pseudo-labels? A teacher predicts its fold's labelled validation
tiles exactly as `saltkit pseudo-label` predicts unlabelled ones (flip TTA, its tuned post-processing, the same
confidence), and the tiles' competition metric against their true masks is reported for each confidence cut: the
share of tiles kept, the mean metric of the kept and of the dropped tiles, and the kept share per predicted
coverage class.

    python benchmarks/pseudo_confidence.py CKPT [--dataset_dir DATA] [--fold 0] [--folds_csv F]

dataset_dir, fold and folds CSV default to what the run beside CKPT recorded (config.json). Settings tuned on the
same validation tiles (SWA, `saltkit tune`) flatter the metric a little; the comparison between cuts stands.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from saltkit.checkpoints import run_setting  # noqa: E402
from saltkit.data.folds import coverage_class, fold_split  # noqa: E402
from saltkit.data.layout import load_mask  # noqa: E402
from saltkit.inference.postprocess import postprocess  # noqa: E402
from saltkit.inference.pseudo_labels import (  # noqa: E402
    COVERAGE_NAMES,
    load_teachers,
    predict_tiles,
    teacher_postprocessing,
    tile_confidence,
)
from saltkit.metrics import competition_metric  # noqa: E402

CUTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--dataset_dir", default=None)
    parser.add_argument("--fold", type=int, default=None)
    parser.add_argument("--num_folds", type=int, default=None)
    parser.add_argument("--folds_csv", default=None)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)
    run_dir = args.ckpt.parent
    dataset_dir = run_setting(run_dir, "dataset_dir", str(REPO / "saltkit/sample_data/tgs"), args.dataset_dir)
    fold = run_setting(run_dir, "fold", 0, args.fold)
    num_folds = run_setting(run_dir, "num_folds", 10, args.num_folds)
    folds_csv = run_setting(run_dir, "folds_csv", None, args.folds_csv)
    _, items = fold_split(dataset_dir, folds_csv, fold, num_folds)
    teachers = load_teachers([args.ckpt])
    settings, line = teacher_postprocessing(teachers)
    start = time.perf_counter()
    pred = predict_tiles(teachers, items, batch_size=args.batch_size)
    truth = np.stack([load_mask(it["label"]) for it in items])
    masks = postprocess(pred.probs, pred.image_probs, settings)
    confidence = tile_confidence(pred.probs, pred.image_probs, masks)["confidence"]
    metric = competition_metric(masks, truth)
    classes = coverage_class(masks)
    print(f"{args.ckpt}: fold {fold} of {dataset_dir}, {len(items)} validation tiles, "
          f"{time.perf_counter() - start:.0f} s; {line}")
    print(f"metric of all tiles {metric.mean():.4f}; confidence quartiles "
          f"{np.round(np.percentile(confidence, [25, 50, 75]), 3).tolist()}")
    header = f"{'cut':>5}{'kept':>7}{'metric kept':>13}{'dropped':>9}   kept share per predicted coverage class"
    print(header)
    print(" " * 34 + "  ".join(f"{n:>7}" for n in COVERAGE_NAMES))
    for cut in CUTS:
        kept = confidence >= cut
        per_class = [f"{kept[classes == c].mean():7.0%}" if (classes == c).any() else f"{'-':>7}"
                     for c in range(-1, 10)]
        dropped = f"{metric[~kept].mean():9.4f}" if (~kept).any() else f"{'-':>9}"
        kept_metric = f"{metric[kept].mean():13.4f}" if kept.any() else f"{'-':>13}"
        print(f"{cut:5.1f}{kept.mean():7.0%}{kept_metric}{dropped}   " + "  ".join(per_class))


if __name__ == "__main__":
    main()
