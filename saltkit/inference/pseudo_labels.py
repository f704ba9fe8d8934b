"""Pseudo-labels: a teacher (one checkpoint, or several whose probabilities are averaged) predicts unlabelled tiles
with flip TTA and its tuned post-processing, and the confident predictions become a training set.

`pseudo_label(images, ckpts, out)` writes, in the competition layout that training reads,

    OUT/train/images/<id>.png   the tile (a copy, or a symbolic link with `link`)
    OUT/train/masks/<id>.png    the teacher's post-processed mask, 0 / 255
    OUT/train.csv               id,rle_mask
    OUT/manifest.json           teachers and their weight fingerprints, post-processing, confidence rule, every
                                predicted tile (source file, confidence, predicted coverage, kept or not), and
                                the set's fingerprint (`saltkit.data.pseudo.set_fingerprint`)

Confidence of a tile: the share of its pixels whose probability is far from 0.5 (below 0.1 or above 0.9), times
the image head's certainty about what the mask says (2p - 1 for a mask with salt, p the head's salt probability;
2(1 - p) - 1 for an empty one; 0 when the head disagrees with the mask). Tiles below `min_confidence` are left out.
The folder appears complete or not at all (written beside it, then renamed into place).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from saltkit.checkpoints import network_from_checkpoint, read_checkpoint, weights_fingerprint
from saltkit.data.folds import coverage_class, mask_coverage
from saltkit.data.layout import DatasetError, id_listing, png_files, train_items
from saltkit.data.pseudo import FORMAT, MANIFEST, VERSION, set_fingerprint
from saltkit.geometry import restore_tiles
from saltkit.inference.inferers import IMAGE_PROB, PROB, FlipTTAInferer
from saltkit.inference.postprocess import PostProcessingSettings, postprocess
from saltkit.inference.postprocess_tuned import AUTO, KEYS, choose_postprocessing, is_auto, settings_text
from saltkit.inference.probabilities import Probabilities
from saltkit.inference.runtime import torch_network
from saltkit.io import atomic_folder, check_writable
from saltkit.rle import rle_encode

CERTAIN_LOW, CERTAIN_HIGH = 0.1, 0.9  # a pixel is certain below / above these probabilities
DEFAULT_MIN_CONFIDENCE = 0.5
COVERAGE_NAMES = ["empty"] + [f"{10 * c}-{10 * c + 10}%" for c in range(10)]


# ---------------------------------------------------------------- teachers and their post-processing


@dataclass
class Teacher:
    """A checkpoint that predicts: its path, network (eval mode), variant and weight fingerprint."""

    path: Path
    network: torch.nn.Module
    variant: str
    weights: str
    ckpt: dict

    def record(self) -> dict:
        """The manifest's entry for this teacher."""
        return {"ckpt": str(self.path.resolve()), "weights": self.weights, "variant": self.variant,
                "arch": dict(self.ckpt["arch"]), "epoch": self.ckpt.get("epoch"),
                "postprocessing": self.ckpt.get("postprocessing")}


def load_teachers(paths: Sequence[str | Path], device: str | torch.device = "cpu") -> list[Teacher]:
    """The checkpoints at `paths` as teachers; every one must record its variant, and all the same one (their
    probabilities are averaged on the tile grid, and the student trains that variant)."""
    if not paths:
        raise ValueError("--ckpt: give at least one teacher checkpoint")
    teachers = []
    for path in map(Path, paths):
        ckpt = read_checkpoint(path, "ckpt")
        variant = ckpt.get("variant")
        if variant is None:
            raise ValueError(f"{path} does not record its variant (pad or resize); only a checkpoint written by "
                             "saltkit training or SWA can teach")
        network = torch_network(network_from_checkpoint(ckpt, path), device).eval()
        teachers.append(Teacher(path, network, variant, weights_fingerprint(ckpt["network"]), ckpt))
    variants = {t.variant for t in teachers}
    if len(variants) > 1:
        listing = ", ".join(f"{t.path} ({t.variant})" for t in teachers)
        raise ValueError(f"--ckpt: the teachers are of different variants ({listing}); a pseudo-labelled set "
                         "belongs to one variant: give the pad or the resize checkpoints")
    return teachers


