"""Post-processing: threshold, small components, image-head and area emptying."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.morphology import remove_small_objects

from saltkit.inference.postprocess import PostProcessingSettings, postprocess, remove_small_components


def test_defaults_are_a_plain_threshold():
    rng = np.random.default_rng(0)
    probs = rng.random((5, 101, 101)).astype(np.float32)
    out = postprocess(probs)
    assert out.dtype == np.uint8
    assert np.array_equal(out, (probs > 0.5).astype(np.uint8))
    assert np.array_equal(postprocess(probs, settings=PostProcessingSettings(threshold=0.8)), probs > 0.8)


def test_small_components_match_skimage_per_tile():
    rng = np.random.default_rng(1)
    masks = rng.random((6, 101, 101)) > 0.7  # many small blobs, some touching the tile edge
    masks[2] = False
    ours = remove_small_components(masks, 5)
    for k in range(len(masks)):
        # skimage >= 0.26: max_size removes objects of at most that size, i.e. fewer than 5 pixels
        ref = remove_small_objects(masks[k], max_size=4, connectivity=1)
        assert np.array_equal(ours[k], ref), k
    assert ours.sum() < masks.sum()


def test_components_never_merge_across_tiles():
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, 4, 4] = masks[1, 4, 4] = True  # same pixel in consecutive tiles: two 1-pixel components
    assert not remove_small_components(masks, 2).any()
    masks[0, 4, 5] = True
    kept = remove_small_components(masks, 2)
    assert kept[0].sum() == 2 and kept[1].sum() == 0


def test_image_threshold_and_min_area_empty_tiles():
    probs = np.zeros((3, 101, 101), dtype=np.float32)
    probs[0, :50, :50] = 0.9  # big, confident
    probs[1, :3, :3] = 0.9  # 9 pixels
    probs[2, 10:60, 10:60] = 0.9  # big, but the image head says no salt
    image = np.array([0.9, 0.9, 0.1], dtype=np.float32)
    out = postprocess(probs, image, PostProcessingSettings(image_threshold=0.5, min_area=10))
    assert out[0].sum() == 2500 and out[1].sum() == 0 and out[2].sum() == 0
    out = postprocess(probs, image, PostProcessingSettings(min_component_size=10))
    assert out[1].sum() == 0 and out[2].sum() == 2500


def test_bad_settings_and_inputs():
    with pytest.raises(ValueError, match="threshold"):
        PostProcessingSettings(threshold=1.5)
    with pytest.raises(ValueError, match="min_area"):
        PostProcessingSettings(min_area=-1)
    with pytest.raises(ValueError, match="image probabilities"):
        postprocess(np.zeros((1, 4, 4)), None, PostProcessingSettings(image_threshold=0.5))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        postprocess(np.zeros((4, 4)))


def test_engine_transforms_equal_postprocess_on_real_masks(sample_dir):
    import torch
    from scipy import ndimage

    from saltkit.data import train_items
    from saltkit.data.layout import load_mask
    from saltkit.inference.postprocess import mask_transforms

    truths = np.stack([load_mask(it["label"]) for it in train_items(sample_dir)[:40]]).astype(np.float64)
    rng = np.random.default_rng(3)
    noise = ndimage.gaussian_filter(rng.normal(size=truths.shape), (0, 2, 2)) * 6
    probs = (1 / (1 + np.exp(-(3 * (2 * truths - 1) + noise)))).astype(np.float32)
    image = rng.random(len(truths)).astype(np.float32)
    salty = int(np.argmax(truths.mean(axis=(1, 2)) > 0.2))
    image[salty] = np.float32(0.7)  # exactly the float32 nearest 0.7, which lies below 0.7: both keep the tile
    for settings in (PostProcessingSettings(0.45, 20, 0.5, 40), PostProcessingSettings(0.6, 0, 0.7, 0), PostProcessingSettings(0.3, 80)):
        expected = postprocess(probs, image, settings)
        post = mask_transforms(settings)
        for k in range(len(probs)):
            out = post({"prob": torch.from_numpy(probs[k][None]), "image_prob": torch.from_numpy(image[k : k + 1])})
            np.testing.assert_array_equal(out["mask"][0].numpy(), expected[k], err_msg=f"{settings} tile {k}")
        assert 0 < (expected.reshape(len(expected), -1).any(1)).sum() < len(expected)
        assert expected[salty].any()
