"""The inference and evaluate bundles on the shipped sample, ensembling from the CLI, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import run as bundle_run

from saltkit.checkpoints import load_network
from saltkit.cli import main as saltkit_main
from saltkit.data import load_image
from saltkit.data import test_items as list_test_items  # aliased: pytest would collect test_items
from saltkit.inference import load_probabilities
from saltkit.metrics import competition_metric
from saltkit.submission import read_submission, validate_submission

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")  # MONAI's eval notice

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "saltnet" / "configs"
CONFIGS = REPO / "configs"


def configs(bundle: str, variant: str = "pad") -> list[str]:
    return [str(BUNDLE / f"{bundle}.json"), str(CONFIGS / f"{variant}.json")]


def chain_text(e: BaseException) -> str:
    """Messages of an exception and its causes (MONAI wraps errors raised inside config expressions)."""
    parts = []
    while e is not None:
        parts.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding a tiny randomly initialised best_metric.pt (the default checkpoint name)."""
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False)
    d = tmp_path_factory.mktemp("pad_fold0")
    torch.save({"network": net.state_dict(), "arch": net.arch, "variant": "pad"}, d / "best_metric.pt")
    return d


@pytest.fixture(scope="module")
def resize_ckpt(run_dir):
    ckpt = torch.load(run_dir / "best_metric.pt", weights_only=True)
    path = run_dir.parent / "resize_model.pt"
    torch.save({**ckpt, "variant": "resize"}, path)
    return path


