"""MONAI inferers of saltkit: flip test-time augmentation around any inner inferer, and a sliding window whose
window is the tile the network was trained on, so one network predicts a 101 x 101 tile or a section of any size.

- `FlipTTAInferer(inner)`: the batch and its horizontal mirror go through `inner` as one batch; the mirrored
  prediction is flipped back and the two sigmoid probabilities are averaged (the original recipe's TTA).
- inner `SimpleInferer` for tiles already padded / resized to 128 by the data pipeline (training, evaluate,
  inference of Kaggle tiles);
- inner `TileSlidingWindowInferer(variant)` for images larger than a window: pad variant, 128 px windows;
  resize variant, 101 px windows each resized to 128 and the output resized back; Gaussian blending (MONAI's
  `SlidingWindowInferer`). `SectionInferer` around the whole takes images of any size at their own resolution,
  reflect-padded by 13 / 14 px as a tile is in training, and crops the prediction back.
- `AutocastInferer(inner, dtype)`: `inner` with the network run under `torch.autocast` (bf16 on the CPU, config key
  `amp`), its outputs back in float32; MONAI's engines autocast on CUDA only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer

from saltkit.geometry import NETWORK_SIZE, TILE_SIZE, check_variant, pad_widths
from saltkit.logs import progress_bars

PROB, IMAGE_PROB = "prob", "image_prob"
PLAIN_SUFFIX = "_plain"
NETWORK_OUTPUT = "network_output"


def split_output(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final `(B, 1, H, W)` logit and `(B, 1)` image logit (or None) of a SaltOutput, tuple or bare tensor.

    Tuples: `(logit, image_logit)` (ONNX Runtime) or `(logit, pixel_logits, image_logit)` (a traced SaltOutput).
    """
    if isinstance(output, torch.Tensor):
        return output, None
    if hasattr(output, "logit"):
        return output.logit, getattr(output, "image_logit", None)
    if isinstance(output, (tuple, list)) and len(output) in (2, 3):
        return output[0], output[-1]
    raise TypeError(f"network output must be a tensor, a SaltOutput or a (logit, image_logit) tuple, "
                    f"got {type(output).__name__}")


def logit_of(network):
    """`network` as a callable returning only the final logit (what a sliding window can blend)."""
    return lambda x, *args, **kwargs: split_output(network(x, *args, **kwargs))[0]


