"""Post-processing tuned on labelled tiles: the `PostProcessingSettings` with the best mean competition metric over a grid.

Exact (the chosen setting's metric is what `postprocess` + `competition_metric` give) and fast, without running
`postprocess` once per setting:
- salt components are labelled once per probability threshold; each `min_component_size` then only decides which
  components stay, so a tile's predicted pixels and its overlap with the truth are sums over kept components;
- `image_threshold` and `min_area` only empty whole tiles: per (threshold, size) each tile has a score when kept,
  a predicted area and an empty-or-not truth (an emptied tile scores 1 when its truth is empty, else 0), so every
  (image_threshold, min_area) pair is one array expression over the tiles.
Scores are counted in tenths (a tile's competition score is k / 10), so totals compare exactly. Among the settings
within a tolerance of the best (by default one tile's score, 1 / N: less than one tile changing its mind is noise)
the plainest wins (the defaults first), so noise does not switch rules on or pick extremes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from saltkit.inference.postprocess import PostProcessingSettings, check_count, check_fraction, postprocess
from saltkit.metrics import competition_metric, scores_from_counts

DEFAULT = PostProcessingSettings()


def _grid(start: float, stop: float, step: float) -> tuple[float, ...]:
    return tuple(round(float(v), 2) for v in np.arange(start, stop + step / 2, step))


@dataclass(frozen=True)
class TuningGrid:
    """The values searched for each `PostProcessingSettings` key; the plain defaults (0.5, 0, None, 0) are always added.

    thresholds: pixel probability thresholds; min_component_sizes, min_areas: pixel counts (0: off);
    image_thresholds: image-head probability thresholds (None: off; ignored when there is no image head).
    """

    thresholds: tuple[float, ...] = _grid(0.30, 0.70, 0.05)
    min_component_sizes: tuple[int, ...] = (0, 10, 20, 40, 80, 160)
    image_thresholds: tuple[float | None, ...] = (None, *_grid(0.20, 0.80, 0.10))
    min_areas: tuple[int, ...] = (0, 10, 20, 40, 80, 160)

    def __post_init__(self):
        for t in self.thresholds:
            check_fraction("thresholds", t)
        for t in self.image_thresholds:
            if t is not None:
                check_fraction("image_thresholds", t, " or null")
        for n in self.min_component_sizes:
            check_count("min_component_sizes", n)
        for n in self.min_areas:
            check_count("min_areas", n)

    def values(self, has_image_probs: bool) -> tuple[list, list, list, list]:
        """Sorted, de-duplicated values per key, each including its default (None first for image thresholds)."""
        image = [None] + sorted({t for t in self.image_thresholds if t is not None}) if has_image_probs else [None]
        return (sorted({*self.thresholds, DEFAULT.threshold}), sorted({*self.min_component_sizes, 0}), image,
                sorted({*self.min_areas, 0}))


@dataclass(frozen=True)
class TuningResult:
    """The chosen settings and the mean competition metric (over `tiles` tiles) with them and with the defaults."""

    settings: PostProcessingSettings
    metric: float
    default_metric: float
    tiles: int
    candidates: int  # settings compared
    ties: int = field(default=1)  # settings within the tolerance of the best metric (the plainest was chosen)

    @property
    def gain(self) -> float:
        return self.metric - self.default_metric


def plainness(s: PostProcessingSettings) -> tuple:
    """Sort key: fewer rules switched on, then the threshold nearest 0.5, then the weakest rules."""
    on = (s.threshold != DEFAULT.threshold) + (s.min_component_size > 1) + (s.image_threshold is not None) + (s.min_area > 0)
    return (on, abs(s.threshold - DEFAULT.threshold), s.threshold, s.min_component_size,
            -1.0 if s.image_threshold is None else s.image_threshold, s.min_area)


def _check_inputs(probs, image_probs, truths) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    probs = np.asarray(probs)
    truths = np.asarray(truths)
    if probs.ndim != 3 or probs.shape != truths.shape or len(probs) == 0:
        raise ValueError(f"tuning needs (N, H, W) probabilities and truths of one shape with N >= 1, got "
                         f"{probs.shape} and {truths.shape}")
    if image_probs is not None:
        image_probs = np.asarray(image_probs).reshape(-1)
        if len(image_probs) != len(probs):
            raise ValueError(f"tuning: {len(image_probs)} image probabilities for {len(probs)} tiles")
    return probs, image_probs, truths.astype(bool)


def _tile_structure() -> np.ndarray:
    """4-connectivity within a tile, none across tiles of an `(N, H, W)` stack (as `remove_small_components`)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    return structure


