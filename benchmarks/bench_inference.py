"""Inference throughput on this CPU: flip TTA vs no TTA, and one doubled batch vs two forward passes.

The network is the CPU recipe's: backbone, num_filters and upsample_input of the training bundle's defaults,
overridden by configs/cpu.json when it exists (resnet18 with 8 filters when neither says); random weights,
eval mode, 128 x 128 inputs, batch 16. images/s = batch / time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.run import Case

BATCH = 16
REPO = Path(__file__).resolve().parents[1]
RECIPE_FILES = (REPO / "bundles" / "saltnet" / "configs" / "train.json", REPO / "configs" / "cpu.json")


def recipe_arch() -> dict:
    """SaltUNet kwargs of the CPU recipe (train.json defaults, then configs/cpu.json, when they exist)."""
    arch = {"backbone": "resnet18", "num_filters": 8}
    for f in RECIPE_FILES:
        if f.is_file():
            cfg = json.loads(f.read_text())
            arch.update({k: cfg[k] for k in ("backbone", "num_filters", "upsample_input") if k in cfg})
    return arch


def setup():
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    net = SaltUNet(pretrained=None, **recipe_arch()).eval()
    return net, torch.rand(BATCH, 3, 128, 128)


@torch.no_grad()
def with_tta(inputs):
    from saltkit.inference import FlipTTAInferer

    net, x = inputs
    return FlipTTAInferer(tta=True)(x, net)["prob"]


@torch.no_grad()
def without_tta(inputs):
    from saltkit.inference import FlipTTAInferer

    net, x = inputs
    return FlipTTAInferer(tta=False)(x, net)["prob"]


@torch.no_grad()
def tta_two_passes(inputs):
    net, x = inputs
    return (torch.sigmoid(net(x).logit) + torch.sigmoid(net(x.flip(-1)).logit).flip(-1)) / 2


def max_diff(a, b):
    return {"max_abs_diff": float((a - b).abs().max())}


def per_image(ours, base):
    return {"batch": BATCH, "arch": str(recipe_arch())}


CASES = [
    Case("inference_tta_vs_plain", setup, with_tta, without_tta, compare=per_image, repeat=4,
         notes=f"ours: flip TTA, baseline: no TTA; batch {BATCH} at 128px; images/s = batch / time"),
    Case("inference_tta_batched_vs_two_passes", setup, with_tta, tta_two_passes, compare=max_diff, repeat=4,
         notes="flip TTA as one doubled batch (ours) vs two forward passes"),
]

