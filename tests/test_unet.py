"""SaltUNet: the three heads and their shapes, input checks, arch round trip, SDPA vs plain equality."""

from __future__ import annotations

import pytest
import torch

from saltkit.networks import SaltOutput, SaltUNet, network_from_arch


@pytest.fixture(scope="module")
def resnet18_net():
    torch.manual_seed(0)
    return SaltUNet("resnet18", pretrained=None, num_filters=8).eval()


def assert_heads(out, batch, h, w):
    assert isinstance(out, SaltOutput)
    assert out.logit.shape == (batch, 1, h, w)
    assert len(out.pixel_logits) == 5
    assert all(p.shape == (batch, 1, h, w) for p in out.pixel_logits)
    assert out.image_logit.shape == (batch, 1)
    assert all(torch.isfinite(t).all() for t in (out.logit, out.image_logit, *out.pixel_logits))


@pytest.mark.parametrize("size", [(128, 128), (64, 64), (96, 96), (64, 96)])
def test_heads_and_shapes(resnet18_net, size):
    with torch.no_grad():
        out = resnet18_net(torch.rand(1, 3, *size))
    assert_heads(out, 1, *size)


def test_train_mode_backward_reaches_encoder():
    torch.manual_seed(0)
    net = SaltUNet("resnet18", num_filters=4).train()
    out = net(torch.rand(2, 3, 32, 32))
    assert_heads(out, 2, 32, 32)
    (out.logit.mean() + sum(p.mean() for p in out.pixel_logits) + out.image_logit.mean()).backward()
    assert net.encoder.layer0[0].weight.grad.abs().sum() > 0


def test_upsample_input_false_keeps_output_at_input_size():
    torch.manual_seed(0)
    net = SaltUNet("resnet18", num_filters=8, upsample_input=False).eval()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        feats = net.encoder((x - net.mean) / net.std)
        out = net(x)
    assert [f.shape[-1] for f in feats] == [32, 32, 16, 8, 4]  # encoder at the input's own size
    assert_heads(out, 1, 128, 128)


@pytest.mark.parametrize("size", [96, 160])
def test_odd_bottleneck_sizes_keep_the_input_size(size):
    """Without upsample_input a 96 px input reaches a 3 px bottleneck (160 px: 5): the centre pools it up to 2 and
    crops its x2 output back to 3, so every multiple of 32 from 64 px works, as the input check promises."""
    net = SaltUNet("resnet18", num_filters=4, upsample_input=False).eval()
    with torch.no_grad():
        assert_heads(net(torch.rand(1, 3, size, size)), 1, size, size)


def test_cheap_recipe_needs_64_px():
    net = SaltUNet("resnet18", num_filters=4, upsample_input=False).eval()
    with pytest.raises(ValueError, match=r"needs H and W >= 64.*\(1, 3, 32, 32\)"):
        net(torch.rand(1, 3, 32, 32))


def test_recipe_stage_sizes_for_128_input(resnet18_net):
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 128, 128), scale_factor=2, mode="bilinear")
    with torch.no_grad():
        feats = resnet18_net.encoder(x)
    assert [f.shape[-1] for f in feats] == [64, 64, 32, 16, 8]


@pytest.mark.parametrize("shape", [(1, 3, 101, 101), (1, 3, 128, 100), (1, 1, 128, 128)])
def test_bad_input_shape_is_refused(resnet18_net, shape):
    with pytest.raises(ValueError, match=r"multiples of 32.*" + str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        resnet18_net(torch.rand(*shape))


def test_arch_round_trip(resnet18_net):
    arch = resnet18_net.arch
    assert arch["backbone"] == "resnet18" and arch["num_filters"] == 8 and "pretrained" not in arch
    rebuilt = network_from_arch(arch).eval()
    rebuilt.load_state_dict(resnet18_net.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x).logit, resnet18_net(x).logit)
    with pytest.raises(ValueError, match="unknown keys"):
        network_from_arch({**arch, "depth": 5})


def test_sdpa_and_plain_networks_agree():
    torch.manual_seed(1)
    net = SaltUNet("resnet18", num_filters=8).eval()
    for m in net.modules():  # the OC output projections start at zero; make attention matter
        if hasattr(m, "out") and isinstance(m.out, torch.nn.Conv2d):
            torch.nn.init.normal_(m.out.weight, std=0.1)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = net(x)
        net.set_attention("plain")
        b = net(x)
    assert "attention" not in net.arch  # a reference switch: checkpoints carry none
    assert network_from_arch({**net.arch, "attention": "plain"}).arch == net.arch  # older checkpoints still load
    for ta, tb in zip(a.pixel_logits, b.pixel_logits, strict=True):
        assert (ta - tb).abs().max().item() < 1e-4
    for ta, tb in ((a.logit, b.logit), (a.image_logit, b.image_logit)):
        assert (ta - tb).abs().max().item() < 1e-4


