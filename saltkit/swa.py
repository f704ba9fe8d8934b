"""Stochastic weight averaging of a run's best checkpoints (the recipe's SWA stage).

Equal-weight mean of the parameters with `torch.optim.swa_utils.AveragedModel`, then BatchNorm statistics
recomputed with `update_bn` over the fold's training tiles (no augmentation), because averaged weights do not
match any checkpoint's running statistics. Then, by default, the post-processing is tuned on the fold's validation
tiles with the averaged network (`saltkit.inference.postprocess_tuned`), and stored in the same checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from saltkit.checkpoints import (
    check_checkpoint_variant,
    network_from_checkpoint,
    read_checkpoint,
    weight_arch,
)
from saltkit.config import as_bool
from saltkit.inference.runtime import torch_network
from saltkit.io import atomic_write, check_outputs, check_writable
from saltkit.precision import choose_precision

DEFAULT_CHECKPOINTS = ("best_loss.pt", "best_accuracy.pt", "best_metric.pt")
IDENTITY_KEYS = ("fold", "num_folds", "split")  # what best_*.pt record of their run: they average only with their own


def run_checkpoints(run_dir: str | Path, names: str | Sequence[str] = DEFAULT_CHECKPOINTS) -> list[Path]:
    """Paths of the checkpoints to average (config key 'checkpoints'; existence is checked when they are read).

    `names`: a list, or one comma-separated string (`--checkpoints best_loss.pt,last.pt`); a bare file name
    (`last.pt`) is taken inside `run_dir`, a path with a folder as it is. Any checkpoint with "network" and "arch"
    counts, `last.pt` included; a name listed twice is averaged in twice.
    """
    if isinstance(names, (str, Path)):
        names = [n.strip() for n in str(names).split(",") if n.strip()]
    paths = [Path(str(n)) for n in names]
    return [p if p.parent != Path(".") else Path(run_dir) / p for p in paths]


def check_one_run(paths: Sequence[Path], ckpts: Sequence[dict], expected: dict | None = None) -> dict:
    """The checkpoints were trained on one fold split (the `IDENTITY_KEYS` those that record them record), and on
    the one `expected` names (the run's fold); ValueError naming the two that differ. Returns the common keys."""
    common, first = {}, {}
    for p, c in zip(paths, ckpts, strict=True):
        for key in IDENTITY_KEYS:
            value = c.get(key)
            if value is None:
                continue
            if key in common and value != common[key]:
                raise ValueError(f"config key 'checkpoints': {p} was trained on {key} {value}, {first[key]} on "
                                 f"{key} {common[key]}: SWA averages the checkpoints of one run")
            common.setdefault(key, value)
            first.setdefault(key, p)
            wanted = (expected or {}).get(key)
            if wanted is not None and value != wanted:
                raise ValueError(f"config key 'checkpoints': {p} was trained on {key} {value}, but the run it is "
                                 f"averaged into holds {key} {wanted} out: average the checkpoints of that run "
                                 "(--run_dir of theirs)")
    return common


def average_checkpoints(paths: Sequence[str | Path], variant: str | None = None,
                        expected: dict | None = None) -> tuple[nn.Module, dict]:
    """Network (CPU, eval mode) whose parameters are the equal-weight mean of the checkpoints', and its arch.

    Every checkpoint must have the same arch (and, when they record one, the config's `variant`, and one fold
    split: the `expected` fold's, see `check_one_run`).
    Buffers (BN running statistics) are the last checkpoint's (AveragedModel keeps them in sync with the
    model it averages in); recompute them with `recompute_bn`.
    """
    if not paths:
        raise ValueError("config key 'checkpoints': no checkpoint to average")
    ckpts = [read_checkpoint(p, key="checkpoints") for p in paths]
    arch = dict(ckpts[0]["arch"])
    check_one_run(paths, ckpts, expected)
    for p, c in zip(paths, ckpts, strict=True):
        check_checkpoint_variant(c, variant, p)
        if weight_arch(c["arch"]) != weight_arch(arch):  # the first checkpoint's attention/dropout settings are kept
            raise ValueError(f"{p}: arch {c['arch']} differs from {paths[0]}'s {arch}; cannot average them")
    network = network_from_checkpoint(ckpts[0], paths[0])
    averaged = AveragedModel(network)  # default avg_fn: running equal-weight mean of the parameters
    for c in ckpts:
        network.load_state_dict(c["network"])
        averaged.update_parameters(network)
    return averaged.module.eval(), arch


def recompute_bn(network: nn.Module, images: Iterable[torch.Tensor], device: str | torch.device = "cpu",
                 autocast: torch.dtype | None = None) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them from `(B, 3, H, W)` batches.

    Cumulative average over the batches (momentum None), as `update_bn` does; returns the number of tiles seen.
    `autocast`: the network runs under `torch.autocast` in that dtype (the statistics stay float32).
    The network is left in eval mode.
    """
    seen = 0

    def counted():
        nonlocal seen
        for x in images:
            seen += x.shape[0]
            yield x

    device = torch.device(device)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        update_bn(counted(), network, device=device)
    network.eval()
    return seen


def save_swa_checkpoint(path: str | Path, network: nn.Module, arch: dict, sources: Sequence, bn_tiles: int,
                        variant: str | None = None, postprocessing: dict | None = None,
                        identity: dict | None = None) -> Path:
    """Write {"network", "arch", "checkpoints", "bn_tiles", "variant", "postprocessing", **identity} to `path`
    atomically (variant and postprocessing when given; identity: the fold keys its checkpoints recorded)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    payload = {"network": state, "arch": arch, "checkpoints": [str(s) for s in sources], "bn_tiles": int(bn_tiles)}
    if variant is not None:
        payload["variant"] = variant
    if postprocessing is not None:
        payload["postprocessing"] = postprocessing
    payload.update({k: v for k, v in (identity or {}).items() if k in IDENTITY_KEYS})
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)
    return path


