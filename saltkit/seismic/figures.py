"""Pictures of predicted seismic that explain themselves: axes, a legend or a colour bar, and a caption naming the
threshold, the model (checkpoint name, weight fingerprint, what it was trained on) and the saltkit version.

Drawn with matplotlib's object API on an off-screen Agg canvas (no pyplot state, no display needed). No-data
pixels (NaN probability) are transparent over a hatched background. Every picture is written through
`saltkit.io.atomic_write`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from saltkit.io import atomic_write

SALT_COLOUR = (1.0, 64 / 255, 0.0)  # the orange tint of `saltkit.seismic.section_files.outline_overlay`
OUTLINE_COLOUR = (1.0, 1.0, 0.0)  # its yellow outline
TINT_ALPHA = 0.35
PROBABILITY_CMAP = "magma"
NO_DATA_HATCH = "///"
DPI = 100
FONT_SIZE = 9


def model_text(model: dict | None) -> str:
    """'model swa.pt (weights 0123abcd..., trained on 2880 tiles of tgs)' from `model_provenance`'s dict: the data
    set by its folder's name (the full path, in the provenance JSON, names the training machine's folders)."""
    if not model:
        return "model not recorded"
    text = f"model {model.get('name', '?')} (weights {model.get('weights', '?')}"
    if model.get("train_tiles") is not None:
        where = "the embedded sample" if model.get("sample") else Path(str(model.get("dataset_dir") or "?")).name
        pseudo = f" + {model['pseudo_tiles']} pseudo-labelled" if model.get("pseudo_tiles") else ""
        text += f", trained on {model['train_tiles']}{pseudo} tiles of {where}"
    elif model.get("sample"):
        text += ", trained on the embedded sample"
    else:
        text += ", training data not recorded"
    text += ")"
    if model.get("toy"):
        text += " - A TOY MODEL, see the warning"
    return text


def caption_text(threshold: float, model: dict | None, extra: str = "") -> str:
    """The caption under every picture: threshold, model and saltkit version (and `extra`, e.g. the clip)."""
    from saltkit import __version__

    parts = [f"salt: probability > {threshold:.2f}", model_text(model)]
    if extra:
        parts.append(extra)
    parts.append(f"saltkit {__version__}")
    return " | ".join(parts)


@dataclass(frozen=True)
class Axis:
    """How a picture's rows or columns are labelled: `label` and the value at each index (`values`, e.g. the
    crossline numbers or sample times), or the pixel index when `values` is None."""

    label: str
    values: Sequence[float] | None = None

    def tick_text(self, index: float) -> str:
        if self.values is None:
            return f"{index:g}"
        k = int(round(index))
        if not 0 <= k < len(self.values):
            return ""
        return f"{self.values[k]:g}"


PIXEL_X, PIXEL_Y = Axis("column (pixel)"), Axis("row (pixel)")


def _data_size(h: int, w: int, equal: bool) -> tuple[int, int]:
    """(height, width) in figure pixels of the image area: small sections scaled up (at least ~560 px on the long
    side), large ones down (at most 1400 px); `equal` keeps the pixel aspect unless a side would be under 160 px
    (a long thin section), else each side is clamped."""
    scale = min(max(560 / max(h, w), 1.0), 1400 / max(h, w))
    if equal and min(h, w) * scale >= 160:
        return int(round(h * scale)), int(round(w * scale))
    return int(np.clip(h * scale, 320, 900)), int(np.clip(w * scale, 420, 1400))


class _Canvas:
    """A figure laid out in pixels: title on top, the image area, an optional colour bar on its right, and the
    legend and wrapped caption underneath."""

    LEFT, TOP, BOTTOM_AXIS, RIGHT, BAR = 80, 34, 48, 24, 90

    def __init__(self, data_h: int, data_w: int, caption: str, colour_bar: bool, legend: bool):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        right = self.RIGHT + (self.BAR if colour_bar else 0)
        fig_w = max(self.LEFT + data_w + right, 640)
        self.caption = textwrap.wrap(caption, width=max(40, int((fig_w - 20) / 7.0))) or [""]
        below = self.BOTTOM_AXIS + (30 if legend else 0) + 8 + 14 * len(self.caption)
        fig_h = self.TOP + data_h + below
        self.fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
        FigureCanvasAgg(self.fig)
        self.fig_w, self.fig_h, self.below = fig_w, fig_h, below
        left = self.LEFT + (fig_w - self.LEFT - data_w - right) // 2  # centred when the caption sets the width
        self.ax = self.fig.add_axes((left / fig_w, below / fig_h, data_w / fig_w, data_h / fig_h))
        self.cax = (self.fig.add_axes(((left + data_w + 16) / fig_w, below / fig_h, 14 / fig_w, data_h / fig_h))
                    if colour_bar else None)
        self.legend_y = (below - self.BOTTOM_AXIS - 4) / fig_h

    def finish(self, title: str, path: str | Path) -> Path:
        self.ax.set_title(title, fontsize=FONT_SIZE + 2, loc="left")
        self.fig.text(10 / self.fig_w, 4 / self.fig_h, "\n".join(self.caption), fontsize=FONT_SIZE,
                      va="bottom", ha="left", family="DejaVu Sans", linespacing=1.25)
        with atomic_write(path, "wb") as f:
            self.fig.savefig(f, format="png", dpi=DPI, metadata={"Software": "saltkit"},
                             pil_kwargs={"compress_level": 3})
        return Path(path)


def _label_axes(ax, h: int, w: int, x: Axis, y: Axis) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    for axis, spec in ((ax.xaxis, x), (ax.yaxis, y)):
        axis.set_major_locator(MaxNLocator(nbins=8, integer=True, min_n_ticks=2))
        axis.set_major_formatter(FuncFormatter(lambda v, _pos, spec=spec: spec.tick_text(v)))
    ax.set_xlabel(x.label, fontsize=FONT_SIZE)
    ax.set_ylabel(y.label, fontsize=FONT_SIZE)
    ax.tick_params(labelsize=FONT_SIZE - 1)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def _no_data_background(ax) -> None:
    """Hatching behind the image: it shows where the image is transparent (no data)."""
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, facecolor="white", edgecolor="0.6",
                           hatch=NO_DATA_HATCH, linewidth=0, zorder=0))


def _no_data_handle():
    from matplotlib.patches import Patch

    return Patch(facecolor="white", edgecolor="0.6", hatch=NO_DATA_HATCH, label="no data (not predicted)")


def _interpolation(data_h: int, h: int) -> str:
    return "nearest" if data_h >= h else "antialiased"


def _rgba(colour: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H, W, 3) float colours in [0, 1] -> (H, W, 4) uint8, transparent where not `valid`: one image to draw,
    cheaper than layers that matplotlib resamples and blends one by one."""
    out = np.empty((*valid.shape, 4), np.uint8)
    out[..., :3] = np.rint(np.clip(colour, 0, 1) * 255)
    out[..., 3] = np.where(valid, 255, 0)
    return out


