"""Fine-tuning: a training run that starts from a trained model's weights (config key `init_ckpt`).

The checkpoint is checked before anything heavy starts (same weight-bearing `arch` and variant as the
config's), its weights are loaded on the trainer's start (`saltkit.handlers.InitFromCheckpoint`), and the run
records where it started (`init_identity`), so a resume can refuse another starting point.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from saltkit.checkpoints import (
    INIT_KEY,
    ResumeError,
    arch_of,
    read_checkpoint,
    read_resume_checkpoint,
    weight_arch,
    weights_fingerprint,
)
from saltkit.config import ConfigError, none_if_null
from saltkit.networks import SaltUNet

logger = logging.getLogger(__name__)


def init_checkpoint(init_ckpt) -> str | None:
    """Config key 'init_ckpt' as a path, or None (null: start from the encoder's initial weights)."""
    value = none_if_null(init_ckpt)
    return None if value is None or value is False else str(value)


def read_init_checkpoint(init_ckpt) -> dict | None:
    """The checkpoint config key 'init_ckpt' names (tensors mapped, not read), None for null; ConfigError naming
    the key when it is missing or not a saltkit checkpoint."""
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


def init_path(init_ckpt, resume_path: str | None = None) -> str | None:
    """The checkpoint whose weights the trainer loads on its start: `init_ckpt`'s, unless the run resumes
    (then its weights come from last.pt)."""
    return None if resume_path is not None else init_checkpoint(init_ckpt)


def pretrained_weights(pretrained, init_ckpt):
    """The network's `pretrained` (config key `pretrained`; null: random weights), None when `init_ckpt` is
    set (its weights replace them).

    Args:
        pretrained: config key `pretrained`, the encoder's weights ("imagenet" or a .pth path); null: none.
        init_ckpt: config key `init_ckpt`, a checkpoint to start from; null: none.
    """
    return None if init_checkpoint(init_ckpt) else none_if_null(pretrained)
