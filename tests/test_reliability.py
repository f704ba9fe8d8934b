"""Nothing lost, nothing silently wrong: used and locked run folders, resume checks, kills between checkpoint
writes, stale temporaries, strict booleans, override-file typos, hostile images and RLE, bad checkpoints for
export, partial ensemble output, unwritable output folders and the errors that must name a key or a file.

The training-path tests share one 1-epoch run on 20 sample tiles (killed while writing its best files, then
resumed, which completes it); every other bundle call fails in `initialize`, before any training."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run as bundle_run
from monai.data import set_track_meta
from PIL import Image

import saltkit.handlers.save_resume as ckpt_mod
from saltkit.cli import main
from saltkit.config import ConfigError, as_bool, check_overrides
from saltkit.data.folds import folds_for_dataset, write_folds
from saltkit.data.layout import (
    DatasetError,
    check_dataset,
    copy_subset,
    load_image,
    load_mask,
    sample_dir,
    train_items,
)
from saltkit.data.layout import (
    test_items as list_test_items,
)
from saltkit.handlers import FailOnNanLoss
from saltkit.handlers.nan import DivergenceError
from saltkit.inference.postprocess import PostProcessingSettings
from saltkit.inference.probabilities import Probabilities, load_probabilities, save_probabilities
from saltkit.io import FolderNotWritableError, atomic_write, check_writable
from saltkit.rle import RLEError, rle_runs
from saltkit.rundir import claim_run_dir
from saltkit.swa import run_swa

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles/saltnet/configs"
TRAIN, SWA, INFERENCE = CONFIGS / "train.json", CONFIGS / "swa.json", CONFIGS / "inference.json"
PAD, RESIZE = REPO / "configs/pad.json", REPO / "configs/resize.json"
# 20 tiles in 5 folds: 16 training tiles, 2 iterations of 8 per epoch, one epoch
TINY = {"num_folds": 5, "batch_size": 8, "num_filters": 4, "warmup_epochs": 1, "max_epochs": 1,
        "tta": False, "progress": False}
BAD_NAME = b"\xff\xfebad"  # not valid UTF-8

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")  # MONAI's eval notice


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_track_meta():
    yield
    set_track_meta(True)  # a failed run may leave MONAI's MetaTensor tracking off


def sample_ids(n: int, start: int = 0) -> list[str]:
    return [it["id"] for it in train_items(sample_dir())][start:start + n]


@pytest.fixture(scope="module")
def tiles20(tmp_path_factory) -> Path:
    return copy_subset(sample_dir(), tmp_path_factory.mktemp("tgs20") / "tgs", sample_ids(20))


def run_training(dataset: Path, run_dir: Path, variant_config=PAD, **overrides):
    args = {**TINY, "dataset_dir": str(dataset), "run_dir": str(run_dir), "folds_csv": str(dataset / "folds.csv"),
            **overrides}
    bundle_run("training", config_file=[str(TRAIN), str(variant_config)], logging_file=False, **args)


def config_error(dataset: Path, run_dir: Path, variant_config=PAD, **overrides) -> str:
    """The ConfigError message of a training that must fail before it starts."""
    with pytest.raises(RuntimeError) as info:
        run_training(dataset, run_dir, variant_config, **overrides)
    cause = info.value.__cause__
    assert isinstance(cause, ConfigError), repr(cause)
    return str(cause)


class Killed(Exception):
    """Stands for a kill -9."""


@pytest.fixture(scope="module")
def killed_run(tiles20, tmp_path_factory) -> Path:
    """A 1-epoch run killed while it writes its first best checkpoint at the end of epoch 1."""
    run_dir = tmp_path_factory.mktemp("runs") / "pad_fold0"
    original = ckpt_mod.save_checkpoint

    def killed_at_best(ckpt, path):
        if Path(path).name.startswith("best_"):
            raise Killed
        return original(ckpt, path)

    mp = pytest.MonkeyPatch()
    mp.setattr(ckpt_mod, "save_checkpoint", killed_at_best)
    try:
        with pytest.raises(RuntimeError) as info:
            run_training(tiles20, run_dir)
        assert isinstance(info.value.__cause__, Killed)
    finally:
        mp.undo()
    return run_dir


@pytest.fixture(scope="module")
def finished_run(killed_run, tiles20) -> Path:
    """The killed run resumed: epoch 1 is complete, so the resume only restores the missing best files."""
    before = {p.name for p in killed_run.iterdir()}
    run_training(tiles20, killed_run, resume="true")
    assert "best_metric.pt" not in before
    return killed_run


# ---------------------------------------------------------------- checkpoint order (kill between writes)


@pytest.mark.slow
def test_kill_during_the_best_files_keeps_the_epoch_in_last_pt(killed_run):
    last = torch.load(killed_run / "last.pt", weights_only=True)
    assert last["trainer"]["epoch"] == 1 and last["trainer"]["iteration"] == 2
    assert {b["epoch"] for b in last["best"].values()} == {1}
    assert not list(killed_run.glob("best_*.pt")) and not list(killed_run.glob(".*.tmp"))


@pytest.mark.slow
def test_resume_restores_the_best_files_last_pt_records(finished_run):
    last = torch.load(finished_run / "last.pt", weights_only=True)
    assert last["trainer"]["epoch"] == 1
    for name in ("best_loss.pt", "best_accuracy.pt", "best_metric.pt"):
        best = torch.load(finished_run / name, weights_only=True)
        assert best["epoch"] == 1 and best["score"] == last["best"][name]["score"] and best["variant"] == "pad"
        for key, value in last["network"].items():
            assert torch.equal(best["network"][key], value), (name, key)


# ---------------------------------------------------------------- a used run folder


@pytest.mark.slow
def test_fresh_run_into_a_used_folder_is_refused(finished_run, tiles20):
    mtimes = {p.name: p.stat().st_mtime_ns for p in finished_run.glob("*.pt")}
    message = config_error(tiles20, finished_run)
    assert f"{finished_run} holds a previous run" in message
    assert "--resume true" in message and "--overwrite true" in message and "--run_dir" in message
    assert {p.name: p.stat().st_mtime_ns for p in finished_run.glob("*.pt")} == mtimes


def test_overwrite_clears_the_previous_run(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "tensorboard").mkdir(parents=True)
    (run_dir / "inference").mkdir()
    for name in ("last.pt", "best_metric.pt", "swa.pt", "config_resumed.json", "tensorboard/events.1",
                 "inference/submission.csv"):
        (run_dir / name).write_text("old")
    with pytest.raises(ConfigError, match="holds a previous run"):
        claim_run_dir(run_dir)
    elsewhere = tmp_path / "elsewhere" / "last.pt"
    with pytest.raises(ConfigError, match=rf"{run_dir} holds another run .* than the {elsewhere} to resume"):
        claim_run_dir(run_dir, str(elsewhere))
    with pytest.raises(ConfigError, match="'resume' and 'overwrite' are both set"):
        claim_run_dir(run_dir, str(run_dir / "last.pt"), "true")
    with pytest.raises(ConfigError, match="'overwrite' must be true or false"):
        claim_run_dir(run_dir, None, "please")
    lock = claim_run_dir(run_dir, None, "true")
    try:
        assert lock.held
        left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
        assert left == [".lock", "inference", "inference/submission.csv"]
    finally:
        lock.release()


# ---------------------------------------------------------------- two trainings, one folder


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that locks `run_dir` as a training does, and keeps it until killed."""
    code = ("import sys, time; from saltkit.rundir import lock_run_dir; lock_run_dir(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(300)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow
def test_second_training_fails_naming_the_holder_and_a_killed_holder_does_not_block(finished_run, tiles20):
    holder = hold_lock(finished_run)
    try:
        message = config_error(tiles20, finished_run, resume="true")
        assert f"is in use by another training (pid {holder.pid}" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (finished_run / ".lock").read_text().split()[0] == str(holder.pid)  # the killed holder's stale lock
    run_training(tiles20, finished_run, resume="true")  # resumes all the same (epoch 1 was the last)


# ---------------------------------------------------------------- resume must continue the same run


@pytest.fixture(scope="module")
def other_split(tiles20, tmp_path_factory) -> tuple[Path, Path]:
    """(other dataset of 20 tiles, another folds file of the run's dataset)."""
    other = copy_subset(sample_dir(), tmp_path_factory.mktemp("tgs20b") / "tgs", sample_ids(20, start=20))
    folds = tmp_path_factory.mktemp("folds") / "seed7.csv"
    write_folds(folds_for_dataset(tiles20, k=5, seed=7), folds)
    return other, folds


@pytest.mark.slow
@pytest.mark.parametrize("case, message", [
    ("fold", r"another run \(fold: checkpoint 0 vs config 1\); resume with the run's own settings \(--fold 0\)"),
    ("variant", r"another run \(variant: checkpoint 'pad' vs config 'resize'\)"),
    ("dataset", r"trained on other tiles for fold 0 \(dataset_dir .*tgs20\d*/tgs"),
    ("folds_csv", r"trained on other tiles for fold 0 .*folds_csv .*seed7.csv"),
])
def test_resume_refuses_another_run(finished_run, tiles20, other_split, case, message):
    other_dataset, other_folds = other_split
    overrides, config = {"resume": str(finished_run / "last.pt")}, PAD
    if case == "fold":
        overrides["fold"] = 1
    elif case == "variant":
        config = RESIZE
    elif case == "dataset":
        overrides.update(dataset_dir=str(other_dataset), folds_csv=str(other_dataset / "folds.csv"))
    else:
        overrides["folds_csv"] = str(other_folds)
    args = {**TINY, "dataset_dir": str(tiles20), "run_dir": str(finished_run),
            "folds_csv": str(tiles20 / "folds.csv"), **overrides}
    with pytest.raises(RuntimeError) as info:
        bundle_run("training", config_file=[str(TRAIN), str(config)], logging_file=False, **args)
    assert isinstance(info.value.__cause__, ConfigError), repr(info.value.__cause__)
    assert re.search(message, str(info.value.__cause__)), str(info.value.__cause__)


@pytest.mark.parametrize("damage", ["truncated", "random"])
@pytest.mark.slow
def test_resume_from_an_unreadable_last_pt_names_it(finished_run, tiles20, tmp_path, damage):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = (finished_run / "last.pt").read_bytes()
    bad = data[: len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(4096)
    (run_dir / "last.pt").write_bytes(bad)
    message = config_error(tiles20, run_dir, resume="true")
    assert f"{run_dir / 'last.pt'} is not a readable checkpoint" in message


# ---------------------------------------------------------------- keys: booleans, integers, override files


def test_booleans_are_parsed_one_way():
    for word, value in (("true", True), ("FALSE", False), (" True ", True), ("1", True), ("0", False),
                        (True, True), (False, False), (1, True), (0, False)):
        assert as_bool(word, "tta") is value
    for bad in ("yes", "no", "on", "off", "", "null", "maybe", None, 2, 0.5):
        with pytest.raises(ConfigError, match=r"config key 'tta' must be true or false"):
            as_bool(bad, "tta")


@pytest.mark.parametrize("overrides, message", [
    ({"progress": "maybe"}, r"'progress' must be true or false \(or 1 / 0\), got 'maybe'"),
    ({"tta": "yes"}, r"'tta' must be true or false"),
    ({"overwrite": "sure"}, r"'overwrite' must be true or false"),
    ({"num_filters": 0}, r"'num_filters' must be an integer >= 1, got 0"),
    ({"val_interval": 0}, r"'val_interval' must be an integer >= 1, got 0"),
    ({"seed": "abc"}, r"'seed' must be an integer >= 0, got 'abc'"),
    ({"resume": "yes"}, r"'resume' must be true, false or the path of a last.pt; yes is no file"),
])
def test_bad_keys_fail_before_training(tiles20, tmp_path, overrides, message):
    assert re.search(message, config_error(tiles20, tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()


def bundle_argv(*files) -> list[str]:
    return [str(Path("/x/monai/bundle/__main__.py")), "run", "--config_file", str([str(f) for f in files])]


def test_override_file_typos_are_errors(tmp_path):
    typo = tmp_path / "short.json"
    typo.write_text(json.dumps({"max_epoch": 1, "batch_size": 4}))
    with pytest.raises(ConfigError, match=r"short.json: unknown config key\(s\) max_epoch \(did you mean max_epochs"):
        check_overrides(bundle_argv(TRAIN, PAD, typo))
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"loss#bce_weight": 1.0, "optimizer#_target_": "torch.optim.SGD",
                                  "optimizer#momentum": 0.9, "max_epochs": 2}))
    check_overrides(bundle_argv(TRAIN, PAD, nested))
    bad_nested = tmp_path / "bad_nested.json"
    bad_nested.write_text(json.dumps({"los#bce_weight": 1.0}))
    with pytest.raises(ConfigError, match=r"bad_nested.json: unknown config key\(s\) los#bce_weight"):
        check_overrides(bundle_argv(TRAIN, PAD, bad_nested))
    # the shipped combinations hold no unknown key
    configs = REPO / "configs"
    check_overrides(bundle_argv(TRAIN, CONFIGS / "multi_gpu_train.json", PAD, configs / "senet154.json",
                                configs / "multi_gpu.json", configs / "fold3.json"))
    check_overrides(bundle_argv(TRAIN, RESIZE, configs / "cpu.json"))
    check_overrides(bundle_argv(SWA, PAD))
    check_overrides(bundle_argv(INFERENCE, RESIZE))


# ---------------------------------------------------------------- images: palette, .PNG, bombs, file names


def palette_png(path: Path, indices: np.ndarray, palette: list[int]) -> Path:
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    im.putpalette(palette)
    im.save(path)
    return path


def test_palette_png_is_read_through_its_palette(tmp_path):
    indices = np.random.default_rng(0).integers(0, 256, (101, 101))
    grey = palette_png(tmp_path / "grey.png", indices, [255 - i for i in range(256) for _ in range(3)])
    assert Image.open(grey).mode == "P"
    np.testing.assert_array_equal(load_image(grey), 255 - indices)  # the pixels, not the palette indices
    colour = palette_png(tmp_path / "colour.png", indices, [c for i in range(256) for c in (i, 0, 255 - i)])
    with pytest.raises(DatasetError, match=r"colour.png: palette image with colours that are not grey"):
        load_image(colour)
    truth = np.zeros((101, 101), np.uint8)
    truth[20:40, 30:90] = 1
    mask = palette_png(tmp_path / "mask.png", truth, [0, 0, 0, 255, 255, 255])
    np.testing.assert_array_equal(load_mask(mask), truth)


def test_upper_case_png_is_read_and_a_duplicate_id_reported(tmp_path):
    root = copy_subset(sample_dir(), tmp_path / "tgs", sample_ids(8), test_ids=["000c8dfb2a", "0e0edd09c7"])
    tests = root / "test" / "images"
    (tests / "0e0edd09c7.png").rename(tests / "0e0edd09c7.PNG")
    assert [it["id"] for it in list_test_items(root)] == ["000c8dfb2a", "0e0edd09c7"]
    assert check_dataset(root) == []
    shutil.copy(tests / "000c8dfb2a.png", tests / "000c8dfb2a.PNG")
    with pytest.raises(DatasetError, match=r"id 000c8dfb2a has two files \(000c8dfb2a.PNG and 000c8dfb2a.png\)"):
        list_test_items(root)
    assert any("id 000c8dfb2a has two files" in p for p in check_dataset(root))


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims `width` x `height` pixels (the data is never decoded)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8  # after the signature: length, b"IHDR", 13 bytes of data, CRC
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    data[ihdr + 21:ihdr + 25] = struct.pack(">I", zlib.crc32(bytes(data[ihdr + 4:ihdr + 21])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_a_clear_error(tmp_path, capsys):
    huge = bomb_png(tmp_path / "huge.png", 14000, 14000)
    with pytest.raises(DatasetError, match=r"huge.png: image is far too large to read"):
        load_image(huge)
    big = bomb_png(tmp_path / "big.png", 12000, 12000)  # below the bomb limit: refused by size, never decoded
    with pytest.raises(DatasetError, match=r"big.png: mask is 12000x12000 pixels \(HxW\); expected 101x101"):
        load_mask(big)
    root = copy_subset(sample_dir(), tmp_path / "tgs", sample_ids(4), test_ids=["000c8dfb2a"])
    shutil.copy(huge, root / "test" / "images" / "000c8dfb2a.png")
    assert main(["check-data", str(root)]) == 1
    assert "000c8dfb2a.png: image is far too large to read" in capsys.readouterr().out


def test_file_names_that_are_not_utf8(tmp_path, capsys):
    root = copy_subset(sample_dir(), tmp_path / "tgs", sample_ids(12), test_ids=["000c8dfb2a"])
    first = sample_ids(1)[0]
    for sub in ("train/images", "train/masks"):
        shutil.copy(root / sub / f"{first}.png", os.path.join(os.fsencode(root / sub), BAD_NAME + b".png"))
    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"train/images/\\xff\\xfebad.png: file name is not valid UTF-8", out), out
    with pytest.raises(DatasetError, match="not valid UTF-8"):
        train_items(root)
    message = config_error(root, tmp_path / "run", num_folds=2)
    assert "config key 'dataset_dir'" in message and "not valid UTF-8" in message
    shutil.copy(root / "test/images/000c8dfb2a.png", os.path.join(os.fsencode(root / "test/images"), BAD_NAME + b".png"))
    with pytest.raises(DatasetError, match=r"test/images/\\xff\\xfebad.png: file name is not valid UTF-8"):
        list_test_items(root)


# ---------------------------------------------------------------- RLE tokens


@pytest.mark.parametrize("rle, message", [
    ("99999999999999999999 1", "'99999999999999999999' is far larger than any pixel number"),
    ("1_0 2", r"'1_0' is not an integer \(ASCII digits"),
    ("\u0661\u0662 2", "is not an integer"),
    ("+5 2", "'\\+5' is not an integer"),
])
def test_rle_tokens_are_ascii_digits(rle, message):
    with pytest.raises(RLEError, match=message):
        rle_runs(rle)


def test_score_reports_an_overflowing_token(tmp_path, capsys):
    truth = tmp_path / "truth.csv"
    truth.write_text("id,rle_mask\na,1 5\n")
    pred = tmp_path / "pred.csv"
    pred.write_text("id,rle_mask\na,99999999999999999999 1\n")
    assert main(["score", str(truth), str(pred)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saltkit score: error: ") and "pred.csv line 2 (id a)" in err and "\n" not in err


# ---------------------------------------------------------------- export of bad checkpoints


def test_export_of_a_bad_checkpoint_is_a_one_line_error(tmp_path, capsys):
    from saltkit.networks import SaltUNet

    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False)
    unknown = tmp_path / "unknown.pt"
    torch.save({"network": net.state_dict(), "arch": {**net.arch, "colour": "red"}}, unknown)
    wider = tmp_path / "wider.pt"
    torch.save({"network": net.state_dict(), "arch": {**net.arch, "num_filters": 8}}, wider)
    for path, what in ((unknown, r"arch has unknown keys \['colour'\]"), (wider, "weights do not match its own arch")):
        assert main(["export", str(path), "--out", str(tmp_path / "m.ts")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"saltkit export: error: {path}") and re.search(what, err) and "\n" not in err
        assert not (tmp_path / "m.ts").exists()


# ---------------------------------------------------------------- ensemble: nothing partial


def probabilities(ids, seed=0, image=False) -> Probabilities:
    rng = np.random.default_rng(seed)
    return Probabilities(np.array(ids), rng.random((len(ids), 101, 101)).astype(np.float32),
                         rng.random(len(ids)).astype(np.float32) if image else None)


def test_ensemble_refuses_an_empty_or_malformed_file_before_writing(tmp_path, capsys):
    empty = tmp_path / "empty.npz"
    np.savez(empty, ids=np.array([], dtype=str), probs=np.zeros((0, 101, 101), np.uint16))
    flat = tmp_path / "flat.npz"
    np.savez(flat, ids=np.array(["a", "b"]), probs=np.zeros((2, 101), np.uint16))
    for path, what in ((empty, "holds no tiles"), (flat, r"'probs' must be \(N, 101, 101\) tiles, got shape \(2, 101\)")):
        out = tmp_path / "submission.csv"
        assert main(["ensemble", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert re.search(f"{re.escape(str(path))}: {what}", err), err
        assert not out.exists()
    with pytest.raises(ValueError, match="flat.npz"):
        load_probabilities(flat)


def test_ensemble_writes_the_csv_and_the_probabilities_both_or_neither(tmp_path, capsys):
    a = save_probabilities(tmp_path / "a.npz", probabilities(["x", "y", "z"], 1))
    b = save_probabilities(tmp_path / "b.npz", probabilities(["z", "x", "y"], 2))
    out, mean = tmp_path / "out" / "submission.csv", tmp_path / "out" / "mean.npz"
    args = ["ensemble", str(a), str(b), "--out", str(out), "--save-probs", str(mean)]
    assert main(args) == 0
    assert out.is_file() and load_probabilities(mean).ids.tolist() == ["x", "y", "z"]
    before = out.read_bytes(), mean.read_bytes()
    c = save_probabilities(tmp_path / "c.npz", probabilities(["x", "y", "z"], 3))
    # fails after averaging (no image probabilities to threshold): the earlier pair stays as it was
    assert main(["ensemble", str(a), str(c), "--out", str(out), "--save-probs", str(mean),
                 "--image-threshold", "0.5"]) == 2
    assert "image_threshold" in capsys.readouterr().err
    assert (out.read_bytes(), mean.read_bytes()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["mean.npz", "submission.csv"]


# ---------------------------------------------------------------- stale temporaries of killed writes


def killed_writer(target: Path, kill: bool = True) -> subprocess.Popen:
    """A process stopped (SIGKILL) in the middle of an atomic write of `target`, or still writing (kill False)."""
    code = ("import sys, time; from saltkit.io import atomic_write\n"
            "with atomic_write(sys.argv[1], 'wb') as f:\n"
            "    f.write(b'x' * 100000); f.flush(); print('writing', flush=True); time.sleep(300)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "writing"
    if kill:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def test_stale_temporaries_are_removed_at_the_next_write(tmp_path):
    target = tmp_path / "last.pt"
    live = killed_writer(target, kill=False)  # a writer that is still at work keeps its temporary
    try:
        killed_writer(target)
        killed_writer(tmp_path / "best_loss.pt")
        assert len(temporaries(tmp_path)) == 3
        with atomic_write(target, "wb") as f:
            f.write(b"new")
        left = temporaries(tmp_path)
        assert len(left) == 2 and any(f".{live.pid}@" in n for n in left) and any("best_loss" in n for n in left)
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    (tmp_path / ".notes.tmp").write_text("not ours")
    check_writable(tmp_path, "output_dir")  # a command starting in the folder clears every stale one
    assert temporaries(tmp_path) == [".notes.tmp"] and target.read_bytes() == b"new"


def test_a_training_start_removes_stale_temporaries_in_its_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    killed_writer(run_dir / "best_metric.pt")
    assert temporaries(run_dir)
    lock = claim_run_dir(run_dir)
    lock.release()
    assert temporaries(run_dir) == []


# ---------------------------------------------------------------- output folders that cannot be written


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "a" / "b", "output_dir").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FolderNotWritableError, match=rf"config key 'output_dir': cannot write to {blocker}/sub"):
        check_writable(blocker / "sub", "output_dir")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_read_only(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(FolderNotWritableError, match=rf"config key 'output': cannot write to {folder}"):
            check_writable(folder, "output")
    finally:
        folder.chmod(0o755)


class Untouchable:
    """A loader that fails the test when SWA starts computing with it."""

    def __iter__(self):
        raise AssertionError("SWA started its work before checking the output folder")


@pytest.mark.slow
def test_swa_checks_its_output_folder_before_the_work(finished_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FolderNotWritableError, match=rf"config key 'output': cannot write to {blocker}"):
        run_swa(sorted(finished_run.glob("best_*.pt")), Untouchable(), blocker / "swa.pt", variant="pad")


# ---------------------------------------------------------------- errors that name the key


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": "abc"}, r"'threshold' must be a number in \[0, 1\], got 'abc'"),
    ({"threshold": float("nan")}, r"'threshold' must be a number in \[0, 1\]"),
    ({"min_area": "abc"}, r"'min_area' must be an integer >= 0 \(pixels; 0: off\), got 'abc'"),
    ({"min_area": 2.5}, r"'min_area' must be an integer >= 0"),
    ({"min_component_size": True}, r"'min_component_size' must be an integer >= 0"),
    ({"image_threshold": "high"}, r"'image_threshold' must be a number in \[0, 1\] or null"),
])
def test_postprocessing_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PostProcessingSettings(**kwargs)
    assert PostProcessingSettings(image_threshold="null").image_threshold is None


def test_nan_in_the_first_epoch_says_there_is_no_checkpoint(tmp_path):
    from ignite.engine import Engine

    def diverging() -> Engine:
        engine = Engine(lambda e, b: {"loss": torch.tensor(float("nan"))})
        FailOnNanLoss(last_checkpoint=str(last)).attach(engine)
        return engine

    last = tmp_path / "last.pt"
    with pytest.raises(DivergenceError, match=rf"no epoch was completed, so there is no {last} to resume from"):
        diverging().run([0, 1], max_epochs=1)
    last.write_bytes(b"")  # stands for the last.pt of a resumed run
    with pytest.raises(DivergenceError, match=rf"{last} holds the last completed epoch"):
        diverging().run([0, 1], max_epochs=1)
