"""INT8 export: the checkpoint's float32 ONNX export statically quantized by ONNX Runtime, checked on its own fold.

    saltkit export runs/tgs/pad_fold0/swa.pt --format onnx --quantize int8
    # -> runs/tgs/pad_fold0/swa.int8.onnx

The model is ONNX Runtime's QDQ format (QuantizeLinear / DequantizeLinear pairs around each quantized node, which
ONNX Runtime fuses into integer kernels): weights int8 per output channel in a 7-bit range (`reduce_range`),
activations uint8 (x86 multiplies uint8 by int8), their ranges calibrated (min / max) on training tiles of the
checkpoint's own fold. The 7-bit weights keep the uint8 x int8 products of AVX2 processors without VNNI from
saturating (with 8-bit weights the probabilities moved 0.28 at worst on this project's CPU, 0.05 with 7 bits), so
one file runs alike on processors with and without VNNI. The object-context attention (MatMul, Softmax) and the
bilinear upsampling (Resize) stay float32: quantizing them cost metric and gained no speed (docs/results.md).

The export checks itself before anything is written: ONNX Runtime scores the INT8 model and the float32 model on
the fold's validation tiles with flip TTA, as the bundles predict (competition metric, the checkpoint's tuned
post-processing when it has one, else threshold 0.5), and refuses when INT8 loses more than `max_metric_loss`.
The two figures, the calibration tile count and the checkpoint's weight fingerprint travel in the model's
metadata. The fold (dataset_dir, folds_csv, fold) comes from the checkpoint's run record (`config.json` beside
it), as evaluate finds it; a checkpoint without one needs them given.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saltkit.checkpoints import check_run_matches, read_checkpoint, run_record, run_setting
from saltkit.io import atomic_write, check_outputs

INT8_SUFFIX = ".int8.onnx"
DEFAULT_CALIBRATION_TILES = 256
DEFAULT_MAX_METRIC_LOSS = 0.005
CALIBRATION_SEED = 0
# the node types quantized; MatMul / Softmax (attention) and Resize (bilinear upsampling) stay float32
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MaxPool", "Concat", "Add", "Mul", "LeakyRelu", "Relu")
QUANTIZATION_KEY = "quantization"  # the entry of the model's saltkit metadata that marks an INT8 export
BATCH = 32


class QuantizationRefused(ValueError):
    """The INT8 model lost more of the competition metric than allowed on the validation fold; nothing written."""


@dataclass(frozen=True)
class Int8Export:
    """What `export_int8` wrote and measured."""

    path: Path
    metric_float32: float
    metric_int8: float
    calibration_tiles: int
    validation_tiles: int
    fold: int
    postprocessing: str

    @property
    def metric_loss(self) -> float:
        return self.metric_float32 - self.metric_int8

    def __str__(self) -> str:
        return (f"competition metric with flip TTA on the {self.validation_tiles} validation tiles of fold "
                f"{self.fold}: float32 {self.metric_float32:.4f}, INT8 {self.metric_int8:.4f} "
                f"(change {-self.metric_loss:+.4f}; {self.postprocessing}); calibrated on "
                f"{self.calibration_tiles} training tiles")


def int8_path(ckpt: str | Path) -> Path:
    """The INT8 export's default path: beside the checkpoint (runs/tgs/pad_fold0/swa.pt -> swa.int8.onnx)."""
    return Path(ckpt).with_suffix(INT8_SUFFIX)


def is_int8_metadata(metadata: dict) -> bool:
    """True for the saltkit metadata of a model `export_int8` wrote (a float32 export has no quantization entry)."""
    return isinstance(metadata.get(QUANTIZATION_KEY), dict)


# ---------------------------------------------------------------- the checkpoint's fold


@dataclass(frozen=True)
class FoldTiles:
    """The training and validation items of the fold a checkpoint was trained on, and where they come from."""

    train: list
    validation: list
    dataset_dir: str
    folds_csv: str
    fold: int
    num_folds: int


