"""`saltkit export`: TorchScript gives the checkpoint's final logit; ONNX, run by OnnxRuntimeNetwork, its final and
image logits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from saltkit.cli import main
from saltkit.export import export_torchscript, load_exported
from saltkit.inference.checkpoint import load_network


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False)
    path = tmp_path_factory.mktemp("export") / "best_metric.pt"
    torch.save({"network": net.state_dict(), "arch": net.arch}, path)
    return path


def test_cli_export_matches_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "model.ts"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert "verified" in capsys.readouterr().out
    module, meta = load_exported(out)
    assert meta["arch"]["backbone"] == "resnet18" and meta["source"] == str(checkpoint)
    net = load_network(checkpoint)
    x = torch.rand(3, 3, 128, 128)  # another batch size than the traced one
    with torch.no_grad():
        expected = net(x).logit
        got = module(x)
    assert got.shape == (3, 1, 128, 128)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_export_bad_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.ts")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        export_torchscript(tmp_path / "missing.pt", tmp_path / "m.ts")
    assert not (tmp_path / "m.ts").exists()


@pytest.mark.filterwarnings("ignore")
def test_monai_ckpt_export_matches_checkpoint(checkpoint, tmp_path):
    from monai.bundle import ckpt_export

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "model_monai.ts"
    ckpt_export("network_def", filepath=str(out), ckpt_file=str(checkpoint), key_in_ckpt="network", use_trace=True,
                input_shape=[1, 3, 128, 128], config_file=str(repo / "bundles/saltnet/configs/export.json"),
                ckpt=str(checkpoint))
    module, _ = load_exported(out)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(module(x), load_network(checkpoint)(x).logit, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_model(checkpoint, tmp_path_factory):
    """The checkpoint exported once with `saltkit export --format onnx` (skipped without the onnx extra)."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    return out


def test_onnx_runtime_network_matches_checkpoint_on_real_tiles(onnx_model, checkpoint, capsys):
    from saltkit.export import verification_tiles
    from saltkit.inference.onnx_runtime import OnnxRuntimeNetwork

    network = OnnxRuntimeNetwork(onnx_model, threads=2)
    assert network.eval() is network and network.to("cpu") is network  # module-like no-ops
    assert network.metadata["arch"]["backbone"] == "resnet18" and network.metadata["source"] == str(checkpoint)
    net = load_network(checkpoint)
    tiles = verification_tiles("pad")[:3]  # another batch size than the exported example's
    for batch in (tiles, tiles[:1]):
        logit, image_logit = network(batch)
        with torch.no_grad():
            expected = net(batch)
        assert logit.shape == (len(batch), 1, 128, 128) and image_logit.shape == (len(batch), 1)
        assert (torch.sigmoid(logit) - torch.sigmoid(expected.logit)).abs().max() <= 1e-4
        assert (torch.sigmoid(image_logit) - torch.sigmoid(expected.image_logit)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match=r"expected input \(B, 3, 128, 128\)"):
        network(torch.rand(2, 3, 101, 101))


def test_onnx_runtime_network_rejects_other_files(onnx_model, checkpoint, tmp_path):
    from saltkit.inference.onnx_runtime import OnnxRuntimeNetwork

    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxRuntimeNetwork(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="best_metric.pt"):
        OnnxRuntimeNetwork(checkpoint)


def test_missing_onnx_extra_is_named(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    out = tmp_path / "m.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 2
    assert "pip install 'saltkit[onnx]'" in capsys.readouterr().err and not out.exists()
