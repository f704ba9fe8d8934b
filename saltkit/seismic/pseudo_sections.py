"""Pseudo-labels of whole sections: a teacher predicts unlabelled section images or every line of a SEG-Y volume,
and its certain pixels become a labelled sections folder that training on sections reads.

`pseudo_label_sections(input, ckpts, out)` writes

    OUT/<name>.png          the section as the network saw it: grey in [0, 1] as a 16-bit PNG
    OUT/<name>_mask.png     255 salt, 0 background, 128 not interpreted (ignored by the loss and the metric)
    OUT/manifest.json       the teachers and their weight fingerprints, the threshold, the certainty cut, the
                            amplitude clip (volumes), every section's source (file; direction and line number for
                            a volume), confidence and salt share, kept or not, and the set's fingerprint

A pixel is labelled when the teacher is certain of it (probability below 0.1 or above 0.9; salt where above the
teacher's tuned threshold); the others, and pixels without data, are 128. A section's confidence is the share of
its data pixels that are labelled; sections below `min_confidence` are left out. Several teachers' probabilities
are averaged. Volume sections are named `<volume>_inline_<number>` / `<volume>_crossline_<number>` by their
header numbers, so every pseudo-label traces back to its line. The folder appears complete or not at all.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from saltkit.data.pseudo import (
    FORMAT,
    MANIFEST,
    VERSION,
    labelled_volumes,
    section_names,
    set_fingerprint,
)
from saltkit.inference import section_inferer
from saltkit.inference.pseudo_labels import (
    CERTAIN_HIGH,
    CERTAIN_LOW,
    check_output_folder,
    load_teachers,
    teacher_postprocessing,
)
from saltkit.io import atomic_folder
from saltkit.labels import MASK_IMAGE_VALUES
from saltkit.seismic.normalize import Normalization, normalize_section
from saltkit.seismic.section_files import list_section_files, read_section_with_alpha
from saltkit.seismic.sections import predict_section, traces_section
from saltkit.seismic.validity import section_valid

SALT, BACKGROUND, NOT_INTERPRETED = 255, 0, 128
assert {SALT: 1.0, BACKGROUND: 0.0}.items() <= MASK_IMAGE_VALUES.items() and NOT_INTERPRETED in MASK_IMAGE_VALUES
DEFAULT_MIN_SECTION_CONFIDENCE = 0.5


@dataclass
class Section:
    """One section to pseudo-label: its name in the set, grey `(H, W)` in [0, 1], data pixels, and its source."""

    name: str
    grey: np.ndarray
    valid: np.ndarray
    source: dict


def image_sections(input: str | Path, normalization: Normalization = Normalization(),
                   fill_value: float | None = None) -> Iterator[Section]:
    """The section images at `input` (a file or a folder), read and scaled as `saltkit predict` reads them; a
    `NAME_mask.png` beside a section `NAME` is its mask, not a section."""
    paths = list_section_files(input)
    stems = {p.stem for p in paths}
    for path in paths:
        if path.stem.endswith("_mask") and path.stem[:-len("_mask")] in stems:
            continue
        raw, alpha = read_section_with_alpha(path)
        valid = section_valid(raw, fill_value, alpha, None, str(path))
        grey, _ = normalize_section(raw, normalization, str(path), valid)
        yield Section(path.stem, grey, valid, {"file": str(path.resolve())})


def volume_sections(path: str | Path, direction: str = "inline", iline_byte: int = 189, xline_byte: int = 193,
                    normalization: Normalization = Normalization(mode="percentile"), clip_traces: int = 2000,
                    fill_value: float | None = None, clip_out: dict | None = None) -> Iterator[Section]:
    """Every inline and/or crossline of the SEG-Y volume at `path` as a `(samples, traces)` section, the amplitudes
    clipped once for the whole volume as `saltkit predict` clips them (`clip_out` receives the clip)."""
    from saltkit.seismic.segy import check_direction, open_segy, read_geometry, read_layout, read_traces
    from saltkit.seismic.volume import amplitude_clip

    path = Path(path)
    layout = read_layout(path)
    with open_segy(layout) as f:
        geometry = read_geometry(f, layout, iline_byte, xline_byte)
        check_direction(geometry, direction, path)
        clip = amplitude_clip(f, layout, normalization, clip_traces, fill_value)
        if clip_out is not None:
            clip_out.update(clip.as_dict())
        for d in (["inline", "crossline"] if direction == "both" else [direction]):
            numbers = geometry.ilines if d == "inline" else geometry.xlines
            for k in range(geometry.count(d)):
                amplitudes = read_traces(f, geometry.section_traces(d, k), layout.samples)
                grey, valid = traces_section(amplitudes, clip.low, clip.high, fill_value)
                if not valid.any():
                    continue
                yield Section(f"{path.stem}_{d}_{int(numbers[k])}", grey, valid.T,
                              {"file": str(path.resolve()), "direction": d, "line": int(numbers[k]), "index": k})


def section_mask(prob: np.ndarray, valid: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 `(H, W)` pseudo-label: salt / background where the teacher is certain, not interpreted elsewhere."""
    certain = ((prob < CERTAIN_LOW) | (prob > CERTAIN_HIGH)) & valid
    mask = np.full(prob.shape, NOT_INTERPRETED, np.uint8)
    mask[certain] = np.where(prob[certain] > threshold, SALT, BACKGROUND)
    return mask