def checkpoint_fold(ckpt: str | Path, variant: str | None, dataset_dir=None, fold=None, folds_csv=None,
                    num_folds=None) -> FoldTiles:
    """The fold of the checkpoint's run record (`config.json` beside it); given values win. Without a record (or
    one lacking them) dataset_dir and fold must be given: a one-line ValueError says so. A fold or dataset other
    than the record's is refused (the checkpoint has learnt the other folds' tiles)."""
    from saltkit.data.folds import default_folds_csv, fold_split

    ckpt = Path(ckpt)
    run_dir = ckpt.parent
    record = run_record(run_dir)
    dataset_dir = run_setting(run_dir, "dataset_dir", None, given=dataset_dir)
    fold = run_setting(run_dir, "fold", None, given=fold)
    if dataset_dir is None or fold is None:
        where = ("has no run record" if not record else "has a run record without dataset_dir / fold") + \
            f" ({run_dir / 'config.json'})"
        raise ValueError(f"{ckpt} {where}: INT8 quantization calibrates and checks on the tiles of its fold; give "
                         f"them: saltkit export {ckpt} --format onnx --quantize int8 --dataset-dir DIR --fold K")
    num_folds = int(run_setting(run_dir, "num_folds", 10, given=num_folds))
    folds_csv = run_setting(run_dir, "folds_csv", None, given=folds_csv) or default_folds_csv(dataset_dir, num_folds)
    check_run_matches(run_dir, dataset_dir, int(fold), num_folds, variant)
    train, validation = fold_split(dataset_dir, folds_csv, int(fold), num_folds)
    return FoldTiles(train, validation, str(dataset_dir), str(folds_csv), int(fold), num_folds)


def calibration_items(train: list, count: int, seed: int = CALIBRATION_SEED) -> list:
    """`count` training items drawn without replacement with `seed` (all of them when there are fewer), in
    their listed order."""
    if count < 1:
        raise ValueError(f"--calibration-tiles must be at least 1, got {count}")
    if count >= len(train):
        return list(train)
    chosen = np.sort(np.random.default_rng(seed).choice(len(train), size=count, replace=False))
    return [train[i] for i in chosen]


def load_tiles(items: list, variant: str, labels: bool = False) -> dict:
    """Items through the bundles' tile pipeline: {"image": (N, 3, S, S) float32 numpy, "label": (N, 1, 101, 101)
    when `labels`, "id": list}."""
    from saltkit.transforms import tile_inputs

    keys = ["image", "label"] if labels else ["image"]
    pipeline = tile_inputs(variant, keys)
    loaded = [pipeline({k: it[k] for k in keys}) for it in items]
    out = {k: np.stack([np.asarray(d[k], dtype=np.float32) for d in loaded]) for k in keys}
    out["id"] = [str(it["id"]) for it in items]
    return out


# ---------------------------------------------------------------- quantization and its check


