"""Salt probability of one seismic section of any size, through the section inferer (sliding window, flip TTA:
`saltkit.inference.section_inferer`)."""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import Inferer
from torch import nn

from saltkit.inference.inferers import PROB


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
