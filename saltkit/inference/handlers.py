"""Engine handlers of the inference and evaluate workflows: collect each tile the evaluator post-processed, then
write the outputs once the run completes (validated first, each file renamed into place).

Ours because MONAI's writers (SaveImage, ClassificationSaver) write one image or one CSV row per item; a
submission is one validated CSV over every tile, beside the probabilities it came from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from saltkit.data import load_image
from saltkit.inference.probabilities import Probabilities, save_probabilities
from saltkit.io import atomic_write

logger = logging.getLogger(__name__)

SUBMISSION = "submission.csv"
PROBABILITIES = "probabilities.npz"
TILES_CSV = "tiles.csv"
COVERAGE_CSV = "coverage.csv"
SUMMARY_JSON = "summary.json"
WORST_PNG = "worst_tiles.png"


def _items(value) -> list:
    """The engine's decollated batch / output (a list of per-tile dicts); a lone dict becomes a list of one."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _numpy(x) -> np.ndarray:
    return torch.as_tensor(x).detach().cpu().numpy()


class TileCollector:
    """Gather `keys` of every decollated tile (and its id) as the engine runs; `arrays()` stacks them."""

    def __init__(self, keys: Sequence[str]):
        self.keys = list(keys)
        self.ids: list[str] = []
        self.values: dict[str, list] = {k: [] for k in self.keys}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def reset(self, engine: Engine | None = None) -> None:
        self.ids = []
        self.values = {k: [] for k in self.keys}

    def collect(self, engine: Engine) -> None:
        batch, output = _items(engine.state.batch), _items(engine.state.output)
        for item, out in zip(batch, output, strict=True):
            self.ids.append(str(item["id"]))
            for k in self.keys:
                self.values[k].append(_numpy(out[k]) if k in out else None)

    def arrays(self) -> dict[str, np.ndarray | None]:
        """Each key stacked over tiles (channel dimension dropped), or None when no tile had it."""
        stacked = {}
        for k, values in self.values.items():
            if not values or any(v is None for v in values):
                stacked[k] = None
                continue
            a = np.stack(values)
            stacked[k] = a.reshape(len(a), *a.shape[2:]) if a.ndim == 4 else a.reshape(len(a), -1)[:, 0]
        return stacked

    def completed(self, engine: Engine) -> None:
        if not self.ids:
            raise ValueError("nothing to predict: the data loader yielded no tiles")
        self.write(engine)

    def write(self, engine: Engine) -> None:
        raise NotImplementedError


class PredictionWriter(TileCollector):
    """Writes `output_dir/probabilities.npz` (restored probabilities before post-processing, uint16) and
    `output_dir/submission.csv` (RLE of the post-processed masks), after checking every expected id is there.

    Args:
        output_dir: the folder the two files are written into.
        expected_ids: the tile ids the prediction must cover (the test images); None: not checked.
        summary: what was predicted how (variant, TTA, post-processing), as text, printed at the end.
    """

    def __init__(self, output_dir: str | Path, expected_ids: Sequence[str] | None = None, summary: str = ""):
        super().__init__(["prob", "image_prob", "mask"])
        self.output_dir = Path(output_dir)
        self.expected_ids = None if expected_ids is None else [str(i) for i in expected_ids]
        self.summary = summary
        self.result: dict = {}

    def write(self, engine: Engine) -> None:
        import pandas as pd

        from saltkit.rle import rle_encode
        from saltkit.submission import validate_submission, write_submission

        a = self.arrays()
        ids = np.asarray(self.ids)
        if self.expected_ids is not None and sorted(self.expected_ids) != sorted(self.ids):
            raise ValueError(f"predicted {len(ids)} tiles but expected the {len(self.expected_ids)} test ids")
        masks = a["mask"].astype(np.uint8)
        rles = rle_encode(masks)
        submission = self.output_dir / SUBMISSION
        validate_submission(pd.DataFrame({"id": ids.tolist(), "rle_mask": rles}), self.expected_ids or ids.tolist(),
                            source=submission)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        probs_path = save_probabilities(self.output_dir / PROBABILITIES,
                                        Probabilities(ids, a["prob"].astype(np.float32), a["image_prob"]))
        write_submission(ids.tolist(), rles, submission)
        empty = int((masks.reshape(len(masks), -1).max(axis=1) == 0).sum())
        self.result = {"tiles": len(ids), "empty": empty, "empty_share": empty / len(ids),
                       "probabilities": str(probs_path), "submission": str(submission)}
        print(f"inference: {len(ids)} tiles, {self.summary}")
        print(f"inference: wrote {probs_path} and {submission}")
        print(f"inference: empty predictions {empty}/{len(ids)} ({empty / len(ids):.1%})")


