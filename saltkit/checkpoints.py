"""The checkpoint format, in one place: what a saltkit .pt holds, how it is written and read, and the checks on it.

Every file is a torch.save'd dict with "network" (state_dict) and "arch" (SaltUNet constructor kwargs, so
inference, SWA and export rebuild the network without any config), and "variant" (pad / resize). Optional
entries: "postprocessing" (settings tuned on the validation fold, `saltkit.inference.postprocess_tuned`);
last.pt also holds "optimizer", "scheduler", "trainer" (Ignite state: epoch, iteration, epoch_length), "best"
(each best checkpoint's score and epoch), "rng" and what identifies the run (variant, fold, the hash of the
split's tile ids), which a resume must match. Files are written through `saltkit.io.atomic_write` (temporary
file + os.replace), so a kill at any moment leaves either the previous file or the new one, and read with
`weights_only=True` (plain types only). The engine handlers that write them during training are in
`saltkit.handlers.save_resume`.

A model packaged for the bundle (`saltkit export CKPT --format model`, `saltkit.export.package_model`) is such a file
outside its run folder: it carries its run record ("record": the run folder's config.json), "metrics", "source"
and "storage" ("float16": its floating-point weights stored in half precision; `read_checkpoint` gives them back as
float32). `bundles/saltnet/models/model.pt` is the one the commands use when no checkpoint is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from saltkit.io import atomic_write

logger = logging.getLogger(__name__)

# arch keys that change how the network computes, not which weights it has; a resume or SWA may differ in them
WEIGHT_NEUTRAL_ARCH_KEYS = ("attention", "head_dropout", "decoder_dropout", "bottleneck_dropout")


def weight_arch(arch: dict) -> dict:
    """`arch` without the weight-neutral keys: two networks with equal weight_arch load each other's weights."""
    return {k: v for k, v in arch.items() if k not in WEIGHT_NEUTRAL_ARCH_KEYS}


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (or the network itself)."""
    return network.module if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else network


def arch_of(network: nn.Module) -> dict:
    """SaltUNet.arch of a (possibly wrapped) network."""
    net = unwrap(network)
    if not hasattr(net, "arch"):
        raise TypeError(f"{type(net).__name__} has no .arch; checkpoints need a SaltUNet-like network")
    return dict(net.arch)


def weights_fingerprint(network_state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex, first 16 digits) of a state dict's names, shapes, dtypes and values, in name order."""
    digest = hashlib.sha256()
    for name in sorted(network_state):
        t = network_state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    """torch.save `ckpt` to `path` atomically (the folder is created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)
    return path


class ResumeError(ValueError):
    """last.pt cannot be resumed by this config (other architecture or run, missing, unreadable or incomplete)."""


# what last.pt records about its run that a resume must match (other recorded keys only explain a mismatch)
RUN_KEYS = ("variant", "fold", "num_folds")


SPLIT_KEY = "split"
# what the run started from (a fine-tuning's init_ckpt: {"path", "weights"}) and the pseudo-labelled set it trains
# on ({"dir", "fingerprint"}); None for a run from initial weights / on labelled tiles only
INIT_KEY, PSEUDO_KEY = "init_ckpt", "pseudo"
# the labelled sections a run trains on instead of tiles ({"dir", "fingerprint"}); None for a run on tiles
SECTIONS_KEY = "sections"


def read_resume_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """The last.pt at `path` (CPU tensors; `mmap` maps instead of reading them); ResumeError naming the path when
    it is missing, unreadable (truncated, not a torch file) or lacks what a resume needs."""
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"resume: {path} not found; nothing to resume (train without --resume first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ResumeError(f"resume: {path} is not a readable checkpoint (truncated or not written by torch.save: "
                          f"{reason}); resume from an intact last.pt, or train afresh") from None
    if not isinstance(ckpt, dict):
        raise ResumeError(f"resume: {path} holds a {type(ckpt).__name__}, not a training checkpoint")
    missing = [k for k in ("network", "arch", "optimizer", "trainer", "best") if k not in ckpt]
    if missing:
        raise ResumeError(f"resume: {path} lacks {missing}; only a last.pt written by training can be "
                          "resumed (best_*.pt hold the network only)")
    return ckpt


def check_same_run(ckpt: dict, expected: dict, path: str | Path) -> None:
    """ResumeError when last.pt was written by another run than `expected` describes: another variant, fold or
    number of folds, another split of the tile ids (other dataset or folds file), another starting checkpoint
    (`init_ckpt`, compared by weight fingerprint) or another pseudo-labelled set (compared by the manifest's
    fingerprint; none counts as one) or other sections (compared by folder and fingerprint). Keys a checkpoint
    does not record are not compared."""
    diff = [f"{k}: checkpoint {ckpt[k]!r} vs config {expected[k]!r}" for k in RUN_KEYS
            if k in ckpt and k in expected and ckpt[k] != expected[k]]
    if diff:
        flags = " ".join(f"--{k} {ckpt[k]}" for k in RUN_KEYS if k in ckpt and k in expected and ckpt[k] != expected[k])
        raise ResumeError(f"cannot resume from {path}: it belongs to another run ({', '.join(diff)}); resume with "
                          f"the run's own settings ({flags}) or train into a new run_dir")
    if SECTIONS_KEY in ckpt and SECTIONS_KEY in expected and ckpt[SECTIONS_KEY] != expected[SECTIONS_KEY]:
        raise ResumeError(f"cannot resume from {path}: it was trained on {_sections_text(ckpt[SECTIONS_KEY])}, this "
                          f"config gives {_sections_text(expected[SECTIONS_KEY])}; resume with "
                          + (f"--sections_dir {ckpt[SECTIONS_KEY].get('dir')}" if ckpt[SECTIONS_KEY]
                             else "--sections_dir null") + ", or train into a new run_dir")
    if SPLIT_KEY in ckpt and SPLIT_KEY in expected and ckpt[SPLIT_KEY] != expected[SPLIT_KEY]:
        raise ResumeError(f"cannot resume from {path}: it was trained on other tiles for fold {ckpt.get('fold')} "
                          f"({data_source(ckpt)}) than this config gives ({data_source(expected)}); resume with the "
                          "run's own dataset_dir and folds_csv, or train into a new run_dir")
    if INIT_KEY in ckpt and INIT_KEY in expected and _digest(ckpt[INIT_KEY], "weights") != \
            _digest(expected[INIT_KEY], "weights"):
        raise ResumeError(f"cannot resume from {path}: that run started from {_init_text(ckpt[INIT_KEY])}, this "
                          f"config from {_init_text(expected[INIT_KEY])}; resume it without --init_ckpt, or "
                          "fine-tune into a new run_dir")
    if PSEUDO_KEY in ckpt and PSEUDO_KEY in expected and _digest(ckpt[PSEUDO_KEY], "fingerprint") != \
            _digest(expected[PSEUDO_KEY], "fingerprint"):
        raise ResumeError(f"cannot resume from {path}: it was trained with {_pseudo_text(ckpt[PSEUDO_KEY])}, this "
                          f"config gives {_pseudo_text(expected[PSEUDO_KEY])}; resume with "
                          + (f"--pseudo_dir {ckpt[PSEUDO_KEY].get('dir')}" if ckpt[PSEUDO_KEY] else "--pseudo_dir null")
                          + ", or train into a new run_dir")


def _digest(record, key: str):
    """`record[key]` of a run-identity entry that is a dict or None."""
    return record.get(key) if isinstance(record, dict) else None


def _init_text(record) -> str:
    if not isinstance(record, dict):
        return "the encoder's initial weights"
    return f"init_ckpt {record.get('path')} (weights {record.get('weights')})"


def _pseudo_text(record) -> str:
    if not isinstance(record, dict):
        return "no pseudo-labelled tiles"
    return f"the pseudo-labelled set {record.get('dir')} (fingerprint {record.get('fingerprint')})"


def _sections_text(record) -> str:
    if not isinstance(record, dict):
        return "tiles (no sections_dir)"
    return f"the sections of {record.get('dir')} (fingerprint {record.get('fingerprint')})"


def data_source(record: dict) -> str:
    """'dataset_dir D, folds_csv F' of a run record, for messages."""
    return f"dataset_dir {record.get('dataset_dir', '?')}, folds_csv {record.get('folds_csv', '?')}"


def check_same_arch(saved: dict, current: dict, path: str | Path) -> None:
    """Raise ResumeError naming the differing arch keys when `saved` and `current` build different weights."""
    saved, current = weight_arch(saved), weight_arch(current)
    keys = set(saved) | set(current)
    diff = {k: (saved.get(k), current.get(k)) for k in sorted(keys) if saved.get(k) != current.get(k)}
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(f"cannot resume from {path}: it holds another architecture ({shown}); use the config "
                          "it was trained with, or a new run_dir to start afresh")


def read_checkpoint(path: str | Path, key: str = "ckpt", mmap: bool = False, float32: bool = True) -> dict:
    """The checkpoint dict at `path` (on CPU); errors name the file, the config `key` and what is missing.

    `mmap`: map the tensors instead of reading them (cheap when only the small entries are wanted). `float32`:
    network weights stored in half precision (a packaged model's `--half` storage) come back as float32 (False:
    as stored, to rewrite the file as it was).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (config key '{key}'); train the run first, "
                                f"or pass --{key} with an existing checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from e
    if not isinstance(ckpt, dict) or "network" not in ckpt or "arch" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a saltkit checkpoint with keys 'network' and 'arch', got {keys}")
    if float32 and isinstance(ckpt["network"], dict):
        ckpt["network"] = float32_state(ckpt["network"])
    return ckpt


