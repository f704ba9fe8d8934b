"""Inference throughput on this CPU: flip TTA vs no TTA, one doubled batch vs two forward passes, and ONNX Runtime
vs torch eager.

The network is the CPU recipe's: backbone, num_filters and upsample_input of the training bundle's defaults,
overridden by configs/cpu.json when it exists (resnet18 with 8 filters when neither says); random weights,
eval mode, in channels_last layout on the CPU as the bundles run it (`torch_network`), 128 x 128 inputs,
batch 16. images/s = batch / time.

inference_onnxruntime_vs_torch: the same network exported with `saltkit export --format onnx` and run by
OnnxRuntimeNetwork vs the torch network as the bundles run it on the CPU (channels_last), both with 2 threads, on
the test tiles of $SALTKIT_DATA, else the sample's (reflect-padded to 128 as the pad variant): each round
takes the next batch of 32 tiles, and each side predicts it with flip TTA (the tiles and their mirror images
in one batch, probabilities averaged).
tiles/s = 32 / time.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_data import data_with
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


def recipe_network() -> torch.nn.Module:
    """The CPU recipe's SaltUNet (random weights, seed 0) in eval mode, as the bundles run it on the CPU
    (`torch_network`: channels_last)."""
    from saltkit.inference.runtime import torch_network
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    return torch_network(SaltUNet(pretrained=None, **recipe_arch()).eval(), "cpu")


def setup():
    return recipe_network(), torch.rand(BATCH, 3, 128, 128)


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
    return {"per_round": BATCH, "per_round_unit": "tiles", "arch": str(recipe_arch())}


# ---------------------------------------------------------------- ONNX Runtime vs torch eager
ORT_BATCH = 32
THREADS = 2


def test_tiles() -> tuple[np.ndarray, str]:
    """The test tiles of $SALTKIT_DATA as uint8 (N, 101, 101) (the shipped sample's when it is not set)."""
    from saltkit.data.layout import load_image, test_items

    root = data_with("test/images")
    tiles = np.stack([load_image(it["image"]) for it in test_items(root)])
    return tiles, f"{len(tiles)} test tiles of {root}"


def runtime_setup() -> dict:
    """The CPU recipe network (random weights) as a checkpoint, its ONNX export, both runtimes, and the tiles."""
    from saltkit.checkpoints import load_network
    from saltkit.export import export_onnx
    from saltkit.inference.onnx_runtime import OnnxRuntimeNetwork
    from saltkit.inference.runtime import torch_network
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    net = SaltUNet(pretrained=None, **recipe_arch())
    with tempfile.TemporaryDirectory(prefix="saltkit_bench_onnx_") as folder:  # both runtimes load into memory
        ckpt = Path(folder) / "model.pt"
        torch.save({"network": net.state_dict(), "arch": net.arch, "variant": "pad"}, ckpt)
        model, difference = export_onnx(ckpt, Path(folder) / "model.onnx")
        # the torch network as the bundles run it on the CPU (channels_last, `torch_network`)
        runtimes = {"torch": torch_network(load_network(ckpt), "cpu"), "onnxruntime": OnnxRuntimeNetwork(model, threads=THREADS)}
    tiles, source = test_tiles()
    return {**runtimes, "tiles": tiles, "source": source, "export_difference": difference,
            "cursor": {"torch": 0, "onnxruntime": 0}}


def padded_batch(tiles: np.ndarray, start: int) -> torch.Tensor:
    """Tiles [start, start + ORT_BATCH) (wrapping) as (B, 3, 128, 128) floats in [0, 1], reflect-padded."""
    from saltkit.geometry import pad_widths

    idx = np.arange(start, start + ORT_BATCH) % len(tiles)
    grey = torch.from_numpy(tiles[idx]).float().div_(255.0)[:, None]
    before, after = pad_widths(grey.shape[-1], 128)
    return torch.nn.functional.pad(grey, (before, after, before, after), mode="reflect").expand(-1, 3, -1, -1)


def runtime_side(name: str):
    def run(inputs: dict):
        from saltkit.inference import FlipTTAInferer

        start = inputs["cursor"][name]
        inputs["cursor"][name] += ORT_BATCH  # each round, the next batch of tiles (the same for both sides)
        threads = torch.get_num_threads()
        torch.set_num_threads(THREADS)
        try:
            with torch.no_grad():
                return FlipTTAInferer(tta=True)(padded_batch(inputs["tiles"], start), inputs[name])["prob"]
        finally:
            torch.set_num_threads(threads)

    return run


def runtime_describe(inputs: dict) -> dict:
    return {"per_round": ORT_BATCH, "per_round_unit": "tiles", "threads": THREADS, "tiles": inputs["source"],
            "arch": str(recipe_arch()), "export_max_prob_diff": inputs["export_difference"]}


CASES = [
    Case("inference_tta_vs_plain", setup, with_tta, without_tta, compare=per_image, repeat=4, baseline_name="no TTA",
         notes=f"ours: flip TTA, baseline: no TTA; batch {BATCH} at 128px; images/s = batch / time"),
    Case("inference_tta_batched_vs_two_passes", setup, with_tta, tta_two_passes, compare=max_diff, repeat=4,
         baseline_name="two forward passes",
         notes="flip TTA as one doubled batch (ours) vs two forward passes"),
    Case("inference_onnxruntime_vs_torch", runtime_setup, runtime_side("onnxruntime"), runtime_side("torch"),
         compare=max_diff, describe=runtime_describe, repeat=5, baseline_name="torch eager (2 threads)",
         notes=f"flip TTA on batches of {ORT_BATCH} test tiles, {THREADS} threads each: ONNX Runtime (ours) "
               "vs torch eager; ratio > 1: ONNX Runtime is faster"),
]

