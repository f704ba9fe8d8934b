"""Real (short) runs of the training bundle on a 40-tile subset of the shipped sample: checkpoints, TensorBoard,
an interrupted run resumed from last.pt, the resize variant, bad configs, the CLI and 2-process gloo DDP."""

from __future__ import annotations

import json
import logging
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
from saltkit.data.layout import train_items
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
    best = torch.load(run_dir / "best_metric.pt", weights_only=True)
    assert best["variant"] == "resize"
    # the best files record their run's fold split, so a copy moved elsewhere still tunes and averages on it
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert best["fold"] == 0 and best["num_folds"] == config["num_folds"] and best["split"] == last["split"]


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
    ({"amp": "maybe"}, r"^config key 'amp' must be auto, true, false, 'bf16' or 'fp16', got 'maybe'$"),
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
    from saltkit.rundir import prepare_run_dir

    monkeypatch.chdir(tmp_path)
    record = {"dataset_dir": "data/tgs", "folds_csv": "runs/folds/tgs-k10.csv", "run_dir": "runs/pad_fold0", "fold": 0}
    prepare_run_dir("runs/pad_fold0", record, argv=["train"])
    resolved = json.loads((tmp_path / "runs/pad_fold0/config.json").read_text())["resolved"]
    root = tmp_path.resolve()
    assert resolved == {"dataset_dir": str(root / "data/tgs"), "folds_csv": str(root / "runs/folds/tgs-k10.csv"),
                        "run_dir": str(root / "runs/pad_fold0"), "fold": 0}



def test_default_run_folder_names_the_dataset(tmp_path, monkeypatch):
    """The sample run and a real run of the same variant and fold never share a folder:
    runs/<dataset name>/<variant>_fold<k> (the sample's own folder is named tgs too, so it is filed as
    `sample`); the workflows after training default to the same folder, and the run record holds it."""
    from monai.bundle import ConfigParser

    from saltkit.data import sample_dir
    from saltkit.rundir import default_run_dir, prepare_run_dir

    tgs = tmp_path / "data" / "tgs"
    assert default_run_dir(sample_dir(), "pad", 0) == "runs/sample/pad_fold0"
    assert default_run_dir(str(tgs), "pad", 0) == "runs/tgs/pad_fold0"
    assert default_run_dir(f"{tgs}/", "resize", 3) == "runs/tgs/resize_fold3"
    assert default_run_dir(None, None, None) == default_run_dir("null", "pad", 0) == "runs/sample/pad_fold0"

    def parsed(config: Path, key: str, **overrides):
        parser = ConfigParser()
        parser.read_config([str(config), str(PAD)] if config == TRAIN else str(config))
        for k, v in {"folds_csv": str(tmp_path / "folds.csv"), **overrides}.items():
            parser[k] = v
        parser.parse()
        return parser.get_parsed_content(key)

    sample_record = parsed(TRAIN, "recipe").record()
    tgs_record = parsed(TRAIN, "recipe", dataset_dir=str(tgs), fold=2).record()
    assert sample_record["run_dir"] == "runs/sample/pad_fold0"
    assert tgs_record["run_dir"] == "runs/tgs/pad_fold2"
    for workflow in ("swa.json", "evaluate.json", "inference.json"):
        assert parsed(CONFIGS / workflow, "run_dir") == "runs/sample/pad_fold0", workflow
        tgs_run = parsed(CONFIGS / workflow, "run_dir", dataset_dir=str(tgs), fold=2)
        assert tgs_run == "runs/tgs/pad_fold2", workflow
    monkeypatch.chdir(tmp_path)
    prepare_run_dir(tgs_record["run_dir"], tgs_record, argv=["train"])
    resolved = json.loads((tmp_path / "runs/tgs/pad_fold2/config.json").read_text())["resolved"]
    assert resolved["run_dir"] == str(tmp_path.resolve() / "runs/tgs/pad_fold2")


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


# ---------------------------------------------------------------- mixed precision (config key `amp`)


