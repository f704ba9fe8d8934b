"""TorchScript export of a checkpoint's network, returning only the final logit.

    saltkit export runs/pad_fold0/swa.pt --out model.ts

The exported module maps `(B, 3, S, S)` float tiles in [0, 1] (padded or resized to S = 128 as in training)
to `(B, 1, S, S)` salt logits; undo the padding / resize and apply a sigmoid outside. It is traced at S x S, so
use that size; the batch size is free. The checkpoint's arch and source path travel in the extra file
`saltkit.json`.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import torch
from monai.networks.utils import convert_to_torchscript

from saltkit.inference.checkpoint import read_checkpoint
from saltkit.io import atomic_write
from saltkit.networks import SaltUNet


class SaltUNetLogit(SaltUNet):
    """SaltUNet whose forward returns only the final `(B, 1, H, W)` logit (same weights, same state_dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).logit


def logit_network_from_arch(arch: dict, source: str | Path = "checkpoint") -> SaltUNetLogit:
    """`SaltUNetLogit` with the architecture of a checkpoint's "arch" (random weights; load them after).

    ValueError naming `source` when the arch is not a mapping of SaltUNet constructor arguments that build."""
    if not isinstance(arch, dict):
        raise ValueError(f"{source}: 'arch' must be a dict of SaltUNet arguments, got {type(arch).__name__}")
    arch = dict(arch)
    arch.pop("pretrained", None)
    unknown = sorted(set(arch) - set(inspect.signature(SaltUNet).parameters))
    if unknown:
        raise ValueError(f"{source}: arch has unknown keys {unknown}; expected SaltUNet constructor arguments")
    try:
        return SaltUNetLogit(pretrained=None, **arch)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{source}: cannot build the network of its arch {arch} ({e})") from None


def checkpoint_arch(path: str | Path) -> dict:
    """The "arch" dict of the checkpoint at `path` (for configs that build the network before loading it)."""
    return dict(read_checkpoint(path)["arch"])


def export_torchscript(ckpt: str | Path, out: str | Path, image_size: int = 128, verify: bool = True) -> Path:
    """Trace the checkpoint's network at `(2, 3, image_size, image_size)` and save it to `out` atomically.

    With `verify`, the traced module's output is compared with the eager network's (MONAI's converter).
    """
    ckpt = Path(ckpt)
    state = read_checkpoint(ckpt)
    network = logit_network_from_arch(state["arch"], ckpt)
    try:
        network.load_state_dict(state["network"])
    except (RuntimeError, TypeError, AttributeError) as e:
        lines = str(e).strip().splitlines()  # torch: a heading line, then one line per kind of mismatch
        detail = (lines[1] if len(lines) > 1 else str(e)).strip()
        raise ValueError(f"{ckpt}: weights do not match its own arch {state['arch']} "
                         f"({detail[:200]}{'...' if len(detail) > 200 else ''})") from None
    network.eval()
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        # shape checks in forward are constants at a fixed input size; TorchScript's deprecation notice is known
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = convert_to_torchscript(
            network, filename_or_obj=None, verify=verify, inputs=[example], use_trace=True, rtol=1e-4, atol=1e-4,
            check_trace=False,  # `verify` already compares outputs; the check would trace a second time
        )
    meta = {
        "arch": state["arch"],
        "source": str(ckpt),
        "input": f"(B, 3, {image_size}, {image_size}) float in [0, 1]",
        "output": f"(B, 1, {image_size}, {image_size}) salt logit",
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, f, _extra_files={"saltkit.json": json.dumps(meta)})
    return out


def load_exported(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """The exported module (eval mode, CPU) and its `saltkit.json` metadata."""
    files = {"saltkit.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return module.eval(), json.loads(files["saltkit.json"] or "{}")
