"""Networks for tests that exercise data paths, not the model: same output type as SaltUNet, milliseconds a call."""

from __future__ import annotations

import torch
from torch import nn

from saltkit.networks.unet import SaltOutput


class TinyConv(nn.Module):
    """One 5x5 convolution, (B, 3, H, W) in [0, 1] -> SaltOutput with a (B, 1, H, W) logit (seeded weights)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 1, 5, padding=2)

    def forward(self, x):
        logit = 4 * self.conv(x - 0.5)
        return SaltOutput(logit, (logit,), logit.mean((2, 3)))