def teacher_postprocessing(teachers: Sequence[Teacher], **given) -> tuple[PostProcessingSettings, str]:
    """The post-processing the masks get, and a line saying where each value came from.

    A key given (not `auto`) is used as it is. One teacher: its tuned value (stored in the checkpoint), else the
    plain default. Several teachers: the value they agree on, else the plain default (their tuned settings fit their
    own probabilities, not the average).
    """
    given = {k: given.get(k, AUTO) for k in KEYS}
    chosen = [choose_postprocessing(t.path, **given) for t in teachers]
    if len(chosen) == 1:
        return chosen[0].settings, str(chosen[0])
    values, notes = {}, []
    for key in KEYS:
        found = [getattr(c.settings, key) for c in chosen]
        if all(v == found[0] for v in found):
            values[key] = found[0]
            sources = {c.sources[key] for c in chosen}
            notes.append(f"{key} {found[0]} ({'/'.join(sorted(sources))})")
        else:
            values[key] = getattr(PostProcessingSettings(), key)
            notes.append(f"{key} {values[key]} (the plain default: the teachers' values {found} differ)")
    return PostProcessingSettings(**values), f"post-processing {'; '.join(notes)}"


def given_postprocessing(**given) -> tuple[PostProcessingSettings, str]:
    """The post-processing of pseudo-labels from saved probabilities: the values given, else the plain defaults
    (a probabilities file carries no tuned values)."""
    values = {k: v for k, v in given.items() if k in KEYS and not is_auto(v)}
    try:
        settings = PostProcessingSettings(**values)
    except ValueError as e:
        raise ValueError(f"{e}, or {AUTO}") from None
    notes = [f"{k} {getattr(settings, k)} ({'given' if k in values else 'the plain default'})" for k in KEYS]
    return settings, f"post-processing {'; '.join(notes)} (saved probabilities carry no tuned values)"


def teacher_variant(teachers: Sequence[Teacher], probabilities: Sequence, variant: str | None) -> str:
    """The variant of the set: the checkpoints', which `variant` (needed with saved probabilities alone) must match."""
    if teachers and variant is not None and variant != teachers[0].variant:
        raise ValueError(f"--variant {variant}: the teacher checkpoints are {teachers[0].variant}; drop --variant or "
                         "give checkpoints of that variant")
    if teachers:
        return teachers[0].variant
    if variant not in ("pad", "resize"):
        raise ValueError(f"--variant: pseudo-labels from saved probabilities ({probabilities[0]}) need the variant of "
                         "the student they train: --variant pad or --variant resize")
    return variant


def saved_teacher(path: str | Path, items: Sequence[dict]) -> tuple[Probabilities, dict]:
    """A probabilities file as a teacher: its probabilities in the order of `items` (every tile must be in it) and
    its manifest entry (path, content fingerprint)."""
    import hashlib

    from saltkit.inference.probabilities import load_probabilities

    path = Path(path)
    saved = load_probabilities(path)
    row = {i: k for k, i in enumerate(saved.ids.tolist())}
    missing = [it["id"] for it in items if it["id"] not in row]
    if missing:
        raise ValueError(f"{path}: holds no probabilities for {len(missing)} of the tiles to pseudo-label "
                         f"({id_listing(missing)}); predict that folder with saltkit inference and give its "
                         "probabilities.npz")
    order = np.asarray([row[it["id"]] for it in items])
    image = None if saved.image_probs is None else saved.image_probs[order]
    record = {"probabilities": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
              "tiles": len(saved.ids)}
    return Probabilities(saved.ids[order], saved.probs[order], image), record


# ---------------------------------------------------------------- tiles and predictions


def unlabelled_tiles(images: str | Path, exclude_dataset: str | Path | None = None) -> tuple[list[dict], list[str]]:
    """([{"image", "id"}] of the tile PNGs in `images` sorted by id, [ids left out]): a folder of tiles, or a
    dataset folder (its test/images); ids of the labelled `exclude_dataset` (its train/) are left out."""
    folder = Path(images)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder of tiles")
    if not png_files(folder)[0] and (folder / "test" / "images").is_dir():
        folder = folder / "test" / "images"
    found, problems = png_files(folder)
    if problems:
        raise DatasetError(problems[0])
    if not found:
        raise DatasetError(f"{folder}: no .png tiles to pseudo-label")
    labelled = set()
    if exclude_dataset is not None:
        labelled = {it["id"] for it in train_items(exclude_dataset)}
    skipped = sorted(set(found) & labelled)
    items = [{"image": str(found[i]), "id": i} for i in sorted(found) if i not in labelled]
    if not items:
        raise DatasetError(f"{folder}: every tile is a labelled tile of {exclude_dataset} ({id_listing(skipped)}); "
                           "nothing to pseudo-label")
    return items, skipped


