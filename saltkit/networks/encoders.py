"""Backbone registry: name -> encoder cut into five stages (layer0..layer4) with known output channels.

Every backbone here reduces by 4 in layer0 (stride-2 conv + max pool) and by 2 in layer2..layer4, so an input
of S px gives stages at S/4, S/4, S/8, S/16, S/32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CADENE = "https://data.lip6.fr/cadene/pretrainedmodels/"
_TORCHVISION = "https://download.pytorch.org/models/"


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for but no file could be found or downloaded."""


class WeightsHashError(ValueError):
    """A downloaded weights file does not have the SHA-256 prefix its published file name carries."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: a random-init constructor, its stage channels and the ImageNet weights URL."""

    build: Callable[[], nn.Module]
    channels: tuple[int, int, int, int, int]
    url: str | None  # None: no ImageNet weights are published for it (random initialisation or a local file)


def _pretrainedmodels(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        # imported lazily: importing pretrainedmodels loads every model module it ships (seconds)
        import pretrainedmodels

        return pretrainedmodels.__dict__[name](num_classes=1000, pretrained=None)

    return build


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.__dict__[name](weights=None)

    return build


def _monai_resnet(layers: list[int], widths: list[int]) -> Callable[[], nn.Module]:
    """A 2-D MONAI ResNet with torchvision's stem (7x7 stride-2 conv + max pool) at the given stage widths.

    torchvision's BasicBlock ResNets come at one width only; MONAI's take `block_inplanes`.
    """

    def build() -> nn.Module:
        from monai.networks.nets import ResNet

        return ResNet("basic", layers, widths, spatial_dims=2, n_input_channels=3, conv1_t_size=7,
                      conv1_t_stride=2, num_classes=1000)

    return build


def backbone_specs() -> dict[str, BackboneSpec]:
    """The registry: backbone name -> BackboneSpec (a function, so there is no module-level mutable table)."""
    se_channels = (64, 256, 512, 1024, 2048)
    return {
        "senet154": BackboneSpec(_pretrainedmodels("senet154"), (128, 256, 512, 1024, 2048),
                                 _CADENE + "senet154-c7b49a05.pth"),
        "se_resnext50_32x4d": BackboneSpec(_pretrainedmodels("se_resnext50_32x4d"), se_channels,
                                           _CADENE + "se_resnext50_32x4d-a260b3a4.pth"),
        "se_resnext101_32x4d": BackboneSpec(_pretrainedmodels("se_resnext101_32x4d"), se_channels,
                                            _CADENE + "se_resnext101_32x4d-3b2fe3d8.pth"),
        "se_resnet50": BackboneSpec(_pretrainedmodels("se_resnet50"), se_channels,
                                    _CADENE + "se_resnet50-ce0d4300.pth"),
        "se_resnet101": BackboneSpec(_pretrainedmodels("se_resnet101"), se_channels,
                                     _CADENE + "se_resnet101-7e38fcc6.pth"),
        "se_resnet152": BackboneSpec(_pretrainedmodels("se_resnet152"), se_channels,
                                     _CADENE + "se_resnet152-d17c99b7.pth"),
        "resnet18": BackboneSpec(_torchvision("resnet18"), (64, 64, 128, 256, 512),
                                 _TORCHVISION + "resnet18-f37072fd.pth"),
        "resnet34": BackboneSpec(_torchvision("resnet34"), (64, 64, 128, 256, 512),
                                 _TORCHVISION + "resnet34-b627a593.pth"),
        "resnet50": BackboneSpec(_torchvision("resnet50"), (64, 256, 512, 1024, 2048),
                                 _TORCHVISION + "resnet50-0676ba61.pth"),
        # narrow ResNets for training from scratch on a CPU (half resnet18's widths: a quarter of its conv work)
        "resnet10_w32": BackboneSpec(_monai_resnet([1, 1, 1, 1], [32, 64, 128, 256]), (32, 32, 64, 128, 256), None),
        "resnet18_w32": BackboneSpec(_monai_resnet([2, 2, 2, 2], [32, 64, 128, 256]), (32, 32, 64, 128, 256), None),
    }


def available_backbones() -> list[str]:
    """Names accepted by `build_encoder` / `SaltUNet(backbone=...)`."""
    return sorted(backbone_specs())


def backbone_spec(name: str) -> BackboneSpec:
    specs = backbone_specs()
    if name not in specs:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(specs)}")
    return specs[name]


