"""Post-processing tuned on labelled tiles: the grid search against postprocess + the metric on real masks, the
checkpoint entry, and the settings the workflows take from it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

from saltkit.data import train_items
from saltkit.data.layout import load_mask
from saltkit.inference.postprocess import PostProcessingSettings, postprocess
from saltkit.inference.postprocess_search import (
    TuningGrid,
    heldout_metric,
    metric_grid,
    plainness,
    search_postprocessing,
    tile_scores,
)
from saltkit.inference.postprocess_tuned import (
    check_entry,
    choose_postprocessing,
    prediction_threshold,
    read_tuned_postprocessing,
    store_postprocessing,
    tune,
    tuning_record,
)
from saltkit.metrics import competition_metric


@pytest.fixture(scope="module")
def truths(sample_dir) -> np.ndarray:
    """The 100 real masks of the shipped sample, (100, 101, 101) uint8."""
    return np.stack([load_mask(it["label"]) for it in train_items(sample_dir)]).astype(np.uint8)


def constructed(truths: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities a post-processing can improve: smooth noise around the truth, biased low (a lower threshold
    helps), small confident specks (components / areas to drop) and an image head that knows most empty tiles."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=truths.shape), (0, 3, 3)) * 8
    logits = 2.5 * (2 * truths.astype(np.float64) - 1) + noise - 0.8
    for k in rng.choice(len(truths), size=len(truths) // 3, replace=False):
        y, x = rng.integers(0, 95, size=2)
        logits[k, y : y + rng.integers(2, 6), x : x + rng.integers(2, 6)] = 3.0
    probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    salt = truths.reshape(len(truths), -1).any(1)
    image = np.clip(np.where(salt, 0.8, 0.25) + rng.normal(0, 0.2, len(truths)), 0, 1).astype(np.float32)
    return probs, image


def direct_metric(probs, image, truths, settings) -> float:
    return float(competition_metric(postprocess(probs, image, settings), truths).mean())


def test_search_result_is_what_postprocess_scores_and_beats_the_defaults(truths):
    probs, image = constructed(truths)
    result = search_postprocessing(probs, image, truths)
    assert result.metric == pytest.approx(direct_metric(probs, image, truths, result.settings), abs=1e-12)
    assert result.default_metric == pytest.approx(direct_metric(probs, image, truths, PostProcessingSettings()), abs=1e-12)
    assert result.metric > result.default_metric + 0.02, result
    assert result.settings != PostProcessingSettings() and result.tiles == 100
    grid = TuningGrid()
    assert result.candidates == len(grid.thresholds) * len(grid.min_component_sizes) * 8 * len(grid.min_areas)
    # no image head: image_threshold is never searched
    plain = search_postprocessing(probs, None, truths)
    assert plain.settings.image_threshold is None and plain.metric <= result.metric
    assert plain.metric == pytest.approx(direct_metric(probs, None, truths, plain.settings), abs=1e-12)


def test_metric_grid_agrees_with_brute_force(truths):
    probs, image = constructed(truths, seed=1)
    grid = TuningGrid(thresholds=(0.35, 0.5, 0.65), min_component_sizes=(0, 1, 12, 60),
                      image_thresholds=(None, 0.3, 0.7), min_areas=(0, 25, 150))
    totals, values = metric_grid(probs, image, truths, grid)
    assert totals.shape == (3, 4, 3, 3) and values[2] == [None, 0.3, 0.7]
    for (i, t), (k, s), (j, it), (a, area) in itertools.product(*(list(enumerate(v)) for v in values)):
        settings = PostProcessingSettings(t, s, it, area)
        assert totals[i, k, j, a] / (10 * len(truths)) == pytest.approx(
            direct_metric(probs, image, truths, settings), abs=1e-12), settings
    best = search_postprocessing(probs, image, truths, grid, tolerance=0)
    assert best.metric == pytest.approx(totals.max() / (10 * len(truths)), abs=1e-12)
    # by default a setting must beat a plainer one by more than one tile's score (here 1 / 100)
    chosen = search_postprocessing(probs, image, truths, grid)
    i, k, j, a = (values[n].index(getattr(chosen.settings, key)) for n, key in enumerate(
        ("threshold", "min_component_size", "image_threshold", "min_area")))
    assert totals[i, k, j, a] >= totals.max() - 10
    plainer = [s for s in itertools.product(*values) if plainness(PostProcessingSettings(*s)) < plainness(chosen.settings)]
    assert all(totals[tuple(v.index(x) for v, x in zip(values, s, strict=True))] < totals.max() - 10 for s in plainer)


def test_ties_go_to_the_plainest_setting(truths):
    # probabilities that give the exact truth at every threshold of the grid: the defaults tie with many settings
    probs = np.where(truths > 0, 0.9, 0.1).astype(np.float32)
    image = np.where(truths.reshape(len(truths), -1).any(1), 0.9, 0.1).astype(np.float32)
    result = search_postprocessing(probs, image, truths, tolerance=0)
    assert result.settings == PostProcessingSettings() and result.metric == result.default_metric == 1.0
    assert result.ties > 1
    # a tolerance as wide as the metric keeps the defaults whatever the data
    noisy, noisy_image = constructed(truths)
    assert search_postprocessing(noisy, noisy_image, truths, tolerance=1.0).settings == PostProcessingSettings()
    assert min([PostProcessingSettings(0.45), PostProcessingSettings(0.5, 20), PostProcessingSettings()], key=plainness) == PostProcessingSettings()
    assert plainness(PostProcessingSettings(0.55)) < plainness(PostProcessingSettings(0.5, 10, 0.3))


def test_heldout_metric_scores_each_tile_with_settings_tuned_on_the_others(truths):
    probs, image = constructed(truths, seed=2)
    grid = TuningGrid(thresholds=(0.4, 0.5), min_component_sizes=(0, 20), image_thresholds=(None, 0.5),
                      min_areas=(0, 40))
    order = np.argsort(truths.reshape(len(truths), -1).sum(1), kind="stable")
    first = np.zeros(len(truths), dtype=bool)
    first[order[::2]] = True
    scores = np.empty(len(truths))
    for held in (first, ~first):
        settings = search_postprocessing(probs[~held], image[~held], truths[~held], grid).settings
        scores[held] = tile_scores(probs[held], image[held], truths[held], settings)
    assert heldout_metric(probs, image, truths, grid) == pytest.approx(scores.mean(), abs=1e-12)


def test_bad_inputs_name_what_is_wrong(truths):
    probs, image = constructed(truths[:5])
    with pytest.raises(ValueError, match=r"\(N, H, W\) probabilities and truths of one shape"):
        search_postprocessing(probs[:, :50], image, truths[:5])
    with pytest.raises(ValueError, match="4 image probabilities for 5 tiles"):
        search_postprocessing(probs, image[:4], truths[:5])
    with pytest.raises(ValueError, match=r"'thresholds' must be a number in \[0, 1\]"):
        TuningGrid(thresholds=(0.5, 1.5))
    with pytest.raises(ValueError, match="'min_areas' must be an integer >= 0"):
        TuningGrid(min_areas=(-10,))


# ---------------------------------------------------------------- the checkpoint entry


@pytest.fixture()
def ckpt(tmp_path):
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False)
    path = tmp_path / "best_metric.pt"
    torch.save({"network": net.state_dict(), "arch": net.arch, "variant": "pad"}, path)
    return path


def test_entry_round_trip_through_the_checkpoint(ckpt, truths, sample_dir):
    probs, image = constructed(truths)
    items = train_items(sample_dir)
    record = tuning_record(items, sample_dir, 0, 10, "folds.csv")
    result, entry = tune(probs, image, truths, record)
    assert entry["metric_after"] == result.metric and entry["metric_before"] == result.default_metric
    assert 0 <= entry["metric_heldout"] <= 1 and entry["tuned_on"]["tiles"] == 100
    weights = torch.load(ckpt, weights_only=True)["network"]
    assert read_tuned_postprocessing(ckpt) is None
    store_postprocessing(ckpt, entry)
    saved = torch.load(ckpt, weights_only=True)  # plain values only
    assert saved["postprocessing"] == entry and saved["variant"] == "pad"
    assert all(torch.equal(saved["network"][k], v) for k, v in weights.items())
    assert read_tuned_postprocessing(ckpt) == entry
    chosen = choose_postprocessing(ckpt)
    assert chosen.settings == result.settings and set(chosen.sources.values()) == {"tuned"}
    assert "all tuned (fold 0, 100 tiles" in str(chosen) and str(ckpt) in str(chosen)
    given = choose_postprocessing(ckpt, threshold=0.5, image_threshold="null")
    assert given.settings == PostProcessingSettings(0.5, result.settings.min_component_size, None, result.settings.min_area)
    assert given.sources == {"threshold": "given", "min_component_size": "tuned", "image_threshold": "given",
                             "min_area": "tuned"}
    assert prediction_threshold(ckpt) == result.settings.threshold
    assert prediction_threshold(ckpt, 0.3) == 0.3


def test_checkpoint_without_entry_gives_the_plain_defaults(ckpt, capsys):
    chosen = choose_postprocessing(ckpt)
    assert chosen.settings == PostProcessingSettings() and set(chosen.sources.values()) == {"default"}
    assert f"all the plain default ({ckpt} holds no tuned values)" in str(chosen)
    assert choose_postprocessing(ckpt, min_area=40).settings == PostProcessingSettings(min_area=40)
    assert prediction_threshold(ckpt) == 0.5
    assert "mask threshold 0.5 (the default" in capsys.readouterr().out


@pytest.mark.parametrize("entry, message", [
    ([0.5, 0, None, 0], r"entry 'postprocessing' must be a dict"),
    ({"threshold": 0.5, "min_component_size": 0, "image_threshold": None}, r"lacks min_area"),
    ({"threshold": 1.5, "min_component_size": 0, "image_threshold": None, "min_area": 0},
     r"key 'threshold' must be a number in \[0, 1\], got 1.5"),
    ({"threshold": 0.5, "min_component_size": 2.5, "image_threshold": None, "min_area": 0},
     r"key 'min_component_size' must be an integer >= 0"),
    ({"threshold": 0.5, "min_component_size": 0, "image_threshold": None, "min_area": 0, "metric_after": 3.0},
     r"key 'metric_after' must be a metric in \[0, 1\]"),
])
def test_malformed_entry_is_named(ckpt, entry, message):
    saved = torch.load(ckpt, weights_only=True)
    torch.save({**saved, "postprocessing": entry}, ckpt)
    with pytest.raises(ValueError, match=message) as info:
        choose_postprocessing(ckpt)
    assert str(ckpt) in str(info.value) and "saltkit tune" in str(info.value)
    before = ckpt.read_bytes()
    with pytest.raises(ValueError, match=message):
        store_postprocessing(ckpt, entry)
    assert ckpt.read_bytes() == before  # nothing written
    check_entry({"threshold": 0.5, "min_component_size": 0, "image_threshold": None, "min_area": 0})


def test_given_values_out_of_range_name_the_key(ckpt):
    with pytest.raises(ValueError, match=r"config key 'threshold' must be a number in \[0, 1\], got 2.0, or auto"):
        choose_postprocessing(ckpt, threshold=2.0)
    with pytest.raises(ValueError, match=r"config key 'min_area' must be an integer >= 0.*got 'lots', or auto"):
        choose_postprocessing(ckpt, min_area="lots")
    assert choose_postprocessing(ckpt, threshold="AUTO").settings == PostProcessingSettings()


def test_predict_command_masks_at_the_tuned_threshold(ckpt, sample_dir, tmp_path, capsys):
    from PIL import Image

    from saltkit.cli import main

    # the random network's probabilities lie near 0.62 everywhere: 0.65 masks nothing, 0.6 everything
    entry = {"threshold": 0.65, "min_component_size": 0, "image_threshold": None, "min_area": 0,
             "metric_before": 0.5, "metric_after": 0.6, "metric_heldout": None, "tuned_on": {"tiles": 10, "fold": 0}}
    store_postprocessing(ckpt, entry)
    image = train_items(sample_dir)[0]["image"]
    for given, threshold, salt in (([], 0.65, False), (["--threshold", "0.6"], 0.6, True)):
        out = tmp_path / f"pred{len(given)}"
        assert main(["predict", image, "--ckpt", str(ckpt), "--out", str(out), "--no-progress", *given]) == 0
        assert f"predict: mask threshold {threshold} (" in capsys.readouterr().out
        stem = train_items(sample_dir)[0]["id"]
        prob = np.load(out / f"{stem}_prob.npy")
        mask = np.asarray(Image.open(out / f"{stem}_mask.png")) > 0
        np.testing.assert_array_equal(mask, prob > threshold)
        assert mask.all() if salt else not mask.any()
    assert main(["predict", image, "--ckpt", str(ckpt), "--out", str(tmp_path / "bad"), "--threshold", "high"]) == 2
    assert "config key 'threshold' must be a number in [0, 1], got 'high', or auto" in capsys.readouterr().err


def test_a_checkpoint_moved_out_of_its_run_keeps_its_fold(tmp_path, caplog):
    """Tuning and evaluation read the fold from the checkpoint's own record: a best_*.pt copied elsewhere tunes on
    its fold, one beside another run's config.json is refused, and one that records nothing is warned about."""
    import json
    import logging

    from saltkit.checkpoints import run_setting

    ckpt = tmp_path / "moved" / "best_metric.pt"
    ckpt.parent.mkdir()
    torch.save({"network": {}, "arch": {}, "fold": 3, "num_folds": 10}, ckpt)
    assert run_setting(ckpt.parent, "fold", 0, ckpt=ckpt) == 3
    assert run_setting(ckpt.parent, "fold", 0, given=5, ckpt=ckpt) == 5  # the command line wins
    (ckpt.parent / "config.json").write_text(json.dumps({"resolved": {"fold": 1, "num_folds": 10}}))
    with pytest.raises(ValueError, match="was trained on fold 3, but .*config.json beside it records fold 1"):
        run_setting(ckpt.parent, "fold", 0, ckpt=ckpt)
    old = tmp_path / "old" / "best_metric.pt"
    old.parent.mkdir()
    torch.save({"network": {}, "arch": {}}, old)
    with caplog.at_level(logging.WARNING, logger="saltkit.checkpoints"):
        assert run_setting(old.parent, "fold", 0, ckpt=old) == 0
    assert f"{old}: no fold recorded" in caplog.text and "pass --fold N" in caplog.text
