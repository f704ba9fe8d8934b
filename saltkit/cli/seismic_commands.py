"""`saltkit predict` (section images and SEG-Y volumes) and `saltkit mosaic` (real sections from the tiles)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from saltkit.cli.subcommand import Subcommand, register_subcommand, tta_option


def _threshold(text: str):
    """`--threshold 0.4` as a number; `auto` (or anything else, for the check to name) as it is."""
    try:
        return float(text)
    except ValueError:
        return text


def _path_or_url(text: str):
    """A local path as a Path; a URL (s3://..., memory://...) as it is: Path would merge its slashes."""
    return text if "://" in text else Path(text)


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=_path_or_url,
                   help="section image (PNG/TIFF, grey, 8/16-bit), .npy 2-D array, a folder of them, a SEG-Y volume "
                        "(.sgy/.segy) or an MDIO volume (.mdio, local or an fsspec URL)")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="trained checkpoint (e.g. runs/tgs/pad_fold0/swa.pt; default: the bundle's model, "
                        "bundles/saltnet/models/model.pt)")
    p.add_argument("--out", type=_path_or_url, required=True,
                   help="output folder for images; output SEG-Y file (OUT.sgy) for a SEG-Y volume; output MDIO "
                        "dataset (OUT.mdio, local or URL) for an MDIO volume")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap, 0 <= x <= 0.9 (0.5)")
    p.add_argument("--tta", type=tta_option, default=True, help="flip test-time augmentation, true/false (true)")
    p.add_argument("--sw-batch-size", type=int, default=16, help="windows per network batch (16)")
    p.add_argument("--threshold", default="auto",
                   help="salt where probability > this, for masks (auto: the checkpoint's tuned threshold, else 0.5)")
    p.add_argument("--normalize", choices=("auto", "dtype", "percentile"), default=None,
                   help="intensity mapping to [0, 1]: images default 'auto' (8/16-bit grey by full scale, other "
                        "values by percentiles), SEG-Y always 'percentile'")
    p.add_argument("--clip-percentiles", type=float, nargs=2, default=(1.0, 99.0), metavar=("LOW", "HIGH"),
                   help="percentiles mapped to 0 and 1 (1 99)")
    p.add_argument("--clip-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="fixed values mapped to 0 and 1 instead of percentiles (e.g. from a previous run's OUT.json)")
    p.add_argument("--direction", choices=("inline", "crossline", "both"), default="inline",
                   help="SEG-Y: predict inline sections, crossline sections, or both averaged (inline)")
    p.add_argument("--dtype", choices=("float32", "uint8"), default="float32",
                   help="SEG-Y output samples: IEEE float probability, or uint8 = probability * 255 (float32)")
    p.add_argument("--iline-byte", type=int, default=189, help="trace header byte of the inline number (189)")
    p.add_argument("--xline-byte", type=int, default=193, help="trace header byte of the crossline number (193)")
    p.add_argument("--clip-traces", type=int, default=2000, help="SEG-Y traces sampled for the clip percentiles")
    p.add_argument("--npy", action="store_true", help="SEG-Y: also write OUT.npy, (inlines, crosslines, samples)")
    p.add_argument("--valid-mask", type=Path, default=None,
                   help="images: a mask image of the section's size, non-zero where there is data (no-data pixels "
                        "are not predicted: NaN probability); transparent pixels of the input count as no data too")
    p.add_argument("--fill-value", type=float, default=None,
                   help="input value that marks no data (NaN always does; SEG-Y: dead and missing traces too)")
    p.add_argument("--qc", type=int, default=3,
                   help="SEG-Y: QC pictures of this many evenly spaced inlines and crosslines, and a map, in the "
                        "folder OUT_qc beside OUT.sgy (3; 0: none)")
    p.add_argument("--qc-inlines", default=None, metavar="N,N", help="SEG-Y: picture these inlines (e.g. 120,125)")
    p.add_argument("--qc-crosslines", default=None, metavar="N,N", help="SEG-Y: picture these crosslines")
    p.add_argument("--variant", choices=("pad", "resize"), default=None,
                   help="only for checkpoints that do not record their variant")
    p.add_argument("--runtime", choices=("torch", "onnxruntime", "onnxruntime-int8"), default="torch",
                   help="torch, or onnxruntime on the CPU (the checkpoint is exported beside itself as .onnx once; "
                        "pip install 'saltkit[onnx]'), or onnxruntime-int8 (its INT8 export, .int8.onnx, checked on "
                        "the checkpoint's fold)")
    p.add_argument("--onnx-path", type=Path, default=None, metavar="FILE",
                   help="ONNX Runtime: the checkpoint's ONNX export, made there when missing (default: beside the "
                        "checkpoint; for the bundle's model runs/bundle_model/)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: one per core); MDIO: torch threads of each Dask "
                        "worker (default: the cores shared out)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: this process's GPU, else cpu)")
    p.add_argument("--amp", choices=("auto", "true", "false", "bf16", "fp16"), default="false",
                   help="network precision: auto (bf16 where the processor runs it natively, else float32), true "
                        "(bf16), false (float32; the default)")
    p.add_argument("--workers", type=int, default=1,
                   help="MDIO: processes of the local Dask cluster, one thread each (1)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="MDIO: run on this Dask scheduler (tcp://HOST:8786) instead of a local cluster; its workers "
                        "need saltkit installed and the checkpoint at the same path")
    p.add_argument("--overwrite", action="store_true", help="MDIO: replace an existing output dataset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _predict_run(args: argparse.Namespace) -> int:
    import torch

    from saltkit.checkpoints import shipped_model
    from saltkit.inference.postprocess_tuned import prediction_threshold
    from saltkit.seismic.mdio_volume import is_mdio_path
    from saltkit.seismic.predict import (
        check_prediction_outputs,
        default_device,
        join_torchrun,
        load_predictor,
        normalization_for,
        run_predict,
    )
    from saltkit.seismic.provenance import model_provenance
    from saltkit.seismic.segy import is_segy_path, read_layout

    if is_mdio_path(args.input):
        return _predict_mdio_run(args)
    joined = join_torchrun()
    try:
        if is_segy_path(args.input):
            read_layout(args.input)  # a bad volume or the missing extra fails before the network loads
        check_prediction_outputs(args.input, args.out)
        if args.ckpt is None:
            args.ckpt = Path(shipped_model(log=lambda line: print(f"predict: {line}", flush=True)))
        device = default_device(args.device)
        norm = normalization_for(args.input, args.normalize, args.clip_percentiles, args.clip_range)
        threshold = prediction_threshold(args.ckpt, _threshold(args.threshold))
        network, inferer = load_predictor(args.ckpt, device, args.tta, args.overlap, args.sw_batch_size, args.variant,
                                          runtime=args.runtime, threads=args.threads, amp=args.amp,
                                          onnx_path=args.onnx_path)
        provenance = {"ckpt": str(args.ckpt), "tta": args.tta, "overlap": args.overlap, "runtime": args.runtime,
                      "model": model_provenance(args.ckpt)}
        summary = run_predict(args.input, args.out, network, inferer, threshold=threshold, normalization=norm,
                              direction=args.direction, dtype=args.dtype, iline_byte=args.iline_byte,
                              xline_byte=args.xline_byte, clip_traces=args.clip_traces, save_npy=args.npy,
                              device=device, progress=not args.no_progress, provenance=provenance,
                              valid_mask=args.valid_mask, fill_value=args.fill_value, qc=args.qc,
                              qc_inlines=args.qc_inlines, qc_crosslines=args.qc_crosslines)
    except ImportError as e:  # the optional SEG-Y extra
        print(f"saltkit predict: error: {e}", file=sys.stderr)
        return 2
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    if "sections" in summary:
        print(f"predicted {summary['sections']} section(s) from {summary['input']}: mean salt share "
              f"{summary['salt_share']:.1%}; wrote {summary['output']}"
              + (f" (see {summary['index']})" if summary["index"] else ""))
    else:
        il, xl = summary["ilines"], summary["xlines"]
        print(f"predicted {summary['input']} ({il['count']} inlines x {xl['count']} crosslines x "
              f"{summary['samples']} samples, {summary['direction']}): wrote {summary['output']}"
              + (f" and {summary['npy']}" if summary["npy"] else "")
              + f"; amplitude clip {summary['clip']['range'][0]:.6g} .. {summary['clip']['range'][1]:.6g}"
              + f"; salt in {summary['salt_share']:.1%} of the samples with data"
              + (f" ({summary['dead_traces']} dead and {summary['missing_traces']} missing traces left out)"
                 if summary["dead_traces"] or summary["missing_traces"] else "")
              + (f"; QC pictures: {summary['qc']}" if summary["qc"] else ""))
    return 0


def _predict_mdio_run(args: argparse.Namespace) -> int:
    """`saltkit predict VOLUME.mdio --out OUT.mdio`: over Dask (`saltkit.seismic.mdio_volume`)."""
    import os
    from dataclasses import asdict

    from saltkit.checkpoints import shipped_model
    from saltkit.inference.postprocess_tuned import prediction_threshold
    from saltkit.seismic.mdio_volume import (
        PredictorSettings,
        check_mdio_output,
        predict_mdio,
        require_mdio,
    )
    from saltkit.seismic.predict import default_device, normalization_for
    from saltkit.seismic.provenance import model_provenance

    segy_only = {"--npy": args.npy, "--dtype uint8": args.dtype != "float32", "--valid-mask": args.valid_mask,
                 "--qc-inlines": args.qc_inlines, "--qc-crosslines": args.qc_crosslines}
    given = [name for name, value in segy_only.items() if value]
    if given:
        raise ValueError(f"{', '.join(given)}: not for MDIO volumes ({args.input}); the output is a float32 "
                         "MDIO dataset, without QC pictures")
    try:
        require_mdio()
    except ImportError as e:
        print(f"saltkit predict: error: {e}", file=sys.stderr)
        return 2
    check_mdio_output(str(args.input), str(args.out), args.overwrite)
    if args.ckpt is None:
        args.ckpt = Path(shipped_model(log=lambda line: print(f"predict: {line}", flush=True)))
    threads = args.threads or (None if args.scheduler else max(1, (os.cpu_count() or 1) // max(1, args.workers)))
    settings = PredictorSettings(str(args.ckpt), str(default_device(args.device)), args.tta, args.overlap,
                                 args.sw_batch_size, args.variant, args.runtime, threads, args.amp,
                                 None if args.onnx_path is None else str(args.onnx_path))
    provenance = {"ckpt": str(args.ckpt), "settings": asdict(settings),
                  "model": model_provenance(args.ckpt)}
    s = predict_mdio(str(args.input), str(args.out), settings, direction=args.direction,
                     normalization=normalization_for(args.input, args.normalize, args.clip_percentiles,
                                                     args.clip_range),
                     clip_traces=args.clip_traces, fill_value=args.fill_value,
                     threshold=prediction_threshold(args.ckpt, _threshold(args.threshold)),
                     workers=args.workers, scheduler=args.scheduler, overwrite=args.overwrite,
                     device=settings.device, progress=not args.no_progress, provenance=provenance)
    il, xl, samples = s["shape"]
    print(f"predicted {s['input']} ({il} inlines x {xl} crosslines x {samples} samples, {s['direction']}) on "
          f"{s['workers']} Dask worker(s) in {s['seconds']:.0f} s: wrote {s['output']}; amplitude clip "
          f"{s['clip']['range'][0]:.6g} .. {s['clip']['range'][1]:.6g}; salt in {s['salt_share']:.1%} of the "
          "samples with data")
    return 0


def _mosaic_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset_dir", type=Path, help="dataset folder holding mosaics.csv and train/test images")
    p.add_argument("names", nargs="*", help="mosaics to write (default: list the largest ones)")
    p.add_argument("--out", type=Path, default=Path("mosaics"), help="folder for NAME.png and NAME_mask.png")
    p.add_argument("--mosaics-csv", type=Path, default=None, help="default DATASET_DIR/mosaics.csv")


def _mosaic_run(args: argparse.Namespace) -> int:
    import numpy as np

    from saltkit.seismic.mosaics import assemble_mosaic, mosaic_summary, read_mosaics
    from saltkit.seismic.section_files import write_png

    table = read_mosaics(args.mosaics_csv or args.dataset_dir / "mosaics.csv")
    if not args.names:
        print(mosaic_summary(table).head(20).to_string())
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        m = assemble_mosaic(args.dataset_dir, name, table)
        # grey + alpha: absent cells are transparent, so predicting the picture leaves them out (no data)
        write_png(args.out / f"{name}.png", np.dstack([m.image, np.where(m.present, 255, 0).astype(np.uint8)]))
        # 0 background, 255 salt, 128 not labelled (test tile or absent cell)
        write_png(args.out / f"{name}_mask.png", np.where(m.labelled, m.mask * 255, 128).astype(np.uint8))
        print(f"wrote {args.out / name}.png ({m.shape[0]}x{m.shape[1]}, {len(m.cells)} tiles, "
              f"{int(m.cells['labelled'].sum())} labelled) and {name}_mask.png")
    return 0


def _sections_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("volume", type=Path, help="SEG-Y volume")
    p.add_argument("--mask", type=Path, required=True,
                   help="SEG-Y mask volume of the same geometry: 1 salt, 0 background, -1 not interpreted")
    p.add_argument("--out", type=Path, required=True, help="new sections folder (train with --sections_dir OUT)")
    p.add_argument("--direction", choices=("inline", "crossline", "both"), default="inline",
                   help="sections to write: inlines, crosslines (cut at the folds' inline ranges) or both")
    p.add_argument("--k", type=int, default=5, help="folds: K contiguous inline ranges (default 5)")
    p.add_argument("--iline-byte", type=int, default=189, help="trace header byte of the inline number")
    p.add_argument("--xline-byte", type=int, default=193, help="trace header byte of the crossline number")
    p.add_argument("--fill-value", type=float, default=None, help="volume value that marks no data")


def _sections_run(args: argparse.Namespace) -> int:
    from saltkit.seismic.labelled_volume import volume_to_sections

    s = volume_to_sections(args.volume, args.mask, args.out, direction=args.direction, k=args.k,
                           iline_byte=args.iline_byte, xline_byte=args.xline_byte, fill_value=args.fill_value,
                           command=["saltkit", *sys.argv[1:]])
    ranges = ", ".join(f"{a}-{b}" for a, b in s["inline_ranges"])
    print(f"wrote {s['sections']} labelled sections ({s['labelled_pixels']} labelled pixels) to {s['out']}; "
          f"folds by inline range ({ranges}) in {s['folds_csv']}")
    print(f"train on them: saltkit train configs/pad.json --sections_dir {s['out']} --folds_csv {s['folds_csv']} "
          f"--num_folds {args.k} --init_ckpt CKPT")
    return 0


def register(registry: dict[str, Subcommand]) -> None:
    """Add the seismic subcommands to the saltkit CLI registry."""
    register_subcommand(registry, Subcommand(
        "predict", "salt probability of section images of any size or of a whole SEG-Y volume",
        _predict_arguments, _predict_run))
    register_subcommand(registry, Subcommand(
        "mosaic", "assemble real seismic sections from the tiles listed in mosaics.csv",
        _mosaic_arguments, _mosaic_run))
    register_subcommand(registry, Subcommand(
        "sections", "turn a SEG-Y volume and its mask volume into labelled sections to train on, folds by inline range",
        _sections_arguments, _sections_run))
