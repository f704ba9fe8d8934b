"""Regenerate the pictures of this folder from a trained run:

    python bundles/saltnet/docs/make_pictures.py runs/tgs/pad_fold0/best_metric.pt

worst_tiles.png: the run's validation tiles with the lowest competition score (no TTA), drawn as the TensorBoard
image `val/worst_tiles` draws them (saltkit.pictures.tile_grid). The dataset, fold split and variant are the run's
own (its config.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from monai.transforms import BorderPad, Resize
from PIL import Image

from saltkit.checkpoints import load_network, run_record
from saltkit.data import load_image, load_mask
from saltkit.data.folds import fold_split
from saltkit.geometry import restore_tiles
from saltkit.metrics import competition_metric
from saltkit.pictures import tile_grid

DOCS = Path(__file__).resolve().parent


def network_input(images: np.ndarray, variant: str) -> torch.Tensor:
    """(N, 101, 101) uint8 tiles -> (N, 3, 128, 128) in [0, 1], padded or resized as training prepared them."""
    # configs/pad.json and configs/resize.json's spatial transforms
    spatial = (BorderPad(spatial_border=[13, 14, 13, 14], mode="reflect") if variant == "pad"
               else Resize((128, 128), mode="bilinear"))
    x = torch.from_numpy(images).float().div(255)[:, None].expand(-1, 3, -1, -1)
    return torch.stack([torch.as_tensor(spatial(t)) for t in x])


def worst_tiles(ckpt: Path, count: int = 8) -> np.ndarray:
    record = run_record(ckpt.parent)
    variant = record.get("variant", "pad")
    _, items = fold_split(record["dataset_dir"], record["folds_csv"], record["fold"], record["num_folds"])
    images = np.stack([load_image(it["image"]) for it in items])
    truths = np.stack([load_mask(it["label"]) for it in items])
    network = load_network(ckpt, "cpu", variant)
    with torch.no_grad():
        logits = torch.cat([network(b).logit for b in network_input(images, variant).split(32)])
    preds = (restore_tiles(logits, variant)[:, 0] > 0).numpy().astype(np.uint8)
    scores = competition_metric(preds, truths)
    worst = np.argsort(scores, kind="stable")[:count]
    return tile_grid(images[worst], truths[worst], preds[worst], [items[k]["id"] for k in worst], scores[worst])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path, help="a checkpoint in a run folder (its config.json is read)")
    parser.add_argument("--out", type=Path, default=DOCS / "worst_tiles.png")
    args = parser.parse_args(argv)
    Image.fromarray(worst_tiles(args.ckpt)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
