"""Our fast paths give the values of the original recipe's algorithms (benchmarks/baselines.py, the benchmarks'
baselines): identical RLE strings and scores, the same Lovasz values and gradients. The baselines themselves are
checked against the golden values of the original code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from saltkit.data.layout import load_mask
from saltkit.losses import lovasz_hinge, symmetric_lovasz
from saltkit.metrics import competition_metric
from saltkit.rle import rle_encode

BASELINES = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines.py"


@pytest.fixture(scope="module")
def original():
    """benchmarks/baselines.py, loaded from its file (the benchmarks folder is not a package on sys.path)."""
    spec = importlib.util.spec_from_file_location("saltkit_benchmark_baselines", BASELINES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def masks(sample_dir):
    """The 100 real masks of the shipped sample, uint8 (100, 101, 101)."""
    return np.stack([load_mask(f) for f in sorted((sample_dir / "train" / "masks").glob("*.png"))])


def shifted_predictions(masks: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    preds = np.stack([np.roll(m, int(rng.integers(-4, 5)), axis=int(rng.integers(0, 2))) for m in masks])
    preds[rng.random(len(preds)) < 0.1] = 0
    return preds


def tie_free_logits(shape, seed=0):
    """Logits with distinct, exactly representable hinge errors (at ties the Lovasz gradient follows the sort)."""
    n = int(np.prod(shape))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return ((perm - n // 2).float() + 0.25).div(512).reshape(shape)


# ---------------------------------------------------------------- RLE


def test_rle_identical_on_real_masks(original, masks):
    expected = original.rle_encode_original(masks)
    assert sum(map(bool, expected)) > 30  # real salt, not only empty strings
    assert rle_encode(masks) == expected
    assert rle_encode(masks.astype(bool)) == expected and rle_encode(masks * 255) == expected
    assert rle_encode(torch.from_numpy(masks).float()) == expected


def test_rle_identical_on_every_shared_train_mask(original, tgs_dir):
    masks = np.stack([load_mask(f) for f in sorted((tgs_dir / "train" / "masks").glob("*.png"))])
    assert rle_encode(masks) == original.rle_encode_original(masks)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (3, 64), (64, 3), (1, 128), (2, 192), (65, 129), (128, 64)])
def test_rle_identical_on_other_shapes(original, shape):
    # widths below, at and above the 64-bit word that the bit-packed change search works in
    rng = np.random.default_rng(sum(shape))
    masks = (rng.random((70, *shape)) < rng.random((70, 1, 1))).astype(np.uint8)
    masks[0], masks[1] = 0, 1
    assert rle_encode(masks) == original.rle_encode_original(masks)


# ---------------------------------------------------------------- competition score


def test_scores_identical_on_real_masks(original, masks):
    preds = shifted_predictions(masks)
    np.testing.assert_array_equal(competition_metric(preds, masks), original.competition_metric_original(preds, masks))


def test_scores_identical_at_exact_thresholds(original):
    # IoU exactly 0.50, 0.55, ..., 0.95 (k / 20 of a 20-column truth): "exceeds" is strict in both
    truth = np.zeros((101, 101), np.uint8)
    truth[:, :20] = 1
    preds = np.zeros((12, 101, 101), np.uint8)
    for k in range(10, 20):
        preds[k - 10, :, :k] = 1
    preds[11, 50, 50] = 1  # an empty truth with a non-empty prediction
    truths = np.stack([truth] * 11 + [np.zeros_like(truth)])
    ours = competition_metric(preds, truths)
    np.testing.assert_array_equal(ours, original.competition_metric_original(preds, truths))
    np.testing.assert_array_equal(ours[:10], np.arange(10) / 10)


def test_original_score_matches_golden(original, golden):
    scores = original.competition_metric_original(golden["preds"], golden["masks"])
    np.testing.assert_array_equal(scores, golden["kaggle_per_image"])
    np.testing.assert_array_equal(competition_metric(golden["preds"], golden["masks"]), scores)


# ---------------------------------------------------------------- Lovasz


def value_and_grad(fn, logits, targets):
    x = logits.clone().requires_grad_()
    loss = fn(x, targets)
    loss.backward()
    return loss.item(), x.grad


@pytest.mark.parametrize("name", ["symmetric", "hinge"])
def test_lovasz_same_value_and_gradient(original, masks, name):
    targets = torch.from_numpy(masks[:12]).float()[:, None]
    targets = torch.nn.functional.pad(targets, (13, 14, 13, 14), mode="reflect")  # 128 px, as in training
    logits = tie_free_logits(targets.shape)
    ours, theirs = {"symmetric": (symmetric_lovasz, original.symmetric_lovasz_original),
                    "hinge": (lovasz_hinge, original.lovasz_hinge_original)}[name]
    value, grad = value_and_grad(ours, logits, targets)
    value_o, grad_o = value_and_grad(theirs, logits, targets)
    assert value == pytest.approx(value_o, rel=1e-6)
    torch.testing.assert_close(grad, grad_o, rtol=1e-5, atol=1e-6 * grad_o.abs().max().item())


def test_original_lovasz_matches_golden(original, golden):
    logits = torch.tensor(golden["logits"]).unsqueeze(1)
    masks = torch.tensor(golden["masks"], dtype=torch.float32).unsqueeze(1)
    value, grad = value_and_grad(original.symmetric_lovasz_original, logits, masks)
    assert value == pytest.approx(float(golden["lovasz_elu_symmetric"]), rel=1e-5)
    expected = golden["lovasz_elu_symmetric_grad"]
    np.testing.assert_allclose(grad.squeeze(1).numpy(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