def reflect_pad(x: torch.Tensor, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Reflect-pad (without repeating the edge, as numpy's / MONAI's "reflect") `(B, C, H, W)` by any amount.

    torch's reflect pad needs pad < size; larger pads (images smaller than the padding) reflect repeatedly.
    """
    while top or bottom or left or right:
        h, w = x.shape[-2:]
        if h == 1 or w == 1:  # a single row / column has nothing to reflect: repeat it
            return F.pad(x, (left, right, top, bottom), mode="replicate")
        t, b, l_, r = (min(p, n - 1) for p, n in ((top, h), (bottom, h), (left, w), (right, w)))
        x = F.pad(x, (l_, r, t, b), mode="reflect")
        top, bottom, left, right = top - t, bottom - b, left - l_, right - r
    return x


def float32_outputs(output):
    """A network output (tensor, SaltOutput, tuple, list or dict) with every floating tensor in float32."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() and output.dtype != torch.float32 else output
    if hasattr(output, "_fields"):
        return type(output)(*(float32_outputs(o) for o in output))
    if isinstance(output, (tuple, list)):
        return type(output)(float32_outputs(o) for o in output)
    if isinstance(output, dict):
        return {k: float32_outputs(v) for k, v in output.items()}
    return output


def autocast_network(network, dtype: torch.dtype | None):
    """`network` as a callable that runs under `torch.autocast(device of its input, dtype)` and returns its outputs
    in float32 (so losses, TTA averages and sliding-window blends stay float32); `network` itself for None."""
    if dtype is None:
        return network

    def run(x, *args, **kwargs):
        with torch.autocast(x.device.type, dtype=dtype):
            output = network(x, *args, **kwargs)
        return float32_outputs(output)

    return run


class AutocastInferer(Inferer):
    """`inferer` (default `SimpleInferer`) with the network under `torch.autocast` in `dtype` (None: float32, the
    network as it is), its outputs cast back to float32 (`autocast_network`).

    The bundles' `amp` on the CPU: MONAI's engines autocast on CUDA only, and call `engine.inferer(inputs, network)`
    in training, validation, evaluate and inference alike, so the network, its weights (float32) and the checkpoint
    format stay as they are. The trainer's loss then sees float32 logits.

    Args:
        inferer: the inferer that calls the network; None: `SimpleInferer`.
        dtype: the autocast dtype, torch.bfloat16 or torch.float16 (`saltkit.precision.amp_settings`); None:
            float32, no autocast.
    """

    def __init__(self, inferer: Inferer | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"config key 'amp': autocast dtype must be torch.bfloat16, torch.float16 or None, "
                             f"got {dtype!r}")
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.dtype = dtype

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        return self.inferer(inputs, autocast_network(network, self.dtype), *args, **kwargs)


MAX_OVERLAP = 0.9  # 100 windows a pixel; more costs hours on a large section for no measurable gain


class TileSlidingWindowInferer(Inferer):
    """Sliding-window logits `(B, 1, H, W)` of `(B, C, H, W)` images with H, W >= the window.

    pad: 128 x 128 windows (the padded tile of training); resize: 101 x 101 windows, each resized to 128
    (bilinear, as MONAI's `Resized` does in training) and its output resized back to 101. Overlapping windows are
    blended by Gaussian weights (MONAI's `SlidingWindowInferer`). Returns logits; `FlipTTAInferer` makes them
    probabilities. `SectionInferer` pads images the way tiles are padded before this runs.
    """

    def __init__(self, variant: str, overlap: float = 0.5, sw_batch_size: int = 16, mode: str = "gaussian",
                 progress: bool = False):
        super().__init__()
        self.variant = check_variant(variant)
        if not 0.0 <= float(overlap) <= MAX_OVERLAP:
            # windows per pixel grow as 1 / (1 - overlap)^2: 4 at 0.5, 100 at 0.9, 10000 at 0.99
            raise ValueError(f"config key 'overlap' must be in [0, {MAX_OVERLAP}], got {overlap} (each pixel is "
                             f"predicted about 1 / (1 - overlap)^2 times: 4 at 0.5, 100 at {MAX_OVERLAP})")
        if int(sw_batch_size) < 1:
            raise ValueError(f"config key 'sw_batch_size' must be >= 1, got {sw_batch_size}")
        self.window = NETWORK_SIZE if variant == "pad" else TILE_SIZE
        self.sliding = SlidingWindowInferer(roi_size=self.window, sw_batch_size=int(sw_batch_size),
                                            overlap=float(overlap), mode=mode,
                                            progress=progress_bars(progress))

    def _window_network(self, network):
        logit = logit_of(network)
        if self.variant == "pad":
            return logit

        def resized(x, *args, **kwargs):
            x = F.interpolate(x, size=(NETWORK_SIZE, NETWORK_SIZE), mode="bilinear", align_corners=False)
            out = logit(x, *args, **kwargs)
            return F.interpolate(out, size=(TILE_SIZE, TILE_SIZE), mode="bilinear", align_corners=False)

        return resized

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        inputs = _plain(inputs)
        if inputs.ndim != 4 or min(inputs.shape[-2:]) < self.window:
            raise ValueError(f"expected (B, C, H, W) images of at least {self.window} px (pad them with "
                             f"SectionInferer), got shape {tuple(inputs.shape)}")
        return self.sliding(inputs, self._window_network(network), *args, **kwargs)


class SectionInferer(Inferer):
    """Images at their own resolution (any H, W >= 1) through `inferer` (e.g. `FlipTTAInferer` around
    `TileSlidingWindowInferer`), padded as training pads a tile and cropped back: every `(B, C, H', W')` map the
    inner inferer returns comes back as `(B, C, H, W)`.

    pad: reflect-padded by 13 before and 14 after (a lone 101 x 101 tile becomes exactly its training input, and
    flip TTA mirrors that padded input as the recipe does), then further to at least the 128 px window;
    resize: reflect-padded only up to the 101 px window when smaller.
    """

    def __init__(self, variant: str, inferer: Inferer):
        super().__init__()
        self.variant = check_variant(variant)
        self.inferer = inferer
        self.window = NETWORK_SIZE if variant == "pad" else TILE_SIZE

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        inputs = _plain(inputs)
        if inputs.ndim != 4:
            raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(inputs.shape)}")
        h, w = inputs.shape[-2:]
        if self.variant == "pad":
            (top, bottom), (left, right) = pad_widths(TILE_SIZE, NETWORK_SIZE), pad_widths(TILE_SIZE, NETWORK_SIZE)
        else:
            top = bottom = left = right = 0
        bottom += max(0, self.window - (h + top + bottom))  # smaller than a window: pad the far side (cropped off)
        right += max(0, self.window - (w + left + right))
        out = self.inferer(reflect_pad(inputs, top, bottom, left, right), network, *args, **kwargs)

        def crop(x):
            return x[..., top : top + h, left : left + w] if isinstance(x, torch.Tensor) and x.ndim == 4 else x

        return {k: crop(v) for k, v in out.items()} if isinstance(out, dict) else crop(out)


