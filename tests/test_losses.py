"""Lovasz losses against the golden values of the original recipe's code, and the deep-supervision criterion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saltkit.geometry import center_crop
from saltkit.losses import (
    DeepSupervisionLoss,
    LovaszHinge,
    SymmetricLovasz,
    _lovasz_rows_torch,
    _LovaszRowsNumpy,
    lovasz_hinge,
    lovasz_hinge_reference,
    symmetric_lovasz,
)
from saltkit.networks import SaltOutput

RTOL = 1e-5

# golden key -> (batched function, reference-loop function)
CASES = {
    "lovasz_elu_hinge_per_image": (lambda x, t: lovasz_hinge(x, t),
                                   lambda x, t: lovasz_hinge_reference(x, t)),
    "lovasz_elu_symmetric": (lambda x, t: symmetric_lovasz(x, t),
                             lambda x, t: lovasz_hinge_reference(x, t, symmetric=True)),
    "lovasz_elu_symmetric_ignore_empty": (lambda x, t: symmetric_lovasz(x, t, ignore_empty=True),
                                          lambda x, t: lovasz_hinge_reference(x, t, symmetric=True,
                                                                              ignore_empty=True)),
    "lovasz_elu_hinge_whole_batch": (lambda x, t: lovasz_hinge(x, t, per_image=False),
                                     lambda x, t: lovasz_hinge_reference(x, t, per_image=False)),
    "lovasz_relu_hinge_per_image": (lambda x, t: lovasz_hinge(x, t, smooth=False),
                                    lambda x, t: lovasz_hinge_reference(x, t, smooth=False)),
}


def check_against_golden(golden, key, fn):
    logits = torch.tensor(golden["logits"], dtype=torch.float32).unsqueeze(1).requires_grad_()
    masks = torch.tensor(golden["masks"], dtype=torch.float32).unsqueeze(1)
    loss = fn(logits, masks)
    assert loss.dtype == torch.float32
    loss.backward()
    assert loss.item() == pytest.approx(float(golden[key]), rel=RTOL)
    if key + "_grad" in golden:
        expected = golden[key + "_grad"]
        np.testing.assert_allclose(logits.grad.squeeze(1).double().numpy(), expected, rtol=RTOL,
                                   atol=RTOL * np.abs(expected).max())


@pytest.mark.parametrize("key", sorted(CASES))
def test_batched_matches_golden(golden, key):
    check_against_golden(golden, key, CASES[key][0])


@pytest.mark.parametrize("key", sorted(CASES))
def test_reference_loop_matches_golden(golden, key):
    check_against_golden(golden, key, CASES[key][1])


def masks_and_logits(batch=6, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    t[0] = 0
    x = 2 * torch.randn(batch, 1, size, size, generator=g)
    return x, t


def test_ignore_empty_is_zero_when_no_salt_and_still_differentiable():
    x = torch.randn(3, 1, 16, 16, requires_grad=True)
    loss = symmetric_lovasz(x, torch.zeros(3, 1, 16, 16), ignore_empty=True)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_perfect_prediction_scores_lower_than_inverted():
    _, t = masks_and_logits()
    good = symmetric_lovasz(10 * (2 * t - 1), t, smooth=False)
    bad = symmetric_lovasz(-10 * (2 * t - 1), t, smooth=False)
    assert good.item() == 0.0 and bad.item() > 1.0


def test_module_wrappers():
    x, t = masks_and_logits()
    assert torch.equal(LovaszHinge(smooth=False)(x, t), lovasz_hinge(x, t, smooth=False))
    assert torch.equal(SymmetricLovasz(ignore_empty=True)(x, t), symmetric_lovasz(x, t, ignore_empty=True))


def fake_output(batch=4, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    logit = torch.randn(batch, 1, size, size, generator=g)
    pixels = tuple(torch.randn(batch, 1, size, size, generator=g) for _ in range(5))
    return SaltOutput(logit, pixels, torch.randn(batch, 1, generator=g))


def expected_loss(out, t, crop=None):
    cut = (lambda a: a) if crop is None else (lambda a: center_crop(a, crop))
    t = cut(t)
    has_salt = (t.flatten(1).amax(1, keepdim=True) > 0).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out.image_logit, has_salt)
    pixel = sum(lovasz_hinge_reference(cut(p), t, symmetric=True, ignore_empty=True) for p in out.pixel_logits)
    return 0.05 * bce + 0.1 * pixel + lovasz_hinge_reference(cut(out.logit), t, symmetric=True)


def test_deep_supervision_matches_its_definition():
    out = fake_output()
    _, t = masks_and_logits(batch=4, size=128)
    loss = DeepSupervisionLoss()(out, t)
    assert loss.item() == pytest.approx(expected_loss(out, t).item(), rel=RTOL)
    assert DeepSupervisionLoss(reference=True)(out, t).item() == pytest.approx(loss.item(), rel=RTOL)
    # a bare logit tensor gets the final term only
    assert DeepSupervisionLoss()(out.logit, t).item() == pytest.approx(symmetric_lovasz(out.logit, t).item(),
                                                                       rel=RTOL)


def test_bce_weight_adds_pixel_bce_on_the_cropped_final_logit():
    out = fake_output()
    _, t = masks_and_logits(batch=4, size=128)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(center_crop(out.logit, 101), center_crop(t, 101))
    base = DeepSupervisionLoss(center_crop=101)(out, t)
    assert DeepSupervisionLoss(center_crop=101, bce_weight=0.5)(out, t).item() == pytest.approx(
        base.item() + 0.5 * bce.item(), rel=RTOL)


def tie_free_logits(*shape, seed=0):
    """Logits whose hinge errors 1 - x * (2t - 1) are all distinct and exact for any {0, 1} t: a shuffled grid of
    (k + 1/4) / 1024. At tied errors the Lovasz gradient depends on the sort's order among the ties."""
    n = int(np.prod(shape))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return ((perm - n // 2).float() + 0.25).div(1024).reshape(shape)


def test_deep_supervision_gradients_match_reference():
    out = SaltOutput(tie_free_logits(3, 1, 64, 64), tuple(tie_free_logits(3, 1, 64, 64, seed=s) for s in range(1, 6)),
                     torch.randn(3, 1, generator=torch.Generator().manual_seed(0)))
    _, t = masks_and_logits(batch=3, size=64)
    grads = []
    for reference in (False, True):
        leaves = [a.clone().requires_grad_() for a in (out.logit, *out.pixel_logits, out.image_logit)]
        o = SaltOutput(leaves[0], tuple(leaves[1:6]), leaves[6])
        DeepSupervisionLoss(reference=reference)(o, t).backward()
        grads.append([a.grad for a in leaves])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)


def test_center_crop_ignores_the_padding():
    out = fake_output()
    # salt only in the padding band: the 101 centre is empty, so "has salt" must be 0 after the crop
    t = torch.zeros(4, 1, 128, 128)
    t[:, :, :5] = 1
    t[1, :, 40:60, 40:60] = 1
    crit = DeepSupervisionLoss(center_crop=101)
    loss = crit(out, t)
    assert loss.item() == pytest.approx(expected_loss(out, t, crop=101).item(), rel=RTOL)
    assert loss.item() != pytest.approx(DeepSupervisionLoss()(out, t).item(), rel=1e-3)
    # changing logits outside the central 101 x 101 does not change the loss nor get gradient
    logit = out.logit.clone()
    logit[..., :13, :] = 50.0
    logit.requires_grad_()
    loss2 = crit(SaltOutput(logit, out.pixel_logits, out.image_logit), t)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), rel=RTOL)
    assert logit.grad[..., :13, :].abs().sum() == 0 and logit.grad[..., 13:114, 13:114].abs().sum() > 0


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"logits \(2, 1, 8, 8\) and targets \(2, 1, 8, 9\)"):
        lovasz_hinge(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError, match="center_crop=None"):
        DeepSupervisionLoss()(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9))


@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_numpy_rows_match_torch_rows(smooth, symmetric):
    # CPU tensors go through numpy; other devices through torch operations: same losses and gradients.
    _, t = masks_and_logits(batch=4, size=32)
    t = t.reshape(4, -1)
    results = []
    for rows in (_LovaszRowsNumpy.apply, _lovasz_rows_torch):
        x = tie_free_logits(4, 32 * 32).requires_grad_()
        losses = rows(x, t, smooth, symmetric)
        (losses * torch.arange(1.0, 5.0)).sum().backward()  # unequal weights: each row's gradient counts
        results.append((losses.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-9)
