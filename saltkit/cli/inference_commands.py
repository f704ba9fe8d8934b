"""`saltkit ensemble`, `saltkit export` and `saltkit pseudo-label` (listed by saltkit.cli through `register`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from saltkit.cli.subcommand import Subcommand, register_subcommand, tta_option


def _ensemble_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("probs", nargs="+", type=Path, metavar="PROBS.npz",
                   help="probabilities written by the inference bundle (same tile ids in every file)")
    p.add_argument("--out", type=Path, default=None,
                   help="submission CSV to write (default: ensemble/submission.csv in the inputs' common folder, "
                        "e.g. runs/tgs/ensemble/submission.csv)")
    p.add_argument("--threshold", type=float, default=0.5, help="salt when the mean probability is > this (0.5)")
    p.add_argument("--min-component-size", type=int, default=0,
                   help="remove 4-connected salt components smaller than this many pixels (0: off)")
    p.add_argument("--image-threshold", type=float, default=None,
                   help="empty a tile whose mean image-head probability is below this (default off)")
    p.add_argument("--min-area", type=int, default=0, help="empty a tile with fewer salt pixels (0: off)")
    p.add_argument("--save-probs", type=Path, default=None, metavar="OUT.npz",
                   help="also write the averaged probabilities (to ensemble them further)")


def default_ensemble_out(probs: list[Path]) -> Path:
    """`ensemble/submission.csv` in the folder the inputs share (runs/tgs/*_fold*/... -> runs/tgs/ensemble/).
    """
    common = Path(os.path.commonpath([p.resolve().parent for p in probs]))
    if common.parent == common:
        raise ValueError(f"the inputs share no folder but {common}; give --out")
    out = common / "ensemble" / "submission.csv"
    return out.relative_to(Path.cwd().resolve()) if out.is_relative_to(Path.cwd().resolve()) else out


def _ensemble_run(args: argparse.Namespace) -> int:
    from saltkit.inference.ensemble import ensemble_files, write_prediction
    from saltkit.inference.postprocess import PostProcessingSettings
    from saltkit.inference.probabilities import write_probabilities
    from saltkit.io import atomic_write, check_outputs, check_writable

    settings = PostProcessingSettings(threshold=args.threshold, min_component_size=args.min_component_size,
                              image_threshold=args.image_threshold, min_area=args.min_area)
    out = args.out or default_ensemble_out(args.probs)
    check_outputs({"--out": out, "--save-probs": args.save_probs}, {"PROBS.npz": args.probs})
    check_writable(out.parent, "--out")
    if args.save_probs is not None:
        check_writable(args.save_probs.parent, "--save-probs")
    mean = ensemble_files(args.probs)
    if args.save_probs is None:
        summary = write_prediction(mean, out, settings)
    else:
        # the npz is renamed into place only after the submission was written: both files or neither
        with atomic_write(args.save_probs, "wb") as f:
            write_probabilities(f, mean)
            summary = write_prediction(mean, out, settings)
        print(f"wrote {args.save_probs}")
    print(f"ensembled {len(args.probs)} files over {summary['tiles']} tiles ({settings})")
    print(f"empty predictions: {summary['empty']}/{summary['tiles']} ({summary['empty_share']:.1%})")
    print(f"wrote {summary['submission']}")
    return 0


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", type=Path,
                   help="checkpoint with 'network' and 'arch' (e.g. runs/tgs/pad_fold0/swa.pt)")
    p.add_argument("--format", choices=("torchscript", "onnx", "model"), default="torchscript",
                   help="torchscript (default; returns the final logit), onnx (final and image logits, for "
                        "ONNX Runtime; needs pip install 'saltkit[onnx]'), or model: the bundle's model file "
                        "(weights, arch, variant, tuned post-processing, scores and the run record, read with "
                        "weights_only=True), e.g. --out bundles/saltnet/models/model.pt")
    p.add_argument("--out", type=Path, default=None,
                   help="file to write (default: beside the checkpoint, runs/tgs/pad_fold0/swa.pt -> "
                        "swa.ts / swa.onnx; --format model needs it)")
    p.add_argument("--image-size", type=int, default=128, help="network input size of the export (128)")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the export's output with the checkpoint's")
    m = p.add_argument_group("the bundle's model file (with --format model)")
    m.add_argument("--half", action="store_true",
                   help="store the weights as float16 (half the size; they load as float32), written only when the "
                        "masks of the sample's test tiles stay as the checkpoint's")
    m.add_argument("--record", type=Path, default=None,
                   help="the run record to embed (default: config.json beside the checkpoint)")
    q = p.add_argument_group("INT8 (with --format onnx --quantize int8)")
    q.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8: statically quantized with ONNX Runtime (QDQ, per-channel int8 weights, uint8 "
                        "activations) on training tiles of the checkpoint's fold; written only when it loses at most "
                        "--max-metric-loss of the competition metric on the fold's validation tiles "
                        "(default out: swa.pt -> swa.int8.onnx)")
    q.add_argument("--calibration-tiles", type=int, default=256,
                   help="training tiles the ranges are calibrated on (256)")
    q.add_argument("--max-metric-loss", type=float, default=0.005,
                   help="largest allowed drop of the validation metric, float32 -> INT8 (0.005)")
    q.add_argument("--dataset-dir", default=None, help="dataset of the fold (default: the checkpoint's run record)")
    q.add_argument("--fold", type=int, default=None,
                   help="the checkpoint's validation fold (default: its run record)")
    q.add_argument("--folds-csv", default=None, help="fold file (default: the run record's, else runs/folds/...)")
    q.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads while scoring (default: one per core)")


def _export_run(args: argparse.Namespace) -> int:
    from saltkit.export import ONNX_TOLERANCE, export_onnx, export_torchscript

    size = args.image_size
    if args.format != "model" and (args.half or args.record is not None):
        print("saltkit export: error: --half and --record belong to --format model", file=sys.stderr)
        return 2
    if args.format == "model":
        return _export_model(args)
    if args.quantize is not None:
        return _export_int8(args)
    if args.format == "onnx":
        try:
            out, difference = export_onnx(args.ckpt, args.out or args.ckpt.with_suffix(".onnx"), image_size=size,
                                          verify=not args.no_verify)
        except ImportError as e:
            print(f"saltkit export: error: {e}", file=sys.stderr)
            return 2
        checked = "" if difference is None else (f" (checked with ONNX Runtime on sample tiles: max probability "
                                                 f"difference {difference:.2g} <= {ONNX_TOLERANCE:g})")
        print(f"wrote {out}: ONNX, image (B, 3, {size}, {size}) tiles in [0, 1] -> logit (B, 1, {size}, {size}), "
              f"image_logit (B, 1){checked}")
        return 0
    out = export_torchscript(args.ckpt, args.out or args.ckpt.with_suffix(".ts"), image_size=size, verify=not args.no_verify)
    print(f"wrote {out}: TorchScript, (B, 3, {size}, {size}) tiles in [0, 1] -> "
          "(B, 1, H, W) final logit" + ("" if args.no_verify else " (verified against the checkpoint)"))
    return 0


def _export_model(args: argparse.Namespace) -> int:
    from saltkit.export import MODEL_SIZE_LIMIT, package_model

    if args.out is None:
        print("saltkit export: error: --format model needs --out (e.g. --out bundles/saltnet/models/model.pt)",
              file=sys.stderr)
        return 2
    if args.quantize is not None:
        print("saltkit export: error: --quantize int8 quantizes the ONNX export, not the model file", file=sys.stderr)
        return 2
    result = package_model(args.ckpt, args.out, half=args.half, record=args.record, verify=not args.no_verify)
    print(f"wrote {result.path}: the model file of {args.ckpt} ({result})")
    if result.size > MODEL_SIZE_LIMIT:
        print(f"saltkit export: note: {result.path} is larger than the {MODEL_SIZE_LIMIT // 2**20} MB the bundle "
              "ships" + ("" if args.half else "; --half stores it in half the size"))
    return 0


def _export_int8(args: argparse.Namespace) -> int:
    from saltkit.inference.quantize import export_int8

    if args.format != "onnx":
        print("saltkit export: error: --quantize int8 quantizes the ONNX export: add --format onnx", file=sys.stderr)
        return 2
    try:
        result = export_int8(args.ckpt, args.out, calibration_tiles=args.calibration_tiles,
                             max_metric_loss=args.max_metric_loss, dataset_dir=args.dataset_dir, fold=args.fold,
                             folds_csv=args.folds_csv, threads=args.threads, image_size=args.image_size)
    except ImportError as e:
        print(f"saltkit export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result.path}: ONNX INT8 (QDQ), same inputs and outputs as the float32 export; {result}")
    return 0


def _auto_or_number(text: str):
    """A post-processing option: `auto` (the teacher's tuned value) or `null` as they are, else a number."""
    if text.strip().lower() in ("auto", "null", "none"):
        return text
    return int(text) if text.strip().lstrip("-").isdigit() else float(text)


MIN_CONFIDENCE = 0.5  # saltkit.inference.pseudo_labels.DEFAULT_MIN_CONFIDENCE (not imported: it loads torch)


def _pseudo_label_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path,
                   help="folder of unlabelled 101x101 tiles (e.g. DATASET/test/images; a dataset folder means its "
                        "test/images); with --sections, section images of any size; or a SEG-Y volume")
    p.add_argument("--ckpt", type=Path, nargs="+", default=[], metavar="CKPT",
                   help="teacher checkpoint(s) of one variant; several are averaged "
                        "(e.g. runs/tgs/pad_fold*/swa.pt)")
    p.add_argument("--probabilities", type=Path, nargs="+", default=[], metavar="NPZ",
                   help="saved teachers: probabilities.npz of these tiles written by saltkit inference, averaged "
                        "with the checkpoints (tiles only)")
    p.add_argument("--variant", choices=("pad", "resize"), default=None,
                   help="the student's variant, needed when only --probabilities are given")
    p.add_argument("--out", type=Path, required=True,
                   help="new folder for the set: train/images, train/masks, train.csv, manifest.json")
    p.add_argument("--min-confidence", type=float, default=MIN_CONFIDENCE,
                   help=f"keep tiles whose confidence (certain pixels x image-head certainty) is at least this "
                        f"({MIN_CONFIDENCE})")
    p.add_argument("--exclude-dataset", type=Path, default=None, metavar="DIR",
                   help="labelled dataset whose train ids are never pseudo-labelled (skipped when among the tiles); "
                        "sections and volumes: the labelled sections folder (its sections are skipped)")
    for key, default in (("threshold", "auto"), ("min-component-size", "auto"), ("image-threshold", "auto"),
                         ("min-area", "auto")):
        p.add_argument(f"--{key}", type=_auto_or_number, default=default,
                       help="post-processing (auto: the teacher's tuned value, else the plain default)")
    p.add_argument("--tta", type=tta_option, default=True, help="flip test-time augmentation, true/false (true)")
    p.add_argument("--link", action="store_true", help="link the tiles into train/images instead of copying them")
    p.add_argument("--batch-size", type=int, default=32, help="tiles per network batch (32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present, else cpu)")
    p.add_argument("--sections", action="store_true",
                   help="the input is section images of any size (a SEG-Y volume always is): write a sections "
                        "folder (NAME.png, NAME_mask.png with 128 where the teacher is unsure, manifest.json)")
    p.add_argument("--direction", choices=("inline", "crossline", "both"), default="inline",
                   help="SEG-Y: pseudo-label the inlines, the crosslines or both (inline)")
    p.add_argument("--iline-byte", type=int, default=189, help="SEG-Y: trace header byte of the inline number")
    p.add_argument("--xline-byte", type=int, default=193, help="SEG-Y: trace header byte of the crossline number")
    p.add_argument("--fill-value", type=float, default=None, help="input value that marks no data")


