"""Which runtime runs the network at inference: torch (the default) or ONNX Runtime (CPU, `runtime: onnxruntime`).

With ONNX Runtime the bundles run the ONNX model beside the checkpoint (`swa.pt` -> `swa.onnx`, or `onnx_path`),
exporting it first when it is missing or was exported from other weights (the export records a fingerprint of the
checkpoint's network weights, so a checkpoint rewritten with new post-processing settings keeps its model).
Everything around the network (TTA, sliding windows, post-processing, writers) is the same code for both runtimes.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")


def check_runtime(runtime) -> str:
    """`runtime` as one of RUNTIMES; ValueError naming config key 'runtime' otherwise."""
    name = str(runtime).strip().lower() if isinstance(runtime, str) else runtime
    if name not in RUNTIMES:
        raise ValueError(f"config key 'runtime' must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    return name


def uses_onnxruntime(runtime) -> bool:
    return check_runtime(runtime) == "onnxruntime"


def weights_fingerprint(network_state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex, first 16 digits) of a state dict's names, shapes, dtypes and values, in name order."""
    digest = hashlib.sha256()
    for name in sorted(network_state):
        t = network_state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def torch_network(network: torch.nn.Module, device) -> torch.nn.Module:
    """`network` on `device` for inference; on the CPU in channels_last layout, where its convolutions run about
    2x faster than in the default layout (same values to 1e-5; the inputs can stay in the default layout)."""
    device = torch.device(device)
    layout = torch.channels_last if device.type == "cpu" else torch.preserve_format
    return network.to(device, memory_format=layout)


def inference_network(runtime, network, ckpt: str | Path, device, onnx_path: str | Path | None = None,
                      threads: int | None = None):
    """The network the engine calls: `network` on `device` (torch, `torch_network`; its weights are loaded by the
    bundle's CheckpointLoader), or an OnnxRuntimeNetwork of the checkpoint's ONNX export at `onnx_path` (default: `ckpt`
    with suffix .onnx), exported there first when missing, unreadable or from other weights (`threads` intra-op
    threads, None: ONNX Runtime's default)."""
    if not uses_onnxruntime(runtime):
        return torch_network(network, device)
    from saltkit.checkpoints import read_checkpoint
    from saltkit.export import export_onnx
    from saltkit.inference.onnx_runtime import OnnxRuntimeNetwork

    ckpt = Path(ckpt)
    path = Path(onnx_path) if onnx_path else ckpt.with_suffix(".onnx")
    expected = weights_fingerprint(read_checkpoint(ckpt)["network"])
    if path.is_file():
        try:
            model = OnnxRuntimeNetwork(path, threads=threads)
            found = model.metadata.get("weights")
        except ValueError:  # not a saltkit export ONNX Runtime can load: exported again
            model, found = None, None
        if found == expected:
            return model
        logger.info(f"{path} was exported from other weights than {ckpt} ({found} != {expected}): exporting again")
    else:
        logger.info(f"exporting {ckpt} to {path} for ONNX Runtime (once; later runs reuse it)")
    export_onnx(ckpt, path)
    return OnnxRuntimeNetwork(path, threads=threads)
