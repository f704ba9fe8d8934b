"""`saltkit export`: TorchScript gives the checkpoint's final logit; ONNX, run by OnnxRuntimeNetwork, its final and
image logits."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from saltkit.checkpoints import load_network
from saltkit.cli import main
from saltkit.export import export_torchscript, load_exported


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False)
    path = tmp_path_factory.mktemp("export") / "best_metric.pt"
    torch.save({"network": net.state_dict(), "arch": net.arch}, path)
    return path


def test_cli_export_matches_checkpoint(checkpoint, capsys):
    assert main(["export", str(checkpoint)]) == 0  # default: beside the checkpoint, not in the current folder
    out = checkpoint.with_suffix(".ts")
    printed = capsys.readouterr().out
    assert f"wrote {out}: " in printed and "verified" in printed
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


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("spelling", ["same", "dot", "link"])
def test_export_never_writes_over_its_checkpoint(checkpoint, tmp_path, monkeypatch, capsys, fmt, spelling):
    # `saltkit export m.pt --out m.pt` replaced the checkpoint with the export
    monkeypatch.chdir(checkpoint.parent)
    out = {"same": checkpoint, "dot": f"./{checkpoint.name}", "link": tmp_path / "link.pt"}[spelling]
    if spelling == "link":
        out.symlink_to(checkpoint)
    before = checkpoint.read_bytes()
    assert main(["export", checkpoint.name, "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {Path(out)} is the input checkpoint {checkpoint.name}" in err and "another file name" in err
    assert checkpoint.read_bytes() == before
