"""A newcomer's wrong turns, typed as the README types its commands: each one ends with saltkit's one-line
message naming the key or file (the last line of the output) and exit code 2, without a traceback.

Every case fails before any training, so the processes are cheap; they run side by side.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from saltkit.data.layout import copy_subset, sample_dir, train_items

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "saltnet" / "configs"
PAD = str(REPO / "configs" / "pad.json")


def bundle(run_id: str, config: str, *args: str) -> list[str]:
    """`python -m monai.bundle run RUN_ID --config_file "['bundles/.../CONFIG', 'configs/pad.json']" ARGS`."""
    files = [str(CONFIGS / config), PAD]
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", repr(files), *args]


def saltkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "saltkit.cli", *args]


def wrong_size_dataset(root: Path) -> Path:
    """Twelve sample tiles and masks stored at 128 x 128 instead of the competition's 101 x 101."""
    ids = [it["id"] for it in train_items(sample_dir())][:12]
    data = copy_subset(sample_dir(), root, ids)
    for png in [*data.glob("train/images/*.png"), *data.glob("train/masks/*.png")]:
        Image.open(png).resize((128, 128), Image.NEAREST).save(png)
    return data


def cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command, regular expression the last line must match from its start)."""
    one = tmp / "one_checkpoint"
    one.mkdir()
    (one / "best_loss.pt").write_bytes(b"")  # a run folder holding one of the three checkpoints SWA averages
    big = wrong_size_dataset(tmp / "tgs128")
    return {
        "wrong dataset_dir": (
            bundle("training", "train.json", "--dataset_dir", str(tmp / "tgs_typo")),
            rf"saltkit training: error: config key 'dataset_dir': {re.escape(str(tmp / 'tgs_typo'))} is not a folder"),
        "misspelt key": (
            saltkit("train", PAD, "--max_epoch", "3"),
            r"saltkit train: error: unknown config key\(s\) on the command line: --max_epoch \(did you mean max_epochs"),
        "fold out of range": (
            bundle("training", "train.json", "--fold", "10"),
            r"saltkit training: error: config key 'fold' must be an integer in 0\.\.9 \(num_folds=10\), got 10"),
        "inference with no model": (  # a bundle without its model.pt, before any training
            bundle("inference", "inference.json", "--bundle_root", str(tmp / "bare_bundle")),
            rf"saltkit inference: error: checkpoint not found: neither the bundle's model "
            rf"{re.escape(str(tmp / 'bare_bundle' / 'models' / 'model.pt'))} nor the run's "
            rf"runs/sample/pad_fold0/best_metric.pt exists \(config key 'ckpt'\); pass --ckpt FILE"),
        "swa with one checkpoint": (
            saltkit("swa", PAD, "--run_dir", str(one)),
            rf"saltkit swa: error: SWA checkpoint not found: {re.escape(str(one / 'best_accuracy.pt'))}"),
        "tiles of the wrong size": (
            bundle("training", "train.json", "--dataset_dir", str(big), "--num_folds", "3"),
            rf"saltkit training: error: {re.escape(str(big))}/train/\w+/\w+\.png: \w+ is 128x128 pixels .*expected 101x101"),
    }


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[list[str], str, int, str]]:
    """name -> (command, expected last line, exit code, output), all started at once."""
    tmp = tmp_path_factory.mktemp("walkthrough")
    work = tmp / "work"  # an empty current folder: no runs/ from anything else
    work.mkdir()
    started = {name: (cmd, expected, subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True))
               for name, (cmd, expected) in cases(tmp).items()}
    results = {}
    for name, (cmd, expected, proc) in started.items():
        out, _ = proc.communicate(timeout=900)  # generous: only a hang should trip it
        results[name] = (cmd, expected, proc.returncode, out)
    return results


@pytest.mark.parametrize("name", ["wrong dataset_dir", "misspelt key", "fold out of range",
                                  "inference with no model", "swa with one checkpoint", "tiles of the wrong size"])
def test_error_ends_with_one_line(outcomes, name):
    cmd, expected, code, out = outcomes[name]
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2, f"{name}: exit code {code}\n{out}"
    assert re.match(expected, lines[-1]), f"{name}: last line {lines[-1]!r}, expected {expected!r}"
    assert "Traceback" not in out and "RuntimeError" not in out, out
