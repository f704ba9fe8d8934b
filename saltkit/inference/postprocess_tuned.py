"""Post-processing tuned on a fold's validation tiles, stored in the checkpoint, and the settings inference uses.

A tuned checkpoint holds a plain-dict entry (readable with `torch.load(weights_only=True)`):

    "postprocessing": {"threshold": 0.45, "min_component_size": 20, "image_threshold": None, "min_area": 0,
                       "metric_before": 0.751, "metric_after": 0.772, "metric_heldout": 0.763,
                       "tuned_on": {"tiles": 320, "fold": 0, "num_folds": 10, "folds_csv": ..., "dataset_dir": ...,
                                    "ids_sha1": ..., "tta": True}}

metric_before is the mean competition metric with the plain defaults, metric_after with the tuned settings (both
with flip TTA, on the tiles they were tuned on), metric_heldout the tuning's estimate on tiles it did not see
(`saltkit.inference.postprocess_search.heldout_metric`). The inference, evaluate and predict workflows take a
key whose value is `auto` from the entry when there is one, else from the plain defaults; a value given in a
config or on the command line wins.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saltkit.config import ConfigError
from saltkit.inference.postprocess import PostProcessingSettings
from saltkit.inference.postprocess_search import (
    TuningGrid,
    TuningResult,
    heldout_metric,
    search_postprocessing,
)

ENTRY = "postprocessing"
KEYS = ("threshold", "min_component_size", "image_threshold", "min_area")
METRICS = ("metric_before", "metric_after", "metric_heldout")
AUTO = "auto"
DEFAULT = PostProcessingSettings()


# ---------------------------------------------------------------- the entry: build, check, read, write


def tuning_record(items: Sequence[dict], dataset_dir=None, fold=None, num_folds=None, folds_csv=None,
                  tta: bool = True) -> dict:
    """What the tuning saw: tile count, fold, fold file, dataset and a hash of the sorted tile ids.

    Args:
        items: the data dicts of the tiles tuned on (their "id").
        dataset_dir: the dataset folder, or None.
        fold: the validation fold, or None (every tile).
        num_folds: the number of folds, or None.
        folds_csv: the fold file, or None.
        tta: whether the probabilities tuned on had flip TTA.
    """
    ids = sorted(str(it["id"]) for it in items)
    return {"tiles": len(ids), "fold": None if fold is None else int(fold),
            "num_folds": None if num_folds is None else int(num_folds),
            "folds_csv": None if folds_csv is None else str(folds_csv),
            "dataset_dir": None if dataset_dir is None else str(dataset_dir),
            "ids_sha1": hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:16], "tta": bool(tta)}


def postprocessing_entry(result: TuningResult, tuned_on: dict, heldout: float | None = None) -> dict:
    """The checkpoint entry of a tuning result (plain ints / floats / None / str only)."""
    s = result.settings
    return {"threshold": float(s.threshold), "min_component_size": int(s.min_component_size),
            "image_threshold": None if s.image_threshold is None else float(s.image_threshold),
            "min_area": int(s.min_area), "metric_before": float(result.default_metric),
            "metric_after": float(result.metric), "metric_heldout": None if heldout is None else float(heldout),
            "tuned_on": dict(tuned_on)}


def check_entry(entry, source: str | Path = "checkpoint") -> dict:
    """`entry` when it is a well-formed post-processing entry, else a ValueError naming `source` and the key."""
    fix = f"tune it again (saltkit tune --ckpt {source}) or delete the entry"
    if not isinstance(entry, dict):
        raise ValueError(f"{source}: entry '{ENTRY}' must be a dict of {', '.join(KEYS)}, got "
                         f"{type(entry).__name__}; {fix}")
    missing = [k for k in KEYS if k not in entry]
    if missing:
        raise ValueError(f"{source}: entry '{ENTRY}' lacks {', '.join(missing)}; {fix}")
    try:
        PostProcessingSettings(**{k: entry[k] for k in KEYS})
    except ValueError as e:
        raise ValueError(f"{source}: entry '{ENTRY}': {str(e).replace('config key', 'key')}; {fix}") from None
    for key in METRICS:
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 1 or math.isnan(value)):
            raise ValueError(f"{source}: entry '{ENTRY}': key '{key}' must be a metric in [0, 1] or None, "
                             f"got {value!r}; {fix}")
    if "tuned_on" in entry and not isinstance(entry["tuned_on"], dict):
        raise ValueError(f"{source}: entry '{ENTRY}': key 'tuned_on' must be a dict, got "
                         f"{type(entry['tuned_on']).__name__}; {fix}")
    return entry


def entry_settings(entry: dict) -> PostProcessingSettings:
    """The `PostProcessingSettings` an entry (checked with `check_entry`) holds."""
    return PostProcessingSettings(**{k: entry[k] for k in KEYS})


def read_tuned_postprocessing(path: str | Path, key: str = "ckpt") -> dict | None:
    """The checked post-processing entry of the checkpoint at `path`, or None when it has none (older runs)."""
    from saltkit.checkpoints import read_checkpoint

    entry = read_checkpoint(path, key, mmap=True).get(ENTRY)
    return None if entry is None else check_entry(entry, path)


def store_postprocessing(path: str | Path, entry: dict) -> Path:
    """Rewrite the checkpoint at `path` with `entry` (checked first) as its post-processing entry, atomically:
    a failure leaves the file as it was, and the weights keep their storage (a packaged model's float16)."""
    from saltkit.checkpoints import read_checkpoint, save_checkpoint

    check_entry(entry, path)
    ckpt = read_checkpoint(path, "ckpt", float32=False)
    ckpt[ENTRY] = entry
    return save_checkpoint(ckpt, path)


# ---------------------------------------------------------------- tuning


def tune(probs, image_probs, truths, tuned_on: dict, grid: TuningGrid = TuningGrid(),
         heldout: bool = True) -> tuple[TuningResult, dict]:
    """Search the grid on `(N, H, W)` probabilities (+ `(N,)` image probabilities or None) against binary truths;
    returns the result and its checkpoint entry (with the held-out estimate when `heldout` and N >= 4)."""
    result = search_postprocessing(probs, image_probs, truths, grid)
    estimate = heldout_metric(probs, image_probs, truths, grid) if heldout and len(probs) >= 4 else None
    return result, postprocessing_entry(result, tuned_on, estimate)


def _metric(entry: dict, key: str) -> str:
    value = entry.get(key)
    return "?" if value is None else f"{value:.4f}"


def settings_text(settings: PostProcessingSettings) -> str:
    """`threshold 0.45, min_component_size 20, image_threshold None, min_area 0`."""
    return ", ".join(f"{k} {getattr(settings, k)}" for k in KEYS)


def tuning_summary(entry: dict) -> str:
    """One line: the metric before and after, the settings, and what they were tuned on."""
    on = entry.get("tuned_on") or {}
    fold = f"fold {on['fold']}, " if on.get("fold") is not None else ""
    heldout = (f" (on tiles the tuning did not see: {_metric(entry, 'metric_heldout')})"
               if entry.get("metric_heldout") is not None else "")
    return (f"competition metric with TTA {_metric(entry, 'metric_before')} with the defaults -> "
            f"{_metric(entry, 'metric_after')} tuned{heldout}; {settings_text(entry_settings(entry))} "
            f"({fold}{on.get('tiles', '?')} validation tiles)")


def predict_labelled_tiles(network: torch.nn.Module, loader: Iterable[dict], variant: str,
                           device: str | torch.device = "cpu",
                           autocast: torch.dtype | None = None) -> dict[str, np.ndarray | None]:
    """Flip-TTA probabilities of labelled batches ("image" at network size, "label" `(B, 1, 101, 101)`, "id"),
    back on the tile grid: {"prob": `(N, 101, 101)`, "image_prob": `(N,)` or None, "label": `(N, 101, 101)`
    uint8, "id": `(N,)`}, as the evaluate workflow computes them (the network in `autocast`'s dtype, None:
    float32)."""
    from saltkit.geometry import restore_tiles
    from saltkit.inference.inferers import IMAGE_PROB, PROB, AutocastInferer, FlipTTAInferer

    inferer = FlipTTAInferer(AutocastInferer(dtype=autocast))
    network.eval()
    probs, image_probs, labels, ids = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            out = inferer(torch.as_tensor(batch["image"]).to(device), network)
            probs.append(restore_tiles(out[PROB].float(), variant)[:, 0].cpu().numpy())
            image_probs.append(out[IMAGE_PROB][:, 0].cpu().numpy() if IMAGE_PROB in out else None)
            labels.append((torch.as_tensor(batch["label"])[:, 0] > 0.5).cpu().numpy().astype(np.uint8))
            ids.extend(str(i) for i in batch["id"])
    if not probs:
        raise ValueError("tuning: the validation loader yielded no tiles (check dataset_dir / fold)")
    image = None if any(p is None for p in image_probs) else np.concatenate(image_probs)
    return {"prob": np.concatenate(probs), "image_prob": image, "label": np.concatenate(labels),
            "id": np.asarray(ids)}


# ---------------------------------------------------------------- the settings a workflow uses


def is_auto(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == AUTO


@dataclass(frozen=True)
class ChosenPostProcessing:
    """The settings a workflow uses, and where each key came from ("tuned", "given" or "default")."""

    settings: PostProcessingSettings
    sources: dict
    ckpt: str
    entry: dict | None = None

    def __str__(self) -> str:
        text = f"post-processing {settings_text(self.settings)}"
        parts = []
        tuned = [k for k in KEYS if self.sources[k] == "tuned"]
        if tuned:
            on = self.entry.get("tuned_on") or {}
            fold = f"fold {on['fold']}, " if on.get("fold") is not None else ""
            parts.append(f"{'all tuned' if len(tuned) == len(KEYS) else ', '.join(tuned) + ' tuned'} "
                         f"({fold}{on.get('tiles', '?')} tiles: {_metric(self.entry, 'metric_before')} -> "
                         f"{_metric(self.entry, 'metric_after')}) as stored in {self.ckpt}")
        given = [k for k in KEYS if self.sources[k] == "given"]
        if given:
            parts.append(f"{', '.join(given)} as given")
        default = [k for k in KEYS if self.sources[k] == "default"]
        if default:
            why = "" if self.entry is not None else f" ({self.ckpt} holds no tuned values)"
            parts.append(f"{'all' if len(default) == len(KEYS) else ', '.join(default)} the plain default{why}")
        return f"{text} ({'; '.join(parts)})"


def choose_postprocessing(ckpt: str | Path, threshold=AUTO, min_component_size=AUTO, image_threshold=AUTO,
                          min_area=AUTO) -> ChosenPostProcessing:
    """The settings to use: a key that is `auto` takes the checkpoint's tuned value when it has one, else the
    plain default (0.5, 0, null, 0); any other value is used as given (checked, errors naming the key).

    Args:
        ckpt: the checkpoint whose tuned "postprocessing" entry `auto` reads.
        threshold: salt where the probability is above this (0..1), or `auto`.
        min_component_size: remove 4-connected salt components smaller than this many pixels (0: off), or
            `auto`.
        image_threshold: empty a tile whose image-head probability is below this (null: off), or `auto`.
        min_area: empty a tile with fewer salt pixels than this (0: off), or `auto`.
    """
    given = {"threshold": threshold, "min_component_size": min_component_size, "image_threshold": image_threshold,
             "min_area": min_area}
    entry = read_tuned_postprocessing(ckpt) if any(is_auto(v) for v in given.values()) else None
    values, sources = {}, {}
    for key, value in given.items():
        if not is_auto(value):
            values[key], sources[key] = value, "given"
        elif entry is not None:
            values[key], sources[key] = entry[key], "tuned"
        else:
            values[key], sources[key] = getattr(DEFAULT, key), "default"
    try:
        settings = PostProcessingSettings(**values)
    except ValueError as e:
        raise ConfigError(f"{e}, or {AUTO} (the checkpoint's tuned value, else the default)") from None
    return ChosenPostProcessing(settings, sources, str(ckpt), entry)


def prediction_threshold(ckpt: str | Path, threshold=AUTO) -> float:
    """The mask threshold of the predict workflow (`auto`: the checkpoint's tuned threshold, else 0.5); prints
    which one and where it came from."""
    chosen = choose_postprocessing(ckpt, threshold=threshold, min_component_size=0, image_threshold=None, min_area=0)
    source = {"tuned": f"tuned, stored in {ckpt}", "given": "as given",
              "default": f"the default; {ckpt} holds no tuned value"}[chosen.sources["threshold"]]
    print(f"predict: mask threshold {chosen.settings.threshold} ({source})", flush=True)
    return chosen.settings.threshold


def tuning_checkpoint(tune_postprocessing, eval_set: str, ckpt: str | Path) -> str | None:
    """The checkpoint the evaluate workflow tunes into (`ckpt`), or None when config key 'tune_postprocessing' is
    false. Checked before any work: tuning needs the validation fold (eval_set 'fold': settings tuned on training
    tiles would fit tiles the network has learnt) and a checkpoint folder that can be written."""
    from saltkit.config import as_bool
    from saltkit.io import check_writable

    if not as_bool(tune_postprocessing, "tune_postprocessing"):
        return None
    if eval_set != "fold":
        raise ConfigError(f"config key 'tune_postprocessing' needs eval_set 'fold', got {eval_set!r}: settings tuned "
                          "on the training tiles would fit tiles the network has learnt")
    check_writable(Path(str(ckpt)).parent, "ckpt")
    return str(ckpt)
