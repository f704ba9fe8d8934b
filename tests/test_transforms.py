"""The transform chain of the training bundle on real sample tiles: loading, augmentation keeps masks binary,
pad vs resize shapes, the tile label kept for the metric, mapping predictions back to tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import set_track_meta
from monai.transforms import Compose
from monai.utils import set_determinism
from PIL import Image

from saltkit.data.layout import load_image, load_mask, train_items
from saltkit.geometry import center_crop
from saltkit.transforms import (
    LoadTiled,
    TilePredictiond,
    network_input_transform,
    tile_label_copy,
    tile_output_transform,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "bundles/saltnet/configs/train.json"
VARIANTS = {"pad": REPO / "configs/pad.json", "resize": REPO / "configs/resize.json"}


@pytest.fixture(autouse=True)
def _plain_tensors():
    """The bundle runs its transforms without MetaTensor tracking; restore MONAI's default afterwards."""
    set_track_meta(False)
    yield
    set_track_meta(True)


def bundle(variant: str, tmp_path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(TRAIN), str(VARIANTS[variant])])
    parser["folds_csv"] = str(tmp_path / "folds.csv")
    for k, v in overrides.items():
        parser[k] = v
    parser.parse()
    return parser


@pytest.fixture(scope="module")
def items(sample_dir):
    all_items = train_items(sample_dir)
    salty = [it for it in all_items if load_mask(it["label"]).any()]
    return salty[:6]


def test_load_tiled_reads_8_and_16_bit_masks(items, tmp_path):
    it = items[0]
    mask = load_mask(it["label"])
    for name, stored in (("m8.png", (mask * 255).astype(np.uint8)), ("m16.png", mask.astype(np.uint16) * 65535)):
        Image.fromarray(stored).save(tmp_path / name)
        out = LoadTiled(channels=3)({"image": it["image"], "label": str(tmp_path / name), "id": it["id"]})
        assert out["label"].shape == (1, 101, 101) and out["label"].dtype == torch.float32
        assert torch.equal(out["label"][0], torch.from_numpy(mask).float())
        assert out["image"].shape == (3, 101, 101)
        assert torch.equal(out["image"][0], out["image"][2])
        assert torch.allclose(out["image"][1] * 255, torch.from_numpy(load_image(it["image"])).float())
        assert out["id"] == it["id"]
    only_image = LoadTiled(keys="image")({"image": it["image"]})
    assert only_image["image"].shape == (1, 101, 101)


@pytest.mark.parametrize("variant", ["pad", "resize"])
def test_train_chain_shapes_and_binary_masks(variant, items, tmp_path):
    parser = bundle(variant, tmp_path)
    # force every random transform to fire, so each geometric one is exercised on the masks
    randoms = parser.get_parsed_content("train#random_transforms")
    for t in randoms:
        if hasattr(t, "prob"):
            t.prob = 1.0
    chain = parser.get_parsed_content("train#deterministic_transforms") + randoms + \
        parser.get_parsed_content("train#final_transforms")
    set_determinism(0)
    for it in items:
        d = dict(it)
        for t in chain:
            d = t(d)
        assert d["image"].shape == (3, 128, 128)
        assert d["label"].shape == (1, 128, 128)
        assert d["label_tile"].shape == (1, 101, 101)
        for key in ("label", "label_tile"):
            assert set(torch.unique(d[key]).tolist()) <= {0.0, 1.0}, f"{key} of {it['id']} not binary"
        assert torch.isfinite(d["image"]).all()
        if variant == "pad":
            # loss and metric look at the centre: it is exactly the tile label
            assert torch.equal(center_crop(d["label"], 101), d["label_tile"])
    set_determinism(None)


@pytest.mark.parametrize("variant", ["pad", "resize"])
def test_validation_chain_is_the_tile_mapped_to_128(variant, items, tmp_path):
    parser = bundle(variant, tmp_path)
    chain = parser.get_parsed_content("validate#preprocessing")
    it = items[0]
    out = chain(dict(it))
    mask = torch.from_numpy(load_mask(it["label"])).float()[None]
    assert torch.equal(out["label_tile"], mask)
    if variant == "pad":
        image = torch.from_numpy(load_image(it["image"])).float() / 255
        assert torch.allclose(center_crop(out["image"], 101)[0], image)
        # reflect padding without repeating the edge pixel (numpy 'reflect' = OpenCV BORDER_REFLECT_101)
        assert torch.allclose(out["image"][0], torch.from_numpy(np.pad(image.numpy(), ((13, 14), (13, 14)), "reflect")))
        assert parser.get_parsed_content("loss").center_crop == 101
    else:
        assert parser.get_parsed_content("loss").center_crop is None
        assert out["image"].shape == (3, 128, 128)