def stage_channels(name: str) -> tuple[int, int, int, int, int]:
    """Output channels of layer0..layer4 for backbone `name`."""
    return backbone_spec(name).channels


def hub_weights_path(url: str) -> Path:
    """Where torch hub caches the file published at `url`: <torch.hub.get_dir()>/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def published_hash(url: str) -> str:
    """The SHA-256 prefix a published weights file name carries (`senet154-c7b49a05.pth` -> "c7b49a05")."""
    name = url.rsplit("/", 1)[-1]
    match = torch.hub.HASH_REGEX.search(name)
    if match is None or not match.group(1):
        raise ValueError(f"weights URL {url} has no '-<sha256 prefix>.' in its file name to check the download with")
    return match.group(1)


def download_weights(url: str, path: Path) -> Path:
    """Download `url` to `path` (via a `.partial` file renamed into place), checking its SHA-256 against the prefix
    in the file name; nothing is left at `path` when the download fails or the hash differs."""
    if not url.startswith(("https://", "file://")):
        raise ValueError(f"weights URL {url} must use https (or file:// for a local mirror)")
    expected = published_hash(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        torch.hub.download_url_to_file(url, str(tmp), hash_prefix=expected, progress=False)
    except RuntimeError as err:
        tmp.unlink(missing_ok=True)
        if "invalid hash value" in str(err):  # torch.hub's wording; the file was checked and discarded
            raise WeightsHashError(
                f"the weights downloaded from {url} do not match the published SHA-256 prefix {expected!r} "
                f"({err}); nothing was written to {path}. Retry, or download the file yourself and check it"
            ) from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


def resolve_weights(name: str, pretrained: str | Path | None) -> Path | None:
    """The weights file for `pretrained`: None -> None (random init); "imagenet" -> the torch hub cache file
    (downloaded there over https if absent and the network allows, its SHA-256 checked against the prefix in the
    published file name); anything else -> a local .pth path that must exist."""
    if pretrained is None:
        return None
    if str(pretrained) == "imagenet":
        url = backbone_spec(name).url
        if url is None:
            raise WeightsNotFoundError(
                f"no ImageNet weights are published for backbone {name!r}; pass pretrained=None (random "
                f"initialisation) or pretrained=<path to a .pth state_dict of this backbone>"
            )
        path = hub_weights_path(url)
        if path.is_file():
            return path
        try:
            return download_weights(url, path)
        except WeightsHashError:
            raise
        except Exception as err:  # no network, proxy, HTTP error: all mean the same to the user
            raise WeightsNotFoundError(
                f"ImageNet weights for backbone {name!r} not found at {path} and the download from {url} "
                f"failed ({type(err).__name__}: {err}); download that file to {path}, or pass "
                f"pretrained=<path to the .pth file>, or pretrained=None for random initialisation"
            ) from err
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"pretrained weights file {path} for backbone {name!r} does not exist; expected a state_dict .pth "
            f"(e.g. {_example_file(name)}), 'imagenet' or None"
        )
    return path


def _example_file(name: str) -> str:
    url = backbone_spec(name).url
    return url.rsplit("/", 1)[-1] if url else f"{name}.pth"


class Encoder(nn.Module):
    """A backbone cut into five stages; forward (B, 3, H, W) normalised -> [layer0 .. layer4] features,
    at H/4, H/4, H/8, H/16, H/32 with `channels` channels."""

    def __init__(self, name: str, pretrained: str | Path | None = None):
        super().__init__()
        spec = backbone_spec(name)
        weights = resolve_weights(name, pretrained)  # first: a missing file fails before a slow build
        model = spec.build()
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                raise ValueError(f"weights file {weights} does not fit backbone {name!r}: {err}") from err
        if hasattr(model, "layer0"):  # pretrainedmodels SENet: layer0 already holds conv(s)+BN+ReLU+max pool
            layer0 = model.layer0
        else:  # torchvision ResNet (activation `relu`) or MONAI ResNet (`act`)
            act = model.relu if hasattr(model, "relu") else model.act
            layer0 = nn.Sequential(model.conv1, model.bn1, act, model.maxpool)
        self.name = name
        self.channels = spec.channels
        self.layer0 = layer0
        self.layer1 = model.layer1
        self.layer2 = model.layer2
        self.layer3 = model.layer3
        self.layer4 = model.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in (self.layer0, self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


def build_encoder(name: str, pretrained: str | Path | None = None) -> Encoder:
    """Encoder for backbone `name` with weights from `pretrained` (None, "imagenet" or a .pth path)."""
    return Encoder(name, pretrained)
