"""Export of a checkpoint's network: TorchScript (the default, as MONAI bundles use it) or ONNX; and the bundle's
model file.

    saltkit export runs/tgs/pad_fold0/swa.pt --out model.ts
    saltkit export runs/tgs/pad_fold0/swa.pt --format onnx --out model.onnx
    saltkit export runs/tgs/pad_fold0/swa.pt --format model --half --out bundles/saltnet/models/model.pt

TorchScript maps `(B, 3, S, S)` float tiles in [0, 1] (padded or resized to S = 128 as in training) to the
`(B, 1, S, S)` final salt logit. ONNX (torch.onnx's dynamo exporter; input "image", a dynamic batch axis) gives
the outputs "logit" `(B, 1, S, S)` and "image_logit" `(B, 1)`, checked with ONNX Runtime against the checkpoint
on real tiles before the file is written; `saltkit.inference.onnx_runtime.OnnxRuntimeNetwork` runs it in place
of the torch network. Undo the padding / resize and apply a sigmoid outside. Both are fixed at S x S; the batch
size is free. The checkpoint's arch and source path travel along (`saltkit.json`: an extra file in TorchScript,
a metadata property in ONNX).

`--format model` (`package_model`) writes a saltkit checkpoint that lives outside its run folder, as a bundle's
`models/model.pt`: the network weights (float16 storage with `half`, read back as float32), arch, variant, tuned
post-processing, the scores the checkpoint carries ("metrics"), its run record (the run folder's `config.json`, and
`config_resumed.json` when the run was resumed), where it came from ("source") and what wrote it; plain types only,
so `torch.load(weights_only=True)` reads it. The written file is read back before it replaces anything: the same
float32 weights, or, stored as float16, the masks of the shipped sample's test tiles (flip TTA, the tuned
post-processing) compared with the checkpoint's.
"""

from __future__ import annotations

import inspect
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.utils import convert_to_torchscript

from saltkit.checkpoints import RECORD_KEY, RUN_RECORD, float32_state, read_checkpoint
from saltkit.data.layout import load_image, sample_dir, test_items
from saltkit.geometry import pad_widths
from saltkit.inference.onnx_runtime import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, require_module
from saltkit.inference.runtime import weights_fingerprint
from saltkit.io import atomic_write, check_outputs
from saltkit.networks import SaltUNet
from saltkit.rundir import RESUME_RECORD

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


def logit_network_from_arch(arch: dict, source: str | Path = "checkpoint", cls: type = None) -> SaltUNet:
    """`cls` (default `SaltUNetLogit`) with the architecture of a checkpoint's "arch" (random weights; load them
    after, `load_checked`).

    ValueError naming `source` when the arch is not a mapping of SaltUNet constructor arguments that build."""
    cls = cls or SaltUNetLogit
    if not isinstance(arch, dict):
        raise ValueError(f"{source}: 'arch' must be a dict of SaltUNet arguments, got {type(arch).__name__}")
    arch = dict(arch)
    arch.pop("pretrained", None)
    unknown = sorted(set(arch) - set(inspect.signature(SaltUNet).parameters))
    if unknown:
        raise ValueError(f"{source}: arch has unknown keys {unknown}; expected SaltUNet constructor arguments")
    try:
        return cls(pretrained=None, **arch)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{source}: cannot build the network of its arch {arch} ({e})") from None


def load_checked(network: torch.nn.Module, state: dict, ckpt: str | Path) -> torch.nn.Module:
    """`network` (built from the checkpoint's arch) with the checkpoint's weights, in eval mode; ValueError naming
    the checkpoint and the first mismatch when its weights are not those of its own arch."""
    try:
        network.load_state_dict(state["network"])
    except (RuntimeError, TypeError, AttributeError) as e:
        lines = str(e).strip().splitlines()  # torch: a heading line, then one line per kind of mismatch
        detail = (lines[1] if len(lines) > 1 else str(e)).strip()
        raise ValueError(f"{ckpt}: weights do not match its own arch {state['arch']} "
                         f"({detail[:200]}{'...' if len(detail) > 200 else ''})") from None
    return network.eval()


