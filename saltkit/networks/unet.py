"""SaltUNet: encoder + object-context UNet decoder with hypercolumn, deep supervision and an image head.

Shapes for a 128 input, f = num_filters, upsample_input=True (the recipe): the tile is upsampled x2 to 256,
the encoder stages are at 64, 64, 32, 16, 8 px, the bottleneck at 8 px, d5..d1 at 16, 32, 64, 64, 128 px and
every logit at 128 px. With upsample_input=False the encoder sees the tile at its own size (4x less compute),
d1 is at H/2 and all logits are bilinearly upsampled to H x W.

Where the issue writes "+ABN" a conv is followed by BatchNorm + LeakyReLU(0.01); the other convs (OC value and
output projections, the decoder's ConvTranspose2d, pixel fusion, logit convs) have no norm or activation.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from saltkit.config import as_bool

from .blocks import conv_abn
from .encoders import IMAGENET_MEAN, IMAGENET_STD, build_encoder, stage_channels
from .object_context import ObjectContextBlock

INPUT_MULTIPLE = 32
HYPERCOLUMN_MODES = ("fused", "concat")
DEEP_SUPERVISION_MODES = ("hypercolumn", "native")


class SaltOutput(NamedTuple):
    """What SaltUNet returns (in train and eval mode alike); all logits are pre-sigmoid.

    logit: (B, 1, H, W) final salt logit; pixel_logits: five (B, 1, H, W) deep-supervision logits (from d1, d2, d3,
    d4, d5); image_logit: (B, 1) "is there any salt in the tile".
    """

    logit: torch.Tensor
    pixel_logits: tuple[torch.Tensor, ...]
    image_logit: torch.Tensor


class DecoderBlock(nn.Module):
    """concat(inputs) -> conv3x3(in -> mid) + ABN -> OC(mid, Ck = Cv = mid / 2) -> ConvTranspose2d(mid -> out, x2).

    (B, in, h, w) -> (B, out, 2h, 2w).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, dropout: float = 0.2,
                 attention: str = "sdpa", context_scale: int = 1):
        super().__init__()
        self.conv = conv_abn(in_channels, mid_channels)
        self.context = ObjectContextBlock(mid_channels, mid_channels // 2, mid_channels // 2, dropout, attention,
                                          context_scale)
        self.up = nn.ConvTranspose2d(mid_channels, out_channels, kernel_size=4, stride=2, padding=1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = torch.cat(inputs, dim=1) if len(inputs) > 1 else inputs[0]
        return self.up(self.context(self.conv(x)))


def pixel_head(in_channels: int, num_filters: int, dropout: float) -> nn.Sequential:
    """Dropout2d -> conv3x3(-> f) + ABN -> conv1x1(-> 1): (B, in, H, W) -> (B, 1, H, W) logit."""
    return nn.Sequential(nn.Dropout2d(dropout), conv_abn(in_channels, num_filters), nn.Conv2d(num_filters, 1, 1))


class SaltUNet(nn.Module):
    """The recipe's network; forward (B, 3, H, W) in [0, 1] (H, W multiples of 32) -> SaltOutput.

    The input is normalised with the ImageNet mean/std inside the network.
    `attention="plain"` swaps the fused attention for the reference implementation (same weights), and
    `set_hypercolumn("concat")` the low-resolution hypercolumn for the literal full-resolution one (same weights).

    Two cheaper variants (same weights, different function; the recipe is `fine_context_scale=1`,
    `deep_supervision="hypercolumn"`): `fine_context_scale` > 1 runs the finest object-context block (decoder1's,
    at a quarter of the encoder input) on its map max-pooled by that factor (OCNet's `scale`), and
    `deep_supervision="native"` runs the five deep-supervision heads on d1..d5 at their own resolutions instead of
    on the upsampled hypercolumn (their logits are upsampled; the final logit is unchanged).

    Args:
        backbone: the encoder (`saltkit.networks.encoders.available_backbones`, e.g. "senet154").
        pretrained: the encoder's weights: None (random), "imagenet" or a .pth path.
        num_filters: the decoder's width f (its blocks have multiples of f channels).
        head_dropout: dropout before the final and image heads (0..1).
        decoder_dropout: dropout in the decoder blocks' object-context attention (0..1).
        bottleneck_dropout: dropout in the bottleneck's object-context attention (0..1).
        upsample_input: upsample the input x2 before the encoder (the recipe); false: 4x less compute.
        attention: "sdpa" (fused) or "plain" (the reference implementation, same weights).
        fine_context_scale: max-pool factor of the finest object-context block's map (1: the recipe).
        deep_supervision: "hypercolumn" (the recipe) or "native" (heads at each decoder's own resolution).
    """

    def __init__(self, backbone: str = "senet154", pretrained: str | Path | None = None, num_filters: int = 16,
                 head_dropout: float = 0.5, decoder_dropout: float = 0.2, bottleneck_dropout: float = 0.05,
                 upsample_input: bool = True, attention: str = "sdpa", fine_context_scale: int = 1,
                 deep_supervision: str = "hypercolumn"):
        super().__init__()
        upsample_input = as_bool(upsample_input, "upsample_input")  # a config's true / false, 1 / 0 too
        if deep_supervision not in DEEP_SUPERVISION_MODES:
            raise ValueError(f"deep_supervision={deep_supervision!r}; expected one of {DEEP_SUPERVISION_MODES}")
        f = num_filters
        c0, c1, c2, c3, c4 = stage_channels(backbone)
        self._arch = {"backbone": backbone, "num_filters": num_filters, "head_dropout": head_dropout,
                      "decoder_dropout": decoder_dropout, "bottleneck_dropout": bottleneck_dropout,
                      "upsample_input": upsample_input}  # `attention` is a reference switch, not architecture
        if fine_context_scale != 1 or deep_supervision != "hypercolumn":  # recorded when not the recipe's, so the
            # recipe's checkpoints keep the arch they always had (and resume across versions)
            self._arch.update(fine_context_scale=fine_context_scale, deep_supervision=deep_supervision)
        self.deep_supervision = deep_supervision
        self.upsample_input = upsample_input
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.encoder = build_encoder(backbone, pretrained)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(c4, 32 * f, 3, padding=1, bias=False), nn.BatchNorm2d(32 * f),
            ObjectContextBlock(32 * f, 16 * f, 16 * f, bottleneck_dropout, attention),
        )
        dec = {"dropout": decoder_dropout, "attention": attention}
        self.centre = DecoderBlock(32 * f, 16 * f, 8 * f, **dec)
        self.decoder5 = DecoderBlock(8 * f + 32 * f, 16 * f, 8 * f, **dec)
        self.decoder4 = DecoderBlock(8 * f + c3, 16 * f, 4 * f, **dec)
        self.decoder3 = DecoderBlock(4 * f + c2, 8 * f, 2 * f, **dec)
        self.decoder2 = nn.Sequential(conv_abn(2 * f + c1, 4 * f), conv_abn(4 * f, f))
        self.decoder1 = DecoderBlock(f + c0, 2 * f, f, **dec, context_scale=fine_context_scale)
        # hypercolumn [d1, u2, u3, u4, u5] channels
        hyper = (f, f, 2 * f, 4 * f, 8 * f)
        self.pixel_heads = nn.ModuleList(pixel_head(c, f, head_dropout) for c in hyper)
        self.pixel_fusion = nn.Sequential(nn.Dropout2d(head_dropout), nn.Conv2d(sum(hyper), 64, 1))
        self.image_fusion = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(32 * f, 32), nn.ReLU(inplace=True))
        self.image_logit = nn.Linear(32, 1)
        self.final = pixel_head(64 + 32, f, head_dropout)
        self.hypercolumn = "fused"

    @property
    def arch(self) -> dict:
        """Constructor kwargs that rebuild this architecture (weights excluded: pretrained is always None)."""
        return dict(self._arch)

    def set_attention(self, attention: str) -> None:
        """Switch every OC block between "sdpa" and "plain" (same weights; a test and benchmark switch, so not
        recorded in `arch`: a checkpoint carries no reference switches)."""
        for m in self.modules():
            if isinstance(m, ObjectContextBlock):
                ObjectContextBlock.check_attention(attention)
                m.attention = attention

    def set_hypercolumn(self, mode: str) -> None:
        """"fused" (default) or "concat": two computations of the same heads and pixel fusion (same weights)."""
        if mode not in HYPERCOLUMN_MODES:
            raise ValueError(f"hypercolumn={mode!r}; expected one of {HYPERCOLUMN_MODES}")
        self.hypercolumn = mode

    def _hypercolumn_concat(self, ds: list[torch.Tensor], size: torch.Size, heads: bool = True):
        """The recipe as written: upsample d2..d5 to d1's size, heads on each, dropout + conv1x1 on the concat.
        `heads=False` leaves the heads out (their logits list is empty)."""
        hyper = [d if d.shape[-2:] == size else _upsample(d, size) for d in ds]
        pixel_logits = [head(h) for head, h in zip(self.pixel_heads, hyper, strict=True)] if heads else []
        return pixel_logits, self.pixel_fusion(torch.cat(hyper, dim=1))

    def _hypercolumn_fused(self, ds: list[torch.Tensor], size: torch.Size, heads: bool = True):
        """The same function with less full-resolution work.

        Bilinear upsampling acts on each channel alone, so channel dropout and the 1x1 fusion conv commute with it.
        A low-resolution part with at least as many channels as the fusion's 64 outputs (d5: 128 channels when
        f = 16, 64 when f = 8) is therefore dropped out and projected at its own resolution (its slice of the
        fusion weight) and upsampled as 64 channels, never more than it has; its head drops out before upsampling
        too. The other parts are concatenated at full resolution as written.
        """
        drop, conv = self.pixel_fusion
        project = [d.shape[-2:] != size and d.shape[1] >= conv.out_channels for d in ds]
        if not any(project):
            return self._hypercolumn_concat(ds, size, heads)
        weights = conv.weight.split([d.shape[1] for d in ds], dim=1)
        pixel_logits, full, full_weights, projected = [], [], [], []
        for head, d, w, low_res in zip(self.pixel_heads, ds, weights, project, strict=True):
            if low_res:
                if heads:
                    pixel_logits.append(head[2](head[1](_upsample(head[0](d), size))))
                projected.append(_upsample(F.conv2d(drop(d), w), size))
            else:
                u = d if d.shape[-2:] == size else _upsample(d, size)
                if heads:
                    pixel_logits.append(head(u))
                full.append(u)
                full_weights.append(w)
        fusion = F.conv2d(drop(torch.cat(full, dim=1)), torch.cat(full_weights, dim=1), conv.bias)
        for p in projected:
            fusion = fusion + p
        return pixel_logits, fusion

    def _final_fused(self, pixel_fusion: torch.Tensor, image_fusion: torch.Tensor) -> torch.Tensor:
        """The final head on concat[pixel_fusion, image_fusion broadcast over H x W] without building the broadcast.

        The image part is constant over the map, so its share of the 3x3 conv is, at each pixel, the sum of its
        kernel taps that fall inside the map (zero padding) times the image vector: a (B, out, 3, 3) product
        spread by two 0/1 tap masks. Channel dropout on a constant channel is dropout on the vector.
        """
        drop, conv_bn, out = self.final
        conv, abn = conv_bn[0], conv_bn[1]
        w_pixel, w_image = conv.weight.split([pixel_fusion.shape[1], image_fusion.shape[1]], dim=1)
        x = F.conv2d(drop(pixel_fusion), w_pixel, None, conv.stride, conv.padding)
        image = drop(image_fusion[:, :, None, None])[:, :, 0, 0]
        taps = torch.einsum("oikl,bi->bokl", w_image, image)
        rows = _inside_taps(x.shape[-2], conv.kernel_size[0], conv.padding[0], x)
        cols = _inside_taps(x.shape[-1], conv.kernel_size[1], conv.padding[1], x)
        return out(abn(x + torch.einsum("bokl,ky,lx->boyx", taps, rows, cols)))

    def forward(self, x: torch.Tensor) -> SaltOutput:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % INPUT_MULTIPLE or x.shape[3] % INPUT_MULTIPLE:
            raise ValueError(f"SaltUNet expects (B, 3, H, W) with H and W multiples of {INPUT_MULTIPLE} "
                             f"(pad or resize 101 px tiles to 128); got {tuple(x.shape)}")
        size = x.shape[-2:]
        if not self.upsample_input and min(size) < 2 * INPUT_MULTIPLE:
            raise ValueError(f"SaltUNet(upsample_input=False) needs H and W >= {2 * INPUT_MULTIPLE} (the centre block "
                             f"pools the 1/32 map once more); got {tuple(x.shape)}")
        x = (x - self.mean) / self.std
        if self.upsample_input:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        e0, e1, e2, e3, e4 = self.encoder(x)
        bottleneck = self.bottleneck(e4)
        # an odd bottleneck (an odd multiple of 32 px without upsample_input: 96 px -> 3 px) pools up and the
        # centre's x2 output is cropped back to it; even sizes (every 128 px input) are unchanged
        h, w = bottleneck.shape[-2:]
        centre = self.centre(F.max_pool2d(bottleneck, 2, ceil_mode=True))[..., :h, :w]
        d5 = self.decoder5(centre, bottleneck)
        d4 = self.decoder4(d5, e3)
        d3 = self.decoder3(d4, e2)
        d2 = self.decoder2(torch.cat([d3, e1], dim=1))
        d1 = self.decoder1(d2, e0)
        d_size = d1.shape[-2:]
        ds = [d1, d2, d3, d4, d5]
        hypercolumn = self._hypercolumn_fused if self.hypercolumn == "fused" else self._hypercolumn_concat
        native = self.deep_supervision == "native"
        pixel_logits, pixel_fusion = hypercolumn(ds, d_size, heads=not native)
        if native:
            pixel_logits = [head(d) for head, d in zip(self.pixel_heads, ds, strict=True)]
        image_fusion = self.image_fusion(F.adaptive_avg_pool2d(bottleneck, 1).flatten(1))
        image_logit = self.image_logit(image_fusion)
        if self.hypercolumn == "fused":
            logit = self._final_fused(pixel_fusion, image_fusion)
        else:
            broadcast = image_fusion[:, :, None, None].expand(-1, -1, *d_size)
            logit = self.final(torch.cat([pixel_fusion, broadcast], dim=1))
        if d_size != size:  # upsample_input=False: heads ran at H/2, logits are resized to the input
            logit = F.interpolate(logit, size=size, mode="bilinear", align_corners=False)
        pixel_logits = [p if p.shape[-2:] == size else _upsample(p, size) for p in pixel_logits]
        return SaltOutput(logit, tuple(pixel_logits), image_logit)


def _inside_taps(length: int, kernel: int, padding: int, like: torch.Tensor) -> torch.Tensor:
    """(kernel, length) 0/1: whether tap k of a stride-1 conv at output position y reads inside the map."""
    pos = torch.arange(length, device=like.device)[None, :] + torch.arange(kernel, device=like.device)[:, None]
    return ((pos >= padding) & (pos < length + padding)).to(like.dtype)


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def network_from_arch(arch: dict, pretrained: str | Path | None = None) -> SaltUNet:
    """Rebuild a SaltUNet from `SaltUNet.arch` (as stored in checkpoints under "arch"); weights come separately."""
    arch = dict(arch)
    arch.pop("pretrained", None)  # tolerate an arch written with the ctor's pretrained value
    arch.pop("attention", None)  # older checkpoints recorded the reference switch; it changes no weight
    unknown = set(arch) - set(inspect.signature(SaltUNet).parameters)
    if unknown:
        raise ValueError(f"arch has unknown keys {sorted(unknown)}; expected SaltUNet constructor arguments")
    return SaltUNet(pretrained=pretrained, **arch)
