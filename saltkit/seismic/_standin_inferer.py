"""Temporary stand-in for saltkit.inference.section_inferer (same signature) until it lands in main."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SlidingWindowInferer

from saltkit.geometry import pad_widths
from saltkit.inference.tta import split_output


class _StandIn(Inferer):
    def __init__(self, variant, tta=True, overlap=0.5, sw_batch_size=16):
        self.variant, self.tta = variant, tta
        roi = 128 if variant == "pad" else 101
        self.roi = roi
        self.sw = SlidingWindowInferer(roi_size=(roi, roi), sw_batch_size=sw_batch_size, overlap=overlap,
                                       mode="gaussian", padding_mode="reflect")

    def _prob(self, x, network):
        def net(w):
            if self.variant == "resize":
                w = F.interpolate(w, size=(128, 128), mode="bilinear", align_corners=False)
            p = torch.sigmoid(split_output(network(w))[0].float())
            if self.variant == "resize":
                p = F.interpolate(p, size=(self.roi, self.roi), mode="bilinear", align_corners=False)
            return p
        h, w = x.shape[-2:]
        ph = pad_widths(h, max(h, self.roi))
        pw = pad_widths(w, max(w, self.roi))
        xp = F.pad(x, (*pw, *ph), mode="reflect") if (sum(ph) + sum(pw)) and min(h, w) > self.roi // 2 else \
            F.pad(x, (*pw, *ph), mode="replicate")
        p = self.sw(xp, net)
        return p[..., ph[0]:ph[0] + h, pw[0]:pw[0] + w]

    @torch.no_grad()
    def __call__(self, inputs, network, *args, **kwargs):
        p = self._prob(inputs, network)
        if self.tta:
            p = (p + self._prob(inputs.flip(-1), network).flip(-1)) / 2
        return {"pred": p}


def section_inferer(variant, tta=True, overlap=0.5, sw_batch_size=16):
    return _StandIn(variant, tta, overlap, sw_batch_size)