def check_image_size(image_size) -> int:
    """`--image-size`: the network takes squares of a multiple of 32 pixels, at least 64."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 64 or image_size % 32:
        raise ValueError(f"--image-size must be a multiple of 32 of at least 64 (the network halves it five times), "
                         f"got {image_size!r}; 128 is the training size")
    return image_size


def checkpoint_arch(path: str | Path) -> dict:
    """The "arch" dict of the checkpoint at `path` (for configs that build the network before loading it)."""
    return dict(read_checkpoint(path)["arch"])


def export_torchscript(ckpt: str | Path, out: str | Path, image_size: int = 128, verify: bool = True) -> Path:
    """Trace the checkpoint's network at `(2, 3, image_size, image_size)` and save it to `out` atomically.

    With `verify`, the traced module's output is compared with the eager network's (MONAI's converter).
    """
    ckpt = Path(ckpt)
    check_outputs({"--out": out}, {"checkpoint": ckpt})
    check_image_size(image_size)
    state = read_checkpoint(ckpt)
    network = load_checked(logit_network_from_arch(state["arch"], ckpt), state, ckpt)
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
    check_image_size(image_size)
    onnx = require_module("onnx", "ONNX export")
    require_module("onnxscript", "ONNX export")
    ort = require_module("onnxruntime", "checking an ONNX export") if verify else None
    ckpt = Path(ckpt)
    state = read_checkpoint(ckpt)
    network = load_checked(logit_network_from_arch(state["arch"], ckpt, SaltUNetOutputs), state, ckpt)
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


# ---------------------------------------------------------------- the bundle's model file

MODEL_SIZE_LIMIT = 16 * 1024 * 1024  # the largest model file the bundle ships (bytes)
RESUMED_KEY = "resumed_record"
STORAGE_KEY = "storage"
# Largest share of the sample's test-tile mask pixels allowed to change when the weights are stored as float16.
HALF_MASK_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PackagedModel:
    """What `package_model` wrote: the file, its size, storage, weight fingerprint (of the float32 weights it
    loads to), and, for float16 storage, how many mask pixels of the sample's test tiles changed (of how many)."""

    path: Path
    size: int
    storage: str
    weights: str
    source_weights: str
    changed_pixels: int | None = None
    pixels: int | None = None

    def __str__(self) -> str:
        text = f"{self.size / 1e6:.1f} MB, {self.storage} storage, weights {self.weights}"
        if self.changed_pixels is not None:
            text += (f"; masks of the sample's {self.pixels // (101 * 101)} test tiles (flip TTA, its post-processing) "
                     f"differ from the float32 checkpoint's in {self.changed_pixels} of {self.pixels} pixels")
        return text


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record["resolved"], dict):
            raise TypeError("no 'resolved' dict")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a training run record ({e}); give the run folder's config.json") from None
    return record


def model_record(ckpt: Path, state: dict, record: str | Path | None = None) -> tuple[dict, dict | None]:
    """(run record, resumed run's record or None) for the model file of the checkpoint `ckpt` (read as `state`):
    `record` when given, else the run folder's config.json (and config_resumed.json), else the record a packaged
    model already carries. ValueError naming what is missing, or what disagrees with the checkpoint."""
    if record is not None:
        path = Path(record)
        if not path.is_file():
            raise ValueError(f"--record {path}: no such file; give the training run's config.json")
        found, resumed = _read_record(path), None
    elif (ckpt.parent / RUN_RECORD).is_file():
        found = _read_record(ckpt.parent / RUN_RECORD)
        resumed_path = ckpt.parent / RESUME_RECORD
        resumed = _read_record(resumed_path) if resumed_path.is_file() else None
    elif isinstance(state.get(RECORD_KEY), dict):
        found, resumed = state[RECORD_KEY], state.get(RESUMED_KEY)
    else:
        raise ValueError(f"{ckpt}: no run record ({ckpt.parent / RUN_RECORD} does not exist); package a checkpoint "
                         "in its training run folder, or pass --record RUN/config.json")
    resolved = found["resolved"]
    arch = state["arch"] if isinstance(state.get("arch"), dict) else {}
    for key, ours in (("variant", state.get("variant")), ("backbone", arch.get("backbone")),
                      ("num_filters", arch.get("num_filters"))):
        theirs = resolved.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(f"{ckpt} has {key} {ours!r} but its run record says {theirs!r}: the record belongs to "
                             "another run; pass --record with that run's config.json")
    return found, resumed


