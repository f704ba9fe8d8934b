"""Real (short) runs of the training bundle on a 40-tile subset of the shipped sample: checkpoints, TensorBoard,
an interrupted run resumed from last.pt, the resize variant, bad configs, the CLI and 2-process gloo DDP."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from monai.bundle import run as bundle_run
from monai.data import set_track_meta
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import saltkit.handlers.nan as nan_mod
from saltkit.checkpoints import load_network
from saltkit.config import ConfigError, check_overrides, parse_bundle_argv, unknown_keys
from saltkit.handlers import NoamLambda

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles/saltnet/configs"
TRAIN, MULTI_GPU = CONFIGS / "train.json", CONFIGS / "multi_gpu_train.json"
PAD, RESIZE = REPO / "configs/pad.json", REPO / "configs/resize.json"
# a tiny recipe: 32 training tiles, 4 iterations per epoch
TINY = {"num_folds": 5, "batch_size": 8, "num_filters": 4, "warmup_epochs": 1, "learning_rate": 0.003,
        "progress": False}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # short runs, but a loaded machine slows them 10x


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these tiny batches gain nothing from two, and lose a lot when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_track_meta():
    yield
    set_track_meta(True)  # a failed run may leave MONAI's MetaTensor tracking off


@pytest.fixture(scope="module")
def small_dataset(sample_dir, tmp_path_factory) -> Path:
    """The first 40 sample tiles in the competition layout (masks of both bit depths among them)."""
    root = tmp_path_factory.mktemp("tgs40")
    train = pd.read_csv(sample_dir / "train.csv", dtype=str, keep_default_na=False).sort_values("id").head(40)
    for sub in ("images", "masks"):
        (root / "train" / sub).mkdir(parents=True)
        for i in train["id"]:
            shutil.copy(sample_dir / "train" / sub / f"{i}.png", root / "train" / sub / f"{i}.png")
    train.to_csv(root / "train.csv", index=False)
    depths = pd.read_csv(sample_dir / "depths.csv", dtype=str)
    depths[depths["id"].isin(train["id"])].to_csv(root / "depths.csv", index=False)
    return root


def run_training(dataset: Path, run_dir: Path, variant_config=PAD, run_id: str | None = "training", **overrides):
    args = {**TINY, "dataset_dir": str(dataset), "run_dir": str(run_dir),
            "folds_csv": str(dataset / "folds.csv"), **overrides}
    files = [str(TRAIN), str(variant_config)]
    if run_id is None:  # the default run id, as `python -m monai.bundle run --config_file ...`
        bundle_run(config_file=files, logging_file=False, **args)
    else:
        bundle_run(run_id, config_file=files, logging_file=False, **args)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of the run's TensorBoard event files (several files when it was resumed)."""
    out: dict[str, list] = {}
    for f in sorted((run_dir / "tensorboard").iterdir()):
        ea = EventAccumulator(str(f))
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            out.setdefault(tag, []).extend((s.step, s.value) for s in ea.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}


def image_tags(run_dir: Path) -> set[str]:
    tags = set()
    for f in (run_dir / "tensorboard").iterdir():
        ea = EventAccumulator(str(f), size_guidance={"images": 0})
        ea.Reload()
        tags |= set(ea.Tags()["images"])
    return tags


class Interrupted(Exception):
    """Stands for a kill in the middle of an epoch."""


@pytest.fixture(scope="module")
def interrupted_run(small_dataset, tmp_path_factory):
    """A 3-epoch run killed in the middle of epoch 3 (after 2 complete epochs)."""
    run_dir = tmp_path_factory.mktemp("runs") / "pad_fold0"
    original = nan_mod.FailOnNanLoss.__call__

    def kill_in_epoch_3(self, engine):
        original(self, engine)
        if engine.state.epoch == 3 and engine.state.iteration == 2 * engine.state.epoch_length + 2:
            raise Interrupted

    mp = pytest.MonkeyPatch()
    mp.setattr(nan_mod.FailOnNanLoss, "__call__", kill_in_epoch_3)
    try:
        with pytest.raises(RuntimeError) as info:
            run_training(small_dataset, run_dir, max_epochs=3)
        assert isinstance(info.value.__cause__, Interrupted)
    finally:
        mp.undo()
    return run_dir