HALF_DTYPES = (torch.float16, torch.bfloat16)


def float32_state(state: dict) -> dict:
    """`state` with its float16 / bfloat16 tensors as float32 (other tensors, and a float32 state, as they are)."""
    if not any(isinstance(t, torch.Tensor) and t.dtype in HALF_DTYPES for t in state.values()):
        return state
    return {k: t.float() if isinstance(t, torch.Tensor) and t.dtype in HALF_DTYPES else t for k, t in state.items()}


def network_from_checkpoint(ckpt: dict, source: str | Path = "checkpoint") -> nn.Module:
    """SaltUNet rebuilt from `ckpt["arch"]` with `ckpt["network"]` loaded strictly (eval mode, on CPU)."""
    from saltkit.networks import network_from_arch

    network = network_from_arch(ckpt["arch"])  # pretrained=None: the checkpoint holds every weight
    try:
        network.load_state_dict(ckpt["network"])
    except RuntimeError as e:
        raise ValueError(f"{source}: weights do not match its own arch {ckpt['arch']} ({e})") from e
    return network.eval()


def check_checkpoint_variant(ckpt: dict, variant: str | None, source: str | Path = "checkpoint") -> None:
    """Fail when the checkpoint records another `variant` than the config's (a pad model fed resized tiles)."""
    trained = ckpt.get("variant")
    if variant is not None and trained is not None and trained != variant:
        raise ValueError(f"{source} was trained with variant {trained!r} but config key 'variant' is {variant!r}; "
                         f"merge configs/{trained}.json instead")


