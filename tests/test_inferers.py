"""The flip-TTA and sliding-window inferers: the same probabilities as the recipe's tile path, any image size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SimpleInferer

from saltkit.data import load_image, train_items
from saltkit.inference import (
    AutocastInferer,
    FlipTTAInferer,
    SectionInferer,
    TileSlidingWindowInferer,
    section_inferer,
    tile_inferer,
)
from saltkit.inference.inferers import reflect_pad, split_output
from saltkit.networks import SaltUNet
from saltkit.transforms import network_input_transform, tile_output_transform


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return SaltUNet(backbone="resnet18", pretrained=None, num_filters=8).eval()


@pytest.fixture(scope="module")
def tiles() -> torch.Tensor:
    """(8, 3, 101, 101) real tiles in [0, 1]: from the shared data when present, else the shipped sample."""
    from conftest import SAMPLE_DIR, SHARED_DIR

    shared = SHARED_DIR / "data" / "tgs"
    items = train_items(shared if (shared / "train.csv").is_file() else SAMPLE_DIR)
    picked = [items[i] for i in np.random.default_rng(0).choice(len(items), 8, replace=False)]
    grey = torch.stack([torch.from_numpy(load_image(it["image"])).float() / 255 for it in picked])
    return grey[:, None].expand(-1, 3, -1, -1).contiguous()


def recipe_tile_probabilities(network, tiles: torch.Tensor, variant: str, tta: bool) -> torch.Tensor:
    """The recipe's tile prediction, written out: pad (reflect 13/14) or resize (bilinear) to 128, the tile and
    its mirror in one batch, sigmoid, flipped back and averaged, then cropped / resized back to 101."""
    if variant == "pad":
        x = F.pad(tiles, (13, 14, 13, 14), mode="reflect")
    else:
        x = F.interpolate(tiles, size=(128, 128), mode="bilinear", align_corners=False)
    with torch.no_grad():
        prob = torch.sigmoid(network(torch.cat([x, x.flip(-1)]) if tta else x).logit)
    b = len(tiles)
    prob = (prob[:b] + prob[b:].flip(-1)) / 2 if tta else prob
    if variant == "pad":
        return prob[..., 13:114, 13:114]
    return F.interpolate(prob, size=(101, 101), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("variant", ["pad", "resize"])
@pytest.mark.parametrize("tta", [True, False])
def test_tile_and_section_paths_give_the_recipe_probabilities(network, tiles, variant, tta):
    expected = recipe_tile_probabilities(network, tiles, variant, tta)
    # tile path: the data pipeline brings tiles to 128, FlipTTAInferer(SimpleInferer), back onto the tile grid
    to_net, to_tile = network_input_transform(variant, "image"), tile_output_transform(variant, "prob")
    x = torch.stack([to_net({"image": t})["image"] for t in tiles])
    with torch.no_grad():
        out = tile_inferer(tta=tta)(x, network)
    tile_probs = torch.stack([to_tile({"prob": p})["prob"] for p in out["prob"]])
    torch.testing.assert_close(tile_probs, expected, rtol=0, atol=1e-6)
    assert out["image_prob"].shape == (len(tiles), 1)
    # section path: the raw 101 x 101 tile through the sliding window gives the same probabilities
    with torch.no_grad():
        section = section_inferer(variant, tta=tta)(tiles, network)["prob"]
    torch.testing.assert_close(section, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["pad", "resize"])
@pytest.mark.parametrize("size", [(1, 1), (7, 40), (101, 101), (150, 333), (257, 129)])
def test_sections_of_any_size_keep_their_geometry(network, variant, size):
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prob = section_inferer(variant, overlap=0.25, sw_batch_size=4)(x, network)["prob"]
    assert prob.shape == (1, 1, *size)
    assert torch.isfinite(prob).all() and 0 <= prob.min() and prob.max() <= 1


def test_sliding_window_blends_window_predictions(tiles):
    """A network whose logit is its input's first channel: the blend of overlapping windows gives back the image
    (Gaussian weights sum to one), for both window geometries."""

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x[:, :1] * 4 - 2

    section = torch.cat([torch.cat([tiles[0], tiles[1]], -1), torch.cat([tiles[2], tiles[3]], -1)], -2)[None]
    section = section[..., :190, :170]
    expected = section[:, :1] * 4 - 2
    with torch.no_grad():
        pad = SectionInferer("pad", TileSlidingWindowInferer("pad", overlap=0.5))(section, Identity())
        resize = SectionInferer("resize", TileSlidingWindowInferer("resize", overlap=0.5))(section, Identity())
    torch.testing.assert_close(pad, expected, rtol=0, atol=1e-5)
    # resize: each window is resized 101 -> 128 -> 101, which blurs only the sharpest edges
    assert (resize - expected).abs().mean() < 0.05 and resize.shape == expected.shape


def test_flip_tta_averages_image_and_mirror_and_keeps_the_plain_view(network, tiles):
    x = F.pad(tiles[:4], (13, 14, 13, 14), mode="reflect")
    inferer = FlipTTAInferer(SimpleInferer(), tta=True, keep_plain=True, keep_network_output=True)
    with torch.no_grad():
        out = inferer(x, network)
        plain, mirror = network(x), network(x.flip(-1))
    torch.testing.assert_close(out["prob_plain"], torch.sigmoid(plain.logit))
    torch.testing.assert_close(out["prob"], (torch.sigmoid(plain.logit) + torch.sigmoid(mirror.logit).flip(-1)) / 2)
    torch.testing.assert_close(out["image_prob"],
                               (torch.sigmoid(plain.image_logit) + torch.sigmoid(mirror.image_logit)) / 2)
    torch.testing.assert_close(out["network_output"].logit, plain.logit)
    assert len(out["network_output"].pixel_logits) == 5
    # flip equivariance of the TTA prediction
    with torch.no_grad():
        flipped = inferer(x.flip(-1), network)
    torch.testing.assert_close(flipped["prob"], out["prob"].flip(-1), rtol=0, atol=1e-6)


def test_autocast_inferer_runs_the_network_in_bf16_and_returns_float32():
    """The trainer's inferer under `amp`: convolutions in bf16, every output (the deep-supervision logits and the
    image logit too) back in float32 for the loss, and float32 gradients on the float32 weights."""
    from tiny_networks import TinyConv

    net = TinyConv().to(memory_format=torch.channels_last)
    seen = []
    net.conv.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = AutocastInferer(SimpleInferer(), torch.bfloat16)(x, net)
    assert seen == [torch.bfloat16]
    assert [t.dtype for t in (out.logit, *out.pixel_logits, out.image_logit)] == [torch.float32] * 3
    out.logit.mean().backward()
    assert net.conv.weight.grad.dtype == torch.float32 and net.conv.weight.dtype == torch.float32
    assert AutocastInferer(dtype=None)(x, net).logit.dtype == torch.float32 and seen[-1] == torch.float32
    with pytest.raises(ValueError, match="config key 'amp'"):
        AutocastInferer(dtype=torch.float64)


@pytest.fixture(scope="module")
def trained_tiny_network(sample_dir):
    """The CPU recipe's network (resnet10_w32; 4 filters) trained for 16 steps on 4 real tiles of partial salt
    cover, its BatchNorm statistics then re-estimated on them (as SWA does), channels_last as the bundles run it on
    the CPU; and those tiles (101 x 101) with their masks. Trained, its probabilities are mostly confident and
    follow the salt, so the precision of the uncertain pixels is what a mask comparison measures."""
    from saltkit.data import load_mask
    from saltkit.losses import DeepSupervisionLoss
    from saltkit.swa import recompute_bn

    items = [it for it in train_items(sample_dir) if 0.2 < (load_mask(it["label"]) > 0).mean() < 0.8][:4]
    grey = torch.stack([torch.from_numpy(load_image(it["image"])).float() / 255 for it in items])
    masks = torch.stack([torch.from_numpy(load_mask(it["label"]) > 0).float() for it in items])[:, None]
    tiles = grey[:, None].expand(-1, 3, -1, -1).contiguous()
    x, y = (F.pad(t, (13, 14, 13, 14), mode="reflect") for t in (tiles, masks))
    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet10_w32", pretrained=None, num_filters=4, fine_context_scale=2,
                   deep_supervision="native", head_dropout=0.0, decoder_dropout=0.0)
    net = net.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01)
    loss_fn = DeepSupervisionLoss(center_crop=101, bce_weight=1)
    for step in range(16):
        xs, ys = (x, y) if step % 2 == 0 else (x.flip(-1), y.flip(-1))
        optimizer.zero_grad()
        loss_fn(net(xs), ys).backward()
        optimizer.step()
    recompute_bn(net, [x, x.flip(-1)])
    return net, tiles, masks


def test_bf16_probabilities_match_float32_on_real_tiles(trained_tiny_network):
    """Flip-TTA probabilities of real tiles under bf16 autocast, through the tile path and the section path: within
    2e-2 of float32, the same mask on at least 99% of the pixels."""
    net, tiles, masks = trained_tiny_network
    to_net, to_tile = network_input_transform("pad", "image"), tile_output_transform("pad", "prob")
    x = torch.stack([to_net({"image": t})["image"] for t in tiles])
    probs = {}
    with torch.no_grad():
        for dtype in (None, torch.bfloat16):
            out = FlipTTAInferer(AutocastInferer(dtype=dtype), tta=True)(x, net)["prob"]
            probs[dtype] = torch.stack([to_tile({"prob": p})["prob"] for p in out])
            probs["section", dtype] = section_inferer("pad", tta=True, autocast=dtype)(tiles, net)["prob"]
    f32 = probs[None]
    # the comparison means something: the float32 masks follow the salt, and a good share of pixels is uncertain
    assert ((f32 > 0.5) == (masks > 0.5)).float().mean() > 0.8
    assert 0.2 < (f32 > 0.5).float().mean() < 0.8 and ((f32 - 0.5).abs() < 0.05).float().mean() > 0.02
    for key in (torch.bfloat16, ("section", torch.bfloat16)):
        bf16, reference = probs[key], probs["section", None] if isinstance(key, tuple) else f32
        assert bf16.dtype == torch.float32 and bf16.shape == (len(tiles), 1, 101, 101)
        assert (bf16 - reference).abs().max() <= 2e-2, key
        assert ((bf16 > 0.5) == (reference > 0.5)).float().mean() >= 0.99, key
    torch.testing.assert_close(probs["section", None], f32, rtol=0, atol=1e-6)


def test_tta_switch_accepts_command_line_spellings():
    assert FlipTTAInferer(tta="false").tta is False and FlipTTAInferer(tta="True").tta is True
    with pytest.raises(ValueError, match="'tta'"):
        FlipTTAInferer(tta="maybe")


def test_outputs_of_other_runtimes():
    logit, image = torch.zeros(2, 1, 8, 8), torch.ones(2, 1)
    assert split_output(logit)[1] is None
    assert split_output((logit, image))[1] is image  # ONNX Runtime: (logit, image_logit)
    assert split_output((logit, (logit,) * 5, image))[1] is image  # traced SaltOutput
    with pytest.raises(TypeError, match="network output"):
        split_output("logit")
    assert isinstance(FlipTTAInferer(), Inferer) and isinstance(TileSlidingWindowInferer("pad"), Inferer)


def test_reflect_pad_matches_numpy_and_handles_small_images():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    np.testing.assert_array_equal(reflect_pad(x, 1, 2, 2, 1)[0, 0].numpy(),
                                  np.pad(x[0, 0].numpy(), ((1, 2), (2, 1)), mode="reflect"))
    big = reflect_pad(x, 13, 14, 13, 14)
    assert big.shape == (1, 1, 30, 31) and torch.equal(big[..., 13:16, 13:17], x)
    assert reflect_pad(torch.ones(1, 1, 1, 1), 2, 3, 4, 5).shape == (1, 1, 6, 10)


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="'variant'"):
        TileSlidingWindowInferer("crop")
    with pytest.raises(ValueError, match="'overlap'"):
        TileSlidingWindowInferer("pad", overlap=1.0)
    # 0.99 was accepted and effectively hung (10000 windows a pixel)
    with pytest.raises(ValueError, match=r"'overlap' must be in \[0, 0.9\], got 0.99 .*100 at 0.9"):
        TileSlidingWindowInferer("pad", overlap=0.99)
    assert TileSlidingWindowInferer("pad", overlap=0.9).sliding.overlap == 0.9
    with pytest.raises(ValueError, match="'sw_batch_size'"):
        TileSlidingWindowInferer("pad", sw_batch_size=0)
    with pytest.raises(ValueError, match="at least 128 px"):
        TileSlidingWindowInferer("pad")(torch.zeros(1, 3, 101, 101), torch.nn.Identity())