def write_section_pair(folder: Path, name: str, grey: np.ndarray, mask: np.ndarray) -> None:
    Image.fromarray(np.round(np.clip(grey, 0, 1) * 65535).astype(np.uint16)).save(folder / f"{name}.png")
    Image.fromarray(mask).save(folder / f"{name}_mask.png")


def pseudo_label_sections(input: str | Path, ckpts: Sequence[str | Path], out: str | Path,
                          min_confidence: float = DEFAULT_MIN_SECTION_CONFIDENCE, direction: str = "inline",
                          tta: bool = True, overlap: float = 0.5, device: str | torch.device = "cpu",
                          iline_byte: int = 189, xline_byte: int = 193, fill_value: float | None = None,
                          threshold="auto", command: Sequence[str] | None = None, exclude_dataset=None) -> dict:
    """Pseudo-label the section images or the SEG-Y volume at `input` with the teachers `ckpts` into the sections
    folder `out` (see the module docstring), leaving out the sections of the labelled sections folder
    `exclude_dataset`. Returns a summary: out, predicted, kept, skipped, threshold, fingerprint."""
    from saltkit.seismic.segy import is_segy_path

    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) \
            or not 0 <= min_confidence <= 1:
        raise ValueError(f"--min-confidence must be a number in [0, 1], got {min_confidence!r}")
    input = Path(input)
    excluded = set()
    if exclude_dataset is not None:
        if not Path(exclude_dataset).is_dir():
            raise ValueError(f"--exclude-dataset {exclude_dataset}: not a folder; give the labelled sections folder")
        excluded = section_names(exclude_dataset)
        if is_segy_path(input) and direction != "inline" and input.stem in labelled_volumes(excluded):
            raise ValueError(f"--direction {direction}: {exclude_dataset} labels lines of {input.name} and its "
                             "crosslines cross the held-out inlines; pseudo-label it with --direction inline")
    out = check_output_folder(out, input if input.is_dir() else input.parent)
    teachers = load_teachers(ckpts, device)
    settings, settings_line = teacher_postprocessing(teachers, threshold=threshold)
    inferers = [section_inferer(t.variant, tta=tta, overlap=overlap) for t in teachers]
    clip: dict = {}
    volume = is_segy_path(input)
    sections = volume_sections(input, direction, iline_byte, xline_byte, fill_value=fill_value, clip_out=clip) \
        if volume else image_sections(input, fill_value=fill_value)
    entries, skipped = [], []
    with atomic_folder(out) as partial:
        for s in sections:
            if s.name in excluded:
                skipped.append(s.name)
                continue
            prob = np.mean([predict_section(t.network, i, s.grey, device) for t, i in zip(teachers, inferers,
                                                                                           strict=True)], axis=0)
            mask = section_mask(prob, s.valid, settings.threshold)
            labelled = mask != NOT_INTERPRETED
            confidence = float(labelled.sum() / max(int(s.valid.sum()), 1))
            kept = confidence >= min_confidence
            if kept:
                write_section_pair(partial, s.name, s.grey, mask)
            entries.append({"name": s.name, **s.source, "shape": list(s.grey.shape),
                            "confidence": round(confidence, 6),
                            "salt_share": round(float((mask == SALT).sum() / max(int(labelled.sum()), 1)), 6),
                            "kept": kept})
        if not entries:
            raise ValueError(f"{input}: no section with data to pseudo-label")
        names = [e["name"] for e in entries if e["kept"]]
        if not names:
            best = max(e["confidence"] for e in entries)
            raise ValueError(f"no section reached --min-confidence {min_confidence} (the highest confidence is "
                             f"{best:.3f}); lower it, or use a better teacher")
        fingerprint = set_fingerprint([{"id": n, "image": partial / f"{n}.png", "label": partial / f"{n}_mask.png"}
                                       for n in names])
        manifest = {
            "format": FORMAT, "version": VERSION, "kind": "sections",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": list(sys.argv if command is None else command), "source": str(input.resolve()),
            "variant": teachers[0].variant, "teachers": [t.record() for t in teachers], "tta": bool(tta),
            "overlap": overlap, "threshold": settings.threshold, "threshold_source": settings_line,
            "labels": {"salt": SALT, "background": BACKGROUND, "not_interpreted": NOT_INTERPRETED,
                       "certain_below": CERTAIN_LOW, "certain_above": CERTAIN_HIGH},
            "confidence": {"rule": "share of a section's data pixels the teacher is certain of",
                           "min_confidence": min_confidence},
            "clip": clip or None, "direction": direction if volume else None,
            "predicted": len(entries), "kept": len(names), "items": entries, "fingerprint": fingerprint,
            "excluded": {"dataset": str(Path(exclude_dataset).resolve()), "skipped": skipped}
            if exclude_dataset is not None else None,
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return {"out": str(out), "predicted": len(entries), "kept": len(names), "skipped": skipped,
            "threshold": settings.threshold,
            "settings": settings_line, "fingerprint": fingerprint}


def run_pseudo_label(input: str | Path, ckpt, out: str | Path, sections: bool = False, probabilities=(),
                     variant: str | None = None, min_confidence: float | None = None, exclude_dataset=None,
                     tta: bool = True, batch_size: int = 32, device: str | torch.device = "cpu", link: bool = False,
                     direction: str = "inline", iline_byte: int = 189, xline_byte: int = 193,
                     fill_value: float | None = None, progress: bool = False, command: Sequence[str] | None = None,
                     **postprocessing) -> dict:
    """`saltkit pseudo-label` and the bundle's pseudo_label.json: tiles (`saltkit.inference.pseudo_labels`) or,
    with `sections` or a SEG-Y `input`, sections (`pseudo_label_sections`).

    Args:
        input: a folder of unlabelled tiles (or a dataset folder: its test/images), section images or a SEG-Y volume.
        ckpt: the teacher checkpoint, or a list of them (averaged); null with `probabilities` alone.
        out: the new folder for the set.
        sections: the input is section images of any size (a SEG-Y volume always is).
        probabilities: tiles only: saved teachers, probabilities.npz files written by the inference workflow.
        variant: the student's variant (pad / resize) when only `probabilities` are given.
        min_confidence: keep items at least this confident (null: the default of tiles or sections, 0.5).
        exclude_dataset: a labelled dataset whose train ids are never pseudo-labelled; sections and volumes: a
            labelled sections folder whose sections are left out.
        tta: flip test-time augmentation.
        batch_size: tiles per network batch.
        device: where the teachers run.
        link: tiles only: link the tiles into the set instead of copying them.
        direction: SEG-Y: the lines to pseudo-label, inline, crossline or both.
        iline_byte: SEG-Y: the trace header byte of the inline number.
        xline_byte: SEG-Y: the trace header byte of the crossline number.
        fill_value: the input value that marks no data (sections and volumes).
        progress: report progress on the console.
        command: the command line recorded in the manifest.
        postprocessing: threshold, min_component_size, image_threshold, min_area (`auto`: the teacher's tuned
            value); sections use the threshold only.
    """
    from saltkit.inference.pseudo_labels import DEFAULT_MIN_CONFIDENCE, pseudo_label
    from saltkit.seismic.segy import is_segy_path

    ckpts = [] if ckpt in (None, "", "null") else [ckpt] if isinstance(ckpt, (str, Path)) else list(ckpt)
    probabilities = [probabilities] if isinstance(probabilities, (str, Path)) else list(probabilities or ())
    if sections or is_segy_path(input):
        if probabilities:
            raise ValueError("--probabilities: saved probabilities teach tiles; give --ckpt for sections and volumes")
        if not ckpts:
            raise ValueError("--ckpt: give the teacher checkpoint(s)")
        return pseudo_label_sections(input, ckpts, out, DEFAULT_MIN_SECTION_CONFIDENCE if min_confidence is None
                                     else min_confidence, direction=direction, tta=tta, device=device,
                                     iline_byte=iline_byte, xline_byte=xline_byte, fill_value=fill_value,
                                     threshold=postprocessing.get("threshold", "auto"), command=command,
                                     exclude_dataset=exclude_dataset)
    return pseudo_label(input, ckpts, out, DEFAULT_MIN_CONFIDENCE if min_confidence is None else min_confidence,
                        exclude_dataset=exclude_dataset, tta=tta, batch_size=batch_size, device=device, link=link,
                        progress=progress, command=command, probabilities=probabilities, variant=variant,
                        **postprocessing)
