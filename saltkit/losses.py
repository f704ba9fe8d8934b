"""Lovasz hinge losses (Berman et al. 2018) and the recipe's deep-supervision criterion.

Conventions: logits and targets are (B, 1, H, W) or (B, H, W) (anything with the batch first); targets are
floats 0 (background), 1 (salt) or IGNORE_LABEL (-1, not interpreted: `saltkit.labels`). Every loss here ignores
the pixels labelled IGNORE_LABEL: its value is that of the same loss on the labelled pixels only, and its gradient
there is exactly 0; an image without a labelled pixel adds nothing to a mean over images (a mean over no image is
0, not NaN). Logits are assumed finite. `smooth=True` feeds the sorted hinge errors e into the Lovasz extension as elu(e) + 1 (the
recipe's variant), `smooth=False` as relu(e) (the paper's). Losses are computed in float32.

The batched implementation sorts the (B, HW) errors once and builds the Lovasz weights (the gradient of the
Jaccard extension, piecewise constant in the logits) without autograd; the loss of a row is sum(f(e) * w) in
descending-error order and its gradient f'(e) * w, scattered back to the pixel order. The symmetric loss needs
one sort for both terms: lovasz(-x, 1 - t) has the same hinge errors 1 - x * (2t - 1). On the CPU the rows are
computed in numpy: its SIMD sort of packed (error, index) keys is about 10x faster than torch's CPU sort, and
numpy's single-threaded passes do not stall when other processes hold the cores. Other devices use torch ops.

Ignored pixels in the Lovasz sort: their error is set to -inf, so they sort after every labelled pixel of their
row, and the Jaccard weights count labelled pixels only (the running count of labelled pixels is min(position,
labelled pixels of the row), and the complement labels of the symmetric term are labelled - salt). The labelled
pixels get the positions, counts and weights of the loss computed on them alone; after them the Jaccard index
stays exactly 1, so the ignored pixels' weights are exactly 0, and hinge(-inf) = 0 with slope 0, so they add 0 to
the loss and get 0 gradient. A row without labelled pixels (0 / 0) gets weight 0 and loss 0. Targets without -1
take the unchanged path (one min() over the targets picks it on the CPU; the torch path is branch-free and gives
the same bits either way).
`lovasz_hinge_reference` is the textbook per-image loop (DeepSupervisionLoss(reference=True)).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .geometry import center_crop
from .labels import IGNORE_LABEL


def _flat(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ...) logits and targets -> float32 (B, N) pairs; shapes must match."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape")
    b = logits.shape[0]
    return logits.reshape(b, -1).float(), targets.reshape(b, -1).float()


def _hinge_fn(errors: torch.Tensor, smooth: bool) -> torch.Tensor:
    return F.elu(errors) + 1 if smooth else F.relu(errors)


def _jaccard_weights(gt_sorted: torch.Tensor, cum_labelled: torch.Tensor) -> torch.Tensor:
    """Lovasz extension weights of the Jaccard loss for labels in descending-error order: (R, N) -> (R, N).

    cum_labelled: the running count of labelled pixels, (N,) or (R, N) (1, 2, ..., N when every pixel is).
    """
    gts = gt_sorted.sum(dim=1, keepdim=True)
    cum_fg = gt_sorted.cumsum(dim=1)
    intersection = gts - cum_fg
    union = gts + (cum_labelled - cum_fg)  # cumsum(labelled - gt) without materialising labelled - gt
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)


@torch.no_grad()
def _lovasz_pixel_weights(errors: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor,
                          symmetric: bool) -> torch.Tensor:
    """Per-pixel Lovasz weights in the original pixel order: (R, N) errors (-inf at ignored pixels), {0, 1}
    targets (0 at ignored pixels) and the bool map of labelled pixels -> (R, N).

    symmetric=True gives the mean of the weights for `targets` and `1 - targets` (same errors, one sort).
    """
    order = errors.argsort(dim=1, descending=True)
    gt_sorted = targets.gather(1, order)
    # The ignored pixels sort last: the first `count` positions of a row are its labelled pixels.
    position = torch.arange(1, errors.shape[1] + 1, device=errors.device, dtype=gt_sorted.dtype)
    count = labelled.sum(dim=1, keepdim=True, dtype=gt_sorted.dtype)
    cum_labelled = torch.minimum(position, count)
    w = _jaccard_weights(gt_sorted, cum_labelled)
    if symmetric:
        labelled_sorted = (position <= count).to(gt_sorted.dtype)
        w = (w + _jaccard_weights(labelled_sorted - gt_sorted, cum_labelled)) * 0.5
    w = torch.where(count > 0, w, 0.0)  # a row without labelled pixels: 0 / 0 above
    return torch.empty_like(w).scatter_(1, order, w)


def _lovasz_rows_torch(logits: torch.Tensor, targets: torch.Tensor, smooth: bool, symmetric: bool) -> torch.Tensor:
    """Row-wise Lovasz hinge of float32 (R, N) logits / targets -> (R,) losses, with torch ops (any device).

    Branch-free in the ignored pixels (no device sync): with none, every step gives today's bits."""
    labelled = targets != IGNORE_LABEL
    targets = targets.clamp(min=0.0)
    errors = (1.0 - logits * (2.0 * targets - 1.0)).masked_fill(~labelled, float("-inf"))
    weights = _lovasz_pixel_weights(errors.detach(), targets, labelled, symmetric)
    return (_hinge_fn(errors, smooth) * weights).sum(dim=1)