def _pseudo_label_run(args: argparse.Namespace) -> int:
    import torch

    from saltkit.inference.pseudo_labels import table_text
    from saltkit.seismic.pseudo_sections import run_pseudo_label

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    summary = run_pseudo_label(args.images, args.ckpt, args.out, sections=args.sections,
                               probabilities=args.probabilities, variant=args.variant,
                               min_confidence=args.min_confidence, exclude_dataset=args.exclude_dataset, tta=args.tta,
                               batch_size=args.batch_size, device=device, link=args.link, direction=args.direction,
                               iline_byte=args.iline_byte, xline_byte=args.xline_byte, fill_value=args.fill_value,
                               progress=True, command=["saltkit", *sys.argv[1:]], threshold=args.threshold,
                               min_component_size=args.min_component_size, image_threshold=args.image_threshold,
                               min_area=args.min_area)
    print(summary["settings"])
    if "table" not in summary:  # sections
        if summary["skipped"]:
            print(f"skipped {len(summary['skipped'])} labelled section(s) of {args.exclude_dataset}")
        print(f"kept {summary['kept']} of {summary['predicted']} sections (share of certain pixels >= "
              f"{args.min_confidence}); wrote {summary['out']} (fingerprint {summary['fingerprint']})")
        return 0
    if summary["skipped"]:
        print(f"skipped {len(summary['skipped'])} labelled tile(s) of {args.exclude_dataset}")
    print(table_text(summary["table"]))
    print(f"kept {summary['kept']} of {summary['predicted']} tiles (confidence >= {args.min_confidence}); wrote "
          f"{summary['out']} (fingerprint {summary['fingerprint']})")
    return 0


def register(registry: dict[str, Subcommand]) -> None:
    """Add the inference subcommands to the saltkit CLI registry."""
    register_subcommand(registry, Subcommand(
        "ensemble", "average saved probabilities of several runs into one validated submission",
        _ensemble_arguments, _ensemble_run))
    register_subcommand(registry, Subcommand(
        "pseudo-label", "predict unlabelled tiles with a teacher and write the confident ones as a training set",
        _pseudo_label_arguments, _pseudo_label_run))
    register_subcommand(registry, Subcommand(
        "export", "export a checkpoint's network to TorchScript (the default) or ONNX, or package it as the bundle's "
        "model file",
        _export_arguments, _export_run))