def test_amp_auto_takes_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, caplog):
    import saltkit.precision as precision

    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: (False, "no native bf16: a test processor"))
    with caplog.at_level(logging.DEBUG, logger="saltkit.precision"):
        assert precision.amp_settings("auto", "cpu") == {"amp": False, "amp_kwargs": {}, "autocast": None}
    assert caplog.messages == ["amp auto: float32 on the CPU (no native bf16: a test processor)"]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="saltkit.precision"):
        # `true` asks for bf16 whatever the processor: it gets it, with a warning that it is emulated
        assert precision.amp_settings("true", "cpu")["autocast"] == torch.bfloat16
    assert caplog.records[0].levelno == logging.WARNING and "emulated" in caplog.messages[0]

    monkeypatch.setattr(precision, "native_cpu_bf16", lambda: (True, "oneDNN reports native bf16"))
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="saltkit.precision"):
        # MONAI's engines autocast on CUDA only: on the CPU the bundles' AutocastInferer does it
        assert precision.amp_settings("AUTO", "cpu") == {"amp": False, "amp_kwargs": {}, "autocast": torch.bfloat16}
        assert precision.amp_settings(False, "cpu")["autocast"] is None
        assert precision.amp_settings("fp16", "cpu")["autocast"] is None  # fp16 autocast is CUDA-only here
    assert caplog.messages[0] == "amp auto: bf16 autocast on the CPU (oneDNN reports native bf16)"
    assert caplog.records[1].levelno == logging.DEBUG and caplog.records[2].levelno == logging.WARNING


def test_native_cpu_bf16_asks_onednn_and_the_processor_flags(monkeypatch):
    import saltkit.precision as precision

    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert precision.native_cpu_bf16()[0] is False  # no oneDNN bf16 kernels: torch's generic path, slow
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert precision.native_cpu_bf16() == (True, "oneDNN reports bf16 and the processor has avx512_bf16")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512bw", "amx_tile", "amx_bf16"})
    assert precision.native_cpu_bf16()[0] is True
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512bw", "avx512_vnni"})
    native, why = precision.native_cpu_bf16()  # AVX-512 without bf16 instructions: oneDNN would emulate it
    assert native is False and "emulate" in why
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    assert precision.native_cpu_bf16() == (True, "oneDNN reports native bf16")


def test_bf16_trained_checkpoint_loads_and_predicts_in_float32(sample_dir, tmp_path):
    """A real run under bf16 autocast (forced with `amp: true`, so it runs in bf16 on any processor): training and
    validation ran their convolutions in bf16, the checkpoints hold float32 weights, and the checkpoint predicts
    in float32 through the inference path."""
    from saltkit.data.layout import copy_subset, train_items
    from saltkit.inference import tile_inferer
    from saltkit.inference.runtime import torch_network

    ids = [it["id"] for it in train_items(sample_dir)][:20]  # 16 training tiles (2 iterations), 4 validation
    dataset = copy_subset(sample_dir, tmp_path / "tgs", ids)
    run_dir = tmp_path / "pad_fold0"
    seen = {True: set(), False: set()}  # conv output dtypes in training / in validation

    def record(module, args, output):
        if isinstance(module, torch.nn.Conv2d):
            seen[module.training].add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run_training(dataset, run_dir, max_epochs=1, amp="true", backbone="resnet10_w32", channels_last="true",
                     tta="false")
    finally:
        hook.remove()
    assert seen == {True: {torch.bfloat16}, False: {torch.bfloat16}}
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["amp"] == "true"
    last = torch.load(run_dir / "last.pt", weights_only=True)
    for state in (last["network"], *last["optimizer"]["state"].values()):
        assert {t.dtype for t in state.values() if t.is_floating_point() and t.ndim} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in last["network"].values())

    net = torch_network(load_network(run_dir / "best_metric.pt"), "cpu")
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tile_inferer(tta=True)(x, net)
        plain, mirror = net(x), net(x.flip(-1))
    assert out["prob"].dtype == torch.float32 and plain.logit.dtype == torch.float32
    torch.testing.assert_close(out["prob"], (torch.sigmoid(plain.logit) + torch.sigmoid(mirror.logit).flip(-1)) / 2)


