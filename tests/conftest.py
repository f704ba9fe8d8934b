"""Shared fixtures: the sample shipped in the package, and the full data set beside the checkout when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "saltkit" / "sample_data" / "tgs"
# The full (reduced) competition data lives beside the checkout; tests using it skip on a bare clone.
SHARED_DIR = Path(os.environ.get("SALTKIT_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def tgs_dir() -> Path:
    d = SHARED_DIR / "data" / "tgs"
    if not (d / "train.csv").is_file():
        pytest.skip(f"full TGS data not found at {d}")
    return d


@pytest.fixture(scope="session")
def golden():
    import numpy as np

    f = SHARED_DIR / "golden" / "reference_values.npz"
    if not f.is_file():
        pytest.skip(f"golden reference values not found at {f}")
    with np.load(f) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="session")
def segy_dir() -> Path:
    """The real F3 crop in SEG-Y (f3.sgy big-endian, f3-lsb.sgy little-endian)."""
    d = SHARED_DIR / "data" / "segy"
    if not (d / "f3.sgy").is_file():
        pytest.skip(f"SEG-Y test data not found at {d}")
    return d
