"""Inference as an engine workflow vs the hand-written loop it replaced, on the same test tiles.

ours: `python -m monai.bundle run inference` as a user runs it (SupervisedEvaluator, FlipTTAInferer, post
transforms per tile, PredictionWriter). baseline: the previous loop, written out here: a DataLoader, the tile and
its mirror in one forward pass, probabilities flipped back and averaged, cropped to the tile, thresholded, then
the same probabilities .npz and submission CSV. Both use the CPU recipe's network (random weights; channels_last
on the CPU, as the bundle runs it), flip TTA, batch 32, the test tiles of $SALTKIT_DATA when set (else the 20
of the shipped sample); SALTKIT_BENCH_TILES=N takes the first N of them (a quicker run on a busy machine).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_data import data_with
from benchmarks.bench_inference import recipe_arch
from benchmarks.run import Case

REPO = Path(__file__).resolve().parents[1]
BATCH = 32


def setup():
    from saltkit.data import test_items
    from saltkit.networks import SaltUNet

    data = data_with("test/images")
    work = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    limit = int(os.environ.get("SALTKIT_BENCH_TILES", "0"))
    if limit:  # a dataset folder holding the first `limit` test tiles
        subset = work / "data" / "test" / "images"
        subset.mkdir(parents=True)
        for item in test_items(data)[:limit]:
            (subset / Path(item["image"]).name).symlink_to(item["image"])
        data = work / "data"
    torch.manual_seed(0)
    net = SaltUNet(pretrained=None, **recipe_arch()).eval()
    ckpt = work / "model.pt"
    torch.save({"network": net.state_dict(), "arch": net.arch, "variant": "pad"}, ckpt)
    return {"data": str(data), "ckpt": ckpt, "work": work, "tiles": len(test_items(data))}


def engine(inputs):
    from monai.bundle import run

    out = inputs["work"] / "engine"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run("inference", config_file=str(REPO / "bundles/saltnet/configs/inference.json"), ckpt=str(inputs["ckpt"]),
            dataset_dir=inputs["data"], output_dir=str(out), batch_size=BATCH, progress=False)
    return out


@torch.no_grad()
def loop(inputs):
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, EnsureTyped

    from saltkit.checkpoints import load_network
    from saltkit.data import test_items
    from saltkit.inference import Probabilities, save_probabilities
    from saltkit.inference.ensemble import write_prediction
    from saltkit.inference.postprocess import PostProcessingSettings
    from saltkit.inference.runtime import torch_network
    from saltkit.transforms import LoadTiled, network_input_transform

    items = test_items(inputs["data"])
    chain = Compose([LoadTiled(keys="image", channels=3), network_input_transform("pad", "image"),
                     EnsureTyped(keys="image", track_meta=False)])
    network = torch_network(load_network(inputs["ckpt"]), "cpu")  # the layout the bundle runs it in
    ids, probs, image_probs = [], [], []
    for batch in DataLoader(Dataset(items, chain), batch_size=BATCH, shuffle=False, num_workers=0):
        x = batch["image"].float()
        out = network(torch.cat([x, x.flip(-1)]))
        p, ip = torch.sigmoid(out.logit), torch.sigmoid(out.image_logit).reshape(-1)
        b = len(x)
        probs.append(((p[:b] + p[b:].flip(-1)) / 2)[:, 0, 13:114, 13:114].numpy())
        image_probs.append(((ip[:b] + ip[b:]) / 2).numpy())
        ids.extend(batch["id"])
    out = inputs["work"] / "loop"
    out.mkdir(exist_ok=True)
    pred = Probabilities(np.asarray(ids), np.concatenate(probs), np.concatenate(image_probs))
    save_probabilities(out / "probabilities.npz", pred)
    write_prediction(pred, out / "submission.csv", PostProcessingSettings(), [it["id"] for it in items])
    return out


def compare(ours: Path, base: Path, inputs=None) -> dict:
    same = (ours / "submission.csv").read_bytes() == (base / "submission.csv").read_bytes()
    return {"identical_submission": same}


def _case():
    state = {}

    def setup_once():
        state.update(setup())
        return state

    def with_rates(ours, base):
        row = compare(ours, base)
        row["tiles"] = state["tiles"]
        return row

    return Case("inference_engine_vs_loop", setup_once, engine, loop, compare=with_rates, repeat=2,
                notes="inference bundle (SupervisedEvaluator + FlipTTAInferer) vs the former hand-written loop; "
                      "flip TTA, batch 32, outputs written; img/s = tiles / time")


CASES = [_case()]
