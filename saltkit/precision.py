"""The precision config key `amp` chooses on a device: bf16 or fp16 autocast, or float32, and why.

`choose_precision` decides (bf16 where the device runs it natively for `auto`); `amp_settings` turns the
decision into MONAI engine settings and the autocast dtype of the bundles' `AutocastInferer`. Also the memory
format of config key `channels_last`.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from saltkit.config import ConfigError, as_bool

logger = logging.getLogger(__name__)

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

    Args:
        amp: config key `amp`: false (float32), true / auto (the fastest precision here), "bf16" or "fp16".
        device: the torch device the network runs on.
    """
    dtype = amp_dtype(amp, device)
    if dtype is not None and torch.device(device).type == "cuda":
        return {"amp": True, "amp_kwargs": {"dtype": dtype}, "autocast": None}
    return {"amp": False, "amp_kwargs": {}, "autocast": dtype}


def memory_format(channels_last) -> torch.memory_format:
    """The network's and its batches' memory format: channels_last when config key `channels_last` is true.

    Args:
        channels_last: config key `channels_last` (true / false).
    """
    return torch.channels_last if as_bool(channels_last, "channels_last") else torch.preserve_format
