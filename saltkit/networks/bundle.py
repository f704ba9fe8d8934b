"""The bundle's `network_def`: a SaltUNet rebuilt from a checkpoint's "arch" that MONAI's tools can load and export.

MONAI's `CheckpointLoader` and `ckpt_export` hand a whole .pt file to `load_state_dict`; ours holds the weights
under "network" beside "arch", so `load_state_dict` accepts that layout too. `ckpt_export` scripts the network,
which the encoders do not support, so `__prepare_scriptable__` hands it a trace at the network size (128).
"""

from __future__ import annotations

import warnings

import torch

from .unet import SaltOutput, SaltUNet

OUTPUTS = ("logit", "all")


class TracedLogit(torch.nn.Module):
    """A scriptable shell around a traced network (TorchScript keeps the traced graph as a submodule)."""

    def __init__(self, traced: torch.jit.ScriptModule):
        super().__init__()
        self.traced = traced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.traced(x)


class CheckpointSaltUNet(SaltUNet):
    """SaltUNet(**arch) whose forward returns the final `(B, 1, H, W)` logit (`outputs="logit"`, what a MONAI
    bundle's network returns and exports) or the whole SaltOutput with the image logit (`outputs="all"`).

    Args:
        arch: the checkpoint's "arch", SaltUNet's keyword arguments (`saltkit.checkpoints.checkpoint_arch`);
            its `pretrained` is dropped, the checkpoint holds every weight.
        outputs: "logit" (the final `(B, 1, H, W)` logit) or "all" (the SaltOutput).
    """

    def __init__(self, arch: dict, outputs: str = "logit"):
        if outputs not in OUTPUTS:
            raise ValueError(f"config key 'network_def#outputs' must be one of {OUTPUTS}, got {outputs!r}")
        arch = dict(arch)
        arch.pop("pretrained", None)  # the checkpoint holds every weight
        super().__init__(pretrained=None, **arch)
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor | SaltOutput:
        out = super().forward(x)
        return out.logit if self.outputs == "logit" else out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if isinstance(state_dict, dict) and "network" in state_dict and "arch" in state_dict:
            state_dict = state_dict["network"]
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as e:
            raise ValueError(f"checkpoint weights do not match the network built from its arch {self.arch} "
                             f"({str(e).splitlines()[0]})") from e

    def __prepare_scriptable__(self):
        example = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
        outputs, was_training = self.outputs, self.training
        self.outputs = "logit"
        self.eval()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", FutureWarning)
                return TracedLogit(torch.jit.trace(self, example, check_trace=False))
        finally:
            self.outputs = outputs
            self.train(was_training)