def predict_tiles(teachers: Sequence[Teacher], items: Sequence[dict], tta: bool = True, batch_size: int = 32,
                  device: str | torch.device = "cpu", progress: bool = False) -> Probabilities:
    """Flip-TTA probabilities of the tiles on the 101 x 101 grid, averaged over the teachers (image probabilities
    too, when every teacher has the image head)."""
    from monai.data import DataLoader, Dataset

    from saltkit.transforms import tile_inputs

    variant = teachers[0].variant
    loader = DataLoader(Dataset(list(items), tile_inputs(variant, "image")), batch_size=batch_size, shuffle=False,
                        num_workers=0)
    inferer = FlipTTAInferer(tta=tta)
    probs, image_probs, ids = [], [], []
    done, next_report, start = 0, 0.25, time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            x = torch.as_tensor(batch["image"]).to(device)
            prob, image = 0, 0
            for t in teachers:
                out = inferer(x, t.network)
                prob = prob + restore_tiles(out[PROB].float(), variant)[:, 0].cpu()
                if IMAGE_PROB not in out:
                    image = None
                elif image is not None:
                    image = image + out[IMAGE_PROB][:, 0].float().cpu()
            probs.append((prob / len(teachers)).numpy())
            image_probs.append(None if image is None else (image / len(teachers)).numpy())
            ids.extend(str(i) for i in batch["id"])
            done += len(x)
            if progress and done >= next_report * len(items):
                print(f"pseudo-label: {done}/{len(items)} tiles ({time.perf_counter() - start:.0f} s)", flush=True)
                while next_report * len(items) <= done:
                    next_report += 0.25
    image_all = None if any(p is None for p in image_probs) else np.concatenate(image_probs)
    return Probabilities(np.asarray(ids), np.concatenate(probs).astype(np.float32), image_all)


def tile_confidence(probs: np.ndarray, image_probs: np.ndarray | None, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per tile: "pixel_certainty" (share of pixels below CERTAIN_LOW or above CERTAIN_HIGH), "image_certainty"
    (the image head's certainty about the mask's salt / no salt, 0 where it disagrees; 1 without the head) and
    "confidence", their product."""
    n = len(probs)
    flat = probs.reshape(n, -1)
    pixel = ((flat < CERTAIN_LOW) | (flat > CERTAIN_HIGH)).mean(axis=1)
    if image_probs is None:
        image = np.ones(n)
    else:
        has_salt = masks.reshape(n, -1).any(axis=1)
        agree = np.where(has_salt, image_probs, 1 - image_probs)
        image = np.clip(2 * agree - 1, 0, 1)
    return {"pixel_certainty": pixel, "image_certainty": image, "confidence": pixel * image}


def coverage_table(masks: np.ndarray, kept: np.ndarray) -> list[dict]:
    """Per predicted coverage class (empty, then tenths): tiles predicted and kept."""
    classes = coverage_class(masks)
    return [{"coverage": COVERAGE_NAMES[c + 1], "predicted": int((classes == c).sum()),
             "kept": int(((classes == c) & kept).sum())} for c in range(-1, 10)]


def table_text(rows: Sequence[dict]) -> str:
    """The coverage table as aligned text, with an `all` line."""
    lines = [f"{'predicted coverage':<20}{'predicted':>10}{'kept':>8}{'share':>8}"]
    total = {"coverage": "all", "predicted": sum(r["predicted"] for r in rows), "kept": sum(r["kept"] for r in rows)}
    for r in [*rows, total]:
        share = f"{r['kept'] / r['predicted']:.0%}" if r["predicted"] else "-"
        lines.append(f"{r['coverage']:<20}{r['predicted']:>10}{r['kept']:>8}{share:>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the written set


def check_output_folder(out: str | Path, images: str | Path) -> Path:
    """`out` when the set can be written there: a new or empty folder, not the tiles' own, in a writable place."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder; pseudo-label into a new folder (a set is "
                         "never mixed with another's files)")
    if out.resolve() == Path(images).resolve() or Path(images).resolve() in out.resolve().parents:
        raise ValueError(f"--out {out} lies inside the tiles' folder {images}; write the set elsewhere")
    check_writable(out.resolve().parent, "--out")
    return out


def write_pseudo_set(out: Path, items: Sequence[dict], masks: np.ndarray, manifest: dict, link: bool = False) -> str:
    """Write the set's files and manifest (with its fingerprint, returned) into a folder beside `out`, then rename
    it into place."""
    with atomic_folder(out) as partial:
        for sub in ("images", "masks"):
            (partial / "train" / sub).mkdir(parents=True)
        for it, mask in zip(items, masks, strict=True):
            image = partial / "train" / "images" / f"{it['id']}.png"
            if link:
                image.symlink_to(Path(it["image"]).resolve())
            else:
                shutil.copyfile(it["image"], image)
            Image.fromarray((mask > 0).astype(np.uint8) * 255).save(partial / "train" / "masks" / f"{it['id']}.png")
        pd.DataFrame({"id": [it["id"] for it in items], "rle_mask": rle_encode(masks)}).to_csv(
            partial / "train.csv", index=False)
        fingerprint = set_fingerprint(train_items(partial))
        (partial / MANIFEST).write_text(json.dumps({**manifest, "fingerprint": fingerprint}, indent=1),
                                        encoding="utf-8")
    return fingerprint