# ---------------------------------------------------------------- fine-tuning from a trained model (init_ckpt)


def training_workflow(dataset: Path, run_dir: Path, variant_config=PAD, **overrides):
    """The training bundle as a MONAI ConfigWorkflow, initialized: its engines can be watched before it runs."""
    from monai.bundle import ConfigWorkflow

    args = {**TINY, "dataset_dir": str(dataset), "run_dir": str(run_dir), "folds_csv": str(dataset / "folds.csv"),
            **overrides}
    workflow = ConfigWorkflow(config_file=[str(TRAIN), str(variant_config)], workflow_type="train",
                              logging_file=False, **args)
    workflow.initialize()
    return workflow


@pytest.fixture(scope="module")
def start_checkpoint(interrupted_run, tmp_path_factory) -> Path:
    """A trained model to fine-tune from: the interrupted run's best_metric.pt, copied."""
    path = tmp_path_factory.mktemp("init") / "start.pt"
    shutil.copy(interrupted_run / "best_metric.pt", path)
    return path


@pytest.fixture(scope="module")
def fine_tuned(start_checkpoint, small_dataset, tmp_path_factory):
    """One epoch fine-tuned from `start_checkpoint`, validated once more before its first step."""
    from ignite.engine import Events

    run_dir = tmp_path_factory.mktemp("runs") / "fine"
    workflow = training_workflow(small_dataset, run_dir, init_ckpt=str(start_checkpoint), max_epochs=1)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    at_step_0 = {}

    def validate_before_the_first_step(engine):
        at_step_0["weights"] = {k: v.clone() for k, v in engine.network.state_dict().items()}
        evaluator.run()
        at_step_0["val_metric"] = evaluator.state.metrics["val_metric"]
        for best in workflow.parser.get_parsed_content("validate#best_checkpoints"):
            best.score = best.epoch = None  # this extra validation is not the run's own
            best.pending = False

    trainer.add_event_handler(Events.STARTED, validate_before_the_first_step)
    workflow.run()
    workflow.finalize()
    return run_dir, at_step_0


def test_init_ckpt_starts_from_the_checkpoints_weights(fine_tuned, start_checkpoint):
    from saltkit.checkpoints import weights_fingerprint

    run_dir, at_step_0 = fine_tuned
    start = torch.load(start_checkpoint, weights_only=True)
    # at step 0 the network is the checkpoint's, so it scores what the checkpoint scored on the same fold
    assert set(at_step_0["weights"]) == set(start["network"])
    for name, value in start["network"].items():
        assert torch.equal(at_step_0["weights"][name], value), name
    assert at_step_0["val_metric"] == pytest.approx(start["score"], abs=1e-6)
    # then it trained on, with a fresh optimizer and schedule (not the source run's)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["trainer"]["epoch"] == 1 and last["trainer"]["iteration"] == 4
    assert {int(s["step"]) for s in last["optimizer"]["state"].values()} == {4}
    assert last["scheduler"]["last_epoch"] == 4
    assert not torch.equal(last["network"]["final.2.weight"], start["network"]["final.2.weight"])
    # the run records where it started: the checkpoint and its weight fingerprint
    record = {"path": str(start_checkpoint.resolve()), "weights": weights_fingerprint(start["network"])}
    assert last["init_ckpt"] == record
    assert json.loads((run_dir / "config.json").read_text())["resolved"]["init_ckpt"] == record


