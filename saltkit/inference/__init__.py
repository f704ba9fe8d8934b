"""Inference: the flip-TTA / sliding-window inferers, the post transforms, and the writers of the inference and
evaluate engine workflows; saved probabilities and ensembling.

Data flow: tiles -> `FlipTTAInferer` (in a MONAI `SupervisedEvaluator`) -> back onto the tile grid ->
`mask_transforms` (threshold, small components, empty tiles) -> `PredictionWriter` (probabilities .npz + submission
CSV) or `EvaluationReport` (per-tile CSV, coverage classes, worst tiles); saved probabilities -> `ensemble` ->
submission. Post-processing tuned on a validation fold (`postprocess_search`) is stored in the checkpoint and
used by default (`postprocess_tuned.choose_postprocessing`).
"""

from saltkit.geometry import restore_tiles
from saltkit.inference.ensemble import average_probabilities, ensemble_files
from saltkit.inference.handlers import EvaluationReport, PredictionWriter
from saltkit.inference.inferers import (
    AutocastInferer,
    FlipTTAInferer,
    SectionInferer,
    TileSlidingWindowInferer,
    section_inferer,
    tile_inferer,
)
from saltkit.inference.postprocess import (
    EmptyTilesd,
    PostProcessingSettings,
    RemoveSmallComponentsd,
    mask_transforms,
    postprocess,
    remove_small_components,
)
from saltkit.inference.postprocess_search import TuningGrid, TuningResult, search_postprocessing
from saltkit.inference.postprocess_tuned import (
    ChosenPostProcessing,
    choose_postprocessing,
    prediction_threshold,
    read_tuned_postprocessing,
    store_postprocessing,
)
from saltkit.inference.probabilities import Probabilities, load_probabilities, save_probabilities
from saltkit.inference.runtime import check_runtime, inference_network, runtime_amp, uses_onnxruntime

__all__ = [
    "AutocastInferer",
    "ChosenPostProcessing",
    "EmptyTilesd",
    "EvaluationReport",
    "FlipTTAInferer",
    "PostProcessingSettings",
    "PredictionWriter",
    "Probabilities",
    "RemoveSmallComponentsd",
    "SectionInferer",
    "TileSlidingWindowInferer",
    "TuningGrid",
    "TuningResult",
    "average_probabilities",
    "check_runtime",
    "choose_postprocessing",
    "ensemble_files",
    "inference_network",
    "load_probabilities",
    "mask_transforms",
    "postprocess",
    "prediction_threshold",
    "read_tuned_postprocessing",
    "remove_small_components",
    "restore_tiles",
    "runtime_amp",
    "save_probabilities",
    "search_postprocessing",
    "section_inferer",
    "store_postprocessing",
    "tile_inferer",
    "uses_onnxruntime",
]
