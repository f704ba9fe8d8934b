"""What model made a prediction: the checkpoint's name, its weight fingerprint and what it was trained on, for the
pictures' captions and OUT.json, and a warning when the model is a toy.

A run records what it trained on in its folder's `config.json` (`dataset_dir`, `train_tiles`); a checkpoint that
carries those keys itself is read first, then the run record a packaged model carries (`saltkit export CKPT --format
model`: the bundle's model sits in no run folder). A model trained on the embedded sample (`saltkit/sample_data/tgs`, 90
training tiles) or on fewer than `TOY_TILES` tiles only shows that the commands work: its probabilities on real
seismic mean little.
"""

from __future__ import annotations

import logging
from pathlib import Path

from saltkit.checkpoints import embedded_record, read_checkpoint, run_record, weights_fingerprint

logger = logging.getLogger(__name__)

TOY_TILES = 1000  # the full competition set has 4000 labelled tiles; one fold trains on 3600 (2880 of the shared data)
REAL_MODEL_HINT = ("for a real model train on the full data set: saltkit train configs/pad.json configs/cpu.json "
                   "--dataset_dir DATA (README, 'The full data set')")


def is_embedded_sample(dataset_dir) -> bool:
    """Whether `dataset_dir` (as a run recorded it) is the sample shipped in the package."""
    from saltkit.data.layout import sample_dir

    if not dataset_dir:
        return False
    path = Path(str(dataset_dir))
    try:
        if path.resolve() == Path(sample_dir()).resolve():
            return True
    except OSError:
        pass
    return path.parts[-2:] == ("sample_data", "tgs")


def training_record(ckpt_path: str | Path, ckpt: dict) -> dict:
    """{"dataset_dir", "train_tiles"} the checkpoint, the run record it carries (a packaged model) or its run
    folder's config.json records, in that order ({} when none does)."""
    keys = ("dataset_dir", "train_tiles")
    if any(k in ckpt for k in keys):
        return {k: ckpt.get(k) for k in keys}
    try:
        record = embedded_record(ckpt, ckpt_path) or run_record(Path(ckpt_path).parent)
    except ValueError:  # a config.json or an entry that is not a run record: nothing known
        return {}
    if not any(k in record for k in keys):
        return {}
    pseudo = record.get("pseudo") if isinstance(record.get("pseudo"), dict) else {}
    return {**{k: record.get(k) for k in keys}, "pseudo_tiles": pseudo.get("tiles")}


def model_provenance(ckpt_path: str | Path) -> dict:
    """{"name", "path", "weights" (fingerprint), "dataset_dir", "train_tiles", "pseudo_tiles" (None when it
    trained on labelled tiles only), "sample", "toy"} of a checkpoint;
    logs a warning naming how to get a real model when it is a toy (see the module docstring)."""
    ckpt_path = Path(str(ckpt_path))
    ckpt = read_checkpoint(ckpt_path, mmap=True)
    record = training_record(ckpt_path, ckpt)
    tiles = record.get("train_tiles")
    tiles = int(tiles) if isinstance(tiles, (int, float)) and not isinstance(tiles, bool) else None
    sample = is_embedded_sample(record.get("dataset_dir"))
    toy = sample or (tiles is not None and tiles < TOY_TILES)
    info = {"name": ckpt_path.name, "path": str(ckpt_path), "weights": weights_fingerprint(ckpt["network"]),
            "dataset_dir": None if record.get("dataset_dir") is None else str(record["dataset_dir"]),
            "train_tiles": tiles, "pseudo_tiles": record.get("pseudo_tiles"), "sample": sample, "toy": toy}
    if toy:
        what = f"{tiles} tiles" if tiles is not None else "tiles"
        where = " of the embedded sample (saltkit/sample_data/tgs)" if sample else f" of {info['dataset_dir']}"
        logger.warning(f"{ckpt_path} was trained on {what}{where}: a toy model that shows the commands work, whose "
                       f"salt probabilities on real seismic mean little; {REAL_MODEL_HINT}")
    return info
