"""Lovasz losses against the golden values of the original recipe's code, and the deep-supervision criterion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saltkit.geometry import center_crop
from saltkit.labels import IGNORE_LABEL
from saltkit.losses import (
    DeepSupervisionLoss,
    LovaszHinge,
    SymmetricLovasz,
    _lovasz_rows_torch,
    _LovaszRowsNumpy,
    image_target,
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


# ---------------------------------------------------------------- not interpreted pixels (IGNORE_LABEL)


def with_ignored(t: torch.Tensor, seed=0) -> torch.Tensor:
    """(B, 1, H, W) {0, 1} targets with pixels set to IGNORE_LABEL: a band and scattered pixels in most images,
    image 1 fully ignored, image 2 ignored wherever it has salt (labelled but no labelled salt); image 3 untouched."""
    g = torch.Generator().manual_seed(seed)
    t = t.clone()
    scattered = torch.rand(t.shape, generator=g) < 0.3
    scattered[3] = False
    t[scattered] = IGNORE_LABEL
    t[0, :, : t.shape[-2] // 3] = IGNORE_LABEL
    t[1] = IGNORE_LABEL
    t[2] = (torch.rand(t[2].shape, generator=g) > 0.5).float()
    t[2][t[2] == 1] = IGNORE_LABEL
    return t


def subset_loss(x, t, symmetric, smooth=True, ignore_empty=False, per_image=True):
    """The straightforward reference: per image, the textbook loop on the labelled pixels alone (a (1, n) row),
    mean over the images that have any (and, with ignore_empty, labelled salt); autograd gives the gradient."""
    b = x.shape[0]
    xs, ts = (x.reshape(b, -1), t.reshape(b, -1)) if per_image else (x.reshape(1, -1), t.reshape(1, -1))
    losses = []
    for xi, ti in zip(xs, ts, strict=True):
        keep = ti != IGNORE_LABEL
        xi, ti = xi[keep], ti[keep]
        if ti.numel() == 0 or (ignore_empty and ti.sum() == 0):
            continue
        losses.append(lovasz_hinge_reference(xi[None], ti[None], smooth=smooth, symmetric=symmetric))
    return torch.stack(losses).mean() if losses else x.sum() * 0.0


IGNORE_CASES = {
    "hinge_elu": (lambda x, t: lovasz_hinge(x, t), dict(symmetric=False)),
    "hinge_relu": (lambda x, t: lovasz_hinge(x, t, smooth=False), dict(symmetric=False, smooth=False)),
    "hinge_whole_batch": (lambda x, t: lovasz_hinge(x, t, per_image=False), dict(symmetric=False, per_image=False)),
    "symmetric_elu": (lambda x, t: symmetric_lovasz(x, t), dict(symmetric=True)),
    "symmetric_relu": (lambda x, t: symmetric_lovasz(x, t, smooth=False), dict(symmetric=True, smooth=False)),
    "symmetric_ignore_empty": (lambda x, t: symmetric_lovasz(x, t, ignore_empty=True),
                               dict(symmetric=True, ignore_empty=True)),
    "symmetric_whole_batch": (lambda x, t: symmetric_lovasz(x, t, per_image=False),
                              dict(symmetric=True, per_image=False)),
    "module_symmetric": (lambda x, t: SymmetricLovasz()(x, t), dict(symmetric=True)),
    "reference_loop_symmetric": (lambda x, t: lovasz_hinge_reference(x, t, symmetric=True), dict(symmetric=True)),
}


def value_and_grad(fn, x, t):
    x = x.clone().requires_grad_()
    loss = fn(x, t)
    loss.backward()
    return loss, x.grad


def assert_same_value_and_grad(ours, expected):
    assert torch.isfinite(ours[0]) and torch.isfinite(ours[1]).all()
    assert ours[0].item() == pytest.approx(expected[0].item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(ours[1], expected[1], rtol=1e-5, atol=1e-6 * expected[1].abs().max().item())


@pytest.mark.parametrize("key", sorted(IGNORE_CASES))
def test_ignored_pixels_give_the_loss_of_the_labelled_pixels(key):
    fn, kwargs = IGNORE_CASES[key]
    _, t = masks_and_logits(batch=6, size=32)
    t = with_ignored(t)
    x = tie_free_logits(*t.shape)
    ours = value_and_grad(fn, x, t)
    assert_same_value_and_grad(ours, value_and_grad(lambda a, b: subset_loss(a, b, **kwargs), x, t))
    assert ours[0].item() != pytest.approx(value_and_grad(fn, x, t.clamp(min=0))[0].item(), rel=1e-3)


@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", ["numpy", "torch"])
def test_ignored_pixels_in_each_row_implementation(rows, symmetric, smooth):
    # The CPU's numpy rows and the torch rows (other devices): each row's loss and gradient are those of its
    # labelled pixels; a row without labelled pixels has loss 0 and gradient 0.
    _, t = masks_and_logits(batch=6, size=32)
    t = with_ignored(t).reshape(6, -1)
    fn = {"numpy": _LovaszRowsNumpy.apply, "torch": _lovasz_rows_torch}[rows]
    x = tie_free_logits(6, 32 * 32).requires_grad_()
    losses = fn(x, t, smooth, symmetric)
    (losses * torch.arange(1.0, 7.0)).sum().backward()
    for i in range(6):
        keep = t[i] != IGNORE_LABEL
        xi = x.detach()[i].clone().requires_grad_()
        if keep.any():
            expected = lovasz_hinge_reference(xi[keep][None], t[i][keep][None], smooth=smooth, symmetric=symmetric)
            (expected * (i + 1)).backward()
        else:
            expected = torch.tensor(0.0)
            xi.grad = torch.zeros_like(xi)
        assert losses[i].item() == pytest.approx(expected.item(), rel=1e-6, abs=0)
        torch.testing.assert_close(x.grad[i], xi.grad, rtol=1e-5, atol=1e-6 * xi.grad.abs().max().item())
        assert torch.equal(x.grad[i][~keep], torch.zeros(int((~keep).sum())))


def ignored_output_and_target(size=128, crop=None):
    # tie-free logits for every map: gradients of the batched terms match the loop's exactly up to rounding
    g = torch.Generator().manual_seed(0)
    out = SaltOutput(tie_free_logits(4, 1, size, size), tuple(tie_free_logits(4, 1, size, size, seed=s)
                                                              for s in range(1, 6)), torch.randn(4, 1, generator=g))
    _, t = masks_and_logits(batch=4, size=size)
    return out, with_ignored(t)


def expected_loss_on_labelled(out, t, crop=None, bce_weight=0.0):
    """The criterion's definition, each term on the labelled pixels (and known image targets) only."""
    cut = (lambda a: a) if crop is None else (lambda a: center_crop(a, crop))
    t = cut(t)
    known, has_salt = [], []
    for i, ti in enumerate(t):
        labels = ti[ti != IGNORE_LABEL]
        if (labels == 1).any() or labels.numel() == ti.numel():
            known.append(i)
            has_salt.append([float((labels == 1).any())])
    image = torch.nn.functional.binary_cross_entropy_with_logits(out.image_logit[known], torch.tensor(has_salt))
    pixel = sum(subset_loss(cut(p), t, symmetric=True, ignore_empty=True) for p in out.pixel_logits)
    loss = 0.05 * image + 0.1 * pixel + subset_loss(cut(out.logit), t, symmetric=True)
    if bce_weight:
        keep = t != IGNORE_LABEL
        loss = loss + bce_weight * torch.nn.functional.binary_cross_entropy_with_logits(cut(out.logit)[keep], t[keep])
    return loss