@pytest.fixture(scope="module")
def resumed_run(interrupted_run, small_dataset):
    before = torch.load(interrupted_run / "last.pt", weights_only=True)
    run_training(small_dataset, interrupted_run, run_id=None, max_epochs=3, resume="true")
    return interrupted_run, before


def test_interrupted_run_left_valid_checkpoints(interrupted_run):
    names = {p.name for p in interrupted_run.iterdir()}
    assert {"best_loss.pt", "best_accuracy.pt", "best_metric.pt", "last.pt", "config.json", "tensorboard"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    last = torch.load(interrupted_run / "last.pt", weights_only=True)
    assert last["trainer"]["epoch"] == 2 and last["trainer"]["iteration"] == 8
    assert last["arch"]["num_filters"] == 4 and last["variant"] == "pad"
    config = json.loads((interrupted_run / "config.json").read_text())["resolved"]
    assert config["train_tiles"] == 32 and config["val_tiles"] == 8  # validation tiles (flip TTA: no copies)
    assert config["backbone"] == "resnet18" and config["variant"] == "pad"
    # recorded absolute, so SWA and evaluate find the run's data and folds from any working folder
    for key in ("dataset_dir", "folds_csv", "run_dir"):
        assert Path(config[key]).is_absolute() and Path(config[key]).exists(), (key, config[key])


def test_resume_continues_where_the_run_stopped(resumed_run):
    run_dir, before = resumed_run
    after = torch.load(run_dir / "last.pt", weights_only=True)
    assert after["trainer"] == {"epoch": 3, "iteration": 12, "epoch_length": 4, "max_epochs": 3}
    # optimizer and schedule went on counting from the checkpoint, not from zero
    steps = {int(s["step"]) for s in after["optimizer"]["state"].values()}
    assert steps == {12} and after["scheduler"]["last_epoch"] == 12
    assert {int(s["step"]) for s in before["optimizer"]["state"].values()} == {8}
    # best scores carried over: never worse than before the interruption
    for name, b in before["best"].items():
        a = after["best"][name]
        assert a["epoch"] in (b["epoch"], 3)
        assert (a["score"] <= b["score"]) if b["mode"] == "min" else (a["score"] >= b["score"])
    series = scalars(run_dir)
    # one point per epoch 1..3 across both processes: the resumed one logged epoch 3 only
    for tag in ("train_loss", "val_loss", "val_metric", "val_accuracy", "train_metric", "lr"):
        assert [s for s, _ in series[tag]] == [1, 2, 3], tag
    assert "val/worst_tiles" in image_tags(run_dir)
    assert json.loads((run_dir / "config_resumed.json").read_text())["resumed_from"] == str(run_dir / "last.pt")


def test_short_run_learns(resumed_run):
    run_dir, _ = resumed_run
    series = scalars(run_dir)
    loss = [v for _, v in series["train_loss"]]
    assert loss[-1] < loss[0], f"training loss did not decrease: {loss}"
    metric = [v for _, v in series["train_metric"]]
    assert len(set(metric)) > 1, f"competition metric did not move: {metric}"
    # Noam per iteration, warm-up = 1 epoch = 4 iterations; logged at the end of each epoch
    lr = [v for _, v in series["lr"]]
    assert lr == pytest.approx([TINY["learning_rate"] * NoamLambda(4)(4 * epoch) for epoch in (1, 2, 3)], rel=1e-6)
    # the best checkpoints rebuild through the inference path (arch + weights only)
    net = load_network(run_dir / "best_metric.pt")
    assert net(torch.rand(1, 3, 128, 128)).logit.shape == (1, 1, 128, 128)


def test_resize_variant_runs(small_dataset, tmp_path):
    run_dir = tmp_path / "resize_fold0"
    run_training(small_dataset, run_dir, variant_config=RESIZE, max_epochs=2, tta="false",
                 cooldown_epochs=3, cutout_prob=0.0, validation_size="network", val_interval=5,
                 **{"loss#bce_weight": 0.5})
    config = json.loads((run_dir / "config.json").read_text())["resolved"]
    # the loss's weights are recorded with the run, a `loss#...` override included
    assert config["loss"] == {"class": "DeepSupervisionLoss", "image_weight": 0.05, "pixel_weight": 0.1,
                              "final_weight": 1.0, "bce_weight": 0.5}
    assert config["variant"] == "resize" and config["loss_center_crop"] is None and config["val_tiles"] == 8
    assert config["validation_size"] == "network"  # scored at 128 x 128, as the original validated resize
    assert config["cooldown_epochs"] == 3 and config["cutout_prob"] == 0.0 and config["decoder_dropout"] == 0.2
    # Noam warm-up 1 epoch (4 iterations); the 3-epoch cool-down is longer than the 2-epoch run, so it spans the
    # run: half the Noam rate after epoch 1, 0 at the end of epoch 2
    lr = [v for _, v in scalars(run_dir)["lr"]]
    assert lr == pytest.approx([TINY["learning_rate"] * NoamLambda(4)(4) * 0.5, 0.0])
    # val_interval 5, but both epochs ramp the rate down (and epoch 2 is the last): both are validated
    assert [step for step, _ in scalars(run_dir)["val_metric"]] == [1, 2]
    assert torch.load(run_dir / "best_metric.pt", weights_only=True)["variant"] == "resize"


@pytest.mark.parametrize("overrides, message", [
    ({"dataset_dir": "/no/such/dir"}, r"'dataset_dir': /no/such/dir is not a folder"),
    ({"fold": 7}, r"'fold' must be an integer in 0..4 \(num_folds=5\), got 7"),
    ({"backbone": "resnet19"}, r"unknown backbone 'resnet19' \(did you mean resnet18"),
    ({"batch_size": 64}, r"'batch_size' = 64 is larger than the 32 training tiles of fold 0"),
    ({"variant": "crop"}, r"'variant' must be one of"),
    ({"resume": "true"}, r"'resume': .*last.pt not found"),
    ({"cooldown_epochs": -1}, r"'cooldown_epochs' must be a number >= 0, got -1"),
    ({"cutout_prob": 1.5}, r"'cutout_prob' must be a probability in \[0, 1\], got 1.5"),
    ({"decoder_dropout": -0.1}, r"'decoder_dropout' must be a probability in \[0, 1\], got -0.1"),
    ({"fine_context_scale": 0}, r"'fine_context_scale' must be an integer >= 1, got 0"),
    ({"deep_supervision": "coarse"}, r"'deep_supervision' must be one of \['hypercolumn', 'native'\], got 'coarse'"),
    ({"validation_size": "128"}, r"'validation_size' must be one of tile, network, got '128'"),
])
def test_bad_config_fails_before_training(small_dataset, tmp_path, overrides, message):
    with pytest.raises(RuntimeError) as info:
        run_training(small_dataset, tmp_path / "run", **overrides)
    assert isinstance(info.value.__cause__, ConfigError)
    assert re.search(message, str(info.value.__cause__)), str(info.value.__cause__)
    assert not (tmp_path / "run").exists()  # nothing was written


def test_resume_from_another_architecture_fails(interrupted_run, small_dataset, tmp_path):
    run_dir = tmp_path / "other"
    run_dir.mkdir()
    shutil.copy(interrupted_run / "last.pt", run_dir / "last.pt")
    with pytest.raises(RuntimeError) as info:
        run_training(small_dataset, run_dir, num_filters=8, resume=True)
    cause = info.value.__cause__
    assert "another architecture (num_filters: checkpoint 4 vs config 8)" in str(cause)


def test_unknown_override_keys():
    argv = [str(Path("/x/monai/bundle/__main__.py")), "run", "training", "--config_file", f"['{TRAIN}','{PAD}']",
            "--max_epoch", "3", "--fold=2", "--train#dataloader#num_workers", "1", "--batch-size", "4"]
    files, overrides = parse_bundle_argv(argv)
    assert files == [str(TRAIN), str(PAD)]
    assert overrides == ["max_epoch", "fold", "train#dataloader#num_workers", "batch_size"]
    assert unknown_keys({"max_epochs", "fold", "train", "batch_size"}, overrides) == {"max_epoch": ["max_epochs"]}
    assert unknown_keys({"max_epochs"}, ["max_epochs#x", "max_epochs::y"]) == {}
    with pytest.raises(ConfigError, match=r"--max_epoch \(did you mean max_epochs"):
        check_overrides(argv)
    check_overrides(["pytest", "-q", "--max_epoch", "3"])  # not a bundle command line: nothing to check


def test_cli_rejects_a_misspelt_key(tmp_path):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"['{TRAIN}','{PAD}']",
           "--max_epoch", "3", "--run_dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert proc.returncode != 0
    assert "unknown config key(s) on the command line: --max_epoch (did you mean max_epochs" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_two_process_gloo_run(small_dataset, tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "monai.bundle", "run", "training",
           "--config_file", f"['{TRAIN}','{MULTI_GPU}','{PAD}']",
           "--dataset_dir", str(small_dataset), "--folds_csv", str(small_dataset / "folds.csv"),
           "--run_dir", str(run_dir), "--max_epochs", "1", "--num_folds", "5", "--batch_size", "4",
           "--num_filters", "4", "--progress", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())["resolved"]
    assert config["world_size"] == 2 and config["distributed"] is True
    last = torch.load(run_dir / "last.pt", weights_only=True)
    # 32 tiles over 2 processes with batch 4: 4 iterations per epoch on each
    assert last["trainer"]["epoch_length"] == 4
    assert not any(k.startswith("module.") for k in last["network"])  # saved unwrapped from DDP
    assert len(list((run_dir / "tensorboard").iterdir())) == 1  # only rank 0 writes
    assert {"best_loss.pt", "best_accuracy.pt", "best_metric.pt"} <= {p.name for p in run_dir.iterdir()}


def test_run_record_holds_absolute_paths(tmp_path, monkeypatch):
    """A run trained from one folder is read by SWA / evaluate from another: relative paths are recorded absolute."""
    from saltkit.training import prepare_run_dir

    monkeypatch.chdir(tmp_path)
    record = {"dataset_dir": "data/tgs", "folds_csv": "runs/folds/tgs-k10.csv", "run_dir": "runs/pad_fold0", "fold": 0}
    prepare_run_dir("runs/pad_fold0", record, argv=["train"])
    resolved = json.loads((tmp_path / "runs/pad_fold0/config.json").read_text())["resolved"]
    root = tmp_path.resolve()
    assert resolved == {"dataset_dir": str(root / "data/tgs"), "folds_csv": str(root / "runs/folds/tgs-k10.csv"),
                        "run_dir": str(root / "runs/pad_fold0"), "fold": 0}


def test_loss_record_names_the_loss_and_its_weights():
    """The run record's `loss`: a config's own loss (no weights) is recorded by class and does not break
    the run."""
    from torch import nn

    from saltkit.losses import DeepSupervisionLoss
    from saltkit.training import loss_record

    assert loss_record(nn.BCEWithLogitsLoss()) == {"class": "BCEWithLogitsLoss"}
    assert loss_record(DeepSupervisionLoss(image_weight=0.5, bce_weight=1.0)) == {
        "class": "DeepSupervisionLoss", "image_weight": 0.5, "pixel_weight": 0.1, "final_weight": 1.0,
        "bce_weight": 1.0}
