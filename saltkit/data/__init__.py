"""Data layer: the competition's folder layout and K-fold splits."""

from saltkit.data.folds import (
    coverage_class,
    ensure_folds,
    make_folds,
    mask_coverage,
    read_folds,
    split_items,
    write_folds,
)
from saltkit.data.layout import (
    DatasetError,
    check_dataset,
    load_image,
    load_mask,
    read_depths,
    read_rle_csv,
    read_rle_masks,
    sample_dir,
    test_items,
    train_items,
)

__all__ = [
    "DatasetError",
    "check_dataset",
    "coverage_class",
    "ensure_folds",
    "load_image",
    "load_mask",
    "make_folds",
    "mask_coverage",
    "read_depths",
    "read_folds",
    "read_rle_csv",
    "read_rle_masks",
    "sample_dir",
    "split_items",
    "test_items",
    "train_items",
    "write_folds",
]