def load_network(
    path: str | Path, device: str | torch.device = "cpu", variant: str | None = None, key: str = "ckpt"
) -> nn.Module:
    """Network of the checkpoint at `path`, in eval mode on `device`; checks the recorded variant if given."""
    ckpt = read_checkpoint(path, key)
    check_checkpoint_variant(ckpt, variant, path)
    return network_from_checkpoint(ckpt, path).to(device)


RUN_RECORD = "config.json"  # what training writes into its run folder: {"resolved": {...}, "command": [...], ...}
RECORD_KEY = "record"  # a packaged model's copy of its run folder's config.json
BUNDLE_MODEL = Path("models") / "model.pt"  # a bundle's model, below bundle_root
BUNDLE_ROOT = Path("bundles") / "saltnet"


def embedded_record(ckpt: dict, source: str | Path = "checkpoint") -> dict:
    """The resolved keys of the run record a packaged model carries ({} when it carries none)."""
    record = ckpt.get(RECORD_KEY)
    if record is None:
        return {}
    try:
        return dict(record["resolved"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: entry '{RECORD_KEY}' is not a training run record ({e}); package the "
                         "model again (saltkit export CKPT --format model)") from None


def record_source(run_dir: str | Path) -> Path | None:
    """Where `run_record(run_dir)` reads: `run_dir/config.json`, else a packaged `run_dir/model.pt` (a bundle's
    models folder), else None."""
    record_path = Path(run_dir) / RUN_RECORD
    if record_path.is_file():
        return record_path
    model = Path(run_dir) / BUNDLE_MODEL.name
    try:
        packaged = model.is_file() and RECORD_KEY in read_checkpoint(model, mmap=True, float32=False)
    except ValueError:  # not a checkpoint: whatever reads it as one says so
        packaged = False
    return model if packaged else None


def run_record(run_dir: str | Path) -> dict:
    """The resolved keys training recorded in `run_dir/config.json`; in a bundle's models folder (no config.json),
    the record its packaged `model.pt` carries; {} when there is no record."""
    source = record_source(run_dir)
    if source is None:
        return {}
    if source.name != RUN_RECORD:
        return embedded_record(read_checkpoint(source, mmap=True, float32=False), source)
    try:
        return dict(json.loads(source.read_text())["resolved"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: not a training run record ({e})") from e


def run_setting(run_dir: str | Path, key: str, default=None, given=None, ckpt: str | Path | None = None):
    """`given` when set (a command-line value), else what the checkpoint `ckpt` itself recorded for `key` (best_*.pt
    record their run's fold, split and data), else what the run in `run_dir` recorded, else `default`.

    So the steps after training (SWA, evaluation) use the run's own dataset_dir, fold and fold file by default, also
    for a checkpoint moved out of its run folder. A checkpoint whose record disagrees with the folder's is an error;
    a fold taken from `default` because nothing recorded one is logged as a warning.
    A packaged model's record names the folders of the machine it was trained on: a dataset_dir or folds_csv it
    names that does not exist here is an error saying what to pass (a missing fold file would otherwise be made
    afresh, a split the model may have trained on).

    Args:
        run_dir: the run folder whose record (config.json) is read.
        key: the record's key (dataset_dir, fold, num_folds, folds_csv, variant, ...).
        default: the value when neither the checkpoint nor the run records one.
        given: the config's own value (from the command line); None: look it up.
        ckpt: the checkpoint whose own record is read first; None: only the run's.
    """
    if given is not None:
        return given
    record = run_record(run_dir)
    value = record.get(key)
    own = read_checkpoint(ckpt, mmap=True, float32=False).get(key) if ckpt is not None else None
    if own is not None:
        if value is not None and key in ("fold", "num_folds") and own != value:
            raise ValueError(f"{ckpt} was trained on {key} {own}, but {record_source(run_dir)} beside it records "
                             f"{key} {value}: it belongs to another run; move it to its own run folder, or pass "
                             f"--{key}")
        value = own
    if value is None and key == "fold":
        logger.warning(f"{ckpt or run_dir}: no fold recorded (a checkpoint without its run folder's config.json); "
                       f"using fold {default}: pass --fold N if it was trained with another fold held out")
    if value is not None and key in RECORDED_PATHS and not Path(str(value)).exists():
        source = record_source(run_dir)
        if source is not None and source.name != RUN_RECORD:
            fix = RECORDED_PATHS[key].format(fold=record.get("fold", "?"), num_folds=record.get("num_folds", "?"))
            raise FileNotFoundError(f"{source}: its run record names {key} {value}, which does not exist here; {fix}")
    return default if value is None else value


# what to pass when a packaged model's recorded dataset or fold file is not on this machine
RECORDED_PATHS = {
    "dataset_dir": "pass --dataset_dir DIR (the TGS competition data: train/images, train/masks, train.csv)",
    "folds_csv": "pass --folds_csv FILE holding the split the model was trained with (fold {fold} of {num_folds} "
                 "held out; `saltkit folds DATASET_DIR --k {num_folds} --out FILE` writes the default split)",
}


def check_run_matches(run_dir: str | Path, dataset_dir=None, fold=None, num_folds=None, variant=None) -> None:
    """Fail when `run_dir/config.json` (written by training; a packaged model's record in a bundle's models folder)
    records another fold split or variant.

    SWA's BatchNorm pass and fold evaluation must use the run's own training / validation tiles; a checkpoint
    scored on tiles it was trained on would look better than it is. Silent when the run has no record. A packaged
    model's data may sit in another folder here than where it was trained: another dataset_dir is only logged.

    Args:
        run_dir: the run folder (or a packaged model's models folder) whose record is checked.
        dataset_dir: config key `dataset_dir`; None: not checked.
        fold: config key `fold`; None: not checked.
        num_folds: config key `num_folds`; None: not checked.
        variant: config key `variant` (pad / resize); None: not checked.
    """
    record_path = record_source(run_dir) or Path(run_dir) / RUN_RECORD
    record = run_record(run_dir)
    expected = {"fold": fold, "num_folds": num_folds, "variant": variant}
    for key, value in expected.items():
        if value is not None and key in record and record[key] != value:
            fix = f"merge configs/{record[key]}.json" if key == "variant" else f"pass --{key} {record[key]}"
            raise ValueError(f"{record_path}: the run was trained with {key} {record[key]!r} but config key "
                             f"'{key}' is {value!r}; {fix}")
    if dataset_dir is not None and record.get("dataset_dir"):
        if record_path.name != RUN_RECORD:  # a packaged model: its data may live elsewhere on this machine
            if Path(record["dataset_dir"]).resolve() != Path(str(dataset_dir)).resolve():
                logger.info(f"{record_path} was trained on {record['dataset_dir']}; scoring it on {dataset_dir}")
            return
        if Path(record["dataset_dir"]).resolve() != Path(str(dataset_dir)).resolve():
            raise ValueError(f"{record_path}: the run was trained on {record['dataset_dir']} but config key "
                             f"'dataset_dir' is {dataset_dir}; leave --dataset_dir out to use the run's")


def checkpoint_arch(path: str | Path) -> dict:
    """The "arch" dict of the checkpoint at `path` (for configs that build the network before loading it)."""
    return dict(read_checkpoint(path)["arch"])


def checkpoint_variant(path: str | Path, variant: str | None = None) -> str:
    """The variant the checkpoint at `path` was trained with; `variant` (a config's, or None) must agree."""
    from saltkit.geometry import check_variant as valid_variant

    recorded = read_checkpoint(path).get("variant")
    if recorded is None and variant is None:
        raise ValueError(f"{path} does not record its variant: merge configs/pad.json or configs/resize.json "
                         "(config key 'variant')")
    check_checkpoint_variant({"variant": recorded}, variant, path)
    return valid_variant(recorded if recorded is not None else variant)


# the repository checkout the package sits in (an editable install), as `saltkit.cli.workflows.checkout_dir`
# finds it
PACKAGE_CHECKOUT = Path(__file__).resolve().parents[1]


def bundle_model(bundle_root: str | Path = BUNDLE_ROOT) -> Path:
    """`bundle_root/models/model.pt`; a relative `bundle_root` that holds no model from the current folder is
    taken in the repository checkout the package sits in, so the commands find the shipped model from any folder
    (as they find the bundle's configs)."""
    path = Path(str(bundle_root)) / BUNDLE_MODEL
    if path.is_file() or path.is_absolute():
        return path
    in_checkout = PACKAGE_CHECKOUT / path
    return in_checkout if in_checkout.is_file() else path


def restore_hint(path: Path) -> str:
    return (f"put the shipped model back (git checkout -- {BUNDLE_ROOT / BUNDLE_MODEL}) or package one (saltkit "
            f"export RUN/swa.pt --format model --out {path})")


def shipped_model(bundle_root: str | Path = BUNDLE_ROOT, log=None) -> str:
    """The bundle's model (`bundle_model`), the checkpoint used when none is given, said in one line (`log`,
    default: logged at INFO); FileNotFoundError naming the path it expected and what to do when it is missing."""
    path = bundle_model(bundle_root)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint given and the bundle's model {path} does not exist; pass --ckpt "
                                f"FILE (a trained checkpoint, e.g. runs/tgs/pad_fold0/swa.pt), or "
                                f"{restore_hint(path)}")
    (log or logger.info)(f"checkpoint {path} (the bundle's model; --ckpt FILE uses another)")
    return str(path)


def default_checkpoint(bundle_root: str | Path, run_dir: str | Path, name: str = "best_metric.pt") -> str:
    """The checkpoint of a workflow given none: the bundle's model (`bundle_model`) when it exists, as in the
    model zoo, else `run_dir/name` (a training run's checkpoint); logs which one at INFO. FileNotFoundError naming
    both and what to do when neither exists."""
    bundled = bundle_model(bundle_root)
    if bundled.is_file():
        return shipped_model(bundle_root)
    trained = Path(run_dir) / name
    if not trained.is_file():
        raise FileNotFoundError(f"checkpoint not found: neither the bundle's model {bundled} nor the run's {trained} "
                                f"exists (config key 'ckpt'); pass --ckpt FILE, train the run first (saltkit train "
                                f"configs/pad.json), or {restore_hint(bundled)}")
    logger.info(f"checkpoint {trained} (the run's; no bundle model at {bundled})")
    return str(trained)


SHIPPED_OUTPUTS = Path("runs") / "bundle_model"  # where the workflows write for the bundle's model


def output_dir_for(ckpt: str | Path, workflow: str, runtime: str = "torch") -> str:
    """`<folder of ckpt>/<workflow>/<ckpt stem>`: each checkpoint's report or prediction has its own folder, and
    each runtime's (`<stem>-onnxruntime`: an ONNX Runtime prediction never replaces the torch one). For the bundle's
    model, `runs/bundle_model/<workflow>/model` in the current folder: the bundle's folder may be read-only, and
    is no place for predictions."""
    ckpt = Path(ckpt)
    stem = ckpt.stem if runtime in (None, "torch") else f"{ckpt.stem}-{runtime}"
    try:
        shipped = ckpt.resolve() == bundle_model().resolve()
    except OSError:
        shipped = False
    return str((SHIPPED_OUTPUTS if shipped else ckpt.parent) / workflow / stem)
