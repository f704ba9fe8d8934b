"""Object context (OC) block: self-attention over all positions of a feature map (OCNet's base OC module)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ABN

ATTENTION_MODES = ("sdpa", "plain")


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention softmax(Q K^T / sqrt(Ck)) V with the (L, L) matrix materialised.

    q, k: (B, L, Ck); v: (B, L, Cv) -> (B, L, Cv).
    """
    sim = torch.bmm(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5
    return torch.bmm(torch.softmax(sim, dim=-1), v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same attention through `scaled_dot_product_attention` (fused kernel, no (L, L) matrix kept).

    q, k: (B, L, Ck); v: (B, L, Cv) -> (B, L, Cv). Inputs must be contiguous: strided views take a slow path.
    """
    out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
    return out.squeeze(1)


class ObjectContextBlock(nn.Module):
    """OC block on (B, C, H, W) -> (B, C, H, W).

    key = query = conv1x1(C -> Ck) + ABN (one shared projection); value = conv1x1(C -> Cv);
    context = softmax(Q K^T / sqrt(Ck)) V over all H*W positions, then conv1x1(Cv -> C) initialised to zero
    (the block starts as a pass-through of its input); output = conv1x1(concat[context, x] -> C) + ABN + Dropout2d.
    `attention` picks "sdpa" (fast) or "plain" (the reference the tests compare against).
    `scale` > 1 is OCNet's `scale`: the attention runs on the map max-pooled by `scale` (scale^4 times less work)
    and its context is upsampled bilinearly back to H x W (H and W multiples of `scale`); 1 is the recipe.
    """

    def __init__(self, channels: int, key_channels: int, value_channels: int, dropout: float = 0.0,
                 attention: str = "sdpa", scale: int = 1):
        super().__init__()
        self.check_attention(attention)
        if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
            raise ValueError(f"scale={scale!r}; expected an integer >= 1")
        self.attention = attention
        self.scale = scale
        self.key = nn.Sequential(nn.Conv2d(channels, key_channels, 1, bias=False), ABN(key_channels))
        self.value = nn.Conv2d(channels, value_channels, 1)
        self.out = nn.Conv2d(value_channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.fuse = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False), ABN(channels),
                                  nn.Dropout2d(dropout))

    @staticmethod
    def check_attention(attention: str) -> None:
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention={attention!r}; expected one of {ATTENTION_MODES}")

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output before the zero-initialised projection: (B, C, H, W) -> (B, Cv, H, W)."""
        if self.scale > 1:
            size = x.shape[-2:]
            if size[0] % self.scale or size[1] % self.scale:
                raise ValueError(f"object context with scale {self.scale} needs H and W multiples of {self.scale}; "
                                 f"got {tuple(size)}")
            ctx = self._attend(F.max_pool2d(x, self.scale))
            return F.interpolate(ctx, size=size, mode="bilinear", align_corners=False)
        return self._attend(x)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # (B, C', H, W) -> (B, HW, C') made contiguous once; q and k are the same tensor
        qk = self.key(x).flatten(2).transpose(1, 2).contiguous()
        v = self.value(x).flatten(2).transpose(1, 2).contiguous()
        attend = sdpa_attention if self.attention == "sdpa" else plain_attention
        ctx = attend(qk, qk, v)
        return ctx.transpose(1, 2).reshape(b, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.out(self.context(x))
        return self.fuse(torch.cat([ctx, x], dim=1))
