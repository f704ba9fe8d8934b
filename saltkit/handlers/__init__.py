"""Engine add-ons for the training bundle: learning-rate schedule, checkpoints, resume, NaN guard, image grids."""

from saltkit.handlers.image_grids import WorstTilesImages
from saltkit.handlers.nan import DivergenceError, FailOnNanLoss
from saltkit.handlers.noam import (
    NoamHandler,
    NoamLambda,
    cooldown_steps,
    epoch_noam_scheduler,
    noam_scheduler,
    schedule_steps,
    warmup_steps,
)
from saltkit.handlers.progress import EpochSummary, TrainingProgress
from saltkit.handlers.save_resume import (
    BestCheckpoint,
    InitFromCheckpoint,
    LastCheckpoint,
    ResumeError,
    ResumeFromCheckpoint,
    save_checkpoint,
)
from saltkit.handlers.time_limit import EpochTimeBudget
from saltkit.handlers.validation import ScheduledValidation

__all__ = [
    "BestCheckpoint",
    "DivergenceError",
    "EpochSummary",
    "LastCheckpoint",
    "NoamHandler",
    "NoamLambda",
    "ResumeError",
    "ResumeFromCheckpoint",
    "ScheduledValidation",
    "FailOnNanLoss",
    "InitFromCheckpoint",
    "EpochTimeBudget",
    "TrainingProgress",
    "WorstTilesImages",
    "cooldown_steps",
    "epoch_noam_scheduler",
    "noam_scheduler",
    "save_checkpoint",
    "schedule_steps",
    "warmup_steps",
]
