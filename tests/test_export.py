"""`saltkit export`: TorchScript gives the checkpoint's final logit; ONNX, run by OnnxRuntimeNetwork, its final and
image logits."""

from __future__ import annotations

import re
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


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_bad_sizes_weights_and_arch_are_one_line_errors_in_both_formats(checkpoint, tmp_path, capsys, fmt):
    if fmt == "onnx":
        for name in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(name)
    state = torch.load(checkpoint, weights_only=True)
    missing = {**state, "network": dict(list(state["network"].items())[1:])}
    torch.save(missing, tmp_path / "missing_weight.pt")
    torch.save({**state, "arch": {**state["arch"], "bogus": 1}}, tmp_path / "unknown_arch.pt")
    cases = [
        (checkpoint, ["--image-size", "-5"], "--image-size must be a multiple of 32 of at least 64 .* got -5"),
        (tmp_path / "missing_weight.pt", [], "missing_weight.pt: weights do not match its own arch .*Missing key"),
        (tmp_path / "unknown_arch.pt", [], "unknown_arch.pt: arch has unknown keys \\['bogus'\\]"),
    ]
    for ckpt, extra, message in cases:
        code = main(["export", str(ckpt), "--format", fmt, "--out", str(tmp_path / f"m.{fmt}"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert re.search(f"saltkit export: error: .*{message}", err), err[-500:]
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob(".m.*"))


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


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "model"])
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


# ---------------------------------------------------------------- INT8

# INT8 probabilities against the checkpoint's on real tiles: mean difference within INT8_MEAN, at least 99% of the
# pixels within INT8_PIXEL, the same mask at 0.5 on at least 98%, image probabilities within INT8_IMAGE. Stated for
# the tiny random network below, whose scaled-up final block magnifies quantization noise (measured: 0.008, 99.9%,
# 99.0%, 0.001); the trained CPU recipe's network agrees closer (mean 0.005 on 320 validation tiles).
INT8_MEAN, INT8_PIXEL, INT8_MASK, INT8_IMAGE = 0.015, 0.05, 0.98, 0.01


