"""Average the saved probabilities of several runs (folds, pad and resize variants) into one prediction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from saltkit.inference.postprocess import PostProcessingSettings, postprocess
from saltkit.inference.probabilities import Probabilities, load_probabilities


def check_same_ids(reference: np.ndarray, ids: np.ndarray, name: str) -> np.ndarray:
    """Index that reorders `ids` onto `reference`; raises naming `name` and the first differing ids."""
    ref_set, other = set(reference.tolist()), set(ids.tolist())
    if len(other) != len(ids):
        dup = sorted(i for i in other if (ids == i).sum() > 1)[:5]
        raise ValueError(f"{name}: duplicate ids {dup}")
    if ref_set != other:
        missing, extra = sorted(ref_set - other)[:5], sorted(other - ref_set)[:5]
        raise ValueError(f"{name}: ids differ from the first file (missing {missing}, unexpected {extra})")
    order = {tile_id: k for k, tile_id in enumerate(ids.tolist())}
    return np.array([order[i] for i in reference.tolist()], dtype=np.int64)


def average_probabilities(preds: Sequence[Probabilities], names: Sequence[str] | None = None) -> Probabilities:
    """Equal-weight mean of `preds` (same ids, any order), in the id order of the first one.

    `image_probs` are averaged too when every input has them.
    """
    if not preds:
        raise ValueError("nothing to ensemble: no probabilities given")
    names = list(names) if names is not None else [f"input {k}" for k in range(len(preds))]
    if len(names) != len(preds):
        raise ValueError(f"{len(preds)} predictions but {len(names)} names")
    first = preds[0]
    total = np.zeros(first.probs.shape, dtype=np.float64)
    image_total = np.zeros(len(first.ids), dtype=np.float64)
    with_image = all(p.image_probs is not None for p in preds)
    for p, name in zip(preds, names, strict=True):
        order = check_same_ids(first.ids, p.ids, name)
        if p.probs.shape[1:] != first.probs.shape[1:]:
            raise ValueError(f"{name}: tiles are {p.probs.shape[1:]}, the first file's are {first.probs.shape[1:]}")
        total += p.probs[order]
        if with_image:
            image_total += p.image_probs[order]
    n = len(preds)
    image = (image_total / n).astype(np.float32) if with_image else None
    return Probabilities(first.ids.copy(), (total / n).astype(np.float32), image)


def ensemble_files(paths: Sequence[str | Path]) -> Probabilities:
    """Load and average probability files written by the inference bundle; a file given twice is refused (it
    would count double)."""
    from saltkit.io import same_file

    for i, a in enumerate(paths):
        twice = next((b for b in paths[i + 1:] if same_file(a, b)), None)
        if twice is not None:
            raise ValueError(f"{a} and {twice} are the same file: it would count twice in the average; give each "
                             "file once")
    return average_probabilities([load_probabilities(p) for p in paths], [str(p) for p in paths])


def write_prediction(
    pred: Probabilities, output: str | Path, settings: PostProcessingSettings, expected_ids: Sequence[str] | None = None
) -> dict:
    """Post-process `pred`, validate and write the submission CSV at `output`; return a summary dict.

    The rows are validated (every expected id once, well-formed RLE) before the file is written, so a
    failure leaves no invalid submission behind. Summary keys: submission (path), tiles, empty, empty_share.
    """
    from saltkit.rle import rle_encode
    from saltkit.submission import validate_submission, write_submission

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