class FlipTTAInferer(Inferer):
    """Horizontal-flip TTA around `inferer` (default `SimpleInferer`), returning probabilities.

    `inferer(inputs, network)` -> dict with "prob" `(B, 1, H, W)` (sigmoid of the final logit, the image and its
    flipped-back mirror averaged when `tta`) and, when the network has the image head and the inner inferer keeps
    it, "image_prob" `(B, 1)`. `keep_plain` adds "prob_plain" / "image_prob_plain" (the un-flipped view alone),
    `keep_network_output` adds "network_output" (the raw output for the un-flipped view, e.g. for a loss).
    The image and its mirror go through the network as one batch; BatchNorm in eval mode makes that exact.

    Args:
        inferer: the inferer that calls the network on `(2B, C, H, W)` (images and mirrors); None:
            `SimpleInferer`.
        tta: average the image and its flipped-back mirror; false: the image alone.
        keep_plain: also return "prob_plain" / "image_prob_plain", the un-flipped view's probabilities.
        keep_network_output: also return "network_output", the raw output of the un-flipped view.
    """

    def __init__(self, inferer: Inferer | None = None, tta: bool = True, keep_plain: bool = False,
                 keep_network_output: bool = False):
        super().__init__()
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.tta = _as_bool(tta, "tta")
        self.keep_plain = keep_plain
        self.keep_network_output = keep_network_output

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> dict:
        inputs = _plain(inputs)
        b = inputs.shape[0]
        batch = torch.cat([inputs, inputs.flip(-1)]) if self.tta else inputs
        output = self.inferer(batch, network, *args, **kwargs)
        logit, image_logit = split_output(output)
        prob = torch.sigmoid(logit.float())
        image_prob = None if image_logit is None else torch.sigmoid(image_logit.float()).reshape(len(prob), 1)
        result = {PROB: prob[:b]}
        if image_prob is not None:
            result[IMAGE_PROB] = image_prob[:b]
        if self.keep_plain:
            result.update({k + PLAIN_SUFFIX: v.clone() for k, v in result.items()})
        if self.tta:
            result[PROB] = (prob[:b] + prob[b:].flip(-1)) / 2
            if image_prob is not None:
                result[IMAGE_PROB] = (image_prob[:b] + image_prob[b:]) / 2
        if self.keep_network_output:
            result[NETWORK_OUTPUT] = _first(output, b)
        return result


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Drop MONAI's MetaTensor wrapper: the network needs only the pixels and runs faster on a plain tensor."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def _first(output, b: int):
    """The first `b` items of a network output (tensor, SaltOutput or nested tuple)."""
    if isinstance(output, torch.Tensor):
        return output[:b]
    if hasattr(output, "_fields"):
        return type(output)(*(_first(o, b) for o in output))
    if isinstance(output, (tuple, list)):
        return type(output)(_first(o, b) for o in output)
    return output


def _as_bool(value, key: str) -> bool:
    from saltkit.config import as_bool

    return as_bool(value, key)


def tile_inferer(tta: bool = True, keep_plain: bool = False) -> FlipTTAInferer:
    """Flip TTA over `SimpleInferer`: for tiles the data pipeline already brought to the network size."""
    return FlipTTAInferer(SimpleInferer(), tta=tta, keep_plain=keep_plain)


def section_inferer(variant: str, tta: bool = True, overlap: float = 0.5, sw_batch_size: int = 16,
                    progress: bool = False, autocast: torch.dtype | None = None) -> SectionInferer:
    """`SectionInferer(FlipTTAInferer(AutocastInferer(TileSlidingWindowInferer)))`: `(B, 3, H, W)` images in [0, 1]
    of any size -> {"prob": `(B, 1, H, W)`} salt probabilities.

    Args:
        variant: config key `variant` (pad / resize): how a 101 px window is fed to the 128 px network.
        tta: flip test-time augmentation on each window.
        overlap: the windows' overlap, a fraction 0 <= x <= 0.9 of the window side.
        sw_batch_size: windows per network batch.
        progress: show a progress bar over the windows (drawn only when stderr is a terminal).
        autocast: the network's autocast dtype (None: float32; the windows are blended in float32 either way).
    """
    windows = TileSlidingWindowInferer(variant, overlap=overlap, sw_batch_size=sw_batch_size, progress=progress)
    return SectionInferer(variant, FlipTTAInferer(AutocastInferer(windows, autocast), tta=tta))
