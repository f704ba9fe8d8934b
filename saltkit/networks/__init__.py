"""Networks: backbone registry (encoders), object-context block and the SaltUNet."""

from .bundle import CheckpointSaltUNet
from .encoders import (
    Encoder,
    WeightsHashError,
    WeightsNotFoundError,
    available_backbones,
    build_encoder,
    hub_weights_path,
    resolve_weights,
    stage_channels,
)
from .object_context import ObjectContextBlock, plain_attention, sdpa_attention
from .unet import SaltOutput, SaltUNet, network_from_arch

__all__ = [
    "CheckpointSaltUNet",
    "Encoder",
    "ObjectContextBlock",
    "SaltOutput",
    "SaltUNet",
    "WeightsHashError",
    "WeightsNotFoundError",
    "available_backbones",
    "build_encoder",
    "hub_weights_path",
    "network_from_arch",
    "plain_attention",
    "resolve_weights",
    "sdpa_attention",
    "stage_channels",
]
