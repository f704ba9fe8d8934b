"""What a label pixel means, in one place: salt, background, or not interpreted (ignored by the loss and metrics).

Mask files of sections (`saltkit mosaic`, a geoscientist's interpretation) store 0 (background), 255 (salt) and
128 (not interpreted); mask volumes store 0, 1 and -1. In tensors every label is 0, 1 or IGNORE_LABEL (-1), so a
nearest-neighbour resize, a reflection pad or a flip keeps the three values apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IGNORE_LABEL = -1.0
MASK_IMAGE_VALUES = {0: 0.0, 255: 1.0, 128: IGNORE_LABEL}
MASK_VOLUME_VALUES = {0: 0.0, 1: 1.0, -1: IGNORE_LABEL}


def labels_from_values(values: np.ndarray, meaning: dict, source: str | Path) -> np.ndarray:
    """Stored mask values -> float32 labels in {0, 1, IGNORE_LABEL}; any other value is a one-line error naming the
    file and the values allowed."""
    values = np.asarray(values)
    found = np.unique(values)
    unknown = [v for v in found.tolist() if v not in meaning]
    if unknown:
        allowed = ", ".join(f"{k} ({'salt' if v == 1 else 'background' if v == 0 else 'not interpreted'})"
                            for k, v in meaning.items())
        raise ValueError(f"{source}: mask values {unknown[:5]} are not allowed; a mask holds {allowed}")
    labels = np.zeros(values.shape, dtype=np.float32)
    for stored, label in meaning.items():
        labels[values == stored] = label
    return labels


def labelled(labels):
    """Boolean map of the pixels that carry a label (salt or background), numpy or torch alike."""
    return labels != IGNORE_LABEL
