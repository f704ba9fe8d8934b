"""Read model checkpoints ({"network": state_dict, "arch": SaltUNet kwargs, ...}) and rebuild the network."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from torch import nn


def read_checkpoint(path: str | Path, key: str = "ckpt", mmap: bool = False) -> dict:
    """The checkpoint dict at `path` (on CPU); errors name the file, the config `key` and what is missing.

    `mmap`: map the tensors instead of reading them (cheap when only the small entries are wanted).
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
    return ckpt


def network_from_checkpoint(ckpt: dict, source: str | Path = "checkpoint") -> nn.Module:
    """SaltUNet rebuilt from `ckpt["arch"]` with `ckpt["network"]` loaded strictly (eval mode, on CPU)."""
    from saltkit.networks import network_from_arch

    network = network_from_arch(ckpt["arch"])  # pretrained=None: the checkpoint holds every weight
    try:
        network.load_state_dict(ckpt["network"])
    except RuntimeError as e:
        raise ValueError(f"{source}: weights do not match its own arch {ckpt['arch']} ({e})") from e
    return network.eval()


def check_variant(ckpt: dict, variant: str | None, source: str | Path = "checkpoint") -> None:
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
    check_variant(ckpt, variant, path)
    return network_from_checkpoint(ckpt, path).to(device)


def run_record(run_dir: str | Path) -> dict:
    """The resolved keys training recorded in `run_dir/config.json`; {} when the run has no record."""
    record_path = Path(run_dir) / "config.json"
    if not record_path.is_file():
        return {}
    try:
        return dict(json.loads(record_path.read_text())["resolved"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{record_path}: not a training run record ({e})") from e


def run_setting(run_dir: str | Path, key: str, default=None, given=None):
    """`given` when set (a command-line value), else what the run in `run_dir` recorded for `key`, else `default`.

    So the steps after training (SWA, evaluation) use the run's own dataset_dir, fold and fold file by default.
    """
    if given is not None:
        return given
    value = run_record(run_dir).get(key)
    return default if value is None else value


def check_run_matches(run_dir: str | Path, dataset_dir=None, fold=None, num_folds=None, variant=None) -> None:
    """Fail when `run_dir/config.json` (written by training) records another fold split or variant.

    SWA's BatchNorm pass and fold evaluation must use the run's own training / validation tiles; a checkpoint
    scored on tiles it was trained on would look better than it is. Silent when the run has no config.json.
    """
    record_path = Path(run_dir) / "config.json"
    record = run_record(run_dir)
    expected = {"fold": fold, "num_folds": num_folds, "variant": variant}
    for key, value in expected.items():
        if value is not None and key in record and record[key] != value:
            fix = f"merge configs/{record[key]}.json" if key == "variant" else f"pass --{key} {record[key]}"
            raise ValueError(f"{record_path}: the run was trained with {key} {record[key]!r} but config key "
                             f"'{key}' is {value!r}; {fix}")
    if dataset_dir is not None and record.get("dataset_dir"):
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
    check_variant({"variant": recorded}, variant, path)
    return valid_variant(recorded if recorded is not None else variant)


def default_checkpoint(bundle_root: str | Path, run_dir: str | Path, name: str = "best_metric.pt") -> str:
    """`bundle_root/models/model.pt` when it exists (a bundle with its model, as in the model zoo), else
    `run_dir/name` (a training run's checkpoint)."""
    bundled = Path(bundle_root) / "models" / "model.pt"
    return str(bundled if bundled.is_file() else Path(run_dir) / name)


def output_dir_for(ckpt: str | Path, workflow: str) -> str:
    """`<folder of ckpt>/<workflow>/<ckpt stem>`: each checkpoint's report or prediction has its own folder."""
    ckpt = Path(ckpt)
    return str(ckpt.parent / workflow / ckpt.stem)
