"""Backbone registry: stage shapes and channels, and how pretrained weights are found and checked (downloads here
only read local file:// URLs)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch

from saltkit.networks import encoders
from saltkit.networks.encoders import (
    WeightsHashError,
    WeightsNotFoundError,
    available_backbones,
    build_encoder,
    hub_weights_path,
    stage_channels,
)


def test_registry_lists_every_backbone():
    assert set(available_backbones()) == {
        "senet154", "se_resnext50_32x4d", "se_resnext101_32x4d", "se_resnet50", "se_resnet101", "se_resnet152",
        "resnet18", "resnet34", "resnet50", "resnet10_w32", "resnet18_w32",
    }
    with pytest.raises(ValueError, match="unknown backbone 'resnet999'"):
        stage_channels("resnet999")


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "se_resnet50", "resnet10_w32", "resnet18_w32"])
def test_stage_shapes_and_channels(name):
    enc = build_encoder(name).eval()
    with torch.no_grad():
        feats = enc(torch.rand(1, 3, 64, 64))
    sizes = [64 // 4, 64 // 4, 64 // 8, 64 // 16, 64 // 32]
    assert [f.shape[1] for f in feats] == list(stage_channels(name)) == list(enc.channels)
    assert [f.shape[-1] for f in feats] == sizes
    assert [f.shape[-2] for f in feats] == sizes


def test_resnet_channels_are_the_published_ones():
    assert stage_channels("resnet18") == stage_channels("resnet34") == (64, 64, 128, 256, 512)
    assert stage_channels("resnet50") == (64, 256, 512, 1024, 2048)
    assert stage_channels("senet154") == (128, 256, 512, 1024, 2048)
    assert stage_channels("resnet10_w32") == stage_channels("resnet18_w32") == (32, 32, 64, 128, 256)


@pytest.mark.parametrize(("name", "blocks"), [("resnet10_w32", 1), ("resnet18_w32", 2)])
def test_narrow_resnets_are_monai_resnets_with_the_torchvision_stem(name, blocks):
    enc = build_encoder(name)
    conv1 = enc.layer0[0]
    assert (conv1.kernel_size, conv1.stride, conv1.out_channels) == ((7, 7), (2, 2), 32)
    assert isinstance(enc.layer0[3], torch.nn.MaxPool2d)
    assert [len(layer) for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4)] == [blocks] * 4


def test_backbone_without_published_weights_says_so(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="no ImageNet weights are published for backbone 'resnet10_w32'"):
        build_encoder("resnet10_w32", pretrained="imagenet")
    with pytest.raises(WeightsNotFoundError, match="resnet10_w32.pth"):
        build_encoder("resnet10_w32", pretrained=tmp_path / "missing.pth")
    saved = tmp_path / "w.pth"
    torch.manual_seed(3)
    source = encoders.backbone_spec("resnet10_w32").build()  # a whole MONAI ResNet, as a user would save one
    torch.save(source.state_dict(), saved)
    enc = build_encoder("resnet10_w32", pretrained=saved)
    assert torch.equal(enc.layer0[0].weight, source.conv1.weight)
    assert torch.equal(enc.layer4[0].conv2.weight, source.layer4[0].conv2.weight)


def test_missing_local_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "resnet18.pth"
    with pytest.raises(WeightsNotFoundError, match=str(missing)):
        build_encoder("resnet18", pretrained=missing)


def test_imagenet_without_cache_or_network_names_file_and_url(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(url, dst, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    expected = tmp_path / "hub" / "checkpoints" / "senet154-c7b49a05.pth"
    url = encoders.backbone_spec("senet154").url
    with pytest.raises(WeightsNotFoundError) as err:
        build_encoder("senet154", pretrained="imagenet")  # fails before building the 115M-parameter model
    assert str(expected) in str(err.value) and url in str(err.value)
    assert not list(expected.parent.glob("*"))  # no partial file left behind


def test_imagenet_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    import torchvision

    torch.manual_seed(1)
    published = torchvision.models.resnet18(weights=None)
    path = hub_weights_path(encoders.backbone_spec("resnet18").url)
    path.parent.mkdir(parents=True)
    torch.save(published.state_dict(), path)
    assert path.name == "resnet18-f37072fd.pth"
    for pretrained in ("imagenet", path):
        enc = build_encoder("resnet18", pretrained=pretrained)
        assert torch.equal(enc.layer0[0].weight, published.conv1.weight)
        assert torch.equal(enc.layer4[1].conv2.weight, published.layer4[1].conv2.weight)


def test_weights_of_another_backbone_are_refused(tmp_path):
    import torchvision

    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit backbone 'resnet18'"):
        build_encoder("resnet18", pretrained=path)


def test_every_published_url_is_https_with_a_hash_in_its_name():
    published = [name for name in encoders.available_backbones() if encoders.backbone_spec(name).url]
    assert set(encoders.available_backbones()) - set(published) == {"resnet10_w32", "resnet18_w32"}
    for name in published:
        url = encoders.backbone_spec(name).url
        assert url.startswith("https://"), url
        assert len(encoders.published_hash(url)) == 8
    assert encoders.published_hash(encoders.backbone_spec("senet154").url) == "c7b49a05"
    with pytest.raises(ValueError, match="must use https"):
        encoders.download_weights("http://example.org/resnet18-f37072fd.pth", Path("unused.pth"))


def served_file(tmp_path, payload: bytes, prefix: str | None = None) -> str:
    """A file:// URL named like a published weights file, `<name>-<sha256 prefix>.pth` (the true one by default)."""
    prefix = prefix or hashlib.sha256(payload).hexdigest()[:8]
    src = tmp_path / "served" / f"resnet18-{prefix}.pth"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(payload)
    return src.as_uri()


def test_download_checks_the_published_hash(tmp_path):
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buffer)
    payload = buffer.getvalue()
    dest = tmp_path / "hub" / "checkpoints" / "resnet18-x.pth"
    assert encoders.download_weights(served_file(tmp_path, payload), dest).read_bytes() == payload
    dest.unlink()
    wrong = served_file(tmp_path, payload, prefix="00000000")
    with pytest.raises(WeightsHashError) as err:
        encoders.download_weights(wrong, dest)
    assert wrong in str(err.value) and "'00000000'" in str(err.value) and str(dest) in str(err.value)
    assert not list(dest.parent.glob("*"))  # neither the file nor its .partial


def test_imagenet_download_with_a_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    tampered = served_file(tmp_path, b"not the published weights", prefix="f37072fd")
    real = encoders.backbone_specs

    def specs():
        out = real()
        out["resnet18"] = encoders.BackboneSpec(out["resnet18"].build, out["resnet18"].channels, tampered)
        return out

    monkeypatch.setattr(encoders, "backbone_specs", specs)
    with pytest.raises(WeightsHashError, match="f37072fd"):
        build_encoder("resnet18", pretrained="imagenet")
    assert not (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").exists()