@pytest.mark.parametrize("num_filters", [16, 8])
def test_fused_hypercolumn_equals_the_concatenated_one(num_filters):
    """d5 (128 channels when f = 16, 64 when f = 8: as many as the fusion's outputs) is projected before
    upsampling; outputs and weight gradients match the literal concat form (eval mode: the dropouts are off), and
    the dropout masks act per (tile, channel) in both."""
    torch.manual_seed(2)
    net = SaltUNet("resnet18", num_filters=num_filters).eval()
    x = torch.rand(2, 3, 64, 64)
    results = {}
    for mode in ("concat", "fused"):
        net.set_hypercolumn(mode)
        net.zero_grad(set_to_none=True)
        out = net(x)
        (out.logit.square().mean() + sum(p.mean() for p in out.pixel_logits)).backward()
        results[mode] = (out, net.pixel_fusion[1].weight.grad.clone(), net.pixel_heads[4][1][0].weight.grad.clone())
    (a, ga, ha), (b, gb, hb) = results["concat"], results["fused"]
    assert torch.allclose(a.logit, b.logit, atol=1e-5)
    for ta, tb in zip(a.pixel_logits, b.pixel_logits, strict=True):
        assert torch.equal(ta, tb)  # the heads see the same upsampled maps
    assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-4) and torch.allclose(ha, hb, atol=1e-6, rtol=1e-4)
    net.train().set_hypercolumn("fused")  # train mode: dropout before the upsampling
    assert_heads(net(x), 2, 64, 64)
    with pytest.raises(ValueError, match="hypercolumn"):
        net.set_hypercolumn("stacked")


def test_cheaper_variants_keep_the_final_logit_and_weights():
    """fine_context_scale and deep_supervision="native": the same weights; with the finest OC block at its initial
    zero projection the final logit is unchanged, the deep-supervision heads run at d2..d5's own sizes."""
    torch.manual_seed(3)
    recipe = SaltUNet("resnet18", num_filters=8, upsample_input=False).eval()
    assert "fine_context_scale" not in recipe.arch and "deep_supervision" not in recipe.arch  # recipe arch as before
    cheap = SaltUNet("resnet18", num_filters=8, upsample_input=False, fine_context_scale=2,
                     deep_supervision="native").eval()
    cheap.load_state_dict(recipe.state_dict())  # strict: the same parameters
    assert cheap.arch == {**recipe.arch, "fine_context_scale": 2, "deep_supervision": "native"}
    assert network_from_arch(cheap.arch).arch == cheap.arch
    assert cheap.decoder1.context.scale == 2 and cheap.decoder3.context.scale == 1
    seen = []
    hooks = [h[1].register_forward_hook(lambda m, i, o: seen.append(o.shape[-1])) for h in cheap.pixel_heads]
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        a, b = recipe(x), cheap(x)
    for h in hooks:
        h.remove()
    assert seen == [64, 32, 32, 16, 8]  # d1..d5 at their own resolutions
    assert_heads(b, 2, 128, 128)
    assert torch.allclose(a.logit, b.logit, atol=1e-5)  # decoder1's OC projection starts at zero
    assert torch.equal(a.image_logit, b.image_logit)
    assert torch.equal(a.pixel_logits[0], b.pixel_logits[0])  # d1's head is at d1's size either way
    assert not torch.allclose(a.pixel_logits[4], b.pixel_logits[4], atol=1e-3)
    torch.nn.init.normal_(cheap.decoder1.context.out.weight, std=1.0)
    recipe.load_state_dict(cheap.state_dict())
    z = torch.randn(2, 16, 32, 32)  # decoder1's OC block input for a 128 tile
    with torch.no_grad():  # once trained, the pooled attention gives another context
        assert not torch.allclose(recipe.decoder1.context(z), cheap.decoder1.context(z), atol=1e-2)
    with pytest.raises(ValueError, match="deep_supervision='coarse'"):
        SaltUNet("resnet18", num_filters=4, deep_supervision="coarse")


def test_default_senet154_heads():
    torch.manual_seed(0)
    net = SaltUNet().eval()  # the recipe's default: senet154, f = 16
    assert net.arch["backbone"] == "senet154"
    assert net.encoder.channels == (128, 256, 512, 1024, 2048)
    with torch.no_grad():
        out = net(torch.rand(1, 3, 32, 32))
    assert_heads(out, 1, 32, 32)
