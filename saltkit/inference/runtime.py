"""Which runtime runs the network at inference: torch (the default) or ONNX Runtime (CPU, `runtime: onnxruntime`,
or `onnxruntime-int8` for the statically quantized model of `saltkit.inference.quantize`).

With ONNX Runtime the bundles run the ONNX model beside the checkpoint (`swa.pt` -> `swa.onnx`, `swa.int8.onnx`
with INT8, or `onnx_path`), exporting it first when it is missing or was exported from other weights (the export
records a fingerprint of the checkpoint's network weights, so a checkpoint rewritten with new post-processing
settings keeps its model).
Everything around the network (TTA, sliding windows, post-processing, writers) is the same code for both runtimes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from saltkit.checkpoints import weights_fingerprint
from saltkit.io import FolderNotWritableError, check_writable

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "onnxruntime-int8")


def check_runtime(runtime) -> str:
    """`runtime` as one of RUNTIMES; ValueError naming config key 'runtime' otherwise."""
    name = str(runtime).strip().lower() if isinstance(runtime, str) else runtime
    if name not in RUNTIMES:
        raise ValueError(f"config key 'runtime' must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return name


def uses_onnxruntime(runtime) -> bool:
    """True for the ONNX Runtime runtimes (float32 or INT8): the network is an ONNX model, not torch weights."""
    return check_runtime(runtime) in ("onnxruntime", "onnxruntime-int8")


def runtime_amp(runtime, amp):
    """Config key `amp` as `runtime` honours it: ONNX Runtime runs the float32 export, so there any value but false
    becomes false, with a log line saying so (a value `amp` does not take is still an error naming the key).

    Args:
        runtime: config key `runtime`: "torch", "onnxruntime" or "onnxruntime-int8".
        amp: config key `amp` (false, true / auto, bf16, fp16).
    """
    from saltkit.precision import amp_off

    if amp_off(amp) or not uses_onnxruntime(runtime):
        return amp
    logger.info(f"amp {str(amp).strip().lower()}: off (runtime {check_runtime(runtime)} runs its ONNX export)")
    return False


def torch_network(network: torch.nn.Module, device) -> torch.nn.Module:
    """`network` on `device` for inference; on the CPU in channels_last layout, where its convolutions run about
    2x faster than in the default layout (same values to 1e-5; the inputs can stay in the default layout)."""
    device = torch.device(device)
    layout = torch.channels_last if device.type == "cpu" else torch.preserve_format
    return network.to(device, memory_format=layout)


def default_onnx_path(ckpt: Path, int8: bool = False) -> Path:
    """Where a checkpoint's ONNX export goes unless `onnx_path` says: beside it (`ckpt` with suffix .onnx, or
    .int8.onnx); for the bundle's model, in `runs/bundle_model/` (the bundle's folder may be read-only)."""
    from saltkit.checkpoints import SHIPPED_OUTPUTS, bundle_model
    from saltkit.inference.quantize import int8_path

    path = int8_path(ckpt) if int8 else ckpt.with_suffix(".onnx")
    return SHIPPED_OUTPUTS / path.name if ckpt.resolve() == bundle_model().resolve() else path


def inference_network(runtime, network, ckpt: str | Path, device, onnx_path: str | Path | None = None,
                      threads: int | None = None):
    """The network the engine calls: `network` on `device` (torch, `torch_network`; its weights are loaded by the
    bundle's CheckpointLoader), or an OnnxRuntimeNetwork of the checkpoint's ONNX export at `onnx_path` (default: `ckpt`
    with suffix .onnx, or .int8.onnx with "onnxruntime-int8"), exported there first when missing, unreadable or from
    other weights (`threads` intra-op threads, None: ONNX Runtime's default). The INT8 export calibrates and checks
    itself on the checkpoint's fold (its run record) and raises QuantizationRefused, writing nothing, when it loses
    more of the metric than allowed.

    Args:
        runtime: config key `runtime`: "torch", "onnxruntime" or "onnxruntime-int8".
        network: the torch network (used with "torch").
        ckpt: the checkpoint the ONNX export is made from.
        device: the torch device (used with "torch").
        onnx_path: where the ONNX export is (or is written); None: beside `ckpt`.
        threads: ONNX Runtime's intra-op threads; None: its default.
    """
    if not uses_onnxruntime(runtime):
        return torch_network(network, device)
    from saltkit.checkpoints import read_checkpoint
    from saltkit.export import export_onnx
    from saltkit.inference.onnx_runtime import OnnxRuntimeNetwork
    from saltkit.inference.quantize import export_int8, is_int8_metadata

    ckpt = Path(ckpt)
    int8 = check_runtime(runtime) == "onnxruntime-int8"
    path = Path(onnx_path) if onnx_path else default_onnx_path(ckpt, int8)
    expected = weights_fingerprint(read_checkpoint(ckpt)["network"])
    if path.is_file():
        try:
            model = OnnxRuntimeNetwork(path, threads=threads)
            found = model.metadata.get("weights") if is_int8_metadata(model.metadata) == int8 else None
        except ValueError:  # not a saltkit export ONNX Runtime can load: exported again
            model, found = None, None
        if found == expected:
            return model
        logger.info(f"{path} was exported from other weights than {ckpt} ({found} != {expected}): exporting again")
    else:
        logger.info(f"exporting {ckpt} to {path} for ONNX Runtime{' INT8' if int8 else ''} (once; later runs reuse it)")
    try:  # before the export's work: a read-only folder fails now, naming the option
        check_writable(path.parent, "onnx_path")
    except FolderNotWritableError as e:
        raise FolderNotWritableError(f"{e}; --onnx-path FILE puts the ONNX export elsewhere") from None
    if int8:
        logger.info(f"INT8 export: {export_int8(ckpt, path, threads=threads)}")
    else:
        export_onnx(ckpt, path)
    return OnnxRuntimeNetwork(path, threads=threads)
