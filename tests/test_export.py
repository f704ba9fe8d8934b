"""TorchScript export (`saltkit export`) gives the checkpoint's final logit."""

from __future__ import annotations

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
