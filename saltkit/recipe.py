"""The training recipe: the keys a user sets in train.json's first section or overrides, checked before
anything heavy starts, and written as the run record (`config.json` in the run folder).

Checks raise ConfigError naming the config key, the value and what was expected.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import ignite.distributed as idist

from saltkit.config import ConfigError, check_booleans, check_overrides, none_if_null, require_int
from saltkit.data.layout import DatasetError, train_items
from saltkit.networks import available_backbones
from saltkit.networks.unet import DEEP_SUPERVISION_MODES
from saltkit.precision import amp_off
from saltkit.transforms import check_validation_size, check_variant

# the recipe's boolean keys: true / false, 1 / 0, in any case (`saltkit.config.as_bool`)
BOOLEAN_KEYS = ("upsample_input", "tta", "channels_last", "deterministic", "distributed", "sync_bn",
                "progress", "overwrite")


class Recipe:
    """The training bundle's recipe: its keys as the config resolved them (train.json, override files, the
    command line), checked by `check` before folds, caches and networks are built, and recorded with the run.

    Args:
        **keys: the recipe's config keys by name (train.json passes each top-level key of its first section);
            each is also an attribute (`recipe.batch_size`).
    """

    def __init__(self, **keys):
        self.keys = dict(keys)

    def __getattr__(self, name: str):
        try:
            return self.__dict__["keys"][name]
        except KeyError:
            raise AttributeError(f"the recipe has no key {name!r}") from None

    def check(self) -> None:
        """Every check that needs no data, network or folder: the keys on the command line and in override
        files (`saltkit.config.check_overrides`), the booleans, integers, `amp`, the data and fold keys, the
        network and schedule keys and the probabilities; the first failure raises its ConfigError."""
        check_overrides()
        check_booleans(**{key: self.keys[key] for key in BOOLEAN_KEYS})
        check_integers(self.num_filters, self.val_interval, self.seed)
        amp_off(self.amp)
        check_config(self.dataset_dir, self.fold, self.num_folds, self.backbone, self.variant, self.batch_size,
                     self.max_epochs, self.learning_rate, self.warmup_epochs)
        check_network_variant(self.fine_context_scale, self.deep_supervision)
        check_schedule(self.max_epochs, self.cooldown_epochs, self.warmup_unit)
        check_probabilities(self.cutout_prob, self.geometric_prob, self.intensity_prob, self.head_dropout,
                            self.decoder_dropout)
        check_validation_size(self.validation_size)
        check_sections(self.sections_dir, self.section_windows_per_epoch)

    def record(self) -> dict:
        """The keys as the run folder's config.json records them (`saltkit.rundir.prepare_run_dir`)."""
        return dict(self.keys)


def check_config(dataset_dir, fold, num_folds, backbone: str, variant: str, batch_size, max_epochs,
                 learning_rate, warmup_epochs) -> None:
    """Cheap checks of the user-facing keys, before folds, caches and networks are built."""
    root = Path(str(dataset_dir))
    if not root.is_dir():
        raise ConfigError(f"config key 'dataset_dir': {root} is not a folder; expected the TGS layout "
                          "(train/images, train/masks, train.csv)")
    try:
        train_items(root)
    except DatasetError as e:
        raise ConfigError(f"config key 'dataset_dir': {e}") from None
    for key, value, low in (("num_folds", num_folds, 2), ("batch_size", batch_size, 1), ("max_epochs", max_epochs, 1)):
        require_int(key, value, low)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise ConfigError(f"config key 'fold' must be an integer in 0..{num_folds - 1} (num_folds={num_folds}), "
                          f"got {fold!r}")
    if backbone not in available_backbones():
        close = difflib.get_close_matches(str(backbone), available_backbones(), n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"config key 'backbone': unknown backbone {backbone!r}{hint}; "
                          f"expected one of {available_backbones()}")
    try:
        check_variant(variant)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key, value in (("learning_rate", learning_rate), ("warmup_epochs", warmup_epochs)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"config key '{key}' must be a number > 0, got {value!r}")


def check_sections(sections_dir, windows_per_epoch) -> None:
    """`sections_dir` null or a folder; `section_windows_per_epoch` null or an integer >= 1
    (the sections themselves are read and checked with the fold split)."""
    if none_if_null(windows_per_epoch) is not None:
        require_int("section_windows_per_epoch", windows_per_epoch, 1)
    folder = none_if_null(sections_dir)
    if folder is None:
        return
    if not Path(str(folder)).is_dir():
        raise ConfigError(f"config key 'sections_dir': {folder} is not a folder; expected sections NAME.png (.tif, "
                          ".npy) with NAME_mask.png beside each (saltkit mosaic writes such a folder)")


def check_integers(num_filters, val_interval, seed) -> None:
    """Integer keys checked before the network is built: num_filters >= 1, val_interval >= 1, seed >= 0."""
    require_int("num_filters", num_filters, 1)
    require_int("val_interval", val_interval, 1)
    require_int("seed", seed, 0)


def check_network_variant(fine_context_scale, deep_supervision) -> None:
    """The two cheaper-network keys: `fine_context_scale` an integer >= 1, `deep_supervision` a known mode."""
    require_int("fine_context_scale", fine_context_scale, 1)
    if deep_supervision not in DEEP_SUPERVISION_MODES:
        raise ConfigError(f"config key 'deep_supervision' must be one of {list(DEEP_SUPERVISION_MODES)}, "
                          f"got {deep_supervision!r}")


def check_schedule(max_epochs, cooldown_epochs, unit: str = "epoch") -> None:
    """`cooldown_epochs` (counted in `warmup_unit`s): a number >= 0 (one longer than the run covers the run)."""
    if isinstance(cooldown_epochs, bool) or not isinstance(cooldown_epochs, (int, float)) or cooldown_epochs < 0:
        raise ConfigError(f"config key 'cooldown_epochs' must be a number >= 0, got {cooldown_epochs!r}")


def check_probabilities(cutout_prob, geometric_prob, intensity_prob, head_dropout=0.5, decoder_dropout=0.2) -> None:
    """The augmentation and dropout probabilities are numbers in [0, 1]."""
    for key, value in (("cutout_prob", cutout_prob), ("geometric_prob", geometric_prob),
                       ("intensity_prob", intensity_prob), ("head_dropout", head_dropout),
                       ("decoder_dropout", decoder_dropout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ConfigError(f"config key '{key}' must be a probability in [0, 1], got {value!r}")


def check_batch_size(items: Sequence[dict], batch_size: int, fold: int | None = None) -> None:
    """The training fold must fill at least one batch per process (batches are dropped when incomplete)."""
    per_rank = len(items) // idist.get_world_size()
    if batch_size > per_rank:
        where = f" of fold {fold}" if fold is not None else ""
        ranks = f" per process ({idist.get_world_size()} processes)" if idist.get_world_size() > 1 else ""
        raise ConfigError(f"config key 'batch_size' = {batch_size} is larger than the {per_rank} training "
                          f"tiles{where}{ranks}; lower batch_size or use a larger dataset_dir")
