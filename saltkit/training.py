"""Small functions the training bundle (bundles/saltnet/configs/train.json) calls: config checks before anything
heavy starts, the fold split, the run directory, seeding, AMP settings and the distributed set-up.

Checks raise ConfigError naming the config key, the value and what was expected.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import ignite.distributed as idist
import torch

from saltkit.config import FALSE_WORDS, TRUE_WORDS, ConfigError, as_bool, require_int
from saltkit.data.layout import DatasetError, train_items
from saltkit.io import atomic_write
from saltkit.transforms import check_variant

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- config checks and the fold split


def check_config(dataset_dir, fold, num_folds, backbone: str, variant: str, batch_size, max_epochs,
                 learning_rate, warmup_epochs) -> None:
    """Cheap checks of the user-facing keys, before folds, caches and networks are built."""
    from saltkit.networks import available_backbones

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


def check_integers(num_filters, val_interval, seed) -> None:
    """Integer keys checked before the network is built: num_filters >= 1, val_interval >= 1, seed >= 0."""
    require_int("num_filters", num_filters, 1)
    require_int("val_interval", val_interval, 1)
    require_int("seed", seed, 0)


def check_network_variant(fine_context_scale, deep_supervision) -> None:
    """The two cheaper-network keys: `fine_context_scale` an integer >= 1, `deep_supervision` a known mode."""
    from saltkit.networks.unet import DEEP_SUPERVISION_MODES

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


# ---------------------------------------------------------------- run directory, resume


def resume_checkpoint(resume, run_dir) -> str | None:
    """Checkpoint to resume from: None (`resume` false), `<run_dir>/last.pt` (true), or the path given."""
    if isinstance(resume, (str, Path)) and str(resume).strip().lower() not in TRUE_WORDS + FALSE_WORDS:
        path = Path(str(resume))
        if not path.is_file():
            raise ConfigError(f"config key 'resume' must be true, false or the path of a last.pt; {path} is no file")
    elif as_bool(resume, "resume"):
        path = Path(str(run_dir)) / "last.pt"
    else:
        return None
    if not path.is_file():
        raise ConfigError(f"config key 'resume': {path} not found; nothing to resume (run without --resume first)")
    return str(path)


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
    the split's tile ids, see `saltkit.handlers.checkpoints.check_same_run`); ConfigError naming the path if not."""
    if resume_path is None:
        return
    from saltkit.checkpoints import ResumeError, check_same_run, read_resume_checkpoint

    try:
        ckpt = read_resume_checkpoint(resume_path, mmap=True)
        check_same_run(ckpt, dict(expected or {}), resume_path)
    except ResumeError as e:
        raise ConfigError(f"config key 'resume': {e}") from None


# ---------------------------------------------------------------- fine-tuning: starting from a trained model


def init_checkpoint(init_ckpt) -> str | None:
    """Config key 'init_ckpt' as a path, or None (null: start from the encoder's initial weights)."""
    from saltkit.config import none_if_null

    value = none_if_null(init_ckpt)
    return None if value is None or value is False else str(value)


def read_init_checkpoint(init_ckpt) -> dict | None:
    """The checkpoint config key 'init_ckpt' names (tensors mapped, not read), None for null; ConfigError naming
    the key when it is missing or not a saltkit checkpoint."""
    from saltkit.checkpoints import read_checkpoint

    path = init_checkpoint(init_ckpt)
    if path is None:
        return None
    try:
        return read_checkpoint(path, "init_ckpt", mmap=True)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config key 'init_ckpt': {e}") from None


def check_init_ckpt(init_ckpt, network, variant: str, resume_path: str | None = None) -> None:
    """The checkpoint to fine-tune from builds the config's network (same weight-bearing `arch`) and was trained
    with the config's variant; a one-line ConfigError naming what differs otherwise. Logs where a new run starts."""
    from saltkit.checkpoints import arch_of, weight_arch

    ckpt = read_init_checkpoint(init_ckpt)
    if ckpt is None:
        return
    path = init_checkpoint(init_ckpt)
    trained = ckpt.get("variant")
    if trained is not None and trained != variant:
        raise ConfigError(f"config key 'init_ckpt': {path} was trained with variant {trained!r}, the config trains "
                          f"{variant!r}; merge configs/{trained}.json, or start from a {variant} checkpoint")
    saved, built = weight_arch(dict(ckpt["arch"])), weight_arch(arch_of(network))
    keys = [k for k in sorted(set(saved) | set(built)) if saved.get(k) != built.get(k)]
    if keys:
        import inspect

        from saltkit.networks import SaltUNet

        defaults = {k: p.default for k, p in inspect.signature(SaltUNet).parameters.items()}

        def shown(arch):  # a key an arch leaves out has the network's default value
            return ", ".join(f"{k} {arch.get(k, defaults.get(k))}" for k in keys)

        flags = " ".join(f"--{k} {saved[k]}" for k in keys if k in saved)
        raise ConfigError(f"config key 'init_ckpt': {path} was trained with {shown(saved)}, the config builds "
                          f"{shown(built)}; use the keys it was trained with ({flags}) or another init_ckpt")
    if resume_path is None:
        kept = f", its {ckpt['metric']} {ckpt['score']:.4f} at epoch {ckpt.get('epoch')}" \
            if isinstance(ckpt.get("score"), float) and ckpt.get("metric") else ""
        logger.info(f"fine-tuning from the weights of {path}{kept}; fresh optimizer and schedule")


