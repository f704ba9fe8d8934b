"""The predict workflow: section images (a file or a folder) -> probability / mask / overlay images; SEG-Y volume ->
probability volume. One entry point, `run_predict`, shared by `saltkit predict` and the bundle's predict.json.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from monai.inferers import Inferer
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from saltkit.io import OutputClashError, atomic_write, same_file
from saltkit.logs import progress_bars
from saltkit.seismic.mdio_volume import is_mdio_path
from saltkit.seismic.normalize import Normalization, normalize_section
from saltkit.seismic.section_files import (
    list_section_files,
    read_section_with_alpha,
    section_output_paths,
    section_shape,
    write_index_html,
    write_section_outputs,
)
from saltkit.seismic.sections import predict_section
from saltkit.seismic.segy import is_segy_path
from saltkit.seismic.validity import read_valid_mask, salt_share, section_valid
from saltkit.seismic.volume import DEFAULT_CLIP_TRACES, DEFAULT_QC, predict_volume


def load_predictor(ckpt: str | Path, device="cpu", tta=True, overlap: float = 0.5, sw_batch_size: int = 16,
                   variant: str | None = None, runtime: str = "torch",
                   threads: int | None = None, amp=False,
                   onnx_path: str | Path | None = None) -> tuple[nn.Module, Inferer]:
    """The checkpoint's network (eval mode, on `device`; or its ONNX export run by ONNX Runtime with `runtime`
    "onnxruntime", at `onnx_path` or its default place) and the section inferer of the variant it was trained with,
    running the network in the precision `amp` chooses (config key `amp`:
    `saltkit.precision.choose_precision`; prints which, unless false)."""
    from saltkit.checkpoints import checkpoint_variant, load_network
    from saltkit.inference import inference_network, section_inferer
    from saltkit.inference.runtime import runtime_amp
    from saltkit.precision import choose_precision

    variant = checkpoint_variant(ckpt, variant)
    precision = choose_precision(runtime_amp(runtime, amp), device)
    if precision.level > logging.DEBUG:
        print(f"predict: {precision.message}", flush=True)
    network = inference_network(runtime, load_network(ckpt, device), ckpt, device, onnx_path, threads=threads)
    return network, section_inferer(variant, tta=tta, overlap=overlap, sw_batch_size=sw_batch_size,
                                    autocast=precision.dtype)


def normalization_for(input: str | Path, normalize: str | None = None, clip_percentiles=(1.0, 99.0),
                      clip_range=None) -> Normalization:
    """The intensity mapping for `input`: `normalize` if given, else "percentile" for SEG-Y and "auto" for images;
    `clip_range` (low, high) fixes the clip instead of percentiles."""
    if normalize in (None, "", "null"):
        normalize = "percentile" if is_segy_path(input) or is_mdio_path(input) else "auto"
    rng = None if clip_range in (None, "", "null") else tuple(float(v) for v in clip_range)
    return Normalization(normalize, tuple(float(v) for v in clip_percentiles), rng)


def predict_images(
    inputs: list[Path],
    out_dir: str | Path,
    network: nn.Module,
    inferer: Inferer,
    threshold: float = 0.5,
    normalization: Normalization = Normalization(),
    device="cpu",
    progress: bool = True,
    index: bool = False,
    valid_mask: str | Path | None = None,
    fill_value: float | None = None,
    model: dict | None = None,
) -> list[dict]:
    """Predict each section image and write its outputs into `out_dir` (created); `index`: also index.html.

    Names must be unique by stem (a.png and a.npy would write the same files). Returns one row per image:
    name, shape, salt_share (of the pixels with data), valid_share, normalisation, outputs. Pixels without data
    (`saltkit.seismic.validity`: NaN, `fill_value`, transparent, zero in the `valid_mask` image) are not
    predicted: NaN in `_prob.npy`. model: `model_provenance`'s dict, for the pictures' caption. Under torchrun
    the images are dealt out to the ranks.
    """
    from saltkit.seismic.figures import caption_text

    out_dir = Path(out_dir)
    stems = [p.stem for p in inputs]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise ValueError(f"section names {clash} occur more than once (with different suffixes); their outputs "
                         "would overwrite each other")
    earlier = check_section_outputs(inputs, out_dir)
    mask = None if valid_mask in (None, "") else read_valid_mask(valid_mask)
    caption = caption_text(threshold, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = idist.get_rank(), idist.get_world_size()
    rows, failed = [], []
    for path in tqdm(inputs[rank::world], unit="section", desc="predict",
                     disable=not progress_bars(progress) or rank != 0, leave=False):
        try:  # one unreadable section is reported with the others at the end; the rest are predicted
            check_section_memory(path)
            raw, alpha = read_section_with_alpha(path)
            valid = section_valid(raw, fill_value, alpha, mask, str(path))
            grey, norm = normalize_section(raw, normalization, str(path), valid)
        except (ValueError, OSError, Image.DecompressionBombError) as e:
            if len(inputs) == 1:
                raise
            failed.append({"name": path.name, "error": str(e), "outputs": {}})
            continue
        prob = predict_section(network, inferer, grey, device)
        prob[~valid] = np.nan
        outputs = write_section_outputs(out_dir, path.stem, grey, prob, threshold, caption)
        rows.append({"name": path.name, "shape": list(prob.shape), "salt_share": salt_share(prob, threshold),
                     "valid_share": float(valid.mean()), "normalization": norm, "outputs": outputs})
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (rows, failed))
        rows = sorted((r for part in gathered for r in part[0]), key=lambda r: r["name"])
        failed = sorted((r for part in gathered for r in part[1]), key=lambda r: r["name"])
    if rank == 0:
        # sections predicted into this folder by earlier runs stay listed: their files are still ours to replace
        names = {r["name"] for r in rows + failed}
        listed = sorted([r for r in earlier if r.get("name") not in names and r["outputs"]] + rows,
                        key=lambda r: r["name"])
        if index:
            write_index_html(out_dir, listed, failed)
        with atomic_write(out_dir / PREDICTIONS_JSON) as f:
            json.dump([{**r, "outputs": {k: str(v) for k, v in r["outputs"].items()}} for r in listed + failed], f,
                      indent=2)
    if failed:
        reasons = "; ".join(r["error"] for r in failed[:3]) + ("; ..." if len(failed) > 3 else "")
        raise SectionsNotRead(f"{len(failed)} of {len(rows) + len(failed)} sections could not be read, the other "
                              f"{len(rows)} were predicted (all listed in {out_dir / PREDICTIONS_JSON}): {reasons}")
    return rows


class SectionsNotRead(ValueError):
    """Some sections of a folder could not be read; the others were predicted and listed."""


PREDICTIONS_JSON = "predictions.json"
# Peak memory of predicting a section, per pixel, above the ~1 GB of the process (torch, the network): 72 bytes at
# 1000 x 1000, 97 at 2000 x 2000 (benchmarks/section_memory.py, docs/results.md); the whole section, its
# windows' blended outputs and the pictures are held.
SECTION_BYTES_PER_PIXEL = 100


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None where that is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_section_memory(path: Path) -> None:
    """Refuse, before reading it, a section whose prediction would need more memory than is available (the size
    from its header; `SECTION_BYTES_PER_PIXEL`), saying how much it needs."""
    shape, available = section_shape(path), available_memory()
    if shape is None or available is None:
        return
    need = shape[0] * shape[1] * SECTION_BYTES_PER_PIXEL
    if need > available:
        raise MemoryNeeded(f"{path}: predicting a {shape[0]} x {shape[1]} section needs about {need / 1e9:.1f} GB "
                           f"({SECTION_BYTES_PER_PIXEL} bytes a pixel) and {available / 1e9:.1f} GB are available; "
                           "predict it in pieces (crops of a few thousand pixels a side), or where there is more "
                           "memory")


class MemoryNeeded(ValueError):
    """A section too large for the memory available."""


def earlier_predictions(out_dir: Path) -> list[dict]:
    """The rows of `out_dir/predictions.json` written by an earlier predict ([] when there is none)."""
    path = out_dir / PREDICTIONS_JSON
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(rows, list) and all(isinstance(r["outputs"], dict) for r in rows)):
            raise TypeError
    except (ValueError, TypeError, KeyError):
        raise OutputClashError(f"{path} exists and is not a saltkit predict listing; pass another --out "
                               "(predict writes its outputs and predictions.json there)") from None
    return rows


def check_prediction_outputs(input: str | Path, output: str | Path) -> None:
    """For section images: `check_section_outputs` before the network loads (a SEG-Y output is checked by
    `predict_volume`)."""
    if str(input) and str(output) and not is_segy_path(input) and not is_segy_path(output):
        check_section_outputs(list_section_files(input), Path(output))


def check_section_outputs(inputs: list[Path], out_dir: Path) -> list[dict]:
    """Refuse, before any work, outputs that would replace an input image or a file predict did not write.

    A file predict wrote earlier is listed in `out_dir/predictions.json` and may be replaced (a rerun);
    returns that listing's rows. `x.png` predicted into its own folder would write `x_mask.png`, `x_prob.png`:
    refused when such a file is one of the inputs or exists without being listed.
    """
    earlier = earlier_predictions(out_dir)
    ours = {Path(p).name for r in earlier for p in r["outputs"].values()}  # the listing's folder is out_dir
    planned = [(p, o) for p in inputs for o in section_output_paths(out_dir, p.stem).values()]
    for source, output in planned:
        hit = next((p for p in inputs if same_file(output, p)), None)
        if hit is not None:
            raise OutputClashError(f"predicting {source} would write {output}, which is the input image {hit}; "
                                   "pass an --out folder other than the input folder")
    for source, output in planned:
        if output.exists() and output.name not in ours:
            raise OutputClashError(f"predicting {source} would replace {output}, a file saltkit predict did not "
                                   f"write (not in {out_dir / PREDICTIONS_JSON}); pass another --out folder")
    index = out_dir / "index.html"
    if index.exists() and not earlier:
        raise OutputClashError(f"{index} exists and was not written by saltkit predict; pass another --out folder")
    return earlier


def join_torchrun() -> bool:
    """Join torchrun's process group when launched by it with several processes; True if this call joined it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    from saltkit.training import init_distributed

    init_distributed(True)
    return True