def onnx_extra():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory):
    """A tiny pad checkpoint (random weights, the final block's scaled up so its masks are neither empty nor full:
    unscaled, every probability sits near 0.62) in a folder without a run record."""
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False)
    state = {k: v * 6 if k.startswith("final") and k.endswith("weight") else v
             for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("int8") / "swa.pt"
    torch.save({"network": state, "arch": net.arch, "variant": "pad"}, path)
    return path


def int8_arguments(ckpt: Path, *extra: str) -> list[str]:
    """`saltkit export CKPT --format onnx --quantize int8` on fold 0 of the shipped sample, 16 calibration tiles."""
    from saltkit.data import sample_dir

    return ["export", str(ckpt), "--format", "onnx", "--quantize", "int8", "--dataset-dir", str(sample_dir()),
            "--fold", "0", "--folds-csv", str(ckpt.parent / "folds.csv"), "--calibration-tiles", "16",
            "--threads", "2", *extra]


@pytest.fixture(scope="module")
def int8_export(varied_checkpoint):
    """The checkpoint's INT8 export beside it (the default name), and what the command printed."""
    import contextlib
    import io

    onnx_extra()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(int8_arguments(varied_checkpoint)) == 0
    return varied_checkpoint.with_suffix(".int8.onnx"), printed.getvalue()


def test_int8_export_agrees_with_float32_on_real_tiles(int8_export, varied_checkpoint):
    import onnx

    from saltkit.checkpoints import weights_fingerprint
    from saltkit.export import verification_tiles
    from saltkit.inference.onnx_runtime import OnnxRuntimeNetwork

    path, printed = int8_export
    assert path == varied_checkpoint.parent / "swa.int8.onnx" and path.is_file()
    assert f"wrote {path}" in printed and "float32 0." in printed and "INT8 0." in printed
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantized (QDQ)
    int8 = OnnxRuntimeNetwork(path, threads=2)
    meta, quant = int8.metadata, int8.metadata["quantization"]
    state = torch.load(varied_checkpoint, weights_only=True)
    assert meta["weights"] == weights_fingerprint(state["network"]) and meta["variant"] == "pad"
    assert quant["calibration_tiles"] == 16 and quant["validation_tiles"] == 10 and quant["fold"]["fold"] == 0
    assert f"float32 {quant['metric_float32']:.4f}, INT8 {quant['metric_int8']:.4f}" in printed
    tiles = verification_tiles("pad")  # 16 test tiles of the shipped sample
    got = int8(tiles)
    with torch.no_grad():
        want = load_network(varied_checkpoint)(tiles)  # what the float32 export gives, to 1e-4
    probs = [torch.sigmoid(t) for t in (got.logit, want.logit)]
    assert 0.05 < (probs[1] > 0.5).float().mean() < 0.95  # the float32 masks are neither empty nor full
    diff = (probs[0] - probs[1]).abs()
    assert diff.mean() <= INT8_MEAN and (diff <= INT8_PIXEL).float().mean() >= 0.99, (diff.mean(), diff.max())
    assert ((probs[0] > 0.5) == (probs[1] > 0.5)).float().mean() >= INT8_MASK
    assert (torch.sigmoid(got.image_logit) - torch.sigmoid(want.image_logit)).abs().max() <= INT8_IMAGE


def test_int8_export_refuses_a_model_that_loses_metric(varied_checkpoint, tmp_path, capsys):
    import re

    onnx_extra()
    out = tmp_path / "refused.int8.onnx"
    assert main(int8_arguments(varied_checkpoint, "--max-metric-loss", "-1", "--out", str(out))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    found = re.search(r"the INT8 model scores (\d\.\d{4}) against (\d\.\d{4}) for float32 on the 10 validation "
                      r"tiles of fold 0 .* more than the limit -1 \(--max-metric-loss\); .* not written", err[-1])
    assert found, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_int8_export_needs_the_fold_of_a_checkpoint_without_run_record(varied_checkpoint, tmp_path, capsys):
    onnx_extra()
    out = tmp_path / "m.int8.onnx"
    assert main(["export", str(varied_checkpoint), "--format", "onnx", "--quantize", "int8", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no run record" in err[0] and "--dataset-dir DIR --fold K" in err[0], err
    assert main(["export", str(varied_checkpoint), "--quantize", "int8", "--out", str(out)]) == 2  # torchscript
    assert "--quantize int8 quantizes the ONNX export: add --format onnx" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- the bundle's model file (--format model)

RECORD = {"dataset_dir": "/data/tgs", "folds_csv": "/data/folds/tgs-k10.csv", "fold": 0, "num_folds": 10,
          "variant": "pad", "backbone": "resnet18", "num_filters": 4, "train_tiles": 2880, "val_tiles": 320}
TUNED = {"threshold": 0.4, "min_component_size": 30, "image_threshold": None, "min_area": 0,
         "metric_before": 0.7, "metric_after": 0.72, "metric_heldout": 0.71, "tuned_on": {"fold": 0, "tiles": 320}}


def run_folder(root: Path, record: dict | None = RECORD, resumed: bool = False) -> Path:
    """A run folder holding swa.pt (a small SaltUNet whose float32 weights are float16 values, so half storage
    loses nothing, with its logits spread out like a trained model's and tuned post-processing) and, unless
    `record` is None, its config.json (and config_resumed.json)."""
    import json

    from saltkit.networks import SaltUNet

    root.mkdir(parents=True)
    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False).eval()
    with torch.no_grad():
        net.final[2].weight.mul_(3000)
        net.final[2].bias.zero_()
    state = {k: v.half().float() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save({"network": state, "arch": net.arch, "variant": "pad", "postprocessing": TUNED,
                "checkpoints": ["best_loss.pt", "best_metric.pt"], "bn_tiles": 2880}, root / "swa.pt")
    if record is not None:
        (root / "config.json").write_text(json.dumps({"resolved": record, "command": ["train", "--fold", "0"]}))
    if resumed:
        (root / "config_resumed.json").write_text(json.dumps({"resolved": {**record, "resume": "true"},
                                                               "command": ["train", "--resume", "true"]}))
    return root / "swa.pt"


def test_model_file_round_trips_from_half_storage(tmp_path, capsys):
    """`saltkit export RUN/swa.pt --format model --half`: a file `torch.load(weights_only=True)` reads, with the
    weights stored as float16 and read back as float32 (same weights, same masks on the sample's tiles), the
    tuned post-processing, the scores and the run's record (config.json and config_resumed.json)."""
    import json

    from saltkit.checkpoints import read_checkpoint, weights_fingerprint
    from saltkit.export import sample_tile_masks

    swa = run_folder(tmp_path / "run", resumed=True)
    out = tmp_path / "bundle" / "models" / "model.pt"
    assert main(["export", str(swa), "--format", "model", "--half", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: the model file of {swa}" in printed and "float16 storage" in printed
    assert "differ from the float32 checkpoint's in 0 of 204020 pixels" in printed

    stored = torch.load(out, map_location="cpu", weights_only=True)
    floats = [t for t in stored["network"].values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float16 for t in floats) and stored["storage"] == "float16"
    assert out.stat().st_size < 0.6 * swa.stat().st_size
    assert stored["record"] == json.loads((swa.parent / "config.json").read_text())
    assert stored["resumed_record"]["command"] == ["train", "--resume", "true"]
    assert stored["postprocessing"] == TUNED and stored["variant"] == "pad"
    assert stored["metrics"] == {"postprocessing": {"metric_before": 0.7, "metric_after": 0.72, "metric_heldout": 0.71}}
    assert stored["source"]["name"] == "swa.pt" and stored["source"]["checkpoints"] == ["best_loss.pt", "best_metric.pt"]

    source, packaged = read_checkpoint(swa), read_checkpoint(out)
    assert all(t.dtype != torch.float16 for t in packaged["network"].values())
    assert weights_fingerprint(packaged["network"]) == weights_fingerprint(source["network"])
    masks = sample_tile_masks(packaged, out, limit=4)
    assert masks.shape == (4, 101, 101) and 0 < masks.mean() < 1
    assert (masks == sample_tile_masks(source, swa, limit=4)).all()
    # tuning it again (saltkit tune --ckpt) rewrites the entry and keeps the float16 storage
    from saltkit.inference.postprocess_tuned import store_postprocessing

    store_postprocessing(out, {**TUNED, "threshold": 0.45})
    again = torch.load(out, map_location="cpu", weights_only=True)
    assert again["postprocessing"]["threshold"] == 0.45 and again["record"] == stored["record"]
    assert all(t.dtype == torch.float16 for t in again["network"].values() if t.is_floating_point())


def test_model_file_refusals(tmp_path, capsys, monkeypatch):
    """No run record, a record of another run, or float16 storage that changes the masks: one line, no file."""
    import json

    import saltkit.export

    bare = run_folder(tmp_path / "bare", record=None)
    out = tmp_path / "model.pt"
    assert main(["export", str(bare), "--format", "model", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{bare}: no run record ({bare.parent / 'config.json'} does not exist)" in err and "--record" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"resolved": {**RECORD, "backbone": "resnet10_w32"}}))
    assert main(["export", str(bare), "--format", "model", "--out", str(out), "--record", str(other)]) == 2
    assert "has backbone 'resnet18' but its run record says 'resnet10_w32'" in capsys.readouterr().err
    assert main(["export", str(bare), "--out", str(out), "--half"]) == 2
    assert "--half and --record belong to --format model" in capsys.readouterr().err
    assert main(["export", str(bare), "--format", "model"]) == 2
    assert "--format model needs --out" in capsys.readouterr().err

    swa = run_folder(tmp_path / "run")
    monkeypatch.setattr(saltkit.export, "HALF_MASK_TOLERANCE", -1.0)  # any change, even none, is too much
    assert main(["export", str(swa), "--format", "model", "--half", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stored as float16 its masks of the sample's test tiles change in 0 of 204020 pixels" in err
    assert "package it without --half" in err and not out.exists()


def test_packaged_model_carries_its_run_record(tmp_path, caplog):
    """Outside its run folder the model still says what it was trained on (captions, the toy-model warning) and
    evaluate reads its fold from it; a dataset or fold file of the training machine that is not here is named."""
    import logging

    from saltkit.checkpoints import check_run_matches, run_record, run_setting
    from saltkit.data.layout import sample_dir
    from saltkit.seismic.provenance import model_provenance

    real = tmp_path / "bundle" / "models" / "model.pt"
    assert main(["export", str(run_folder(tmp_path / "real")), "--format", "model", "--out", str(real)]) == 0
    toy = tmp_path / "toy_bundle" / "models" / "model.pt"
    toy_record = {**RECORD, "dataset_dir": str(sample_dir()), "train_tiles": 90}
    assert main(["export", str(run_folder(tmp_path / "toy", toy_record)), "--format", "model", "--out", str(toy)]) == 0
    with caplog.at_level(logging.WARNING, logger="saltkit.seismic.provenance"):
        info = model_provenance(real)
        assert info["train_tiles"] == 2880 and info["dataset_dir"] == "/data/tgs" and not info["toy"]
        assert not caplog.records
        assert model_provenance(toy)["toy"]
        assert f"{toy} was trained on 90 tiles of the embedded sample" in caplog.records[-1].getMessage()

    models = real.parent
    assert run_record(models) == RECORD
    assert run_setting(models, "fold", 3) == 0 and run_setting(models, "folds_csv", given="mine.csv") == "mine.csv"
    with pytest.raises(FileNotFoundError) as info:
        run_setting(models, "folds_csv")
    message = str(info.value)
    assert f"{real}: its run record names folds_csv /data/folds/tgs-k10.csv, which does not exist here" in message
    assert "pass --folds_csv FILE" in message and "fold 0 of 10 held out" in message
    with pytest.raises(FileNotFoundError, match="pass --dataset_dir DIR"):
        run_setting(models, "dataset_dir")
    check_run_matches(models, dataset_dir=tmp_path / "tgs", fold=0, num_folds=10, variant="pad")  # data moved: fine
    with pytest.raises(ValueError, match="the run was trained with fold 0 but config key 'fold' is 3; pass --fold 0"):
        check_run_matches(models, dataset_dir=tmp_path / "tgs", fold=3)