@pytest.mark.parametrize("variant", ["pad", "resize"])
def test_tile_output_transform_inverts_the_network_input_transform(variant, items):
    image = torch.from_numpy(load_image(items[0]["image"])).float()[None] / 255
    to_net, to_tile = network_input_transform(variant, "image"), tile_output_transform(variant, "image")
    x = to_net({"image": image})["image"]
    assert x.shape == (1, 128, 128)
    back = to_tile({"image": x})["image"]
    if variant == "pad":
        assert torch.equal(torch.as_tensor(back), image)  # the padding's 13 px before, not a centre at 14
    else:
        assert back.shape == (1, 101, 101) and (torch.as_tensor(back) - image).abs().mean() < 0.02
    # a label is resized with nearest neighbours and stays binary
    label = (torch.rand(1, 101, 101) > 0.5).float()
    net_label = network_input_transform(variant)({"image": image, "label": label})["label"]
    assert set(torch.unique(torch.as_tensor(net_label)).tolist()) <= {0.0, 1.0}


def test_tile_prediction_maps_logits_back_to_the_tile():
    logits = torch.randn(2, 1, 128, 128)
    label = (torch.rand(2, 1, 128, 128) > 0.5).float()
    out = TilePredictiond("pad")({"pred": logits, "label": label})
    assert torch.equal(out["tile_pred"], (logits[..., 13:114, 13:114] > 0).float())
    assert torch.equal(out["tile_label"], label[..., 13:114, 13:114])
    # the probability dict of FlipTTAInferer (validation): salt where the probability is > 0.5
    out = TilePredictiond("pad")({"pred": {"prob": torch.sigmoid(logits)}, "label": label})
    assert torch.equal(out["tile_pred"], (logits[..., 13:114, 13:114] > 0).float())
    tile = (torch.rand(2, 1, 101, 101) > 0.5).float()
    out = TilePredictiond("resize")({"pred": torch.full((2, 1, 128, 128), 3.0), "label": label, "label_tile": tile})
    assert out["tile_pred"].shape == (2, 1, 101, 101) and torch.equal(out["tile_pred"], torch.ones(2, 1, 101, 101))
    assert torch.equal(out["tile_label"], tile)  # the copy kept before resizing, not a resized-back label
    with pytest.raises(ValueError, match="'variant'"):
        TilePredictiond("crop")
    copied = tile_label_copy()({"label": tile[0]})
    assert torch.equal(copied["label_tile"], tile[0]) and copied["label_tile"] is not copied["label"]


def test_validation_size_network_scores_the_resize_variant_at_128(items):
    """`validation_size: network`: the resize variant scored as the original did, the 128 x 128 prediction against
    the nearest-resized label; the pad variant keeps its tile; other values name the key."""
    chain = Compose([LoadTiled(keys=["image", "label"], channels=3), tile_label_copy(),
                     network_input_transform("resize")])
    data = chain(items[0])
    label = torch.as_tensor(data["label"])[None]
    logits = torch.randn(1, 1, 128, 128)
    out = TilePredictiond("resize", validation_size="network")({"pred": {"prob": torch.sigmoid(logits)},
                                                                "label": label, "label_tile": data["label_tile"][None]})
    assert out["tile_pred"].shape == out["tile_label"].shape == (1, 1, 128, 128)
    assert torch.equal(out["tile_pred"], (logits > 0).float()) and torch.equal(out["tile_label"], label)
    assert set(torch.unique(label).tolist()) <= {0.0, 1.0}  # nearest resize keeps the mask binary
    padded = torch.randn(1, 1, 128, 128)
    out = TilePredictiond("pad", validation_size="network")({"pred": padded, "label": (padded > 1).float()})
    assert out["tile_pred"].shape == (1, 1, 101, 101)
    with pytest.raises(ValueError, match="config key 'validation_size' must be one of tile, network"):
        TilePredictiond("resize", validation_size="128")


def test_augmentation_is_seeded(items, tmp_path):
    parser = bundle("pad", tmp_path)
    first, second = [], []
    for out in (first, second):
        set_determinism(0)
        loader = parser.get_parsed_content("train#dataloader", lazy=False)  # rebuilt: fresh transforms
        batch = next(iter(loader))
        out.append((batch["id"], batch["image"]))
    assert first[0][0] == second[0][0]
    assert torch.equal(first[0][1], second[0][1])
    set_determinism(None)