def init_identity(init_ckpt, resume_path: str | None = None) -> dict | None:
    """What a run records about its starting point: {"path", "weights"} of `init_ckpt` (weights: fingerprint of
    its network), or None. A resume without init_ckpt carries on the record of the run it continues."""
    from saltkit.checkpoints import INIT_KEY, ResumeError, read_resume_checkpoint, weights_fingerprint

    ckpt = read_init_checkpoint(init_ckpt)
    if ckpt is not None:
        return {"path": str(Path(init_checkpoint(init_ckpt)).resolve()),
                "weights": weights_fingerprint(ckpt["network"])}
    if resume_path is None:
        return None
    try:
        return read_resume_checkpoint(resume_path, mmap=True).get(INIT_KEY)
    except ResumeError as e:
        raise ConfigError(f"config key 'resume': {e}") from None


RECORDED_PATHS = ("dataset_dir", "folds_csv", "run_dir")


def prepare_run_dir(run_dir, record: Mapping, resume_path: str | None = None, argv: Sequence[str] | None = None) -> Path:
    """Create the run directory and write `config.json` (resolved top-level keys + the command line); rank 0 only.

    A previous run in the folder was refused or removed before (`saltkit.rundir.claim_run_dir`).
    """
    run_dir = Path(str(run_dir))
    if idist.get_rank() != 0:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = list(sys.argv if argv is None else argv)
    # absolute, so SWA and evaluate find the run's data and folds from any working folder
    record = {k: str(Path(str(v)).resolve()) if k in RECORDED_PATHS and v is not None else v for k, v in record.items()}
    content = {"resolved": jsonable(record), "command": argv, "resumed_from": resume_path}
    name = "config.json" if resume_path is None else "config_resumed.json"
    with atomic_write(run_dir / name) as f:
        json.dump(content, f, indent=2)
    return run_dir


def jsonable(value):
    """Config values made JSON-friendly: paths and devices as strings, containers recursively."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ---------------------------------------------------------------- seeding, AMP, devices, distributed


def seed_everything(seed: int, deterministic=True) -> None:
    """Seed python / numpy / torch (MONAI's set_determinism); `deterministic` false lets cuDNN pick fast kernels."""
    from monai.utils import set_determinism

    set_determinism(seed=require_int("seed", seed, 0))
    if not as_bool(deterministic, "deterministic"):
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


# Config key `amp`: the words naming an autocast dtype (true means bf16, false float32, auto: see choose_precision)
AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
              "half": torch.float16}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of bf16 arithmetic (without them oneDNN emulates it)