def pseudo_label(images: str | Path, ckpts: Sequence[str | Path], out: str | Path,
                 min_confidence: float = DEFAULT_MIN_CONFIDENCE, exclude_dataset: str | Path | None = None,
                 tta: bool = True, batch_size: int = 32, device: str | torch.device = "cpu", link: bool = False,
                 progress: bool = False, command: Sequence[str] | None = None,
                 probabilities: Sequence[str | Path] = (), variant: str | None = None, **postprocessing) -> dict:
    """Predict the tiles in `images` with the teachers `ckpts` and write the confident ones as a training set at
    `out` (see the module docstring). `postprocessing`: threshold, min_component_size, image_threshold, min_area
    (`auto`: the teacher's tuned value). `probabilities`: saved teachers, `saltkit inference`'s
    probabilities.npz of these tiles, averaged with the checkpoints' predictions (one share each); `variant` names
    the student's variant when no checkpoint does. Returns a summary: out, predicted, kept, skipped (labelled ids left out),
    table (per predicted coverage class), settings (text), fingerprint."""
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) \
            or not 0 <= min_confidence <= 1:
        raise ValueError(f"--min-confidence must be a number in [0, 1], got {min_confidence!r}")
    if not ckpts and not probabilities:
        raise ValueError("give the teacher: --ckpt CKPT ... and/or --probabilities FILE.npz ...")
    out = check_output_folder(out, images)
    items, skipped = unlabelled_tiles(images, exclude_dataset)
    teachers = load_teachers(ckpts, device) if ckpts else []
    variant = teacher_variant(teachers, probabilities, variant)
    saved = [saved_teacher(path, items) for path in probabilities]
    if saved:  # tuned values fit one checkpoint's own probabilities, not an average with saved ones
        settings, settings_line = given_postprocessing(**postprocessing)
    else:
        settings, settings_line = teacher_postprocessing(teachers, **postprocessing)
    sources = [(s.probs, s.image_probs) for s, _ in saved]
    if teachers:
        pred = predict_tiles(teachers, items, tta=tta, batch_size=batch_size, device=device, progress=progress)
        sources = [(pred.probs, pred.image_probs)] * len(teachers) + sources
    pred = Probabilities(np.asarray([it["id"] for it in items]), np.mean([p for p, _ in sources], axis=0),
                         None if any(i is None for _, i in sources) else np.mean([i for _, i in sources], axis=0))
    masks = postprocess(pred.probs, pred.image_probs, settings)
    scores = tile_confidence(pred.probs, pred.image_probs, masks)
    kept = scores["confidence"] >= min_confidence
    if not kept.any():
        raise ValueError(f"no tile reached --min-confidence {min_confidence} (the highest confidence is "
                         f"{scores['confidence'].max():.3f}); lower it, or use a better teacher")
    coverage = mask_coverage(masks)
    rows = coverage_table(masks, kept)
    entries = [{"id": it["id"], "source": str(Path(it["image"]).resolve()),
                "confidence": round(float(scores["confidence"][k]), 6),
                "pixel_certainty": round(float(scores["pixel_certainty"][k]), 6),
                "image_prob": None if pred.image_probs is None else round(float(pred.image_probs[k]), 6),
                "coverage": round(float(coverage[k]), 6), "kept": bool(kept[k])} for k, it in enumerate(items)]
    manifest = {
        "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": list(sys.argv if command is None else command),
        "source": str(Path(items[0]["image"]).resolve().parent), "variant": variant,
        "teachers": [t.record() for t in teachers] + [record for _, record in saved], "tta": bool(tta),
        "postprocessing": {k: getattr(settings, k) for k in KEYS},
        "confidence": {"rule": "share of pixels with probability < low or > high, times the image head's certainty "
                               "about the mask (2p - 1 with salt, 1 - 2p without, at least 0)",
                       "low": CERTAIN_LOW, "high": CERTAIN_HIGH, "min_confidence": min_confidence},
        "excluded": {"dataset": None if exclude_dataset is None else str(Path(exclude_dataset).resolve()),
                     "ids": skipped},
        "predicted": len(items), "kept": int(kept.sum()), "coverage_classes": rows, "items": entries,
    }
    chosen = np.flatnonzero(kept)
    fingerprint = write_pseudo_set(out, [items[k] for k in chosen], masks[chosen], manifest, link)
    return {"out": str(out), "predicted": len(items), "kept": int(kept.sum()), "skipped": skipped, "table": rows,
            "settings": settings_line, "settings_text": settings_text(settings), "fingerprint": fingerprint,
            "teachers": [t.path for t in teachers] + [Path(p) for p in probabilities]}