def leaves_of(out):
    leaves = [a.clone().requires_grad_() for a in (out.logit, *out.pixel_logits, out.image_logit)]
    return leaves, SaltOutput(leaves[0], tuple(leaves[1:6]), leaves[6])


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize(("crop", "bce_weight"), [(None, 0.0), (101, 0.0), (101, 0.5), (None, 0.5)])
def test_deep_supervision_ignores_unlabelled_pixels(crop, bce_weight, reference):
    out, t = ignored_output_and_target()
    leaves, o = leaves_of(out)
    loss = DeepSupervisionLoss(center_crop=crop, bce_weight=bce_weight, reference=reference)(o, t)
    loss.backward()
    leaves_e, o_e = leaves_of(out)
    expected = expected_loss_on_labelled(o_e, t, crop, bce_weight)
    expected.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for a, b in zip(leaves, leaves_e, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6 * b.grad.abs().max().item())
    # exactly zero gradient at every ignored pixel of every pixel map; the image logit of unknown images too
    ignored = t == IGNORE_LABEL
    for a in leaves[:6]:
        assert torch.equal(a.grad[ignored], torch.zeros(int(ignored.sum())))
        assert a.grad[~ignored].abs().sum() > 0
    _, known = image_target(t if crop is None else center_crop(t, crop))
    assert torch.equal(leaves[6].grad[~known], torch.zeros(int((~known).sum())))