def _quantize(float_model: Path, out: Path, calibration: np.ndarray) -> None:
    """ONNX Runtime's pre-processing (shape inference, basic graph optimisation) and static QDQ quantization of
    `float_model` into `out`, calibrated (min / max) on `calibration` `(N, 3, S, S)` tiles."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    from saltkit.inference.onnx_runtime import INPUT_NAME

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = [calibration[i:i + BATCH] for i in range(0, len(calibration), BATCH)]
            self.next = 0

        def get_next(self):
            if self.next >= len(self.batches):
                return None
            self.next += 1
            return {INPUT_NAME: self.batches[self.next - 1]}

        def rewind(self):
            self.next = 0

    prepared = out.with_name("prepared.onnx")
    logging.disable(logging.WARNING)  # the quantizer's notices about shape-only tensors it leaves as they are
    try:
        quant_pre_process(str(float_model), str(prepared))
        quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(QUANTIZED_OPS), calibrate_method=CalibrationMethod.MinMax)
    finally:
        logging.disable(logging.NOTSET)


def fold_metric(network, tiles: dict, variant: str, settings) -> float:
    """Mean competition metric of `network`'s flip-TTA prediction (as evaluate computes it) of labelled `tiles`
    after the post-processing `settings`."""
    from saltkit.inference.postprocess_search import tile_scores
    from saltkit.inference.postprocess_tuned import predict_labelled_tiles

    n = len(tiles["id"])
    loader = ({"image": torch.from_numpy(tiles["image"][i:i + BATCH]),
               "label": torch.from_numpy(tiles["label"][i:i + BATCH]), "id": tiles["id"][i:i + BATCH]}
              for i in range(0, n, BATCH))
    predicted = predict_labelled_tiles(network, loader, variant)
    return float(tile_scores(predicted["prob"], predicted["image_prob"], predicted["label"], settings).mean())


def export_int8(ckpt: str | Path, out: str | Path | None = None, calibration_tiles: int = DEFAULT_CALIBRATION_TILES,
                max_metric_loss: float | None = None, dataset_dir=None, fold=None, folds_csv=None,
                num_folds=None, threads: int | None = None, image_size: int = 128) -> Int8Export:
    """Quantize the checkpoint's float32 ONNX export to INT8 at `out` (default `int8_path(ckpt)`), atomically.

    Nothing is written (QuantizationRefused) when the INT8 model's metric on the fold's validation tiles is more
    than `max_metric_loss` (None: DEFAULT_MAX_METRIC_LOSS) below the float32 model's; errors about the checkpoint,
    its fold or a missing optional package come before any work. `threads`: ONNX Runtime's intra-op threads while
    scoring (None: one per core).
    """
    from saltkit.export import export_onnx
    from saltkit.inference.onnx_runtime import METADATA_KEY, OnnxRuntimeNetwork, require_module
    from saltkit.inference.postprocess import PostProcessingSettings
    from saltkit.inference.postprocess_tuned import entry_settings, read_tuned_postprocessing, settings_text

    ckpt = Path(ckpt)
    out = Path(out) if out is not None else int8_path(ckpt)
    check_outputs({"--out": out}, {"checkpoint": ckpt})
    onnx = require_module("onnx", "INT8 export")
    require_module("onnxscript", "INT8 export")
    require_module("onnxruntime", "INT8 export")
    max_metric_loss = DEFAULT_MAX_METRIC_LOSS if max_metric_loss is None else float(max_metric_loss)
    if calibration_tiles < 1:
        raise ValueError(f"--calibration-tiles must be at least 1, got {calibration_tiles}")
    state = read_checkpoint(ckpt)
    variant = state.get("variant")
    if variant is None:
        raise ValueError(f"{ckpt} does not record its variant (pad or resize), which the INT8 export's calibration "
                         "tiles need (training records it); save it with 'variant': 'pad' or 'resize'")
    tiles = checkpoint_fold(ckpt, variant, dataset_dir, fold, folds_csv, num_folds)
    entry = read_tuned_postprocessing(ckpt)
    settings = entry_settings(entry) if entry is not None else PostProcessingSettings()
    post = f"{'tuned' if entry is not None else 'default'} post-processing: {settings_text(settings)}"
    calibration = load_tiles(calibration_items(tiles.train, calibration_tiles), variant)["image"]
    validation = load_tiles(tiles.validation, variant, labels=True)
    with tempfile.TemporaryDirectory(prefix="saltkit_int8_") as folder:
        float_model = Path(folder) / "float32.onnx"
        quantized = Path(folder) / "int8.onnx"
        export_onnx(ckpt, float_model, image_size=image_size)
        _quantize(float_model, quantized, calibration)
        metric_float = fold_metric(OnnxRuntimeNetwork(float_model, threads=threads), validation, variant, settings)
        metric_int8 = fold_metric(OnnxRuntimeNetwork(quantized, threads=threads), validation, variant, settings)
        result = Int8Export(out, metric_float, metric_int8, len(calibration), len(validation["id"]), tiles.fold, post)
        if not result.metric_loss <= max_metric_loss:
            raise QuantizationRefused(
                f"{ckpt}: the INT8 model scores {metric_int8:.4f} against {metric_float:.4f} for float32 on the "
                f"{result.validation_tiles} validation tiles of fold {tiles.fold} (flip TTA, {post}), a loss of "
                f"{result.metric_loss:.4f}, more than the limit {max_metric_loss:g} (--max-metric-loss); {out} not "
                "written: run the float32 model (runtime onnxruntime) or allow a larger loss")
        model = onnx.load(str(quantized))
        # the float32 export's metadata (arch, variant, source, weight fingerprint, input / output), extended
        meta = json.loads({p.key: p.value for p in onnx.load(str(float_model)).metadata_props}[METADATA_KEY])
    meta[QUANTIZATION_KEY] = {
        "format": "QDQ", "weights": "int8, per output channel, 7-bit range (reduce_range)", "activations": "uint8",
        "calibration": "minmax", "calibration_tiles": result.calibration_tiles,
        "quantized_ops": list(QUANTIZED_OPS),
        "fold": {"dataset_dir": tiles.dataset_dir, "folds_csv": tiles.folds_csv, "fold": tiles.fold,
                 "num_folds": tiles.num_folds},
        "metric_float32": round(metric_float, 6), "metric_int8": round(metric_int8, 6),
        "validation_tiles": result.validation_tiles, "postprocessing": post, "max_metric_loss": max_metric_loss,
    }
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        f.write(model.SerializeToString())
    return result

