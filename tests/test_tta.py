"""Flip TTA and the un-pad / resize-back geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import BorderPad, Resize
from torch import nn

from saltkit.geometry import pad_widths, restore_tiles
from saltkit.inference import FlipTTAInferer
from saltkit.inference.inferers import split_output


class SymmetricConv(nn.Module):
    """A flip-equivariant network: convolution with a left-right symmetric kernel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 5, padding=2, bias=True)
        with torch.no_grad():
            w = torch.randn_like(self.conv.weight)
            self.conv.weight.copy_((w + w.flip(-1)) / 2)

    def forward(self, x):
        return self.conv(x)


class Shifted(nn.Module):
    """Not flip-equivariant: output at column j looks at column j + 1."""

    def forward(self, x):
        return F.pad(x[:, :1, :, 1:], (0, 1)) * 4 - 2


def test_flip_equivariant_model_gives_same_output_with_tta():
    torch.manual_seed(0)
    net = SymmetricConv().eval()
    x = torch.rand(4, 3, 128, 128)
    with_tta = FlipTTAInferer(tta=True)(x, net)["prob"]
    without = FlipTTAInferer(tta=False)(x, net)["prob"]
    assert with_tta.shape == (4, 1, 128, 128)
    torch.testing.assert_close(with_tta, without, atol=1e-6, rtol=0)


def test_tta_averages_probability_with_flipped_back_probability():
    x = torch.rand(2, 3, 16, 16)
    net = Shifted()
    pred = FlipTTAInferer(tta=True, keep_plain=True)(x, net)
    p_plain = torch.sigmoid(net(x))
    p_flip_back = torch.sigmoid(net(x.flip(-1))).flip(-1)
    torch.testing.assert_close(pred["prob_plain"], p_plain)
    torch.testing.assert_close(pred["prob"], (p_plain + p_flip_back) / 2)  # probabilities, not logits, are averaged
    assert "image_prob" not in pred
    assert not torch.allclose(p_plain, p_flip_back)


def test_image_head_is_flip_averaged():
    class WithHead(nn.Module):
        def forward(self, x):
            logit = x[:, :1]
            return logit, (logit,), x[:, 0, :, :4].mean(dim=(1, 2))[:, None]  # TorchScript-style tuple

    x = torch.rand(3, 3, 8, 8)
    pred = FlipTTAInferer()(x, WithHead())
    prob, image_prob = pred["prob"], pred["image_prob"][:, 0]
    expected = (torch.sigmoid(x[:, 0, :, :4].mean(dim=(1, 2))) + torch.sigmoid(x[:, 0, :, -4:].mean(dim=(1, 2)))) / 2
    torch.testing.assert_close(image_prob, expected)
    assert prob.shape == (3, 1, 8, 8)


def test_split_output_rejects_unknown():
    with pytest.raises(TypeError, match="SaltOutput"):
        split_output({"logit": 1})


def test_unpad_is_exact_inverse_of_training_padding():
    tile = torch.rand(3, 101, 101)
    before, after = pad_widths(101, 128)
    padded = BorderPad(spatial_border=[before, after, before, after], mode="reflect")(tile)
    assert padded.shape == (3, 128, 128)
    restored = restore_tiles(torch.as_tensor(padded)[None], "pad")
    assert torch.equal(restored[0], tile)


def test_resize_back_geometry():
    # a smooth ramp survives 101 -> 128 -> 101 bilinear almost exactly, and nothing is shifted or transposed
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 101), torch.linspace(0, 1, 101), indexing="ij")
    tile = torch.stack([yy, xx, yy * xx])
    up = torch.as_tensor(Resize(spatial_size=(128, 128), mode="bilinear")(tile))
    back = restore_tiles(up[None], "resize")[0]
    assert back.shape == (3, 101, 101)
    inner = (slice(None), slice(2, -2), slice(2, -2))  # edges see the clamped border
    assert (back - tile)[inner].abs().max() < 2e-3
    # exact definition: torch's bilinear with align_corners=False
    torch.testing.assert_close(back[None], F.interpolate(up[None], size=(101, 101), mode="bilinear", align_corners=False))
    # a binary blob keeps its centroid through the round trip
    mask = torch.zeros(1, 101, 101)
    mask[0, 20:40, 60:90] = 1
    up = torch.as_tensor(Resize(spatial_size=(128, 128), mode="bilinear")(mask))
    back = restore_tiles(up[None], "resize")[0, 0] > 0.5
    ys, xs = np.nonzero(back.numpy())
    assert abs(ys.mean() - 29.5) < 0.3 and abs(xs.mean() - 74.5) < 0.3


def test_restore_rejects_unknown_variant_and_small_maps():
    with pytest.raises(ValueError, match="variant"):
        restore_tiles(torch.zeros(1, 1, 128, 128), "crop")
    with pytest.raises(ValueError, match="crop"):
        restore_tiles(torch.zeros(1, 1, 64, 64), "pad")
