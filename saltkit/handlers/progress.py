"""Progress bar for the trainer with the running (exponential average) loss and competition metric."""

from __future__ import annotations

from ignite.engine import Engine
from ignite.handlers import ProgressBar

from saltkit.metrics import kaggle_scores


class TrainingProgress:
    """Ignite ProgressBar showing `loss` and `metric` averaged over recent iterations (rate `alpha`).

    The averages are local to this process (no collective calls), so attach it on rank 0 only. `metric` is the
    competition score of the batch's `tile_pred` > 0 vs `tile_label` (engine output after TilePredictiond).
    """

    def __init__(self, alpha: float = 0.98, persist: bool = False):
        self.alpha = alpha
        self.persist = persist
        self.loss: float | None = None
        self.metric: float | None = None

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else self.alpha * old + (1 - self.alpha) * new

    def update(self, engine: Engine) -> None:
        out = engine.state.output
        self.loss = self._average(self.loss, float(out["loss"].detach()))
        if "tile_pred" in out:
            score = kaggle_scores(out["tile_pred"] > 0, out["tile_label"] > 0.5).mean()
            self.metric = self._average(self.metric, float(score))

    def shown(self, _output) -> dict:
        return {k: v for k, v in (("loss", self.loss), ("metric", self.metric)) if v is not None}

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)  # before the bar reads the values
        ProgressBar(persist=self.persist).attach(engine, output_transform=self.shown)