def _hits_kept(probs: np.ndarray, truths: np.ndarray, threshold: float, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per min_component_size: `(S, N)` competition score in tenths of each tile kept, `(S, N)` predicted pixels."""
    n, pixels = len(probs), probs[0].size
    labels, count = ndimage.label(probs > threshold, structure=_tile_structure())
    flat = labels.ravel()
    salt = np.flatnonzero(flat)
    component_size = np.bincount(flat[salt], minlength=count + 1)
    component_overlap = np.bincount(flat[salt], weights=truths.ravel()[salt], minlength=count + 1)
    component_tile = np.zeros(count + 1, dtype=np.int64)
    component_tile[flat[salt]] = salt // pixels  # a component never leaves its tile
    truth_pixels = truths.reshape(n, -1).sum(1)
    hits = np.empty((len(sizes), n), dtype=np.int64)
    predicted = np.empty((len(sizes), n), dtype=np.int64)
    for k, size in enumerate(sizes):
        kept = component_size >= max(size, 1)  # sizes 0 and 1 keep every component, as postprocess does
        kept[0] = False
        pred = np.rint(np.bincount(component_tile, weights=component_size * kept, minlength=n)).astype(np.int64)
        inter = np.rint(np.bincount(component_tile, weights=component_overlap * kept, minlength=n)).astype(np.int64)
        scores = scores_from_counts(inter, pred + truth_pixels - inter, pred, truth_pixels)
        hits[k], predicted[k] = np.rint(scores * 10).astype(np.int64), pred
    return hits, predicted


def metric_grid(probs, image_probs, truths, grid: TuningGrid = TuningGrid()) -> tuple[np.ndarray, list[list]]:
    """Total competition score in tenths of every setting -> int64 `(T, S, I, A)` array and the four value lists
    (threshold, min_component_size, image_threshold, min_area); the mean metric is total / (10 N)."""
    probs, image_probs, truths = _check_inputs(probs, image_probs, truths)
    values = grid.values(image_probs is not None)
    thresholds, sizes, image_thresholds, areas = values
    truth_empty = ~truths.reshape(len(truths), -1).any(1)
    emptied_hits = 10 * truth_empty.astype(np.int64)
    # (I, N): tiles the image head empties; None empties none
    image_empty = np.stack([np.zeros(len(probs), dtype=bool) if t is None else image_probs < t
                            for t in image_thresholds])
    area = np.asarray(areas)
    totals = np.empty((len(thresholds), len(sizes), len(image_thresholds), len(areas)), dtype=np.int64)
    for i, threshold in enumerate(thresholds):
        hits, predicted = _hits_kept(probs, truths, threshold, sizes)
        for k in range(len(sizes)):
            emptied = image_empty[:, None, :] | (predicted[k][None, None, :] < area[None, :, None])  # (I, A, N)
            totals[i, k] = np.where(emptied, emptied_hits, hits[k]).sum(-1)
    return totals, [list(v) for v in values]


def search_postprocessing(probs, image_probs, truths, grid: TuningGrid = TuningGrid(),
                          tolerance: float | None = None) -> TuningResult:
    """The grid's best `PostProcessingSettings` for `(N, H, W)` probabilities (+ `(N,)` image-head probabilities or None)
    against `(N, H, W)` binary truths, by mean competition metric.

    Among the settings whose metric is within `tolerance` of the best (None: one tile's score, 1 / N; 0: exact
    ties only), the plainest (`plainness`) is chosen; the defaults are the plainest of all, so the result never
    scores below them.
    """
    totals, (thresholds, sizes, image_thresholds, areas) = metric_grid(probs, image_probs, truths, grid)
    n = np.shape(probs)[0]
    best = totals.max()
    tenths = 10 if tolerance is None else int(np.floor(float(tolerance) * 10 * n + 1e-9))
    floor = best - tenths
    candidates = [PostProcessingSettings(thresholds[i], sizes[k], image_thresholds[j], areas[a])
                  for i, k, j, a in zip(*np.nonzero(totals >= floor), strict=True)]
    chosen = min(candidates, key=plainness)
    index = (thresholds.index(chosen.threshold), sizes.index(chosen.min_component_size),
             image_thresholds.index(chosen.image_threshold), areas.index(chosen.min_area))
    default = (thresholds.index(DEFAULT.threshold), 0, 0, 0)
    return TuningResult(settings=chosen, metric=float(totals[index]) / (10 * n),
                        default_metric=float(totals[default]) / (10 * n), tiles=int(n),
                        candidates=int(totals.size), ties=len(candidates))


def tile_scores(probs, image_probs, truths, settings: PostProcessingSettings) -> np.ndarray:
    """Competition metric per tile -> float64 `(N,)` of `postprocess(probs, image_probs, settings)` vs truths."""
    return competition_metric(postprocess(probs, image_probs, settings), np.asarray(truths))


def heldout_metric(probs, image_probs, truths, grid: TuningGrid = TuningGrid(), parts: int = 2) -> float:
    """Mean competition metric of tuning without looking at the scored tiles: the tiles are dealt into `parts`
    groups in order of salt coverage (each group gets every coverage), each group is scored with the settings
    tuned on the others. Tuned and scored on the same tiles, a metric is optimistic; this one is not."""
    probs, image_probs, truths = _check_inputs(probs, image_probs, truths)
    if len(probs) < 2 * parts:
        raise ValueError(f"a held-out estimate over {parts} parts needs at least {2 * parts} tiles, got {len(probs)}")
    order = np.argsort(truths.reshape(len(truths), -1).sum(1), kind="stable")
    group = np.empty(len(probs), dtype=np.int64)
    group[order] = np.arange(len(probs)) % parts
    scores = np.empty(len(probs))
    for g in range(parts):
        tune, held = group != g, group == g
        image = None if image_probs is None else image_probs[tune]
        settings = search_postprocessing(probs[tune], image, truths[tune], grid).settings
        scores[held] = tile_scores(probs[held], None if image_probs is None else image_probs[held], truths[held],
                                   settings)
    return float(scores.mean())