@pytest.fixture(scope="module")
def pad_inference(run_dir):
    """The README's inference command, as a user runs it: inference.json on its own (the variant comes from the
    checkpoint), the sample test set, `--ckpt RUN/best_metric.pt`, `--progress false` as typed."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
           str(BUNDLE / "inference.json"), "--ckpt", str(run_dir / "best_metric.pt"), "--progress", "false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "inference" / "best_metric", proc.stdout + proc.stderr


def test_inference_bundle_writes_valid_submission(pad_inference, sample_dir):
    out, stdout = pad_inference
    ids = [it["id"] for it in list_test_items(sample_dir)]
    sub = read_submission(out / "submission.csv")
    validate_submission(sub, ids)
    assert sorted(sub["id"]) == sorted(ids)
    probs = load_probabilities(out / "probabilities.npz")
    assert probs.ids.tolist() == ids and probs.probs.shape == (20, 101, 101)
    assert probs.image_probs is not None and probs.image_probs.shape == (20,)
    assert 0.0 <= probs.probs.min() and probs.probs.max() <= 1.0
    assert "empty predictions" in stdout
    # one summary, no engine chatter (Ignite's at DEBUG: SALTKIT_DEBUG=1 shows it)
    assert "Engine run finished" not in stdout and "Epoch[1] Complete" not in stdout
    # the submission is the 0.5-threshold of the saved probabilities (post-processing is off by default)
    from saltkit.submission import submission_masks

    masks = submission_masks(sub.set_index("id").loc[ids].reset_index(), out / "submission.csv")
    assert np.array_equal(masks, (probs.probs > 0.5).astype(masks.dtype))


def test_saved_probabilities_equal_manual_flip_tta(pad_inference, run_dir, sample_dir):
    probs = load_probabilities(pad_inference[0] / "probabilities.npz")
    item = list_test_items(sample_dir)[3]
    tile = torch.as_tensor(load_image(item["image"])).float().div(255).expand(1, 3, 101, 101)
    x = F.pad(tile, (13, 14, 13, 14), mode="reflect")
    net = load_network(run_dir / "best_metric.pt")
    with torch.no_grad():
        p = (torch.sigmoid(net(x).logit) + torch.sigmoid(net(x.flip(-1)).logit).flip(-1)) / 2
    expected = p[0, 0, 13:114, 13:114].numpy()
    np.testing.assert_allclose(probs.probs[3], expected, atol=1e-4)


def test_resize_variant_without_tta_and_postprocessing(resize_ckpt, tmp_path):
    bundle_run("inference", config_file=configs("inference", "resize"), ckpt=str(resize_ckpt),
               output_dir=str(tmp_path), tta="false", progress=False, min_area=200, min_component_size=20)
    probs = load_probabilities(tmp_path / "probabilities.npz")
    item = list_test_items(REPO / "saltkit" / "sample_data" / "tgs")[0]
    tile = torch.as_tensor(load_image(item["image"])).float().div(255).expand(1, 3, 101, 101)
    x = F.interpolate(tile, size=(128, 128), mode="bilinear", align_corners=False)
    with torch.no_grad():  # "--tta false" really is off: the plain prediction, resized back
        p = torch.sigmoid(load_network(resize_ckpt)(x).logit)
    expected = F.interpolate(p, size=(101, 101), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(probs.probs[0], expected, atol=1e-4)
    sub = read_submission(tmp_path / "submission.csv")
    assert len(sub) == 20
    from saltkit.submission import submission_masks

    areas = submission_masks(sub, tmp_path / "submission.csv").sum(axis=(1, 2))
    assert ((areas == 0) | (areas >= 200)).all()


def test_ensemble_cli(pad_inference, tmp_path, capsys):
    a = pad_inference[0] / "probabilities.npz"
    p = load_probabilities(a)
    from saltkit.inference import Probabilities, save_probabilities

    b = save_probabilities(tmp_path / "b.npz", Probabilities(p.ids[::-1], 1 - p.probs[::-1], p.image_probs[::-1]))
    out = tmp_path / "ensemble.csv"
    assert saltkit_main(["ensemble", str(a), str(b), "--out", str(out), "--threshold", "0.4"]) == 0
    assert "empty predictions" in capsys.readouterr().out
    sub = validate_submission(read_submission(out), p.ids.tolist())
    assert len(sub) == 20
    # mean of p and 1 - p is 0.5 (up to quantisation) everywhere: > 0.4 -> full masks
    assert (sub["rle_mask"] == "1 10201").all()
    c = save_probabilities(tmp_path / "c.npz", Probabilities(p.ids[:-1], p.probs[:-1]))
    assert saltkit_main(["ensemble", str(a), str(c), "--out", str(tmp_path / "bad.csv")]) == 2
    err = capsys.readouterr().err
    assert "c.npz" in err and p.ids[-1] in err
    assert not (tmp_path / "bad.csv").exists()


def test_evaluate_bundle(run_dir, sample_dir, tmp_path, capsys):
    bundle_run("evaluate", config_file=str(BUNDLE / "evaluate.json"), ckpt=str(run_dir / "best_metric.pt"),
               output_dir=str(tmp_path), folds_csv=str(tmp_path / "folds.csv"), progress=False, worst_tiles=4)
    table = pd.read_csv(tmp_path / "tiles.csv", dtype={"id": str})
    assert list(table.columns) == ["id", "coverage", "iou", "metric", "iou_tta", "metric_tta"]
    folds = pd.read_csv(tmp_path / "folds.csv", dtype={"id": str})
    assert sorted(table["id"]) == sorted(folds.loc[folds["fold"] == 0, "id"])
    assert table[["iou", "metric", "iou_tta", "metric_tta", "coverage"]].stack().between(0, 1).all()
    from PIL import Image

    worst = np.asarray(Image.open(tmp_path / "worst_tiles.png"))
    assert worst.ndim == 3 and worst.shape[2] == 3 and worst.shape[1] > 4 * 101  # four outlined tiles in a row
    out = capsys.readouterr().out
    assert f"{table['metric_tta'].mean():.4f} with TTA" in out


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(Exception) as info:
        bundle_run("inference", config_file=configs("inference"), ckpt=str(tmp_path / "nope.pt"),
                   output_dir=str(tmp_path / "out"))
    assert "nope.pt" in chain_text(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["wrong_size", "corrupt"])
def test_bad_tile_is_named(bad, run_dir, sample_dir, tmp_path):
    data = tmp_path / "data"
    (data / "test" / "images").mkdir(parents=True)
    for item in list_test_items(sample_dir)[:2]:
        shutil.copy(item["image"], data / "test" / "images")
    bad_file = data / "test" / "images" / "badtile0001.png"
    if bad == "wrong_size":
        from PIL import Image

        Image.fromarray(np.zeros((100, 101), dtype=np.uint8)).save(bad_file)
    else:
        bad_file.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(Exception) as info:
        bundle_run("inference", config_file=configs("inference"), run_dir=str(run_dir), dataset_dir=str(data),
                   output_dir=str(tmp_path / "out"), progress=False)
    assert "badtile0001.png" in chain_text(info.value)
    assert not (tmp_path / "out" / "submission.csv").exists()


def test_checkpoint_of_another_variant_is_refused(run_dir, tmp_path):
    ckpt = torch.load(run_dir / "best_metric.pt", weights_only=True)
    torch.save({**ckpt, "variant": "pad"}, tmp_path / "pad_model.pt")
    with pytest.raises(Exception) as info:
        bundle_run("inference", config_file=configs("inference", "resize"), ckpt=str(tmp_path / "pad_model.pt"),
                   output_dir=str(tmp_path / "out"), progress=False)
    assert "pad_model.pt was trained with variant 'pad'" in chain_text(info.value)


def test_iou_per_tile():
    from saltkit.inference.evaluate import iou_per_tile

    truths = np.zeros((3, 4, 4), dtype=np.uint8)
    preds = np.zeros_like(truths)
    truths[1, :2] = 1  # 8 px
    preds[1, :1] = 1  # 4 px inside
    preds[2, 0, 0] = 1  # salt where the truth is empty
    np.testing.assert_allclose(iou_per_tile(preds, truths), [1.0, 0.5, 0.0])


def test_labelled_items(sample_dir, tmp_path):
    from saltkit.inference.evaluate import labelled_items

    assert len(labelled_items(sample_dir, "all")) == 100
    val = labelled_items(sample_dir, "fold", tmp_path / "folds.csv", num_folds=10, fold=2)
    assert len(val) == 10 and (tmp_path / "folds.csv").is_file()
    with pytest.raises(ValueError, match="'eval_set'"):
        labelled_items(sample_dir, "test")


@pytest.fixture(scope="module")
def varied_ckpt(tmp_path_factory, sample_dir):
    """A tiny random network whose last layers are rescaled so that its probabilities spread over (0, 1) on real
    tiles (components of many sizes, image-head probabilities on both sides of 0.5): post-processing bites."""
    from saltkit.data import train_items
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False).eval()
    tiles = torch.stack([torch.as_tensor(load_image(it["image"])).float().div(255).expand(3, 101, 101)
                         for it in train_items(sample_dir)[:20]])
    x = F.pad(tiles, (13, 14, 13, 14), mode="reflect")
    state = net.state_dict()
    with torch.no_grad():
        for weight, bias, output in (("final.2.weight", "final.2.bias", "logit"),
                                     ("image_logit.weight", "image_logit.bias", "image_logit")):
            state[weight] *= 2 / getattr(net(x), output).std()
            net.load_state_dict(state)
            state[bias] -= getattr(net(x), output).median()
            net.load_state_dict(state)
    path = tmp_path_factory.mktemp("varied") / "pad_fold0" / "best_metric.pt"
    path.parent.mkdir()
    torch.save({"network": net.state_dict(), "arch": net.arch, "variant": "pad"}, path)
    return path


def tensorboard_scalars(log_dir: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for f in sorted(log_dir.iterdir()):
        ea = EventAccumulator(str(f))
        ea.Reload()
        scalars.update({tag: ea.Scalars(tag)[-1].value for tag in ea.Tags()["scalars"]})
    return scalars


def test_tune_stores_the_settings_that_evaluate_and_inference_then_use(varied_ckpt, sample_dir, tmp_path, capsys):
    from saltkit.inference import PostProcessingSettings, postprocess
    from saltkit.inference.evaluate import COVERAGE_CLASSES
    from saltkit.submission import submission_masks

    ckpt = tmp_path / "pad_fold0" / "best_metric.pt"
    ckpt.parent.mkdir()
    shutil.copy(varied_ckpt, ckpt)
    common = ["--ckpt", str(ckpt), "--folds_csv", str(tmp_path / "folds.csv"), "--num_folds", "5",
              "--progress", "false", "--worst_tiles", "2"]
    # `saltkit tune` = the evaluate workflow with --tune_postprocessing true
    assert saltkit_main(["tune", *common, "--output_dir", str(tmp_path / "tuned")]) == 0
    out = capsys.readouterr().out
    entry = torch.load(ckpt, weights_only=True)["postprocessing"]
    settings = PostProcessingSettings(**{k: entry[k] for k in ("threshold", "min_component_size", "image_threshold",
                                                         "min_area")})
    assert entry["tuned_on"]["fold"] == 0 and entry["tuned_on"]["num_folds"] == 5 and entry["tuned_on"]["tiles"] == 20
    assert f"stored in {ckpt}" in out and "all the plain default" in out  # evaluated with the defaults, then tuned
    assert entry["metric_after"] > entry["metric_before"] and settings != PostProcessingSettings()
    tuned = pd.read_csv(tmp_path / "tuned" / "tiles.csv", dtype={"id": str})
    assert tuned["metric_tta"].mean() == pytest.approx(entry["metric_before"], abs=1e-9)
    assert tuned["metric_tuned"].mean() == pytest.approx(entry["metric_after"], abs=1e-9)
    # per coverage class: the tiles of each class and their means, counted here from the tiles' coverage
    coverage = pd.read_csv(tmp_path / "tuned" / "coverage.csv", keep_default_na=False, na_values=[""])
    assert coverage["class"].tolist() == [*COVERAGE_CLASSES, "all"]
    pixels = np.rint(tuned["coverage"].to_numpy() * 101 * 101)
    classes = [pixels == 0, (pixels > 0) & (pixels < 510.05), (pixels >= 510.05) & (pixels < 2040.2),
               (pixels >= 2040.2) & (pixels < 5100.5), pixels >= 5100.5, pixels >= 0]
    for row, member in zip(coverage.itertuples(index=False), classes, strict=True):
        assert row.tiles == member.sum(), row
        if member.any():
            assert row.metric_tuned == pytest.approx(tuned["metric_tuned"][member].mean(), abs=1e-6), row
            assert row.metric == pytest.approx(tuned["metric"][member].mean(), abs=1e-6), row
    summary = json.loads((tmp_path / "tuned" / "summary.json").read_text())
    assert summary["tuning"] == entry and summary["coverage"][-1]["tiles"] == 20
    scalars = tensorboard_scalars(tmp_path / "tuned" / "tensorboard")
    assert scalars["evaluate/competition_metric_tta_tuned"] == pytest.approx(entry["metric_after"], abs=1e-6)
    assert scalars["coverage/all/tiles"] == 20 and scalars["coverage/empty/tiles"] == coverage["tiles"][0]

    # evaluate now takes the tuned values (auto): the engine's post transforms give the tuned scores, tile for tile
    bundle_run("evaluate", config_file=str(BUNDLE / "evaluate.json"), ckpt=str(ckpt), output_dir=str(tmp_path / "after"),
               folds_csv=str(tmp_path / "folds.csv"), num_folds=5, progress=False, worst_tiles=2)
    assert "all tuned (fold 0, 20 tiles" in capsys.readouterr().out
    after = pd.read_csv(tmp_path / "after" / "tiles.csv", dtype={"id": str})
    assert after["id"].tolist() == tuned["id"].tolist()
    np.testing.assert_array_equal(after["metric_tta"].to_numpy(), tuned["metric_tuned"].to_numpy())

    # inference too (on the validation tiles as a test set); a value given on the command line wins
    data = tmp_path / "val_as_test"
    (data / "test" / "images").mkdir(parents=True)
    for i in tuned["id"]:
        shutil.copy(sample_dir / "train" / "images" / f"{i}.png", data / "test" / "images")
    other = 0.35 if settings.threshold != 0.35 else 0.4
    for given, expected in (({}, settings), ({"threshold": other, "image_threshold": "null"}, PostProcessingSettings(
            other, settings.min_component_size, None, settings.min_area))):
        out_dir = tmp_path / f"inference{len(given)}"
        bundle_run("inference", config_file=str(BUNDLE / "inference.json"), ckpt=str(ckpt), output_dir=str(out_dir),
                   dataset_dir=str(data), progress=False, **given)
        probs = load_probabilities(out_dir / "probabilities.npz")
        sub = read_submission(out_dir / "submission.csv").set_index("id").loc[probs.ids].reset_index()
        masks = submission_masks(sub, out_dir / "submission.csv")
        # the saved probabilities are rounded to 1/65535, so a pixel right at the threshold may flip
        expected_masks = postprocess(probs.probs, probs.image_probs, expected)
        assert (masks != expected_masks).mean() < 1e-4
        assert (masks != postprocess(probs.probs, probs.image_probs, PostProcessingSettings())).mean() > 0.01
        if not given:
            truth = submission_masks(pd.read_csv(sample_dir / "train.csv", dtype={"id": str}, keep_default_na=False)
                                     .set_index("id").loc[probs.ids].reset_index(), sample_dir / "train.csv")
            assert competition_metric(masks, truth).mean() == pytest.approx(entry["metric_after"], abs=0.05)
    assert "threshold, image_threshold as given" in capsys.readouterr().out


def test_tuning_refuses_the_training_tiles_and_a_malformed_entry_is_named(run_dir, tmp_path):
    ckpt = tmp_path / "model.pt"
    shutil.copy(run_dir / "best_metric.pt", ckpt)
    with pytest.raises(Exception) as info:
        bundle_run("evaluate", config_file=str(BUNDLE / "evaluate.json"), ckpt=str(ckpt), eval_set="all",
                   tune_postprocessing=True, output_dir=str(tmp_path / "out"), progress=False)
    assert "config key 'tune_postprocessing' needs eval_set 'fold'" in chain_text(info.value)
    saved = torch.load(ckpt, weights_only=True)
    torch.save({**saved, "postprocessing": {"threshold": "high"}}, ckpt)
    with pytest.raises(Exception) as info:
        bundle_run("inference", config_file=str(BUNDLE / "inference.json"), ckpt=str(ckpt),
                   output_dir=str(tmp_path / "out"), progress=False)
    assert f"{ckpt}: entry 'postprocessing' lacks min_component_size" in chain_text(info.value)
    assert not (tmp_path / "out" / "submission.csv").exists()


def test_onnxruntime_runtime_gives_the_torch_submission(pad_inference, run_dir, tmp_path):
    """`--runtime onnxruntime`: the checkpoint is exported beside itself once, then the same probabilities (1e-4)
    and the same masks wherever the probability is not within that tolerance of the threshold."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    ckpt = run_dir / "best_metric.pt"
    outputs = []
    for attempt in range(2):
        out = tmp_path / f"ort{attempt}"
        cmd = [sys.executable, "-m", "saltkit.cli", "inference", "--ckpt", str(ckpt), "--runtime", "onnxruntime",
               "--threads", "2", "--output_dir", str(out), "--progress", "false"]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append((out, proc.stdout + proc.stderr))
    assert "exporting" in outputs[0][1] and "exporting" not in outputs[1][1]  # the export is reused
    assert (run_dir / "best_metric.onnx").is_file()
    torch_probs = load_probabilities(pad_inference[0] / "probabilities.npz")
    ort_probs = load_probabilities(outputs[1][0] / "probabilities.npz")
    assert ort_probs.ids.tolist() == torch_probs.ids.tolist()
    np.testing.assert_allclose(ort_probs.probs, torch_probs.probs, atol=1e-4)
    np.testing.assert_allclose(ort_probs.image_probs, torch_probs.image_probs, atol=1e-4)
    from saltkit.submission import submission_masks

    subs = [read_submission(d / "submission.csv").set_index("id").loc[torch_probs.ids].reset_index()
            for d in (pad_inference[0], outputs[1][0])]
    masks = [submission_masks(s, "submission.csv") for s in subs]
    clear = np.abs(torch_probs.probs - 0.5) > 1e-4
    assert np.array_equal(masks[0][clear], masks[1][clear])


