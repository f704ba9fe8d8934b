"""Export of a checkpoint's network: TorchScript (the default, as MONAI bundles use it) or ONNX.

    saltkit export runs/pad_fold0/swa.pt --out model.ts
    saltkit export runs/pad_fold0/swa.pt --format onnx --out model.onnx

TorchScript maps `(B, 3, S, S)` float tiles in [0, 1] (padded or resized to S = 128 as in training) to the
`(B, 1, S, S)` final salt logit. ONNX (torch.onnx's dynamo exporter; input "image", a dynamic batch axis) gives
the outputs "logit" `(B, 1, S, S)` and "image_logit" `(B, 1)`, checked with ONNX Runtime against the checkpoint
on real tiles before the file is written; `saltkit.inference.onnx_runtime.OnnxRuntimeNetwork` runs it in place
of the torch network. Undo the padding / resize and apply a sigmoid outside. Both are fixed at S x S; the batch
size is free. The checkpoint's arch and source path travel along (`saltkit.json`: an extra file in TorchScript,
a metadata property in ONNX).
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import torch
from monai.networks.utils import convert_to_torchscript

from saltkit.checkpoints import read_checkpoint
from saltkit.data.layout import load_image, sample_dir, test_items
from saltkit.geometry import pad_widths
from saltkit.inference.onnx_runtime import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, require_module
from saltkit.inference.runtime import weights_fingerprint
from saltkit.io import atomic_write, check_outputs
from saltkit.networks import SaltUNet

# Largest allowed difference of probabilities (pixel and image) between ONNX Runtime and the checkpoint.
ONNX_TOLERANCE = 1e-4


class SaltUNetLogit(SaltUNet):
    """SaltUNet whose forward returns only the final `(B, 1, H, W)` logit (same weights, same state_dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).logit


class SaltUNetOutputs(SaltUNet):
    """SaltUNet whose forward returns `(final logit (B, 1, H, W), image logit (B, 1))` (same weights and keys)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = super().forward(x)
        return out.logit, out.image_logit


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
    check_outputs({"--out": out}, {"checkpoint": ckpt})
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
        "weights": weights_fingerprint(state["network"]),
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


def verification_tiles(variant: str | None, image_size: int = 128, limit: int = 16) -> torch.Tensor:
    """Real tiles to check an export on: the shipped sample's test images as `(N, 3, S, S)` floats in [0, 1],
    reflect-padded ("pad" or unknown variant) or bilinearly resized ("resize") to S = image_size."""
    items = test_items(sample_dir())[:limit]
    grey = torch.stack([torch.from_numpy(load_image(it["image"])) for it in items]).float().div_(255.0)
    tiles = grey[:, None].expand(-1, 3, -1, -1)
    if variant == "resize":
        return torch.nn.functional.interpolate(tiles, size=(image_size, image_size), mode="bilinear",
                                               align_corners=False)
    before, after = pad_widths(tiles.shape[-1], image_size)
    return torch.nn.functional.pad(tiles, (before, after, before, after), mode="reflect")


def _probability_difference(session, network: torch.nn.Module, tiles: torch.Tensor) -> float:
    """Max abs difference of sigmoid(logit) and sigmoid(image logit) between an ONNX Runtime session and `network`."""
    logit, image_logit = session.run(list(OUTPUT_NAMES), {INPUT_NAME: tiles.numpy()})
    with torch.no_grad():
        expected = network(tiles)
    return max(float((torch.sigmoid(torch.from_numpy(got)) - torch.sigmoid(want)).abs().max())
               for got, want in zip((logit, image_logit), expected, strict=True))


def export_onnx(ckpt: str | Path, out: str | Path, image_size: int = 128,
                verify: bool = True) -> tuple[Path, float | None]:
    """Export the checkpoint's network to ONNX at `out` (atomically) -> (out, max probability difference).

    Input "image" `(batch, 3, image_size, image_size)`; outputs "logit" `(batch, 1, S, S)` and "image_logit"
    `(batch, 1)`. With `verify`, ONNX Runtime runs the model on real tiles first (16 of the shipped sample, shaped
    as the checkpoint's variant) and nothing is written when its probabilities differ from the checkpoint's by
    more than ONNX_TOLERANCE; the difference is returned (None without `verify`).
    """
    check_outputs({"--out": out}, {"checkpoint": ckpt})
    onnx = require_module("onnx", "ONNX export")
    require_module("onnxscript", "ONNX export")
    ort = require_module("onnxruntime", "checking an ONNX export") if verify else None
    ckpt = Path(ckpt)
    state = read_checkpoint(ckpt)
    arch = dict(state["arch"])
    arch.pop("pretrained", None)
    network = SaltUNetOutputs(pretrained=None, **arch)
    network.load_state_dict(state["network"])
    network.eval()
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notices about decompositions and deprecations
        program = torch.onnx.export(
            network, (example,), dynamo=True, verbose=False, input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )
    model = program.model_proto
    meta = {
        "arch": state["arch"],
        "variant": state.get("variant"),
        "source": str(ckpt),
        "weights": weights_fingerprint(state["network"]),
        "input": f"{INPUT_NAME}: (B, 3, {image_size}, {image_size}) float in [0, 1]",
        "output": f"logit: (B, 1, {image_size}, {image_size}); image_logit: (B, 1)",
    }
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
    data = model.SerializeToString()
    difference = None
    if verify:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        tiles = verification_tiles(state.get("variant"), image_size)
        difference = _probability_difference(session, network, tiles)
        if not difference <= ONNX_TOLERANCE:
            raise ValueError(f"{ckpt}: the ONNX export differs from the checkpoint by {difference:.3g} in probability "
                             f"on {len(tiles)} sample tiles (tolerance {ONNX_TOLERANCE}); {out} not written")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        f.write(data)
    return out, difference