def _over(base: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`colour` ((H, W, 3) or (3,)) drawn over the (H, W, 3) `base` with per-pixel `alpha` (H, W)."""
    a = alpha[..., None].astype(np.float32)
    return base * (1 - a) + np.asarray(colour, dtype=np.float32) * a


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    grey = np.nan_to_num(np.clip(np.asarray(grey, dtype=np.float32), 0, 1), nan=0.5)
    return np.repeat(grey[..., None], 3, axis=2)


def _outline(ax, prob: np.ndarray, threshold: float) -> None:
    """The salt boundary: the contour of the probability at the threshold (no-data left out)."""
    values = np.ma.masked_invalid(prob)
    if values.count() and values.min() < threshold < values.max():
        ax.contour(values, levels=[threshold], colors=[OUTLINE_COLOUR], linewidths=1.3, zorder=4)


def _legend(canvas: _Canvas, handles: list) -> None:
    canvas.fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, canvas.legend_y), ncol=len(handles),
                      fontsize=FONT_SIZE, frameon=False, handlelength=1.6, columnspacing=1.4)


def section_overlay_figure(path: str | Path, grey: np.ndarray, prob: np.ndarray, threshold: float, caption: str,
                           title: str, x: Axis = PIXEL_X, y: Axis = PIXEL_Y) -> Path:
    """The section in grey with salt (probability > threshold) tinted orange and outlined in yellow, a legend,
    axes and the caption. grey: (H, W) [0, 1]; prob: (H, W) with NaN where there is no data."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    h, w = grey.shape
    data_h, data_w = _data_size(h, w, equal=True)
    canvas = _Canvas(data_h, data_w, caption, colour_bar=False, legend=True)
    ax = canvas.ax
    valid = np.isfinite(prob)
    _no_data_background(ax)
    salt = valid & (np.nan_to_num(prob) > threshold)
    colour = _over(_grey_rgb(grey), SALT_COLOUR, np.where(salt, TINT_ALPHA, 0.0))
    ax.imshow(_rgba(colour, valid), interpolation=_interpolation(data_h, h), aspect="auto", zorder=1)
    _outline(ax, prob, threshold)
    _label_axes(ax, h, w, x, y)
    handles = [Patch(facecolor=(*SALT_COLOUR, TINT_ALPHA), edgecolor="none", label=f"salt (probability > {threshold:.2f})"),
               Line2D([], [], color=OUTLINE_COLOUR, lw=2, label="salt outline")]
    _legend(canvas, handles + ([_no_data_handle()] if not valid.all() else []))
    return canvas.finish(title, path)


def section_probability_figure(path: str | Path, prob: np.ndarray, threshold: float, caption: str, title: str,
                               x: Axis = PIXEL_X, y: Axis = PIXEL_Y) -> Path:
    """The salt probability in a colour map with its colour bar (the threshold marked on it), the salt boundary,
    axes and the caption. prob: (H, W) with NaN where there is no data."""
    from matplotlib.lines import Line2D

    canvas = _probability_canvas(prob, threshold, caption, equal=True)
    _label_axes(canvas.ax, *prob.shape, x, y)
    handles = [Line2D([], [], color=OUTLINE_COLOUR, lw=2, label=f"salt outline (probability = {threshold:.2f})")]
    _legend(canvas, handles + ([_no_data_handle()] if not np.isfinite(prob).all() else []))
    return canvas.finish(title, path)


def _probability_canvas(prob: np.ndarray, threshold: float, caption: str, equal: bool) -> _Canvas:
    """A canvas with `prob` in the probability colour map over the no-data background, outlined at `threshold`,
    and its colour bar (the threshold marked); the caller labels the axes and adds the legend."""
    data_h, data_w = _data_size(*prob.shape, equal=equal)
    canvas = _Canvas(data_h, data_w, caption, colour_bar=True, legend=True)
    _no_data_background(canvas.ax)
    image = _probability_image(canvas.ax, prob, PROBABILITY_CMAP, data_h)
    _outline(canvas.ax, prob, threshold)
    _colour_bar(canvas, image, threshold)
    return canvas


def _probability_image(ax, prob: np.ndarray, cmap, data_h: int):
    """Draw `prob` in the colour map (no data transparent); returns the mappable its colour bar reads."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cmap = colormaps[cmap] if isinstance(cmap, str) else cmap
    valid = np.isfinite(prob)
    ax.imshow(_rgba(cmap(np.nan_to_num(prob))[..., :3], valid), interpolation=_interpolation(data_h, prob.shape[0]),
              aspect="auto", zorder=1)
    return ScalarMappable(norm=Normalize(0, 1), cmap=cmap)


def _colour_bar(canvas: _Canvas, image, threshold: float, background=None) -> None:
    bar = canvas.fig.colorbar(image, cax=canvas.cax)
    bar.set_label("salt probability", fontsize=FONT_SIZE)
    bar.ax.tick_params(labelsize=FONT_SIZE - 1)
    bar.ax.axhline(threshold, color=OUTLINE_COLOUR, lw=2)
    bar.ax.axhline(threshold, color="black", lw=0.6)
    if background is not None:
        bar.ax.set_facecolor(background)


def probability_ramp():
    """Colour map for probability drawn over seismic: transparent up to 0.15 (the seismic stays as it is where
    there is little chance of salt), then orange to red, more opaque towards 1 (at most 60 %: the amplitude stays
    readable under salt)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    colours = colormaps["YlOrRd"](np.linspace(0.35, 1.0, 256))
    rise = np.clip((np.linspace(0, 1, 256) - 0.15) / 0.6, 0, 1)
    colours[:, 3] = 0.6 * rise * rise * (3 - 2 * rise)  # smoothstep
    return ListedColormap(colours, name="salt_probability")


def volume_section_figure(path: str | Path, amplitude: np.ndarray, prob: np.ndarray, threshold: float,
                          clip: tuple[float, float], caption: str, title: str, x: Axis, y: Axis) -> Path:
    """One inline or crossline: the amplitude in grey (clipped at `clip`, as the network saw it), the salt
    probability drawn over it (colour bar), the salt boundary at the threshold, volume axes and the caption.

    amplitude, prob: (samples, traces); NaN amplitude (no trace) or NaN probability is no data.
    """
    from matplotlib.lines import Line2D

    h, w = amplitude.shape
    data_h, data_w = _data_size(h, w, equal=False)
    canvas = _Canvas(data_h, data_w, caption, colour_bar=True, legend=True)
    ax = canvas.ax
    valid = np.isfinite(prob) & np.isfinite(amplitude)
    _no_data_background(ax)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    ramp = probability_ramp()
    ramped = ramp(np.nan_to_num(prob))
    grey = (amplitude - clip[0]) / (clip[1] - clip[0])
    colour = _over(_grey_rgb(grey), ramped[..., :3], np.where(valid, ramped[..., 3], 0.0))
    ax.imshow(_rgba(colour, valid), interpolation=_interpolation(data_h, h), aspect="auto", zorder=1)
    image = ScalarMappable(norm=Normalize(0, 1), cmap=ramp)
    _outline(ax, np.where(valid, prob, np.nan), threshold)
    _label_axes(ax, h, w, x, y)
    _colour_bar(canvas, image, threshold, background="0.5")
    handles = [Line2D([], [], color=OUTLINE_COLOUR, lw=2, label=f"salt outline (probability = {threshold:.2f})")]
    _legend(canvas, handles + ([_no_data_handle()] if not valid.all() else []))
    return canvas.finish(title, path)


def volume_map_figure(path: str | Path, max_prob: np.ndarray, threshold: float, caption: str, title: str,
                      x: Axis, y: Axis, inlines: Sequence[int] = (), crosslines: Sequence[int] = ()) -> Path:
    """Map view: the maximum salt probability down each trace ((inlines, crosslines), NaN where a trace is missing
    or has no data), with the pictured inlines / crosslines (indices into the rows / columns) drawn as lines."""
    from matplotlib.lines import Line2D

    canvas = _probability_canvas(max_prob, threshold, caption, equal=False)
    for k in inlines:
        canvas.ax.axhline(k, color="cyan", lw=1, ls="--", zorder=5)
    for k in crosslines:
        canvas.ax.axvline(k, color="cyan", lw=1, ls="--", zorder=5)
    _label_axes(canvas.ax, *max_prob.shape, x, y)
    canvas.cax.set_ylabel("maximum salt probability of the trace", fontsize=FONT_SIZE)
    handles = [Line2D([], [], color=OUTLINE_COLOUR, lw=2, label=f"salt in the trace (maximum > {threshold:.2f})")]
    if len(inlines) or len(crosslines):
        handles.append(Line2D([], [], color="cyan", lw=1, ls="--", label="pictured sections"))
    _legend(canvas, handles + ([_no_data_handle()] if not np.isfinite(max_prob).all() else []))
    return canvas.finish(title, path)