class EvaluationReport(TileCollector):
    """Writes into `output_dir`: `tiles.csv` (id, coverage, iou, metric, iou_tta, metric_tta per tile),
    `coverage.csv` (per coverage class: tiles, mean metric, tiles predicted empty), `summary.json` (the means, the
    post-processing used, the tuning) and `worst_tiles.png` (the `worst` lowest-scoring tiles with TTA); prints the
    means and the coverage table, and writes them to TensorBoard through `writer` when given.

    Args:
        output_dir: the folder the tables, summary.json and worst_tiles.png are written into.
        items: the evaluated tiles' data dicts (id, coverage, ...), as `labelled_items` gives them.
        worst: how many of the lowest-scoring tiles worst_tiles.png shows.
        summary: the post-processing used, as text, printed and stored in summary.json.
        writer: a TensorBoard SummaryWriter for the means and the coverage table, or None.
        tune_ckpt: also search the post-processing on these tiles' TTA probabilities
            (`saltkit.inference.postprocess_tuned.tune`), add `metric_tuned` to the tables, and store the
            result in this checkpoint; None / "": no tuning.
        tuned_on: what the tiles are (`saltkit.inference.postprocess_tuned.tuning_record`), stored with the
            tuning.
    """

    def __init__(self, output_dir: str | Path, items: Sequence[dict], worst: int = 16, summary: str = "",
                 writer=None, tune_ckpt: str | Path | None = None, tuned_on: dict | None = None):
        super().__init__(["label", "mask", "mask_plain"] + (["prob", "image_prob"] if tune_ckpt else []))
        self.output_dir = Path(output_dir)
        self.items = {str(it["id"]): it for it in items}
        self.worst = int(worst)
        self.summary = str(summary)
        self.writer = writer
        self.tune_ckpt = None if tune_ckpt in (None, "") else Path(tune_ckpt)
        self.tuned_on = dict(tuned_on or {})
        self.result: dict = {}

    def write(self, engine: Engine) -> None:
        from saltkit.inference.evaluate import coverage_records, coverage_table, save_png, tile_table
        from saltkit.inference.postprocess import postprocess
        from saltkit.inference.postprocess_tuned import store_postprocessing, tune, tuning_summary
        from saltkit.pictures import tile_grid

        a = self.arrays()
        truths = (a["label"] > 0.5).astype(np.uint8)
        tta, plain = a["mask"].astype(np.uint8), a["mask_plain"].astype(np.uint8)
        entry, tuned = None, None
        if self.tune_ckpt is not None:
            result, entry = tune(a["prob"], a["image_prob"], truths, self.tuned_on)
            tuned = postprocess(a["prob"], a["image_prob"], result.settings)
        table = tile_table(self.ids, truths, plain, tta, tuned)
        empty = {"empty_pred": ~plain.reshape(len(plain), -1).any(1), "empty_pred_tta": ~tta.reshape(len(tta), -1).any(1)}
        if tuned is not None:
            empty["empty_pred_tuned"] = ~tuned.reshape(len(tuned), -1).any(1)
        coverage = coverage_table(table, empty)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        csv_path = self.output_dir / TILES_CSV
        with atomic_write(csv_path) as f:
            table.to_csv(f, index=False, float_format="%.6g")
        with atomic_write(self.output_dir / COVERAGE_CSV) as f:
            coverage.to_csv(f, index=False, float_format="%.6g")
        order = np.argsort(table["metric_tta"].to_numpy(), kind="stable")[: max(self.worst, 0)]
        png_path = None
        if len(order):
            images = np.stack([load_image(self.items[self.ids[k]]["image"]) for k in order])
            scores = table["metric_tta"].to_numpy()[order]
            png_path = save_png(self.output_dir / WORST_PNG,
                                tile_grid(images, truths[order], tta[order], [self.ids[k] for k in order], scores))
        self.result = {"tiles": len(table), "metric": float(table["metric"].mean()),
                       "metric_tta": float(table["metric_tta"].mean()), "iou": float(table["iou"].mean()),
                       "iou_tta": float(table["iou_tta"].mean()), "settings": self.summary,
                       "tuning": entry, "coverage": coverage_records(coverage)}
        with atomic_write(self.output_dir / SUMMARY_JSON) as f:
            json.dump(self.result, f, indent=2, default=_json_number)
        if self.writer is not None:
            self.write_tensorboard(coverage, entry)
        r = self.result
        print(f"evaluate: {r['tiles']} tiles, {self.summary}")
        print(f"evaluate: wrote {csv_path}, {COVERAGE_CSV}, {SUMMARY_JSON}" + (f" and {WORST_PNG}" if png_path else ""))
        print(f"evaluate: mean IoU {r['iou']:.4f} without TTA, {r['iou_tta']:.4f} with TTA")
        print(f"evaluate: competition metric {r['metric']:.4f} without TTA, {r['metric_tta']:.4f} with TTA")
        print("evaluate: per coverage class of the truth (mean competition metric; tiles predicted empty):")
        print(coverage.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
        if entry is not None:
            store_postprocessing(self.tune_ckpt, entry)
            print(f"evaluate: post-processing tuned: {tuning_summary(entry)}; stored in {self.tune_ckpt}")

    def write_tensorboard(self, coverage, entry: dict | None) -> None:
        """Scalars `evaluate/...` (means) and `coverage/<class>/...` (per coverage class), the table as text."""
        from saltkit.inference.evaluate import COVERAGE_TAGS, coverage_records, markdown_table

        r, w = self.result, self.writer
        w.add_scalar("evaluate/competition_metric", r["metric"], 0)
        w.add_scalar("evaluate/competition_metric_tta", r["metric_tta"], 0)
        if entry is not None:
            w.add_scalar("evaluate/competition_metric_tta_defaults", entry["metric_before"], 0)
            w.add_scalar("evaluate/competition_metric_tta_tuned", entry["metric_after"], 0)
        for tag, row in zip([*COVERAGE_TAGS, "all"], coverage_records(coverage), strict=True):
            for column, value in row.items():
                if column != "class" and value is not None:  # a class without tiles has no means
                    w.add_scalar(f"coverage/{tag}/{column}", value, 0)
        w.add_text("evaluate/coverage", markdown_table(coverage), 0)
        w.add_text("evaluate/postprocessing", self.summary, 0)
        w.flush()


def _json_number(value):
    """numpy scalars in summary.json as plain numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
