"""The inference bundle's entry point: test tiles -> probabilities.npz + submission.csv in `output_dir`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from saltkit.inference.postprocess import PostProcessing, postprocess
from saltkit.inference.predict import predict_tiles
from saltkit.inference.probabilities import Probabilities, save_probabilities
from saltkit.rle import rle_encode
from saltkit.submission import validate_submission, write_submission

SUBMISSION = "submission.csv"
PROBABILITIES = "probabilities.npz"


def write_prediction(
    pred: Probabilities, output: str | Path, settings: PostProcessing, expected_ids: Sequence[str] | None = None
) -> dict:
    """Post-process `pred`, validate and write the submission CSV at `output`; return a summary dict.

    The rows are validated (every expected id once, well-formed RLE) before the file is written, so a
    failure leaves no invalid submission behind. Summary keys: submission (path), tiles, empty, empty_share.
    """
    masks = postprocess(pred.probs, pred.image_probs, settings)
    output = Path(output)
    ids = pred.ids.tolist()
    rles = rle_encode(masks)
    rows = pd.DataFrame({"id": ids, "rle_mask": rles})
    validate_submission(rows, list(expected_ids) if expected_ids is not None else ids, source=output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_submission(ids, rles, output)
    empty = int((masks.reshape(len(masks), -1).max(axis=1) == 0).sum())
    return {"submission": str(output), "tiles": len(masks), "empty": empty, "empty_share": empty / len(masks)}


def run_inference(
    network: nn.Module,
    loader: Iterable[dict],
    variant: str,
    output_dir: str | Path,
    tta: bool = True,
    postprocessing: PostProcessing | None = None,
    device: str | torch.device = "cpu",
    expected_ids: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Predict every tile of `loader`, save probabilities (before post-processing) and the submission.

    Prints the output paths and the share of empty predictions; returns the summary of `write_prediction`
    plus the probabilities path.
    """
    settings = postprocessing or PostProcessing()
    output_dir = Path(output_dir)
    preds = predict_tiles(network.to(device), loader, variant, tta=tta, device=device, progress=progress)
    if expected_ids is not None and sorted(map(str, expected_ids)) != sorted(preds.ids.tolist()):
        raise ValueError(f"predicted {len(preds.ids)} tiles but expected the {len(expected_ids)} test ids")
    pred = Probabilities(preds.ids, preds.probs, preds.image_probs)
    probs_path = save_probabilities(output_dir / PROBABILITIES, pred)
    summary = write_prediction(pred, output_dir / SUBMISSION, settings, expected_ids)
    summary["probabilities"] = str(probs_path)
    print(f"inference: {summary['tiles']} tiles, TTA {'on' if tta else 'off'}, {settings}")
    print(f"inference: wrote {probs_path} and {summary['submission']}")
    print(f"inference: empty predictions {summary['empty']}/{summary['tiles']} ({summary['empty_share']:.1%})")
    return summary