def test_init_ckpt_of_another_architecture_or_variant_fails(start_checkpoint, small_dataset, tmp_path):
    for overrides, variant, message in (
            ({"num_filters": 8}, PAD, f"config key 'init_ckpt': {start_checkpoint} was trained with num_filters 4, "
                                      "the config builds num_filters 8; use the keys it was trained with "
                                      "(--num_filters 4) or another init_ckpt"),
            ({"backbone": "resnet34"}, PAD, f"{start_checkpoint} was trained with backbone resnet18, the config "
                                            "builds backbone resnet34"),
            ({}, RESIZE, f"{start_checkpoint} was trained with variant 'pad', the config trains 'resize'; merge "
                         "configs/pad.json"),
            ({"init_ckpt": str(tmp_path / "none.pt")}, PAD, "config key 'init_ckpt': checkpoint not found")):
        with pytest.raises(RuntimeError) as info:
            run_training(small_dataset, tmp_path / "run", variant_config=variant,
                         **{"init_ckpt": str(start_checkpoint), **overrides})
        cause = info.value.__cause__
        assert isinstance(cause, ConfigError) and message in str(cause), str(cause)
        assert "\n" not in str(cause)
        assert not (tmp_path / "run").exists()


def test_init_ckpt_with_resume_only_continues_the_same_fine_tuning(fine_tuned, start_checkpoint, interrupted_run,
                                                                   small_dataset, tmp_path):
    run_dir, _ = fine_tuned
    other = torch.load(start_checkpoint, weights_only=True)
    other["network"]["final.2.bias"] += 1
    torch.save(other, tmp_path / "other.pt")
    refusals = ((run_dir, tmp_path / "other.pt", f"that run started from init_ckpt {start_checkpoint.resolve()}"),
                (interrupted_run, start_checkpoint, "that run started from the encoder's initial weights"))
    for resumed, init, message in refusals:
        with pytest.raises(RuntimeError) as info:
            run_training(small_dataset, resumed, max_epochs=4, resume=True, init_ckpt=str(init))
        assert isinstance(info.value.__cause__, ConfigError) and message in str(info.value.__cause__)
        assert "resume it without --init_ckpt, or fine-tune into a new run_dir" in str(info.value.__cause__)
    # the same fine-tuning run resumes, with or without init_ckpt, and keeps its record
    run_training(small_dataset, run_dir, max_epochs=2, resume=True, init_ckpt=str(start_checkpoint))
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["trainer"]["epoch"] == 2 and last["init_ckpt"]["path"] == str(start_checkpoint.resolve())
    assert {int(s["step"]) for s in last["optimizer"]["state"].values()} == {8}  # continued, not restarted


# ---------------------------------------------------------------- training on labelled and pseudo-labelled tiles


@pytest.fixture(scope="module")
def pseudo_set(start_checkpoint, small_dataset, sample_dir, tmp_path_factory) -> Path:
    """The sample's 20 test tiles pseudo-labelled by the interrupted run's model (a pad teacher)."""
    from saltkit.inference.pseudo_labels import pseudo_label

    out = tmp_path_factory.mktemp("pseudo") / "set"
    pseudo_label(sample_dir / "test" / "images", [start_checkpoint], out, min_confidence=0.0,
                 exclude_dataset=small_dataset)
    return out


@pytest.fixture(scope="module")
def pseudo_run(pseudo_set, small_dataset, tmp_path_factory):
    """One epoch on the 32 labelled training tiles of fold 0 and the pseudo-labelled set, half of each batch;
    returns the run folder, the ids of every training batch, and the workflow's validation items."""
    from ignite.engine import Events

    run_dir = tmp_path_factory.mktemp("runs") / "student"
    workflow = training_workflow(small_dataset, run_dir, pseudo_dir=str(pseudo_set), pseudo_share=0.5, max_epochs=1)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    batches = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: batches.append(list(e.state.batch["id"])))
    parsed = {key: workflow.parser.get_parsed_content(key)
              for key in ("train#items", "train#pseudo_items", "train#dataset", "validate#items")}
    workflow.run()
    workflow.finalize()
    return run_dir, batches, parsed


