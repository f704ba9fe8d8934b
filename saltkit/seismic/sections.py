"""Salt probability of one seismic section of any size, through the section inferer (sliding window, flip TTA:
`saltkit.inference.section_inferer`), and of a section given as volume traces (SEG-Y or MDIO): amplitudes clipped
with the volume's clip, no-data samples filled for the network and left out of the result."""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import Inferer
from torch import nn

from saltkit.inference.inferers import PROB
from saltkit.seismic.normalize import scale_to_unit
from saltkit.seismic.validity import fill_no_data, trace_valid


def section_batch(grey: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """`(H, W)` float32 [0, 1] section -> `(1, 3, H, W)` network input (grey repeated, as the training tiles)."""
    x = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32))
    return x[None, None].expand(1, 3, -1, -1).to(device)


@torch.no_grad()
def predict_section(network: nn.Module, inferer: Inferer, grey: np.ndarray,
                    device: str | torch.device = "cpu") -> np.ndarray:
    """`(H, W)` float32 salt probability of the `(H, W)` [0, 1] section `grey` (H, W >= 1)."""
    if grey.ndim != 2 or min(grey.shape) < 1:
        raise ValueError(f"a section must be a 2-D (H, W) array with H, W >= 1, got shape {grey.shape}")
    prob = inferer(section_batch(grey, device), network)[PROB]
    return prob[0, 0].float().cpu().numpy()


def traces_section(amplitudes: np.ndarray, low: float, high: float,
                   fill_value: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The network input of the section whose traces are the rows of `(n, samples)` `amplitudes` (NaN rows:
    missing traces): (`(samples, n)` [0, 1] grey, amplitudes `low` -> 0 and `high` -> 1, no-data samples filled
    by `fill_no_data`; `(n, samples)` bool, True where a sample holds data: `trace_valid`)."""
    valid = trace_valid(amplitudes, fill_value)
    grey = scale_to_unit(np.where(valid, amplitudes, 0).T, low, high)
    return fill_no_data(grey, valid.T), valid


def predict_traces(network: nn.Module, inferer: Inferer, amplitudes: np.ndarray, low: float, high: float,
                   fill_value: float | None = None,
                   device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(`(n, samples)` float32 salt probability, NaN where there is no data; `(n, samples)` bool valid) of the
    section whose traces are the rows of `amplitudes`, clipped at `low` .. `high` (`traces_section`). The one
    way a volume's section is predicted: the SEG-Y and the MDIO paths both call it."""
    grey, valid = traces_section(amplitudes, low, high, fill_value)
    if not valid.any():
        return np.full(amplitudes.shape, np.nan, np.float32), valid
    prob = np.ascontiguousarray(predict_section(network, inferer, grey, device).T)
    prob[~valid] = np.nan
    return prob, valid