def cpu_flags() -> set[str]:
    """The processor's feature flags as /proc/cpuinfo lists them (Linux); empty where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / ARM
            return set(line.split(":", 1)[1].split())
    return set()


def native_cpu_bf16() -> tuple[bool, str]:
    """(whether this processor runs bf16 natively, why): oneDNN must have bf16 kernels for it
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`; without them torch runs bf16 convolutions through a slow
    generic path) and, on x86, the processor must list avx512_bf16 or amx_bf16 (oneDNN emulates bf16 on other
    AVX-512 processors). Emulated bf16 is slower than float32, so `amp: auto` takes bf16 only when this is true."""
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False, "no native bf16: oneDNN has no bf16 kernels for this processor"
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True, "oneDNN reports native bf16"
    found = [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]
    if found:
        return True, f"oneDNN reports bf16 and the processor has {' and '.join(found)}"
    return False, "no native bf16: the processor has neither avx512_bf16 nor amx_bf16, so oneDNN would emulate it"


def amp_off(amp, key: str = "amp") -> bool:
    """Whether config key `amp` says false (float32 everywhere); a value the key does not take is a ConfigError."""
    word = amp.strip().lower() if isinstance(amp, str) else amp
    if word == "auto" or (isinstance(word, str) and word in AMP_DTYPES):
        return False
    try:
        return not as_bool(amp, key)
    except ConfigError:
        raise ConfigError(f"config key '{key}' must be auto, true, false, 'bf16' or 'fp16', got {amp!r}") from None


@dataclass(frozen=True)
class Precision:
    """What config key `amp` chose on a device: the autocast `dtype` (None: float32), the log line saying why,
    and its level (DEBUG for a plain `false`, WARNING where the choice is not what the key asked for or is slow)."""

    dtype: torch.dtype | None
    message: str
    level: int = logging.INFO


def choose_precision(amp, device, key: str = "amp") -> Precision:
    """The precision config key `amp` asks for on `device`.

    `auto`: bf16 autocast where the device runs bf16 natively (a CPU: `native_cpu_bf16`; CUDA:
    `torch.cuda.is_bf16_supported()`), float32 elsewhere. `true` / `bf16`: bf16 autocast (on a CPU without native
    bf16 too, with a warning: it is emulated, slower than float32). `fp16`: float16 autocast on CUDA only (float32
    with a warning elsewhere). `false`: float32. Anything else is a ConfigError naming `key`.
    """
    device = torch.device(device)
    word = amp.strip().lower() if isinstance(amp, str) else amp
    shown = f"{key} {str(amp).strip().lower()}"
    where = "the CPU" if device.type == "cpu" else str(device)
    if word == "auto":
        if device.type == "cpu":
            native, why = native_cpu_bf16()
        elif device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
            why = "the GPU supports bf16" if native else "the GPU has no bf16 support"
        else:
            native, why = False, "autocast is used on the CPU and CUDA only"
        return Precision(torch.bfloat16 if native else None,
                         f"{shown}: {'bf16 autocast' if native else 'float32'} on {where} ({why})")
    if amp_off(amp, key):
        return Precision(None, f"{shown}: float32 on {where}", logging.DEBUG)
    dtype = AMP_DTYPES.get(word, torch.bfloat16)
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    if device.type == "cuda":
        return Precision(dtype, f"{shown}: {name} autocast on {where}")
    if device.type == "cpu" and dtype == torch.bfloat16:
        native, why = native_cpu_bf16()
        if native:
            return Precision(dtype, f"{shown}: bf16 autocast on the CPU ({why})")
        return Precision(dtype, f"{shown}: bf16 autocast on the CPU, emulated ({why}): slower than float32, which "
                                f"`{key}: auto` picks here", logging.WARNING)
    return Precision(None, f"{shown}: float32 on {where} ({name} autocast runs on "
                           f"{'CUDA only' if name == 'fp16' else 'the CPU and CUDA only'}; "
                           f"`{key}: auto` picks the fastest precision)", logging.WARNING)


def amp_dtype(amp, device, key: str = "amp") -> torch.dtype | None:
    """`choose_precision`'s autocast dtype (None: float32), its line logged."""
    precision = choose_precision(amp, device, key)
    logger.log(precision.level, precision.message)
    return precision.dtype


def amp_settings(amp, device) -> dict:
    """MONAI engine and inferer settings from config key `amp` (`choose_precision`; its line is logged):
    {"amp": bool, "amp_kwargs": {"dtype": ...}} for the engines, which autocast on CUDA only, and "autocast": the
    dtype the bundles' `AutocastInferer` runs the network in elsewhere (None: float32, or CUDA, where MONAI does it).
    """
    dtype = amp_dtype(amp, device)
    if dtype is not None and torch.device(device).type == "cuda":
        return {"amp": True, "amp_kwargs": {"dtype": dtype}, "autocast": None}
    return {"amp": False, "amp_kwargs": {}, "autocast": dtype}


def memory_format(channels_last) -> torch.memory_format:
    return torch.channels_last if as_bool(channels_last, "channels_last") else torch.preserve_format


def is_main_process() -> bool:
    """True in single-process runs and on rank 0 of a distributed one (the process that writes files)."""
    return idist.get_rank() == 0


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
    """DistributedDataParallel around `network` (already on `device`), with SyncBatchNorm when `sync_bn`."""
    device = torch.device(device)
    if as_bool(sync_bn, "sync_bn"):
        if device.type != "cuda":
            raise ConfigError("config key 'sync_bn': SyncBatchNorm needs CUDA devices; set --sync_bn false on CPU")
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=ids, output_device=ids[0] if ids else None)


def finish(writer=None, distributed=False) -> None:
    """Close the TensorBoard writer (flushes the events), leave the process group, and switch MONAI's MetaTensor
    tracking back on (initialize turns it off: plain tensors make the transforms ~3x faster)."""
    from monai.data import set_track_meta

    set_track_meta(True)
    if writer is not None:
        writer.close()
    if as_bool(distributed, "distributed") and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