def test_pseudo_labelled_tiles_make_half_of_every_batch(pseudo_run, pseudo_set):
    run_dir, batches, parsed = pseudo_run
    pseudo_ids = {it["id"] for it in train_items(pseudo_set)}
    labelled_ids = {it["id"] for it in parsed["train#items"]}
    assert len(pseudo_ids) == 20 and len(labelled_ids) == 32
    assert len(batches) == 8  # an epoch passes once over the 32 labelled tiles, 4 in each batch of 8
    for ids in batches:
        assert len(ids) == 8 and sum(i in pseudo_ids for i in ids) == 4 and sum(i in labelled_ids for i in ids) == 4
    assert {i for ids in batches for i in ids if i in labelled_ids} == labelled_ids
    # one dataset, one transform chain: pseudo-labelled tiles get the labelled tiles' augmentation
    assert {it["id"] for it in parsed["train#dataset"].data} == labelled_ids | pseudo_ids
    last = torch.load(run_dir / "last.pt", weights_only=True)
    fingerprint = json.loads((pseudo_set / "manifest.json").read_text())["fingerprint"]
    assert last["pseudo"] == {"dir": str(pseudo_set.resolve()), "fingerprint": fingerprint}
    record = json.loads((run_dir / "config.json").read_text())["resolved"]
    assert record["pseudo"]["fingerprint"] == fingerprint and record["pseudo"]["tiles"] == 20
    assert record["pseudo"]["per_batch"] == 4 and record["pseudo_share"] == 0.5
    assert record["train_tiles"] == 32 and record["val_tiles"] == 8


def test_validation_and_swa_use_labelled_tiles_only(pseudo_run, pseudo_set, small_dataset):
    from saltkit.data.folds import read_folds

    run_dir, _, parsed = pseudo_run
    folds = read_folds(small_dataset / "folds.csv")
    assert sorted(it["id"] for it in parsed["validate#items"]) == sorted(folds["id"][folds["fold"] == 0])
    assert not {it["id"] for it in parsed["validate#items"]} & {it["id"] for it in parsed["train#pseudo_items"]}
    # SWA's BatchNorm pass reads the run's labelled training tiles, not the pseudo-labelled ones
    bundle_run("swa", config_file=[str(CONFIGS / "swa.json"), str(PAD)], run_dir=str(run_dir),
               tune_postprocessing=False, logging_file=False)
    assert torch.load(run_dir / "swa.pt", weights_only=True)["bn_tiles"] == 32


def test_resume_with_another_pseudo_set_is_refused(pseudo_run, pseudo_set, small_dataset, sample_dir, tmp_path):
    from saltkit.inference.pseudo_labels import pseudo_label

    run_dir, _, _ = pseudo_run
    tiles = tmp_path / "tiles"  # 15 of the 20 tiles: another set
    tiles.mkdir()
    for path in sorted((sample_dir / "test" / "images").iterdir())[:15]:
        shutil.copy(path, tiles)
    other = tmp_path / "other"
    teacher = json.loads((pseudo_set / "manifest.json").read_text())["teachers"][0]["ckpt"]
    pseudo_label(tiles, [teacher], other, min_confidence=0.0, exclude_dataset=small_dataset)
    for pseudo_dir, message in ((str(other), f"this config gives the pseudo-labelled set {other.resolve()}"),
                                (None, "this config gives no pseudo-labelled tiles")):
        with pytest.raises(RuntimeError) as info:
            run_training(small_dataset, run_dir, max_epochs=2, resume=True, pseudo_dir=pseudo_dir)
        cause = str(info.value.__cause__)
        assert isinstance(info.value.__cause__, ConfigError) and message in cause, cause
        assert f"it was trained with the pseudo-labelled set {pseudo_set.resolve()}" in cause
        assert f"resume with --pseudo_dir {pseudo_set.resolve()}" in cause


def test_a_pseudo_set_of_another_variant_is_refused(pseudo_set, small_dataset, tmp_path):
    with pytest.raises(RuntimeError) as info:
        run_training(small_dataset, tmp_path / "run", variant_config=RESIZE, pseudo_dir=str(pseudo_set))
    cause = info.value.__cause__
    assert isinstance(cause, ConfigError) and str(cause) == (
        f"config key 'pseudo_dir': {pseudo_set / 'manifest.json'} was made by a teacher of variant 'pad', this "
        "config trains 'resize'; pseudo-label with a resize teacher, or merge configs/pad.json")
    assert not (tmp_path / "run").exists()
