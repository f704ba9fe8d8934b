"""Seismic data of any size: section images (PNG / TIFF / .npy) and SEG-Y volumes, predicted with the section
inferer (sliding window + flip TTA) into probability maps, masks, overlays and probability volumes.

Data flow: `section_files` / `segy` (read) -> `normalize` (to the tiles' [0, 1] scale) ->
`sections.predict_section` -> `section_files` (write) / `volume` (stream into SEG-Y); `predict.run_predict` is
the workflow; `mosaics` rebuilds real sections from competition tiles. `validity` says which pixels hold data,
`figures` draws the pictures people read (`qc` the volume's), `provenance` names the model in them.
"""

from saltkit.seismic.mosaics import Mosaic, assemble_mosaic, crop_tiles, mosaic_summary, read_mosaics
from saltkit.seismic.normalize import Normalization, normalize_section
from saltkit.seismic.predict import load_predictor, predict_images, run_predict
from saltkit.seismic.provenance import model_provenance
from saltkit.seismic.section_files import (
    list_section_files,
    outline_overlay,
    read_section,
    write_section_outputs,
)
from saltkit.seismic.sections import predict_section
from saltkit.seismic.volume import predict_volume

__all__ = [
    "Mosaic",
    "Normalization",
    "assemble_mosaic",
    "crop_tiles",
    "load_predictor",
    "model_provenance",
    "mosaic_summary",
    "normalize_section",
    "outline_overlay",
    "predict_images",
    "predict_section",
    "predict_volume",
    "read_mosaics",
    "read_section",
    "run_predict",
    "list_section_files",
    "write_section_outputs",
]