@pytest.mark.parametrize("key", sorted(IGNORE_CASES))
def test_gradient_is_exactly_zero_at_ignored_pixels(key):
    fn, _ = IGNORE_CASES[key]
    x, t = masks_and_logits(batch=6, size=32)
    t = with_ignored(t)
    _, grad = value_and_grad(fn, x, t)
    ignored = t == IGNORE_LABEL
    assert torch.equal(grad[ignored], torch.zeros(int(ignored.sum())))
    assert grad[~ignored].abs().sum() > 0


@pytest.mark.parametrize("key", sorted(IGNORE_CASES))
def test_fully_ignored_image_contributes_nothing(key):
    fn, _ = IGNORE_CASES[key]
    x, t = masks_and_logits(batch=6, size=32)
    t[0, :, :5, :5] = 1  # every image but the ignored one has salt (ignore_empty keeps them all)
    t_ignored = t.clone()
    t_ignored[4] = IGNORE_LABEL
    loss, grad = value_and_grad(fn, x, t_ignored)
    rest = [0, 1, 2, 3, 5]
    loss_rest, grad_rest = value_and_grad(fn, x[rest], t[rest])
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(loss_rest.item(), rel=1e-6)
    assert torch.equal(grad[4], torch.zeros_like(grad[4]))
    # a batch with no labelled pixel at all: 0, gradient 0, no NaN
    loss, grad = value_and_grad(fn, x, torch.full_like(t, IGNORE_LABEL))
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_deep_supervision_all_ignored_is_zero_not_nan():
    out, t = ignored_output_and_target(size=32)
    leaves, o = leaves_of(out)
    loss = DeepSupervisionLoss(bce_weight=0.5)(o, torch.full_like(t, IGNORE_LABEL))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.equal(a.grad, torch.zeros_like(a)) for a in leaves)


def test_image_target_rules():
    t = torch.zeros(5, 1, 8, 8)
    t[0, :, 2, 2] = 1
    t[0, :, 5] = IGNORE_LABEL  # salt and some ignored pixels: salt
    # 1: every pixel labelled, no salt: no salt
    t[2, :, 5] = IGNORE_LABEL  # no labelled salt, some ignored pixels: unknown
    t[3] = IGNORE_LABEL  # nothing labelled: unknown
    t[4] = 1  # all salt
    has_salt, known = image_target(t)
    assert has_salt.dtype == torch.bool and has_salt.shape == (5, 1)
    assert has_salt[:, 0].tolist() == [True, False, False, False, True]
    assert known[:, 0].tolist() == [True, True, False, False, True]
    # in the criterion: the image BCE averages over the known images only
    logit = torch.tensor([[0.3], [-1.2], [2.0], [-0.7], [0.9]], requires_grad=True)
    crit = DeepSupervisionLoss(image_weight=1.0, pixel_weight=0.0, final_weight=0.0)
    loss = crit(SaltOutput(torch.zeros(5, 1, 8, 8), tuple(torch.zeros(5, 1, 8, 8) for _ in range(5)), logit), t)
    loss.backward()
    keep = [0, 1, 4]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logit.detach()[keep],
                                                                    torch.tensor([[1.0], [0.0], [1.0]]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert logit.grad[2].item() == 0.0 and logit.grad[3].item() == 0.0
