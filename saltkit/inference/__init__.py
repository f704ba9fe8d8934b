"""Inference: flip TTA, un-pad / resize back, post-processing, saved probabilities, ensembling, evaluation.

Data flow: `predict.predict_tiles` (network + `tta` + `restore`) -> `probabilities` (uint16 npz) ->
`ensemble` (mean over runs) -> `postprocess` -> submission CSV (`infer.write_prediction`).
"""

from saltkit.inference.checkpoint import load_network, network_from_checkpoint, read_checkpoint
from saltkit.inference.ensemble import average_probabilities, ensemble_files
from saltkit.inference.postprocess import PostProcessing, postprocess, remove_small_components
from saltkit.inference.predict import TilePredictions, predict_tiles
from saltkit.inference.probabilities import Probabilities, load_probabilities, save_probabilities
from saltkit.inference.restore import restore_tiles
from saltkit.inference.tta import flip_predict, tta_probabilities

__all__ = [
    "PostProcessing",
    "Probabilities",
    "TilePredictions",
    "average_probabilities",
    "ensemble_files",
    "flip_predict",
    "load_network",
    "load_probabilities",
    "network_from_checkpoint",
    "postprocess",
    "predict_tiles",
    "read_checkpoint",
    "remove_small_components",
    "restore_tiles",
    "save_probabilities",
    "tta_probabilities",
]