def model_metrics(state: dict) -> dict:
    """The scores a checkpoint carries: the best checkpoint's validation score ("checkpoint": metric, score,
    epoch) and its tuned post-processing's metrics with flip TTA ("postprocessing": before, after, held out)."""
    metrics = {}
    if state.get("score") is not None:
        metrics["checkpoint"] = {"metric": state.get("metric"), "score": float(state["score"]),
                                 "epoch": state.get("epoch")}
    entry = state.get("postprocessing")
    if isinstance(entry, dict):
        metrics["postprocessing"] = {k: entry.get(k) for k in ("metric_before", "metric_after", "metric_heldout")}
    return metrics


def sample_tile_masks(state: dict, source: str | Path = "checkpoint", limit: int | None = None):
    """`(N, 101, 101)` uint8 masks of the shipped sample's test tiles from a checkpoint dict (float32 weights), as
    inference makes them: flip TTA, then its tuned post-processing (the plain defaults without one)."""
    from saltkit.checkpoints import network_from_checkpoint, weights_fingerprint
    from saltkit.inference.postprocess import postprocess
    from saltkit.inference.postprocess_tuned import DEFAULT, check_entry, entry_settings
    from saltkit.inference.pseudo_labels import Teacher, predict_tiles

    network = network_from_checkpoint(state, source)
    teacher = Teacher(Path(str(source)), network, state["variant"], weights_fingerprint(state["network"]), state)
    items = test_items(sample_dir())[:limit]
    probs = predict_tiles([teacher], items)
    entry = state.get("postprocessing")
    settings = DEFAULT if entry is None else entry_settings(check_entry(entry, source))
    return postprocess(probs.probs, probs.image_probs, settings)


def package_model(ckpt: str | Path, out: str | Path, half: bool = False, record: str | Path | None = None,
                  verify: bool = True) -> PackagedModel:
    """Write the bundle's model file of the checkpoint `ckpt` to `out` (atomically); see the module docstring.

    With `verify`, the file is read back with `weights_only=True` first: float32 storage must give the
    checkpoint's weights exactly; float16 storage must change at most HALF_MASK_TOLERANCE of the sample's test-tile
    mask pixels, else nothing is written.
    """
    import saltkit
    from saltkit.checkpoints import weights_fingerprint

    ckpt, out = Path(ckpt), Path(out)
    record_in = Path(record) if record is not None else ckpt.parent / RUN_RECORD
    check_outputs({"--out": out}, {"checkpoint": ckpt, "run record": record_in})
    state = read_checkpoint(ckpt)
    if state.get("variant") is None:
        raise ValueError(f"{ckpt} does not record its variant (pad or resize); package a checkpoint written by "
                         "saltkit training or SWA")
    run, resumed = model_record(ckpt, state, record)
    source_weights = weights_fingerprint(state["network"])
    network = {k: v.half() if half and v.is_floating_point() else v for k, v in state["network"].items()}
    source = state.get("source") if isinstance(state.get("source"), dict) else {
        "path": str(ckpt.resolve()), "name": ckpt.name, "weights": source_weights}
    for key in ("checkpoints", "bn_tiles"):  # what an SWA checkpoint averaged
        if key in state:
            source = {**source, key: state[key]}
    payload = {"network": network, "arch": dict(state["arch"]), "variant": state["variant"]}
    if state.get("postprocessing") is not None:
        payload["postprocessing"] = state["postprocessing"]
    payload.update({"metrics": state.get("metrics") or model_metrics(state), RECORD_KEY: run, "source": source,
                    STORAGE_KEY: "float16" if half else "float32",
                    "packaged_with": {"saltkit": saltkit.__version__, "torch": torch.__version__.split("+")[0]}})
    if resumed is not None:
        payload[RESUMED_KEY] = resumed
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    loaded["network"] = float32_state(loaded["network"])
    weights = weights_fingerprint(loaded["network"])
    changed = pixels = None
    if verify and not half and weights != source_weights:
        raise ValueError(f"{ckpt}: the model file read back holds other weights ({weights}) than the checkpoint "
                         f"({source_weights}); {out} not written")
    if verify and half:
        want, got = sample_tile_masks(state, ckpt), sample_tile_masks(loaded, out)
        changed, pixels = int((want != got).sum()), int(want.size)
        if changed > HALF_MASK_TOLERANCE * pixels:
            raise ValueError(f"{ckpt}: stored as float16 its masks of the sample's test tiles change in {changed} of "
                             f"{pixels} pixels (tolerance {HALF_MASK_TOLERANCE:g}); {out} not written: package it "
                             "without --half")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        f.write(data)
    return PackagedModel(out, len(data), payload[STORAGE_KEY], weights, source_weights, changed, pixels)
