"""Small building blocks shared by the object-context block and the UNet: activated batch norm and conv+ABN."""

from __future__ import annotations

from torch import nn

LEAKY_SLOPE = 0.01


class ABN(nn.Sequential):
    """Activated batch norm: BatchNorm2d then LeakyReLU(0.01), the recipe's InPlace-ABN without the extension.

    The activation runs in place (it overwrites the BN output, which autograd does not need) to save one
    (B, C, H, W) buffer per layer; `inplace=False` gives the plain variant the benchmark compares against.
    """

    def __init__(self, channels: int, inplace: bool = True):
        super().__init__(nn.BatchNorm2d(channels), nn.LeakyReLU(LEAKY_SLOPE, inplace=inplace))


def conv_abn(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """conv(k x k, same padding, no bias: BN follows) + ABN; (B, in, H, W) -> (B, out, H, W)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    return nn.Sequential(conv, ABN(out_channels))


def set_inplace_activations(module: nn.Module, inplace: bool) -> nn.Module:
    """Switch every ABN activation below `module` to in-place or not (benchmarks build the plain reference)."""
    for m in module.modules():
        if isinstance(m, nn.LeakyReLU):
            m.inplace = inplace
    return module
