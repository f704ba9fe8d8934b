"""Competition metric and pixel accuracy: golden values, input forms, and the Ignite metrics in a real Engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError

from saltkit.data.layout import load_mask
from saltkit.metrics import CompetitionMetric, PixelAccuracy, competition_metric, pixel_accuracy


@pytest.fixture(scope="module")
def pairs(sample_dir):
    """64 sample masks, predictions shifted/emptied from them, and noisy logits (always available, unlike golden)."""
    files = sorted((sample_dir / "train" / "masks").glob("*.png"))[:64]
    masks = np.stack([load_mask(f) for f in files])
    rng = np.random.default_rng(0)
    preds = np.stack([np.roll(m, int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2))) for m in masks])
    preds[::9] = 0
    logits = (preds * 2.0 - 1.0) * 2 + rng.normal(0, 1.5, preds.shape)
    return {"masks": masks, "preds": preds, "logits": logits.astype(np.float32)}


def test_golden_values(golden):
    scores = competition_metric(golden["preds"], golden["masks"])
    assert scores.dtype == np.float64 and scores.shape == (64,)
    np.testing.assert_allclose(scores, golden["kaggle_per_image"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(scores.mean(), golden["kaggle_mean"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(pixel_accuracy(golden["preds"], golden["masks"]), golden["pixel_accuracy"],
                               rtol=0, atol=1e-12)


def test_input_forms_agree(pairs):
    p, t = pairs["preds"], pairs["masks"]
    expected = competition_metric(p, t)
    np.testing.assert_array_equal(competition_metric(torch.from_numpy(p)[:, None], torch.from_numpy(t)[:, None]), expected)
    np.testing.assert_array_equal(competition_metric(p.astype(bool), t.astype(np.int64)), expected)
    np.testing.assert_array_equal(competition_metric(p.astype(np.float32), t), expected)


def _tile(salt_cols: int) -> np.ndarray:
    m = np.zeros((101, 101), np.uint8)
    m[:, :salt_cols] = 1
    return m


def test_hand_computed_scores():
    truth = _tile(20)
    cases = [
        (_tile(20), 1.0),  # exact
        (_tile(0), 0.0),  # missed salt
        (_tile(12), 0.2),  # IoU exactly 0.60: exceeds 0.50 and 0.55 only (strictly greater)
        (_tile(13), 0.3),  # IoU exactly 0.65: exceeds 0.50, 0.55, 0.60
        (_tile(40), 0.0),  # IoU 0.5: exceeds none
    ]
    preds = np.stack([c[0] for c in cases])
    scores = competition_metric(preds, np.stack([truth] * len(cases)))
    np.testing.assert_array_equal(scores, [c[1] for c in cases])
    # Empty truth: 1 only for an empty prediction.
    empty = np.zeros((2, 101, 101), np.uint8)
    np.testing.assert_array_equal(competition_metric(np.stack([_tile(0), _tile(1)]), empty), [1.0, 0.0])
    np.testing.assert_allclose(pixel_accuracy(_tile(1)[None], empty[:1]), [1 - 101 / 10201], rtol=0, atol=1e-15)


def test_shape_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        competition_metric(np.zeros((2, 5, 5)), np.zeros((3, 5, 5)))
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, 1, H, W\)"):
        competition_metric(np.zeros((5, 5)), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="binarise"):
        competition_metric(np.full((1, 5, 5), 0.7), np.zeros((1, 5, 5)))


def _run_engine(batches, metrics):
    engine = Engine(lambda e, batch: batch)
    for name, metric in metrics.items():
        metric.attach(engine, name)
    return engine.run(batches, max_epochs=1).metrics


def test_ignite_metrics_in_engine(pairs):
    truth = torch.from_numpy(pairs["masks"]).float()[:, None]
    logits = torch.from_numpy(pairs["logits"])[:, None]
    # Batches of 10 (last one 4): the running mean must equal the per-tile mean over all 64.
    batches = [(logits[i : i + 10], truth[i : i + 10]) for i in range(0, 64, 10)]
    metrics = _run_engine(batches, {"metric": CompetitionMetric(), "acc": PixelAccuracy(),
                                    "metric_t1": CompetitionMetric(logit_threshold=1.0)})
    binary = (pairs["logits"] > 0).astype(np.uint8)
    assert metrics["metric"] == pytest.approx(competition_metric(binary, pairs["masks"]).mean(), abs=1e-12)
    assert metrics["acc"] == pytest.approx(pixel_accuracy(binary, pairs["masks"]).mean(), abs=1e-12)
    binary1 = (pairs["logits"] > 1.0).astype(np.uint8)
    assert metrics["metric_t1"] == pytest.approx(competition_metric(binary1, pairs["masks"]).mean(), abs=1e-12)


def test_ignite_metric_matches_golden_predictions(golden):
    # Logits +-5 from the golden binary predictions: CompetitionMetric must reproduce the golden kaggle_mean exactly.
    logits = torch.from_numpy(golden["preds"]).float()[:, None] * 10 - 5
    truth = torch.from_numpy(golden["masks"]).float()[:, None]
    metrics = _run_engine([(logits[:32], truth[:32]), (logits[32:], truth[32:])], {"k": CompetitionMetric()})
    assert abs(metrics["k"] - float(golden["kaggle_mean"])) <= 1e-12


def test_ignite_metric_on_sample_and_errors(sample_dir):
    files = sorted((sample_dir / "train" / "masks").glob("*.png"))[:16]
    truth = torch.from_numpy(np.stack([load_mask(f) for f in files])).float()[:, None]
    perfect = truth * 20 - 10
    metrics = _run_engine([(perfect[:8], truth[:8]), (perfect[8:], truth[8:])], {"k": CompetitionMetric(),
                                                                                  "a": PixelAccuracy()})
    assert metrics == {"k": 1.0, "a": 1.0}
    with pytest.raises(NotComputableError):
        CompetitionMetric().compute()
    with pytest.raises(ValueError, match="must have the same"):
        CompetitionMetric().update((perfect[:2], truth[:3]))


def _ddp_worker(local_rank, preds, truth, out):
    import ignite.distributed as idist

    rank, world = idist.get_rank(), idist.get_world_size()
    logits = torch.from_numpy(preds).float()[:, None] * 10 - 5
    y = torch.from_numpy(truth).float()[:, None]
    metrics = _run_engine([(logits[rank::world], y[rank::world])], {"k": CompetitionMetric(), "a": PixelAccuracy()})
    if rank == 0:
        out.put(metrics)


@pytest.mark.slow
def test_ignite_metrics_all_reduce_over_two_processes(pairs):
    import ignite.distributed as idist
    import torch.multiprocessing as mp

    out = mp.get_context("spawn").Queue()
    # Each process sees half the tiles; after all-reduce both must report the score over all 64.
    with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
        parallel.run(_ddp_worker, pairs["preds"], pairs["masks"], out)
    metrics = out.get(timeout=1800)  # only a hang should trip it
    total = competition_metric(pairs["preds"], pairs["masks"]).mean()
    half = competition_metric(pairs["preds"][0::2], pairs["masks"][0::2]).mean()
    assert abs(half - total) > 1e-3  # rank 0's own half alone would not pass
    assert abs(metrics["k"] - total) <= 1e-12
    assert abs(metrics["a"] - pixel_accuracy(pairs["preds"], pairs["masks"]).mean()) <= 1e-12
