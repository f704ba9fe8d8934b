"""Data pipeline vs training step: the loader must never be the bottleneck.

Both sides are built from the bundle itself (train.json + configs/cpu.json + configs/pad.json on the shipped
sample), so they time exactly what a CPU training run does:
- pipeline_vs_train_step: ours = random transforms + collate for one batch of cached tiles (what the loader does
  per iteration, in the main process since num_workers is 0 on CPU); baseline = one train step of the CPU recipe
  (forward, deep-supervision loss, backward, AdamW) on that batch. ratio = how many times faster the loader
  produces batches than the trainer consumes them (> 1: the loader is not the bottleneck).
- pipeline_track_meta: the same transforms with MONAI MetaTensor tracking off (what train.json sets) vs on.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.data import list_data_collate, set_track_meta

from benchmarks.run import Case

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "bundles/saltnet/configs/train.json", REPO / "configs/cpu.json", REPO / "configs/pad.json"]


def bundle_parser(**overrides) -> ConfigParser:
    """The CPU recipe's training bundle, parsed (`overrides`: top-level keys set first, e.g. amp="true")."""
    parser = ConfigParser()
    parser.read_config([str(c) for c in CONFIGS])
    # folds of the sample in a temporary folder, so the benchmark leaves nothing behind
    parser["folds_csv"] = str(Path(tempfile.mkdtemp(prefix="saltkit_bench_")) / "folds.csv")
    for key, value in overrides.items():
        parser[key] = value
    parser.parse()
    return parser


def setup(**overrides) -> dict:
    torch.manual_seed(0)
    parser = bundle_parser(**overrides)
    dataset = parser.get_parsed_content("train#dataset")  # caches the deterministic prefix (loading)
    batch_size = parser.get_parsed_content("batch_size")
    network = parser.get_parsed_content("network")
    return {
        "dataset": dataset, "batch_size": batch_size, "network": network,
        "loss": parser.get_parsed_content("loss"), "optimizer": parser.get_parsed_content("optimizer"),
        "batch": list_data_collate([dataset[i] for i in range(batch_size)]),
        "memory_format": parser.get_parsed_content("to_kwargs")["memory_format"],
        "inferer": parser.get_parsed_content("train#inferer"),  # the trainer's: autocast as `amp` chose
        "recipe": f"{parser['backbone']} f={parser['num_filters']} upsample_input={parser['upsample_input']} "
                  f"batch {batch_size}",
    }


def augment_batch(inputs: dict, track_meta: bool = False) -> dict:
    """Random transforms of `batch_size` cached tiles and their collation (one loader batch)."""
    set_track_meta(track_meta)
    try:
        ds, n = inputs["dataset"], inputs["batch_size"]
        return list_data_collate([ds[i % len(ds)] for i in range(n)])
    finally:
        set_track_meta(True)


def train_step(inputs: dict) -> float:
    net, loss_fn, opt, batch = inputs["network"], inputs["loss"], inputs["optimizer"], inputs["batch"]
    net.train()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(batch["image"]), batch["label"])
    loss.backward()
    opt.step()
    return float(loss.detach())


PIPELINE_VS_STEP = Case(
    name="pipeline_vs_train_step",
    setup=setup,
    ours=augment_batch,
    baseline=train_step,
    compare=lambda batch, _loss: {"batch_size": len(batch["image"])},
    baseline_name="one train step of the CPU recipe",
    notes="ours: random transforms + collate of one batch (configs/cpu.json); baseline: one train step on it; "
          "images/s = batch_size / time; ratio > 1 means the loader outpaces training",
    repeat=3,
)

TRACK_META = Case(
    name="pipeline_track_meta",
    setup=setup,
    ours=lambda inputs: augment_batch(inputs, track_meta=False),
    baseline=lambda inputs: augment_batch(inputs, track_meta=True),
    baseline_name="MetaTensor tracking on",
    notes="random transforms of one batch with MetaTensor tracking off (train.json) vs on (MONAI default)",
    repeat=3,
)

CASES = [PIPELINE_VS_STEP, TRACK_META]
