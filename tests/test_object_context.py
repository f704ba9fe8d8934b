"""Object-context block: the SDPA path equals the plain softmax(QK^T / sqrt(Ck)) V reference."""

from __future__ import annotations

import copy

import pytest
import torch

from saltkit.networks import ObjectContextBlock, plain_attention, sdpa_attention


def make_pair(channels=32, key=16, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    block = ObjectContextBlock(channels, key, key, dropout=dropout)
    torch.nn.init.normal_(block.out.weight, std=0.2)  # zero at init: give the attention path some weight
    torch.nn.init.normal_(block.out.bias, std=0.2)
    plain = copy.deepcopy(block)
    plain.attention = "plain"
    return block, plain


def test_attention_functions_agree():
    torch.manual_seed(0)
    q = torch.randn(2, 300, 8)
    v = torch.randn(2, 300, 5)
    assert torch.allclose(sdpa_attention(q, q, v), plain_attention(q, q, v), atol=1e-5)
    # a row of attention weights sums to one: constant values pass through unchanged
    assert torch.allclose(sdpa_attention(q, q, torch.ones(2, 300, 5)), torch.ones(2, 300, 5), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 32, 16, 16), (4, 32, 64, 64), (1, 64, 8, 12)])
def test_sdpa_equals_plain_in_eval_mode(shape):
    block, plain = make_pair(channels=shape[1], key=shape[1] // 2, dropout=0.2)
    x = torch.randn(shape)
    with torch.no_grad():
        a, b = block.eval()(x), plain.eval()(x)
    assert a.shape == x.shape
    assert (a - b).abs().max().item() < 1e-4


def test_sdpa_gradients_equal_plain():
    block, plain = make_pair(dropout=0.0)
    x = torch.randn(2, 32, 16, 16)
    grads = []
    for m in (block, plain):
        xi = x.clone().requires_grad_()
        (m.train()(xi) ** 2).sum().backward()
        grads.append((xi.grad, m.key[0].weight.grad, m.value.weight.grad))
    for g_sdpa, g_plain in zip(*grads, strict=True):
        assert torch.allclose(g_sdpa, g_plain, rtol=1e-4, atol=1e-4)


def test_context_projection_starts_at_zero():
    torch.manual_seed(0)
    block = ObjectContextBlock(16, 8, 8).eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        expected = block.fuse(torch.cat([torch.zeros_like(x), x], dim=1))
        assert torch.equal(block(x), expected)


def test_unknown_attention_mode():
    with pytest.raises(ValueError, match="attention='flash'"):
        ObjectContextBlock(16, 8, 8, attention="flash")


def test_scale_attends_on_the_pooled_map():
    """OCNet's `scale`: the attention runs on the max-pooled map and its context is upsampled back."""
    block, _ = make_pair(channels=16, key=8)
    pooled = copy.deepcopy(block)
    pooled.scale = 2
    x = torch.randn(2, 16, 12, 8)
    with torch.no_grad():
        ctx = pooled.context(x)
        expected = torch.nn.functional.interpolate(block.context(torch.nn.functional.max_pool2d(x, 2)),
                                                   size=(12, 8), mode="bilinear", align_corners=False)
        assert ctx.shape == (2, 8, 12, 8) and torch.equal(ctx, expected)
        assert pooled.eval()(x).shape == x.shape
    assert not torch.allclose(ctx, block.context(x), atol=1e-3)  # a different function from scale 1
    with pytest.raises(ValueError, match=r"scale 2 needs H and W multiples of 2; got \(12, 9\)"):
        pooled(torch.randn(1, 16, 12, 9))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="scale="):
            ObjectContextBlock(16, 8, 8, scale=bad)
