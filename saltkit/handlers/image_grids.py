"""TensorBoard image grid of the worst validation tiles of each epoch (saltkit.pictures.tile_grid: each tile with
its truth and prediction outlined, its id and competition metric underneath)."""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events

from saltkit.geometry import restore_tiles
from saltkit.metrics import competition_metric, pixel_accuracy
from saltkit.pictures import LEGEND, tile_grid


def worst_tile_order(scores: torch.Tensor, accuracy: torch.Tensor) -> torch.Tensor:
    """Indices sorted worst first: lowest competition metric, ties broken by lowest pixel accuracy."""
    # lexicographic sort: stable sort by the tie-breaker, then by the primary key
    order = torch.argsort(accuracy, stable=True)
    return order[torch.argsort(scores[order], stable=True)]


def tile_ids(batch, n: int) -> list[str]:
    """Ids of a collated batch ("id" list, "(flipped)" appended for flip-validation copies); "?" when absent."""
    if not isinstance(batch, dict) or "id" not in batch:
        return ["?"] * n
    flipped = batch.get("flipped")
    flags = flipped.tolist() if isinstance(flipped, torch.Tensor) else [False] * n
    return [f"{i} (flipped)" if f else str(i) for i, f in zip(batch["id"], flags, strict=True)]


class WorstTilesImages:
    """Collect the `num_tiles` validation tiles with the lowest competition metric and write them to TensorBoard
    as one image per epoch (`tag`, global step = the evaluator's epoch, i.e. the training epoch).

    Attach to the evaluator; it reads `image` (network input, mapped back to the tile grid with `variant`),
    `tile_pred` (logits) and `tile_label` from the engine output (decollate=False, `TilePredictiond` applied).

    Args:
        writer: the TensorBoard SummaryWriter; None (a process of rank > 0) makes the handler a no-op.
        variant: config key `variant` (pad / resize): how the 128 px network input maps back to the tile.
        num_tiles: how many of the worst tiles the grid shows.
        tag: the TensorBoard image tag.
        logit_threshold: salt where the logit is above this (0.0: probability 0.5).
        columns: tiles per row of the grid.
    """

    def __init__(self, writer, variant: str, num_tiles: int = 8, tag: str = "val/worst_tiles",
                 logit_threshold: float = 0.0, columns: int = 4):
        self.writer = writer
        self.columns = columns
        self.variant = variant
        self.num_tiles = num_tiles
        self.tag = tag
        self.logit_threshold = logit_threshold
        self.kept: dict[str, torch.Tensor] | None = None
        self.kept_ids: list[str] = []

    def attach(self, engine: Engine) -> None:
        if self.writer is None:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.kept, self.kept_ids = None, []

    def collect(self, engine: Engine) -> None:
        out = engine.state.output
        preds = (out["tile_pred"] > self.logit_threshold).float().cpu()
        truths = out["tile_label"].float().cpu()
        images = out["image"].detach().float()
        if images.shape[-2:] != preds.shape[-2:]:  # back onto the tile grid (unless scored at network size)
            images = restore_tiles(images, self.variant)
        images = images.cpu()
        batch = {"image": images, "truth": truths, "pred": preds,
                 "metric": torch.from_numpy(competition_metric(preds > 0.5, truths > 0.5)),
                 "accuracy": torch.from_numpy(pixel_accuracy(preds > 0.5, truths > 0.5))}
        ids = tile_ids(engine.state.batch, len(preds))
        if self.kept is not None:
            batch = {k: torch.cat([self.kept[k], v]) for k, v in batch.items()}
            ids = self.kept_ids + ids
        keep = worst_tile_order(batch["metric"], batch["accuracy"])[: self.num_tiles]
        self.kept = {k: v[keep] for k, v in batch.items()}
        self.kept_ids = [ids[i] for i in keep.tolist()]

    def write(self, engine: Engine) -> None:
        if not self.kept:
            return
        k = self.kept
        grey = (k["image"][:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        grid = tile_grid(grey, k["truth"][:, 0].numpy(), k["pred"][:, 0].numpy(), self.kept_ids,
                         k["metric"].tolist(), columns=self.columns)
        step = int(engine.state.epoch)
        self.writer.add_image(self.tag, grid, global_step=step, dataformats="HWC")
        tiles = ", ".join(f"{i} ({s:.2f})" for i, s in zip(self.kept_ids, k["metric"].tolist(), strict=True))
        self.writer.add_text(f"{self.tag}_ids", f"worst first, row by row ({LEGEND}): {tiles}", step)
        self.writer.flush()
