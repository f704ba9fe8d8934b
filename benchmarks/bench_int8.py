"""The four CPU inference paths side by side: ONNX Runtime INT8 (ours), ONNX Runtime float32 (the baseline: the
fastest path before INT8), torch float32 and torch bf16 (`torch.autocast("cpu", dtype=torch.bfloat16)` around the
network's forward, as `amp` runs it), all with flip TTA and 2 threads, timed in the same interleaved rounds; each
ratio is the median over rounds of the ONNX Runtime float32 time / that path's time.

inference_int8_four_ways: each round, the next batch of 32 test tiles (bench_inference's: $SALTKIT_DATA's or
the sample's, reflect-padded to 128) predicted with
flip TTA by each path; tiles/s = 32 / time. section_int8_four_ways: a 1010 x 1010 real section (bench_seismic's)
predicted whole by the section inferer (128 px windows, overlap 0.5, flip TTA) by each path.

The network: a trained checkpoint given by SALTKIT_BENCH_CKPT (its float32 and INT8 ONNX exports beside it are
reused, or made there as `--runtime onnxruntime` / `onnxruntime-int8` make them; the INT8 export calibrates and is
checked on the checkpoint's fold), and then the INT8 model's metric change on the validation fold (from its
metadata) is reported next to the times. Without it, the CPU recipe's network with random weights (as the other
inference benchmarks), calibrated on the shipped sample's training tiles of fold 0, and no metric (random weights
predict nothing worth scoring).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_inference import padded_batch, recipe_arch, test_tiles
from benchmarks.run import Case

THREADS = 2
BATCH = 32
CKPT_ENV = "SALTKIT_BENCH_CKPT"
SIDES = ("int8", "onnxruntime", "torch", "torch_bf16")
SIDE_NOTES = {"torch": "torch float32 (channels_last)", "torch_bf16": "torch bf16 autocast (channels_last)"}
# the processor flags of native INT8 dot products (VNNI) and bf16 arithmetic: without them, ONNX Runtime's INT8 runs
# AVX2 integer code and torch emulates bf16
UNIT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")


def unit_flags() -> str:
    from saltkit.precision import cpu_flags

    found = [f for f in UNIT_FLAGS if f in cpu_flags()]
    return " ".join(found) if found else "none of " + "/".join(UNIT_FLAGS)


@functools.lru_cache(maxsize=1)
def networks() -> dict:
    """The four networks of the checkpoint (SALTKIT_BENCH_CKPT, or the CPU recipe's with random weights) and what
    describes them."""
    from saltkit.checkpoints import load_network
    from saltkit.inference.runtime import inference_network, torch_network

    given = os.environ.get(CKPT_ENV)
    if given:
        ckpt = Path(given)
        int8 = inference_network("onnxruntime-int8", None, ckpt, "cpu", threads=THREADS)
        onnx = inference_network("onnxruntime", None, ckpt, "cpu", threads=THREADS)
        q = int8.metadata["quantization"]
        about = {"checkpoint": str(ckpt), "metric_float32": q["metric_float32"], "metric_int8": q["metric_int8"],
                 "metric_change": round(q["metric_int8"] - q["metric_float32"], 4),
                 "validation_tiles": q["validation_tiles"], "calibration_tiles": q["calibration_tiles"]}
    else:
        int8, onnx, ckpt = random_recipe_models()
        about = {"checkpoint": f"CPU recipe {recipe_arch()}, random weights", "metric_change": "none (random weights)"}
    net = torch_network(load_network(ckpt), "cpu")
    about["cpu_flags"] = unit_flags()
    return {"int8": int8, "onnxruntime": onnx, "torch": net, "torch_bf16": net, "about": about}


def random_recipe_models():
    """The CPU recipe's network (random weights, seed 0) saved as a checkpoint in a temporary folder, its float32
    export and its INT8 export (calibrated on the shipped sample's fold-0 training tiles, no metric limit)."""
    from saltkit.data.layout import sample_dir
    from saltkit.export import export_onnx
    from saltkit.inference.onnx_runtime import OnnxRuntimeNetwork
    from saltkit.inference.quantize import export_int8
    from saltkit.networks import SaltUNet

    folder = Path(tempfile.mkdtemp(prefix="saltkit_bench_int8_"))
    atexit.register(shutil.rmtree, folder, True)
    torch.manual_seed(0)
    net = SaltUNet(pretrained=None, **recipe_arch())
    ckpt = folder / "model.pt"
    torch.save({"network": net.state_dict(), "arch": net.arch, "variant": "pad"}, ckpt)
    float_model, _ = export_onnx(ckpt, folder / "model.onnx")
    int8 = export_int8(ckpt, folder / "model.int8.onnx", dataset_dir=sample_dir(), fold=0,
                       folds_csv=folder / "folds.csv", max_metric_loss=float("inf"), threads=THREADS)
    return (OnnxRuntimeNetwork(int8.path, threads=THREADS), OnnxRuntimeNetwork(float_model, threads=THREADS), ckpt)


def side_inferer(name: str, section: bool):
    from monai.inferers import SimpleInferer

    from saltkit.inference import AutocastInferer, FlipTTAInferer, section_inferer

    dtype = torch.bfloat16 if name == "torch_bf16" else None
    if section:
        return section_inferer("pad", tta=True, overlap=0.5, autocast=dtype)
    return FlipTTAInferer(AutocastInferer(SimpleInferer(), dtype), tta=True)


def with_threads(run):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.no_grad():
            return run()
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- test tiles


def tiles_setup() -> dict:
    tiles, source = test_tiles()
    return {**networks(), "tiles": tiles, "source": source, "cursor": dict.fromkeys(SIDES, 0),
            "inferers": {name: side_inferer(name, section=False) for name in SIDES}}


def tiles_side(name: str):
    def run(inputs: dict):
        start = inputs["cursor"][name]
        inputs["cursor"][name] += BATCH  # each round, the next batch of tiles (the same for every side)
        batch = padded_batch(inputs["tiles"], start)
        return with_threads(lambda: inputs["inferers"][name](batch, inputs[name])["prob"])

    return run


def tiles_describe(inputs: dict) -> dict:
    return {"per_round": BATCH, "per_round_unit": "tiles", "threads": THREADS, "tiles": inputs["source"],
            **inputs["about"], "side_notes": SIDE_NOTES}


# ---------------------------------------------------------------- a 1010 x 1010 section


def section_setup() -> dict:
    from benchmarks.bench_seismic import section_inputs

    section = section_inputs()
    return {**networks(), "grey": section["grey"], "source": section["source"],
            "inferers": {name: side_inferer(name, section=True) for name in SIDES}}


def section_side(name: str):
    def run(inputs: dict):
        from saltkit.seismic.sections import predict_section

        return with_threads(lambda: torch.as_tensor(predict_section(inputs[name], inputs["inferers"][name],
                                                                    inputs["grey"])))

    return run


def section_describe(inputs: dict) -> dict:
    return {"per_round": 1, "per_round_unit": "sections", "threads": THREADS, "section": inputs["source"],
            **inputs["about"], "side_notes": SIDE_NOTES}


def probability_difference(int8, float32) -> dict:
    """INT8 against ONNX Runtime float32 on the last round's input: max and mean absolute probability difference."""
    diff = (torch.as_tensor(int8).float() - torch.as_tensor(float32).float()).abs()
    return {"int8_max_prob_diff": float(diff.max()), "int8_mean_prob_diff": float(diff.mean())}


CASES = [
    Case("inference_int8_four_ways", tiles_setup, tiles_side("int8"), tiles_side("onnxruntime"),
         others={"torch": tiles_side("torch"), "torch_bf16": tiles_side("torch_bf16")},
         compare=probability_difference, describe=tiles_describe, repeat=5,
         baseline_name="ONNX Runtime float32 (2 threads)",
         notes=f"flip TTA on batches of {BATCH} test tiles, {THREADS} threads: ONNX Runtime INT8 (ours); "
               "torch float32 and torch bf16 in the same rounds; ratio > 1: faster than ONNX Runtime float32"),
    Case("section_int8_four_ways", section_setup, section_side("int8"), section_side("onnxruntime"),
         others={"torch": section_side("torch"), "torch_bf16": section_side("torch_bf16")},
         compare=probability_difference, describe=section_describe, repeat=2,
         baseline_name="ONNX Runtime float32 (2 threads)",
         notes=f"1010x1010 section, flip TTA, overlap 0.5, {THREADS} threads: ONNX Runtime INT8 (ours); torch float32 "
               "and torch bf16 in the same rounds"),
]
