"""The training bundle's run management (bundles/saltnet/configs/train.json): what a run needs besides its
recipe (`saltkit.recipe`). `TrainingRun` checks what needs the data and the network, claims the run folder,
writes the run record and cleans up at the end; `run_identity` says what a resumed run must match; seeding and
the distributed set-up. The precision of `amp` is `saltkit.precision`'s, fine-tuning `saltkit.finetune`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence

import ignite.distributed as idist
import torch

from saltkit.checkpoints import ResumeError, check_same_run, read_resume_checkpoint
from saltkit.config import ConfigError, as_bool, require_int
from saltkit.data.pseudo import PseudoSet, check_mixing, pseudo_identity, pseudo_record
from saltkit.finetune import check_init_ckpt, init_identity
from saltkit.recipe import Recipe, check_batch_size
from saltkit.rundir import claim_run_dir, prepare_run_dir

logger = logging.getLogger(__name__)


class TrainingRun:
    """One training run's management, at the end of train.json: before the run, the checks that need its data
    and network (`start`) and the claim on the run folder; the run record (`write_record`); at the end, the
    TensorBoard writer closed, the process group left and the folder released (`finish`).

    Args:
        recipe: the checked `Recipe`; its keys are the run record, with what the run resolved added.
        resume_path: the last.pt the run resumes (`saltkit.rundir.resume_checkpoint`), or None.
        identity: what identifies the run (`run_identity`), checked against the last.pt it resumes.
        network: the network as the config builds it, checked against config key `init_ckpt`.
        train_items: the fold's labelled training items.
        val_items: the fold's labelled validation items.
        pseudo: the pseudo-labelled set (`saltkit.data.pseudo.training_pseudo_set`), or None.
        loss: the training loss, recorded by class (and by its terms' weights).
        optimizer: the optimizer, recorded by class.
        sections: the labelled sections trained on instead of tiles
            (`saltkit.seismic.training_sections.training_sections`), or None.
    """

    def __init__(self, recipe: Recipe, resume_path: str | None, identity: Mapping, network: torch.nn.Module,
                 train_items: Sequence[dict], val_items: Sequence[dict], pseudo: PseudoSet | None = None,
                 loss=None, optimizer=None, sections=None):
        self.recipe, self.resume_path, self.identity = recipe, resume_path, dict(identity)
        self.network, self.train_items, self.val_items, self.pseudo = network, train_items, val_items, pseudo
        self.loss, self.optimizer, self.sections = loss, optimizer, sections
        self.lock = None

    def start(self) -> None:
        """The checks that need the fold's tiles, the network, the pseudo-labelled set or the last.pt to
        resume (ConfigError naming the key); then the run folder is claimed (`saltkit.rundir.claim_run_dir`)
        and MONAI's MetaTensor tracking switched off (plain tensors make the transforms ~3x faster)."""
        from monai.data import set_track_meta

        recipe = self.recipe
        if self.sections is None:  # the sections' windows were checked when they were read
            check_batch_size(self.train_items, recipe.batch_size, recipe.fold)
        check_init_ckpt(recipe.init_ckpt, self.network, recipe.variant, self.resume_path)
        n_labelled, n_pseudo = len(self.train_items), 0 if self.pseudo is None else len(self.pseudo.items)
        unit = "tiles"
        if self.sections is not None:  # windows of the labelled and of the pseudo-labelled sections
            n_labelled, n_pseudo = self.sections.windows_per_epoch, int(sum(self.sections.pseudo_windows))
            unit = "section windows"
        check_mixing(n_labelled, n_pseudo, recipe.batch_size, recipe.pseudo_share, unit)
        check_resume(self.resume_path, self.identity)
        self.lock = claim_run_dir(recipe.run_dir, self.resume_path, recipe.overwrite)
        set_track_meta(False)

    def record(self) -> dict:
        """The run record: the recipe's keys and what the run resolved (tiles, processes, loss and optimizer,
        the starting point of a fine-tuning, the pseudo-labelled set, the sections: each with its fingerprint)."""
        recipe = self.recipe
        tiles = self.sections is None
        return {**recipe.record(), "loss_center_crop": getattr(self.loss, "center_crop", None),
                "loss": loss_record(self.loss), "optimizer": type(self.optimizer).__name__,
                "world_size": idist.get_world_size(), "train_tiles": len(self.train_items) if tiles else 0,
                "val_tiles": len(self.val_items) if tiles else 0, "init_ckpt": self.identity.get("init_ckpt"),
                "pseudo": pseudo_record(self.pseudo, recipe.pseudo_share, recipe.batch_size),
                "sections": None if tiles else self.sections.record()}

    def write_record(self) -> None:
        """Write the run record into the run folder (config.json, or config_resumed.json when resuming)."""
        prepare_run_dir(self.recipe.run_dir, self.record(), self.resume_path)

    def finish(self, writer=None) -> None:
        """After the run: `finish` (writer, process group, MetaTensor tracking); the run folder released."""
        finish(writer, self.recipe.distributed)
        if self.lock is not None:
            self.lock.release()


def run_identity(variant: str, fold: int, num_folds: int, split, dataset_dir, folds_csv, init_ckpt=None,
                 resume_path: str | None = None, pseudo: PseudoSet | None = None, sections=None) -> dict:
    """What identifies a run, stored in its last.pt and checked when it is resumed: variant, fold, the split's
    tile ids (`split_digest`), the data and fold files, its starting point (`saltkit.finetune.init_identity`),
    its pseudo-labelled set and its sections.

    Args:
        variant: config key `variant` (pad / resize).
        fold: the validation fold.
        num_folds: the number of folds K.
        split: the fold's (train items, validation items), as `saltkit.data.folds.fold_split` gives them.
        dataset_dir: the dataset folder.
        folds_csv: the fold file.
        init_ckpt: config key `init_ckpt`, the checkpoint a fine-tuning starts from, or None.
        resume_path: the last.pt the run resumes, or None.
        pseudo: the pseudo-labelled set (`saltkit.data.pseudo.training_pseudo_set`), or None.
        sections: the labelled sections (`saltkit.seismic.training_sections.training_sections`), or None.
    """
    return {"variant": variant, "fold": fold, "num_folds": num_folds, "split": split_digest(split),
            "dataset_dir": str(dataset_dir), "folds_csv": str(folds_csv),
            "init_ckpt": init_identity(init_ckpt, resume_path), "pseudo": pseudo_identity(pseudo),
            "sections": None if sections is None else sections.identity()}


def loss_record(loss) -> dict:
    """The run record's view of the loss: its class and, when it has them (DeepSupervisionLoss), its terms'
    weights."""
    weights = getattr(loss, "weights", None)
    return {"class": type(loss).__name__, **(weights() if callable(weights) else {})}


def split_digest(split: tuple[Sequence[dict], Sequence[dict]]) -> str:
    """Hash of a fold split's (train ids, validation ids): equal exactly when both sets of tile ids are equal."""
    train, val = ([str(it["id"]) for it in part] for part in split)
    text = json.dumps({"train": sorted(train), "val": sorted(val)})
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def check_resume(resume_path: str | None, expected: Mapping | None = None) -> None:
    """Before anything heavy: the checkpoint to resume is a readable last.pt of this same run (variant, fold and
    the split's tile ids, see `saltkit.checkpoints.check_same_run`); ConfigError naming the path if not."""
    if resume_path is None:
        return
    try:
        ckpt = read_resume_checkpoint(resume_path, mmap=True)
        check_same_run(ckpt, dict(expected or {}), resume_path)
    except ResumeError as e:
        raise ConfigError(f"config key 'resume': {e}") from None


def seed_everything(seed: int, deterministic=True) -> None:
    """Seed python / numpy / torch (MONAI's set_determinism); `deterministic` false lets cuDNN pick fast kernels."""
    from monai.utils import set_determinism

    set_determinism(seed=require_int("seed", seed, 0))
    if not as_bool(deterministic, "deterministic"):
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def is_main_process() -> bool:
    """True in single-process runs and on rank 0 of a distributed one (the process that writes files)."""
    return idist.get_rank() == 0


def is_secondary_process() -> bool:
    """True on the ranks > 0 of a distributed run, which write no logs, TensorBoard events or files."""
    return not is_main_process()


def init_distributed(distributed) -> None:
    """Join the process group started by torchrun (env:// rendezvous): NCCL with CUDA, else gloo."""
    if not as_bool(distributed, "distributed") or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if "WORLD_SIZE" not in os.environ:
        raise ConfigError("config key 'distributed' is true but WORLD_SIZE is not set; launch with "
                          "`torchrun --nproc_per_node N -m monai.bundle run ...`")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(idist.get_local_rank())


def distributed_device() -> torch.device:
    """This process's device: cuda:<local rank> when CUDA is present, else cpu."""
    return torch.device(f"cuda:{idist.get_local_rank()}") if torch.cuda.is_available() else torch.device("cpu")


def distributed_network(network: torch.nn.Module, device, sync_bn=False) -> torch.nn.Module:
    """DistributedDataParallel around `network` (already on `device`), with SyncBatchNorm when `sync_bn`.

    Args:
        network: the network, already on `device`.
        device: this process's device (`distributed_device`).
        sync_bn: config key `sync_bn`: BatchNorm statistics over all processes (CUDA only).
    """
    device = torch.device(device)
    if as_bool(sync_bn, "sync_bn"):
        if device.type != "cuda":
            raise ConfigError("config key 'sync_bn': SyncBatchNorm needs CUDA devices; set --sync_bn false on CPU")
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=ids, output_device=ids[0] if ids else None)


def finish(writer=None, distributed=False) -> None:
    """Close the TensorBoard writer (flushes the events), leave the process group, and switch MONAI's MetaTensor
    tracking back on (`TrainingRun.start` turns it off)."""
    from monai.data import set_track_meta

    set_track_meta(True)
    if writer is not None:
        writer.close()
    if as_bool(distributed, "distributed") and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
