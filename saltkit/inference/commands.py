"""`saltkit ensemble` and `saltkit export` (listed by saltkit.cli through `register`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from saltkit.subcommands import Subcommand, register_subcommand


def _ensemble_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("probs", nargs="+", type=Path, metavar="PROBS.npz",
                   help="probabilities written by the inference bundle (same tile ids in every file)")
    p.add_argument("--out", type=Path, default=None,
                   help="submission CSV to write (default: ensemble/submission.csv in the inputs' common folder, "
                        "e.g. runs/ensemble/submission.csv)")
    p.add_argument("--threshold", type=float, default=0.5, help="salt when the mean probability is > this (0.5)")
    p.add_argument("--min-component-size", type=int, default=0,
                   help="remove 4-connected salt components smaller than this many pixels (0: off)")
    p.add_argument("--image-threshold", type=float, default=None,
                   help="empty a tile whose mean image-head probability is below this (default off)")
    p.add_argument("--min-area", type=int, default=0, help="empty a tile with fewer salt pixels (0: off)")
    p.add_argument("--save-probs", type=Path, default=None, metavar="OUT.npz",
                   help="also write the averaged probabilities (to ensemble them further)")


def default_ensemble_out(probs: list[Path]) -> Path:
    """`ensemble/submission.csv` in the folder the inputs share (runs/*_fold*/... -> runs/ensemble/)."""
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
    p.add_argument("ckpt", type=Path, help="checkpoint with 'network' and 'arch' (e.g. runs/pad_fold0/swa.pt)")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript",
                   help="torchscript (default; returns the final logit) or onnx (final and image logits, for "
                        "ONNX Runtime; needs pip install 'saltkit[onnx]')")
    p.add_argument("--out", type=Path, default=None, help="file to write (default: beside the checkpoint, runs/pad_fold0/swa.pt -> swa.ts / swa.onnx)")
    p.add_argument("--image-size", type=int, default=128, help="network input size of the export (128)")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the export's output with the checkpoint's")


def _export_run(args: argparse.Namespace) -> int:
    from saltkit.export import ONNX_TOLERANCE, export_onnx, export_torchscript

    size = args.image_size
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


def register(registry: dict[str, Subcommand]) -> None:
    """Add the inference subcommands to the saltkit CLI registry."""
    register_subcommand(registry, Subcommand(
        "ensemble", "average saved probabilities of several runs into one validated submission",
        _ensemble_arguments, _ensemble_run))
    register_subcommand(registry, Subcommand(
        "export", "export a checkpoint's network to TorchScript (the default) or ONNX",
        _export_arguments, _export_run))