def default_device(device=None) -> torch.device:
    """`device` if given, else this process's GPU (cuda:<local rank>) when there is one, else the CPU."""
    if device not in (None, "", "auto"):
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this process sees no CUDA GPU; use --device cpu")
        return chosen
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by torchrun, also before the group is joined
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def run_predict(
    input: str | Path,
    output: str | Path,
    network: nn.Module,
    inferer: Inferer,
    threshold: float = 0.5,
    normalization: Normalization | None = None,
    direction: str = "inline",
    dtype: str = "float32",
    iline_byte: int = 189,
    xline_byte: int = 193,
    clip_traces: int = DEFAULT_CLIP_TRACES,
    save_npy: bool = False,
    device="cpu",
    progress: bool = True,
    provenance: dict | None = None,
    valid_mask: str | Path | None = None,
    fill_value: float | None = None,
    qc: int = DEFAULT_QC,
    qc_inlines=None,
    qc_crosslines=None,
) -> dict:
    """Predict `input`: a SEG-Y volume into the SEG-Y `output`, or a section image / folder of them into the folder
    `output`. Returns a summary dict. The bundle's `predict.json` reaches it as `predictor` (`--predictor#qc 5`).

    Args:
        input: a section image (PNG/TIFF), a `.npy` 2-D array, a folder of them, or a SEG-Y volume.
        output: the output folder for images, the output `.sgy` file for a volume.
        network: the inference network (`(B, 3, H, W)` in [0, 1] -> salt and image logits).
        inferer: the section inferer (sliding window, flip TTA; `saltkit.inference.section_inferer`).
        threshold: salt where the probability is above it, for the masks and pictures.
        normalization: intensities to [0, 1]; None: percentile clip for SEG-Y, "auto" for images.
        direction: SEG-Y: "inline", "crossline" or "both" (averaged).
        dtype: SEG-Y output samples: "float32" probability or "uint8" (probability x 255).
        iline_byte: trace header byte of the inline number.
        xline_byte: trace header byte of the crossline number.
        clip_traces: SEG-Y traces sampled for the clip percentiles.
        save_npy: SEG-Y: also write OUT.npy, (inlines, crosslines, samples).
        device: the torch device the network runs on.
        progress: progress bars (drawn only on a terminal).
        provenance: settings and `provenance["model"]` (`model_provenance`), named in the pictures' captions.
        valid_mask: images: a mask image, non-zero where there is data (`saltkit.seismic.validity`).
        fill_value: the input value that marks no data (NaN always does).
        qc: SEG-Y: QC pictures of this many evenly spaced inlines and crosslines (`saltkit.seismic.qc`); 0: none.
        qc_inlines: SEG-Y: picture these inlines.
        qc_crosslines: SEG-Y: picture these crosslines."""
    if not str(input):
        raise ValueError("config key 'input' is empty; pass --input IMAGE|FOLDER|VOLUME.sgy")
    if is_mdio_path(input):
        raise ValueError(f"input {input}: MDIO volumes are predicted over Dask by saltkit predict VOLUME.mdio --out "
                         "OUT.mdio, not by the predict workflow")
    if not str(output):
        raise ValueError("config key 'output' is empty; pass --output DIR (images) or --output OUT.sgy (SEG-Y)")
    input, output = Path(input), Path(output)
    fill_value = None if fill_value in (None, "", "null") else float(fill_value)
    model = (provenance or {}).get("model")
    if is_segy_path(input):
        if valid_mask not in (None, "", "null"):
            raise ValueError(f"--valid-mask {valid_mask}: a mask image applies to section images; in the SEG-Y "
                             f"{input} dead or missing traces and --fill-value samples are the no-data areas")
        norm = normalization or Normalization(mode="percentile")
        return predict_volume(input, output, network, inferer, direction=direction, dtype=dtype,
                              iline_byte=iline_byte, xline_byte=xline_byte, normalization=norm,
                              clip_traces=clip_traces, save_npy=save_npy, device=device, progress=progress,
                              provenance=provenance, fill_value=fill_value, threshold=threshold, qc=qc,
                              qc_inlines=qc_inlines, qc_crosslines=qc_crosslines)
    if is_segy_path(output):
        raise ValueError(f"output {output} is a SEG-Y name but input {input} is not a SEG-Y volume (.sgy, .segy); "
                         "section images are predicted into a folder")
    files = list_section_files(input)
    rows = predict_images(files, output, network, inferer, threshold, normalization or Normalization(), device,
                          progress, index=input.is_dir(), valid_mask=None if valid_mask in ("", "null") else valid_mask,
                          fill_value=fill_value, model=model)
    salt = [r["salt_share"] for r in rows]
    return {"input": str(input), "output": str(output), "sections": len(rows),
            "salt_share": float(np.mean(salt)) if salt else 0.0,
            "index": str(output / "index.html") if input.is_dir() else None}