def test_unknown_runtime_is_named(run_dir, tmp_path):
    cmd = [sys.executable, "-m", "saltkit.cli", "inference", "--ckpt", str(run_dir / "best_metric.pt"),
           "--runtime", "tensorrt", "--output_dir", str(tmp_path / "x"), "--progress", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "config key 'runtime' must be one of torch, onnxruntime" in last, proc.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- runtime onnxruntime-int8


@pytest.fixture(scope="module")
def int8_run(run_dir, sample_dir, tmp_path_factory):
    """The tiny checkpoint in a run folder whose run record (config.json) names fold 0 of the shipped sample."""
    folder = tmp_path_factory.mktemp("int8_run")
    shutil.copy(run_dir / "best_metric.pt", folder / "best_metric.pt")
    record = {"dataset_dir": str(sample_dir), "fold": 0, "num_folds": 10, "folds_csv": str(folder / "folds.csv"),
              "variant": "pad"}
    (folder / "config.json").write_text(json.dumps({"resolved": record}))
    return folder / "best_metric.pt"


def test_int8_runtime_exports_once_for_inference_then_predict_reuses_it(int8_run, pad_inference, tmp_path):
    """`--runtime onnxruntime-int8`: the inference bundle quantizes the checkpoint beside itself on first use
    (calibrated and checked on the fold of its run record), predicting what torch predicts within INT8's tolerance
    (tests/test_export.py); `saltkit predict` then reuses the model."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    out = tmp_path / "int8"
    cmd = [sys.executable, "-m", "saltkit.cli", "inference", "--ckpt", str(int8_run), "--runtime",
           "onnxruntime-int8", "--threads", "2", "--output_dir", str(out), "--progress", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = int8_run.with_suffix(".int8.onnx")
    assert model.is_file() and "INT8 export: competition metric" in proc.stdout + proc.stderr
    written = model.stat().st_mtime_ns
    torch_probs = load_probabilities(pad_inference[0] / "probabilities.npz")
    int8_probs = load_probabilities(out / "probabilities.npz")
    assert int8_probs.ids.tolist() == torch_probs.ids.tolist()
    assert np.abs(int8_probs.probs - torch_probs.probs).max() <= 0.05
    assert np.abs(int8_probs.image_probs - torch_probs.image_probs).max() <= 0.05
    validate_submission(read_submission(out / "submission.csv"), torch_probs.ids.tolist())

    image = tmp_path / "section.npy"
    np.save(image, np.tile(load_image(list_test_items(REPO / "saltkit" / "sample_data" / "tgs")[0]["image"]), (2, 2)))
    for runtime in ("torch", "onnxruntime-int8"):
        assert saltkit_main(["predict", str(image), "--ckpt", str(int8_run), "--out", str(tmp_path / runtime),
                             "--runtime", runtime, "--threads", "2", "--no-progress"]) == 0
    assert model.stat().st_mtime_ns == written  # reused, not exported again
    section = [np.load(tmp_path / runtime / "section_prob.npy") for runtime in ("torch", "onnxruntime-int8")]
    assert section[0].shape == (202, 202) and np.abs(section[1] - section[0]).max() <= 0.05


def test_int8_runtime_refuses_a_model_that_fails_its_check(int8_run, tmp_path, monkeypatch):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    from saltkit.inference import inference_network, quantize

    ckpt = tmp_path / "swa.pt"
    shutil.copy(int8_run, ckpt)
    shutil.copy(int8_run.parent / "config.json", tmp_path / "config.json")
    monkeypatch.setattr(quantize, "DEFAULT_MAX_METRIC_LOSS", -1.0)  # no model can pass: force the refusal
    with pytest.raises(quantize.QuantizationRefused) as info:
        inference_network("onnxruntime-int8", None, ckpt, "cpu", threads=2)
    message = str(info.value)
    assert "\n" not in message and "the INT8 model scores" in message and "for float32 on the 10 validation" in message
    assert "more than the limit -1" in message and not (tmp_path / "swa.int8.onnx").exists()


def test_int8_runtime_needs_a_run_record(run_dir, tmp_path):
    ckpt = tmp_path / "model.pt"
    shutil.copy(run_dir / "best_metric.pt", ckpt)
    cmd = [sys.executable, "-m", "saltkit.cli", "inference", "--ckpt", str(ckpt), "--runtime", "onnxruntime-int8",
           "--output_dir", str(tmp_path / "x"), "--progress", "false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and f"{ckpt} has no run record" in last and "--dataset-dir DIR --fold K" in last, \
        proc.stderr[-3000:]
    assert not (tmp_path / "model.int8.onnx").exists()


def test_each_runtime_and_the_bundle_model_have_their_own_output_folder(tmp_path):
    """An ONNX Runtime inference does not write into the torch inference's folder; the bundle's model writes under
    runs/bundle_model/ of the current folder, not into the bundle."""
    from saltkit.checkpoints import bundle_model, output_dir_for

    ckpt = tmp_path / "run" / "swa.pt"
    assert output_dir_for(ckpt, "inference") == str(tmp_path / "run" / "inference" / "swa")
    assert output_dir_for(ckpt, "inference", "onnxruntime") == str(tmp_path / "run" / "inference" / "swa-onnxruntime")
    assert output_dir_for(ckpt, "evaluate", "onnxruntime-int8").endswith("evaluate/swa-onnxruntime-int8")
    assert output_dir_for(bundle_model(), "inference") == str(Path("runs") / "bundle_model" / "inference" / "model")