def _descending_order_numpy(errors: np.ndarray) -> np.ndarray:
    """Flat indices that sort each row of float32 (R, N) `errors` in descending order (ties: lower index first).

    One int64 sort of keys (order-preserving integer image of the error) << 32 | flat index.
    """
    bits = errors.view(np.int32)
    # Negative floats' bit patterns order backwards as int32; flipping all but the sign bit fixes that, and
    # inverting every bit turns ascending into descending.
    key = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)
    np.invert(key, out=key)
    packed = key.astype(np.int64)
    packed <<= 32
    packed |= np.arange(errors.size, dtype=np.int64).reshape(errors.shape)
    packed.sort(axis=1)
    packed &= 0xFFFFFFFF
    return packed


def _jaccard_weights_numpy(gts: np.ndarray, cum_fg: np.ndarray, cum_labelled: np.ndarray) -> np.ndarray:
    """`_jaccard_weights` from the label counts: (R, 1) totals, (R, N) cumulative counts, and the running count of
    labelled pixels ((N,) 1-based positions when every pixel is labelled, else (R, N))."""
    jaccard = 1.0 - (gts - cum_fg) / (gts + (cum_labelled - cum_fg))
    jaccard[:, 1:] -= jaccard[:, :-1].copy()
    return jaccard


def _lovasz_rows_numpy(logits: np.ndarray, targets: np.ndarray, smooth: bool,
                       symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise Lovasz hinge of float32 (R, N) arrays -> ((R,) losses, (R, N) gradient of each row's loss).

    Targets hold 0, 1 or IGNORE_LABEL; an ignored pixel's error is -inf (it sorts last, weight 0, slope 0)."""
    labelled = None
    if targets.size and targets.min() < 0:  # some pixel is IGNORE_LABEL
        labelled = targets != IGNORE_LABEL
        targets = np.maximum(targets, np.float32(0.0))
    signs = 2.0 * targets - 1.0
    errors = 1.0 - logits * signs
    if labelled is not None:
        np.copyto(errors, np.float32(-np.inf), where=~labelled)
    order = _descending_order_numpy(errors)
    errors_sorted, gt_sorted = errors.ravel().take(order), targets.ravel().take(order)
    n = errors.shape[1]
    gts = gt_sorted.sum(axis=1, keepdims=True, dtype=np.float32)
    cum_fg = np.cumsum(gt_sorted, axis=1, dtype=np.float32)
    position = np.arange(1, n + 1, dtype=np.float32)
    if labelled is None:
        count, cum_labelled = np.float32(n), position
    else:  # the labelled pixels come first in each sorted row
        count = labelled.sum(axis=1, keepdims=True, dtype=np.float32)
        cum_labelled = np.minimum(position, count)
    with np.errstate(invalid="ignore"):  # 0 / 0 in a row without labelled pixels, zeroed below
        w = _jaccard_weights_numpy(gts, cum_fg, cum_labelled)
        if symmetric:  # labels 1 - t: total count - gts, cumulative cum_labelled - cum_fg
            w += _jaccard_weights_numpy(count - gts, cum_labelled - cum_fg, cum_labelled)
            w *= 0.5
    if labelled is not None:
        w[count[:, 0] == 0] = 0.0
    positive = errors_sorted > 0
    if smooth:  # elu(e) + 1 = e + 1 above 0, exp(e) below; its derivative 1 above 0, exp(e) below
        below = np.exp(np.minimum(errors_sorted, 0.0))
        hinge, slope = np.where(positive, errors_sorted + 1.0, below), np.where(positive, np.float32(1.0), below)
    else:
        hinge, slope = np.maximum(errors_sorted, 0.0), positive.astype(np.float32)
    losses = (hinge * w).sum(axis=1, dtype=np.float32)
    grad = np.empty_like(errors)
    grad.ravel()[order] = slope * w
    grad *= -signs  # d error / d logit
    return losses, grad


class _LovaszRowsNumpy(torch.autograd.Function):
    """`_lovasz_rows_numpy` as an autograd function of CPU float32 (R, N) logits -> (R,) losses."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, smooth: bool, symmetric: bool) -> torch.Tensor:
        losses, grad = _lovasz_rows_numpy(logits.detach().contiguous().numpy(), targets.contiguous().numpy(),
                                          smooth, symmetric)
        ctx.save_for_backward(torch.from_numpy(grad))
        return torch.from_numpy(losses)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_losses: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad_losses[:, None] * grad, None, None, None


def _lovasz_rows(logits: torch.Tensor, targets: torch.Tensor, smooth: bool, symmetric: bool) -> torch.Tensor:
    """Row-wise Lovasz hinge of float32 (R, N) logits / targets in {0, 1, IGNORE_LABEL} -> (R,) losses,
    differentiable in logits; a row's loss is that of its labelled pixels (0 when it has none)."""
    if logits.device.type == "cpu" and logits.numel() < 2**32:
        return _LovaszRowsNumpy.apply(logits, targets, smooth, symmetric)
    return _lovasz_rows_torch(logits, targets, smooth, symmetric)


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the elements where `keep` (same shape); 0 (still differentiable) when none is kept."""
    return (values * keep).sum() / keep.sum().clamp(min=1)


def _mean_where(values: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `values` over the elements where the bool `keep`: exactly `mean` (default values.mean()) when every
    element is kept, 0 when none is; no device sync (both are computed, torch.where picks one)."""
    mean = values.mean() if mean is None else mean
    return torch.where(keep.all(), mean, _masked_mean(values, keep.to(values.dtype)))


def _mean_over_labelled_rows(losses: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean of the row losses over the rows of `t` (R, N) with a labelled pixel (a label >= 0)."""
    return _mean_where(losses, t.amax(dim=1) >= 0)


def lovasz_hinge(logits: torch.Tensor, targets: torch.Tensor, per_image: bool = True,
                 smooth: bool = True) -> torch.Tensor:
    """Lovasz hinge of (B, ...) logits vs targets in {0, 1, IGNORE_LABEL} -> scalar: the mean over images of the
    per-image loss on the labelled pixels (images without any left out; 0 when none has one) (per_image=True), or
    the loss of the whole batch flattened as one image."""
    x, t = _flat(logits, targets)
    if not per_image:
        x, t = x.reshape(1, -1), t.reshape(1, -1)
    return _mean_over_labelled_rows(_lovasz_rows(x, t, smooth, symmetric=False), t)


def symmetric_lovasz(logits: torch.Tensor, targets: torch.Tensor, per_image: bool = True,
                     ignore_empty: bool = False, smooth: bool = True) -> torch.Tensor:
    """(lovasz(logits, t) + lovasz(-logits, 1 - t)) / 2 -> scalar, on the labelled pixels (t in {0, 1,
    IGNORE_LABEL}), averaged over the images with a labelled pixel (0 when none has one). With ignore_empty=True
    the mean runs only over images with a labelled salt pixel (0 when none has); per_image=False treats the batch
    as one image."""
    x, t = _flat(logits, targets)
    if not per_image:
        x, t = x.reshape(1, -1), t.reshape(1, -1)
    losses = _lovasz_rows(x, t, smooth, symmetric=True)
    if ignore_empty:
        return _masked_mean(losses, (t.amax(dim=1) > 0).to(losses.dtype))
    return _mean_over_labelled_rows(losses, t)


def lovasz_hinge_reference(logits: torch.Tensor, targets: torch.Tensor, per_image: bool = True,
                           smooth: bool = True, symmetric: bool = False,
                           ignore_empty: bool = False) -> torch.Tensor:
    """Reference: a Python loop over images, autograd through the sort (the textbook implementation); an image's
    IGNORE_LABEL pixels are dropped before its loss, and an image left with none is skipped."""
    x, t = _flat(logits, targets)
    if not per_image:
        x, t = x.reshape(1, -1), t.reshape(1, -1)

    def one(xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        errors = 1.0 - xi * (2.0 * ti - 1.0)
        errors_sorted, perm = torch.sort(errors, descending=True)
        gt_sorted = ti[perm]
        gts = gt_sorted.sum()
        intersection = gts - gt_sorted.cumsum(0)
        union = gts + (1.0 - gt_sorted).cumsum(0)
        jaccard = 1.0 - intersection / union
        grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        return torch.dot(_hinge_fn(errors_sorted, smooth), grad)

    losses = []
    for xi, ti in zip(x, t, strict=True):
        keep = ti != IGNORE_LABEL
        if not keep.all():
            xi, ti = xi[keep], ti[keep]
        if ti.numel() == 0 or (ignore_empty and ti.sum() == 0):
            continue
        loss = one(xi, ti)
        if symmetric:
            loss = (loss + one(-xi, 1.0 - ti)) / 2
        losses.append(loss)
    if not losses:
        return x.sum() * 0.0
    return torch.stack(losses).mean()


class LovaszHinge(nn.Module):
    """nn.Module wrapper of `lovasz_hinge` (for configs); forward(logits, targets) -> scalar."""

    def __init__(self, per_image: bool = True, smooth: bool = True):
        super().__init__()
        self.per_image, self.smooth = per_image, smooth

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lovasz_hinge(logits, targets, self.per_image, self.smooth)


class SymmetricLovasz(nn.Module):
    """nn.Module wrapper of `symmetric_lovasz`; forward(logits, targets) -> scalar."""

    def __init__(self, per_image: bool = True, ignore_empty: bool = False, smooth: bool = True):
        super().__init__()
        self.per_image, self.ignore_empty, self.smooth = per_image, ignore_empty, smooth

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return symmetric_lovasz(logits, targets, self.per_image, self.ignore_empty, self.smooth)


def image_target(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image head's target from (B, ...) pixel labels in {0, 1, IGNORE_LABEL} -> (has_salt, known), bool (B, 1):
    salt (1) if some labelled pixel is salt; no salt (0) if every pixel is labelled and none is salt; unknown
    (known False, has_salt False) if no labelled pixel is salt but some pixel is not interpreted."""
    flat = target.flatten(1)
    has_salt = flat.amax(dim=1, keepdim=True) > 0
    return has_salt, has_salt | (flat.amin(dim=1, keepdim=True) >= 0)


class DeepSupervisionLoss(nn.Module):
    """The recipe's criterion on a SaltOutput (or a bare (B, 1, H, W) logit tensor) and (B, 1, H, W) targets in
    {0, 1, IGNORE_LABEL}:

    image_weight * BCE-with-logits(image logit, target non-empty)
    + pixel_weight * sum over the five pixel logits of symmetric_lovasz(ignore_empty=True)
    + final_weight * symmetric_lovasz(final logit)
    + bce_weight * BCE-with-logits(final logit, target)   (0 in the recipe; speeds up short runs from scratch).

    center_crop=101 crops logits and targets to the central 101 x 101 first (inputs padded to 128), so both the
    Lovasz terms and "non-empty" only see the real tile. A bare tensor gets the final term only. All six Lovasz
    terms share one sort over a (6B, HW) tensor. `reference=True` computes them with the per-image loop instead.

    Pixels labelled IGNORE_LABEL (not interpreted) are left out of every term: the Lovasz terms and the pixel BCE
    are those of the labelled pixels (an image without any drops out of the final term's mean; "empty" for
    ignore_empty means no labelled salt), and the image BCE runs over the images whose target `image_target`
    knows. Without IGNORE_LABEL in the targets every term is computed as before, to the bit.

    Args:
        image_weight: weight of the image head's BCE (is there salt in the tile).
        pixel_weight: weight of the sum of the five deep-supervision Lovasz terms (empty tiles ignored).
        final_weight: weight of the final logit's symmetric Lovasz term.
        center_crop: side in pixels of the central window scored (101 for pad); None: the whole map (resize).
        reference: compute the Lovasz terms with the per-image loop (slower, for tests).
        bce_weight: weight of a pixel BCE on the final logit (0 in the recipe).
    """

    def __init__(self, image_weight: float = 0.05, pixel_weight: float = 0.1, final_weight: float = 1.0,
                 center_crop: int | None = None, reference: bool = False, bce_weight: float = 0.0):
        super().__init__()
        self.image_weight, self.pixel_weight, self.final_weight = image_weight, pixel_weight, final_weight
        self.bce_weight = bce_weight
        self.center_crop = center_crop
        self.reference = reference

    def weights(self) -> dict[str, float]:
        """The terms' weights, for the run record (a config's `loss#bce_weight` shows up there)."""
        return {"image_weight": self.image_weight, "pixel_weight": self.pixel_weight,
                "final_weight": self.final_weight, "bce_weight": self.bce_weight}

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.center_crop is None else center_crop(x, self.center_crop)

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        if isinstance(output, torch.Tensor):
            logit, pixel_logits, image_logit = output, (), None
        else:
            logit, pixel_logits, image_logit = output
        target = self._crop(target)
        logits = [self._crop(x) for x in (logit, *pixel_logits)]
        for x in logits:
            if x.shape != target.shape:
                raise ValueError(f"logit {tuple(x.shape)} and target {tuple(target.shape)} differ after "
                                 f"center_crop={self.center_crop}")
        if self.reference:
            final = lovasz_hinge_reference(logits[0], target, symmetric=True)
            pixel = [lovasz_hinge_reference(x, target, symmetric=True, ignore_empty=True) for x in logits[1:]]
        else:
            final, pixel = self._lovasz_terms(logits, target)
        loss = self.final_weight * final
        if pixel:
            loss = loss + self.pixel_weight * sum(pixel)
        if image_logit is not None:
            has_salt, known = image_target(target)
            has_salt = has_salt.to(image_logit.dtype)
            bce = F.binary_cross_entropy_with_logits(image_logit, has_salt)
            bce = _mean_where(F.binary_cross_entropy_with_logits(image_logit, has_salt, reduction="none"), known,
                              mean=bce)
            loss = loss + self.image_weight * bce
        if self.bce_weight:
            x, t = logits[0].float(), target.float()
            bce = F.binary_cross_entropy_with_logits(x, t)
            bce = _mean_where(F.binary_cross_entropy_with_logits(x, t.clamp(min=0.0), reduction="none"),
                              t != IGNORE_LABEL, mean=bce)
            loss = loss + self.bce_weight * bce
        return loss

    @staticmethod
    def _lovasz_terms(logits: Sequence[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, list]:
        """(final symmetric Lovasz, [pixel terms with ignore_empty]) from one (len(logits) * B, HW) sort."""
        b = target.shape[0]
        t = target.reshape(b, -1).float()
        x = torch.cat([lg.reshape(b, -1).float() for lg in logits], dim=0)
        rows = _lovasz_rows(x, t.repeat(len(logits), 1), smooth=True, symmetric=True).view(len(logits), b)
        t_max = t.amax(dim=1)
        keep = (t_max > 0).to(rows.dtype)  # labelled salt
        return _mean_where(rows[0], t_max >= 0), [_masked_mean(r, keep) for r in rows[1:]]