def run_swa(
    checkpoints: Sequence[str | Path],
    loader: Iterable[dict],
    output: str | Path,
    device: str | torch.device = "cpu",
    variant: str | None = None,
    image_key: str = "image",
    tune_loader: Iterable[dict] | None = None,
    tuned_on: dict | None = None,
    amp=False,
    fold: int | None = None,
) -> Path:
    """Bundle entry point (prints progress): average `checkpoints`, recompute BN over `loader`'s batches
    (tiles prepared for `variant`), tune the post-processing on `tune_loader`'s labelled validation batches when
    given (`tuned_on` says which tiles: `saltkit.inference.postprocess_tuned.tuning_record`), save to
    `output`. `amp`: config key `amp` for both passes (`saltkit.precision.choose_precision`); the checkpoint
    is float32 either way. `fold`: the run's fold; checkpoints that record another are refused."""
    paths = [Path(p) for p in checkpoints]
    check_outputs({"output": output}, {"checkpoints": paths})
    check_writable(Path(output).parent, "output")  # a read-only or full folder fails now, not after the work
    for p in paths:  # fail before any work, naming the first missing file
        if not p.is_file():
            raise FileNotFoundError(f"SWA checkpoint not found: {p} (config keys 'run_dir' / 'checkpoints'); "
                                    "train the run to its end first, or list the files to average with --checkpoints")
    network, arch = average_checkpoints(paths, variant, expected={"fold": fold})
    identity = check_one_run(paths, [read_checkpoint(p, key="checkpoints", mmap=True) for p in paths])
    print(f"SWA: averaging {len(paths)} checkpoints: {', '.join(map(str, paths))}", flush=True)
    precision = choose_precision(amp, device)
    if precision.level > logging.DEBUG:
        print(f"SWA: {precision.message}", flush=True)
    network = torch_network(network, device)
    tiles = recompute_bn(network, (batch[image_key] for batch in loader), device, precision.dtype)
    if tiles == 0:
        raise ValueError("SWA: the BN loader yielded no training tiles (check dataset_dir / fold)")
    print(f"SWA: recomputed BatchNorm statistics over {tiles} training tiles", flush=True)
    entry = None
    if tune_loader is not None:
        from saltkit.inference.postprocess_tuned import predict_labelled_tiles, tune, tuning_summary

        if variant is None:
            raise ValueError("SWA: tuning the post-processing needs config key 'variant' (pad or resize)")
        start = time.perf_counter()
        predicted = predict_labelled_tiles(network, tune_loader, variant, device, precision.dtype)
        _, entry = tune(predicted["prob"], predicted["image_prob"], predicted["label"], dict(tuned_on or {}))
        print(f"SWA: post-processing tuned in {time.perf_counter() - start:.0f} s: {tuning_summary(entry)}",
              flush=True)
    out = save_swa_checkpoint(output, network, arch, paths, tiles, variant, entry, identity)
    print(f"SWA: wrote {out}", flush=True)
    return out


class StochasticWeightAveraging:
    """The SWA workflow of bundles/saltnet/configs/swa.json (`run_swa`, as `run()`): the run's checkpoints
    averaged, BatchNorm re-estimated over its training tiles, the post-processing tuned on its validation
    tiles.

    Args:
        run_dir: the training run's folder (config key `run_dir`).
        checkpoints: the checkpoints to average (`run_checkpoints`: names inside `run_dir`, or paths).
        loader: batches of the fold's training tiles (no augmentation) for the BatchNorm pass.
        output: the checkpoint to write (config key `output`).
        device: where both passes run.
        variant: config key `variant` (every checkpoint must have been trained with it).
        tune_loader: labelled batches of the fold's validation tiles, for the tuning.
        tune: config key `tune_postprocessing` (true / false): tune on `tune_loader` and store the result.
        tuned_on: which tiles the tuning sees (`saltkit.inference.postprocess_tuned.tuning_record`), stored
            with it.
        amp: config key `amp`, for both passes.
        fold: the run's fold (config key `fold`, else the run's record); checkpoints of another are refused.
    """

    def __init__(self, run_dir: str | Path, checkpoints: str | Sequence[str], loader: Iterable[dict],
                 output: str | Path, device: str | torch.device = "cpu", variant: str | None = None,
                 tune_loader: Iterable[dict] | None = None, tune=True, tuned_on: dict | None = None,
                 amp=False, fold: int | None = None):
        self.checkpoints = run_checkpoints(run_dir, checkpoints)
        self.loader, self.output, self.device, self.variant = loader, output, device, variant
        self.tune_loader = tune_loader if as_bool(tune, "tune_postprocessing") else None
        self.tuned_on, self.amp, self.fold = tuned_on, amp, fold

    def run(self) -> Path:
        """Average, re-estimate, tune and write (`run_swa`); returns the written checkpoint's path."""
        return run_swa(self.checkpoints, self.loader, self.output, self.device, self.variant,
                       tune_loader=self.tune_loader, tuned_on=self.tuned_on, amp=self.amp, fold=self.fold)
