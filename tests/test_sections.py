"""Labelled sections as training data (config key `sections_dir`): listing and checking a sections folder, folds
by section, training windows, and a short training run validated on whole held-out sections.

The sections are built from real tiles of the sample, placed on a grid as `saltkit mosaic` places them: a grey +
alpha PNG (transparent where a cell has no tile) and a mask PNG of 0 / 255 / 128 (not interpreted).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import run as bundle_run
from monai.data import set_track_meta
from PIL import Image

from saltkit.config import ConfigError
from saltkit.data.labelled_sections import (
    ensure_section_folds,
    list_sections,
    read_section_folds,
    read_section_mask,
    section_folds,
)
from saltkit.data.layout import DatasetError, load_image, load_mask
from saltkit.labels import IGNORE_LABEL
from saltkit.seismic.training_sections import (
    SectionCellsd,
    SectionWindows,
    grid_cells,
    load_section,
    window_counts,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles/saltnet/configs"
T = 101
ABSENT, UNINTERPRETED = "absent", "uninterpreted"
# section -> grid of cells: a tile index into the chosen sample tiles, ABSENT (transparent, no data) or
# (index, UNINTERPRETED) (the tile's image, mask 128)
LAYOUT = {
    "alpha": [[0, 1], [2, ABSENT]],
    "beta": [[3, 4, (5, UNINTERPRETED)]],
    "gamma": [[1, 3]],  # cropped to 70 rows below: thinner than a tile
}


def labelled_tiles(sample_dir: Path) -> list[str]:
    """Six labelled sample tiles, some with salt and some without."""
    ids = sorted(p.stem for p in (sample_dir / "train" / "images").glob("*.png"))
    salty = [i for i in ids if 0.1 < load_mask(sample_dir / "train" / "masks" / f"{i}.png").mean() < 0.9]
    empty = [i for i in ids if not load_mask(sample_dir / "train" / "masks" / f"{i}.png").any()]
    return salty[:4] + empty[:2]


def build_section(sample_dir: Path, tiles: list[str], grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grey, alpha, mask) uint8 arrays of a section laid out as `grid`."""
    rows, cols = len(grid), len(grid[0])
    grey = np.full((rows * T, cols * T), 128, np.uint8)
    alpha = np.zeros_like(grey)
    mask = np.full_like(grey, 128)
    for r, row in enumerate(grid):
        for c, cell in enumerate(row):
            if cell == ABSENT:
                continue
            index, state = cell if isinstance(cell, tuple) else (cell, None)
            window = np.s_[r * T:(r + 1) * T, c * T:(c + 1) * T]
            grey[window] = load_image(sample_dir / "train" / "images" / f"{tiles[index]}.png")
            alpha[window] = 255
            if state != UNINTERPRETED:
                mask[window] = load_mask(sample_dir / "train" / "masks" / f"{tiles[index]}.png") * 255
    return grey, alpha, mask


def write_sections(sample_dir: Path, root: Path) -> Path:
    """The LAYOUT sections as NAME.png (grey + alpha) and NAME_mask.png in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    tiles = labelled_tiles(sample_dir)
    for name, grid in LAYOUT.items():
        grey, alpha, mask = build_section(sample_dir, tiles, grid)
        if name == "gamma":
            grey, alpha, mask = grey[:70], alpha[:70], mask[:70]
        Image.fromarray(np.dstack([grey, alpha])).save(root / f"{name}.png")
        Image.fromarray(mask).save(root / f"{name}_mask.png")
    return root


@pytest.fixture(scope="module")
def sections_dir(sample_dir, tmp_path_factory) -> Path:
    return write_sections(sample_dir, tmp_path_factory.mktemp("sections") / "survey")


def expected_labels(sections_dir: Path, name: str) -> np.ndarray:
    """What a section's labels must be: the mask's 0 / 1, IGNORE_LABEL where it holds 128 or the section is
    transparent."""
    mask = np.asarray(Image.open(sections_dir / f"{name}_mask.png"))
    alpha = np.asarray(Image.open(sections_dir / f"{name}.png"))[..., 1]
    labels = np.where(mask == 255, 1.0, 0.0).astype(np.float32)
    labels[(mask == 128) | (alpha == 0)] = IGNORE_LABEL
    return labels


# ---------------------------------------------------------------- listing and checking


def test_a_folder_lists_its_labelled_sections_and_skips_those_without_a_mask(sections_dir, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(sections_dir, folder)
    shutil.copy(folder / "beta.png", folder / "delta.png")  # no delta_mask.png
    (folder / "notes.txt").write_text("not a section")
    sections, skipped = list_sections(folder)
    assert [s.name for s in sections] == ["alpha", "beta", "gamma"]
    assert skipped == ["delta"]
    assert sections[0].image == folder / "alpha.png" and sections[0].mask == folder / "alpha_mask.png"


def test_a_section_reads_with_its_unlabelled_and_no_data_pixels_ignored(sections_dir):
    for files in list_sections(sections_dir)[0]:
        section = load_section(files)
        np.testing.assert_array_equal(section.labels, expected_labels(sections_dir, files.name))
        assert section.grey.dtype == np.float32 and 0 <= section.grey.min() and section.grey.max() <= 1
    alpha = load_section(list_sections(sections_dir)[0][0])
    assert alpha.labelled_pixels == 3 * T * T  # the absent cell carries no label


def test_a_mask_of_another_size_is_refused(sections_dir, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(sections_dir, folder)
    Image.fromarray(np.zeros((T, T), np.uint8)).save(folder / "beta_mask.png")
    beta = list_sections(folder)[0][1]
    with pytest.raises(DatasetError) as info:
        load_section(beta)
    assert str(info.value) == (f"{folder / 'beta_mask.png'}: mask is 101x101 pixels but beta.png is 101x303; a mask "
                               "must be the size of its section")


def test_a_mask_value_other_than_0_128_255_is_refused(sections_dir, tmp_path):
    mask = np.asarray(Image.open(sections_dir / "alpha_mask.png")).copy()
    mask[5, 5] = 77
    path = tmp_path / "alpha_mask.png"
    Image.fromarray(mask).save(path)
    with pytest.raises(DatasetError) as info:
        read_section_mask(path)
    assert str(info.value) == (f"{path}: mask values [77] are not allowed; a mask holds 0 (background), 255 (salt), "
                               "128 (not interpreted)")
    assert "\n" not in str(info.value)


def test_a_mask_without_its_section_is_refused(sections_dir, tmp_path):
    folder = tmp_path / "orphan"
    shutil.copytree(sections_dir, folder)
    (folder / "gamma.png").unlink()
    with pytest.raises(DatasetError) as info:
        list_sections(folder)
    assert str(info.value) == (f"{folder / 'gamma_mask.png'}: a mask without its section gamma.png (.tif, .npy); "
                               "add the section or remove the mask")


def test_a_folder_without_labelled_sections_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"no labelled section .*saltkit mosaic DATA NAME --out DIR"):
        list_sections(tmp_path)


# ---------------------------------------------------------------- folds by section


def test_folds_keep_each_section_whole_and_balance_labelled_pixels():
    names = [f"s{i:02d}" for i in range(11)]
    counts = [50_000, 40_000, 30_000, 30_000, 20_000, 10_000, 10_000, 5_000, 5_000, 2_000, 1_000]
    df = section_folds(names, counts, k=3, seed=0)
    assert list(df.columns) == ["name", "fold"] and sorted(df["name"]) == names
    assert df["name"].is_unique  # a section is in one fold: its windows never fall on both sides
    totals = pd.Series(counts, index=names)[df["name"]].groupby(df["fold"].to_numpy()).sum()
    assert sorted(totals.index) == [0, 1, 2] and totals.max() - totals.min() <= max(counts) // 2
    shuffled = section_folds(names[::-1], counts[::-1], k=3, seed=0)
    pd.testing.assert_frame_equal(df, shuffled)  # deterministic: the order of the input does not matter
    # every fold gets a section, even when one section holds most of the pixels
    few = section_folds(["big", "a", "b"], [1_000_000, 10, 10], k=3)
    assert sorted(few["fold"]) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"k=4 folds needs 2 <= k <= number of sections \(3\)"):
        section_folds(["a", "b", "c"], [1, 2, 3], k=4)


def test_section_folds_file_is_written_once_and_checked(sections_dir, tmp_path):
    path = tmp_path / "folds.csv"
    df = ensure_section_folds(sections_dir, path, k=3)
    assert path.read_text().splitlines()[0] == "name,fold"
    pd.testing.assert_frame_equal(read_section_folds(path, 3), df)
    assert sorted(df["fold"]) == [0, 1, 2]
    other = tmp_path / "other"
    shutil.copytree(sections_dir, other)
    for suffix in (".png", "_mask.png"):
        (other / f"gamma{suffix}").rename(other / f"omega{suffix}")
    with pytest.raises(DatasetError, match=r"folds.csv: its sections differ from those of .*other \(in gamma, omega\)"):
        ensure_section_folds(other, path, k=3)


# ---------------------------------------------------------------- training windows


def windows_of(sections_dir: Path, total: int, seed: int = 0) -> list[dict]:
    sections = [load_section(f) for f in list_sections(sections_dir)[0]]
    dataset = SectionWindows(sections, window_counts([s.labelled_pixels for s in sections], total))
    dataset.draw.set_random_state(seed)
    return [dataset[i] for i in range(len(dataset))]


def test_windows_carry_the_ignored_label_and_never_come_out_unlabelled(sections_dir):
    items = windows_of(sections_dir, 300)
    assert len(items) == 300
    labels = {name: expected_labels(sections_dir, name) for name in LAYOUT}
    seen_ignored = set()
    for item in items:
        name, corner = item["id"].split("@")
        y, x = map(int, corner.split(","))
        assert item["image"].shape == (1, T, T) and item["label"].shape == (1, T, T)
        assert item["image"].dtype == torch.float32 and 0 <= item["image"].min() and item["image"].max() <= 1
        label = item["label"][0].numpy()
        assert set(np.unique(label)) <= {0.0, 1.0, IGNORE_LABEL}
        assert (label != IGNORE_LABEL).any()  # redrawn until it holds a labelled pixel
        full = labels[name]
        if full.shape[0] < T:  # gamma: 70 rows, reflect-padded; the padding carries no label
            assert y == 0 and (label[70:] == IGNORE_LABEL).all()
            np.testing.assert_array_equal(label[:70], full[:, x:x + T])
        else:
            np.testing.assert_array_equal(label, full[y:y + T, x:x + T])
        if (label == IGNORE_LABEL).any():
            seen_ignored.add(name)
    assert seen_ignored == {"alpha", "beta", "gamma"}  # no data, not interpreted, padding
    # windows are shared out by labelled pixels: alpha 3 cells, beta 2, gamma 70 x 202 px
    counts = pd.Series([it["id"].split("@")[0] for it in items]).value_counts()
    assert counts["alpha"] > counts["beta"] > counts["gamma"] >= 1


def test_windows_are_drawn_alike_under_one_seed(sections_dir):
    first = [it["id"] for it in windows_of(sections_dir, 20, seed=3)]
    assert first == [it["id"] for it in windows_of(sections_dir, 20, seed=3)]
    assert first != [it["id"] for it in windows_of(sections_dir, 20, seed=4)]


def test_windows_per_epoch_default_to_labelled_pixels_per_tile():
    assert window_counts([3 * T * T, 2 * T * T, 70 * 202]) == [3, 2, 1]
    assert window_counts([10, 10, 10_000]) == [1, 1, 1]  # at least one per section
    assert window_counts([3 * T * T, T * T], total=10) == [7, 3]


def test_section_cells_score_the_labelled_cells_of_a_grid_from_the_origin():
    label = torch.full((1, 1, 150, 250), IGNORE_LABEL)
    label[..., :101, :101] = 1.0
    label[..., 120:, 210:] = 0.0  # a corner of the last cell, which the grid pads
    prob = torch.full((1, 1, 150, 250), 0.9)
    data = {"id": ["s"], "image": torch.rand(1, 3, 150, 250), "label": label, "pred": {"prob": prob}}
    out = SectionCellsd()(data)
    assert out["id"] == ["s cell 0,0", "s cell 1,2"]
    assert out["tile_pred"].shape == out["tile_label"].shape == (2, 1, T, T) and out["image"].shape == (2, 3, T, T)
    assert (out["tile_label"][0] == 1).all() and (out["tile_pred"][0] == 1).all()
    corner = out["tile_label"][1, 0]
    assert (corner[19:49, 8:48] == 0).all() and (corner == 0).sum() == 30 * 40
    assert out["tile_pred"][1].sum() == 30 * 40  # salt predicted on the labelled pixels only
    assert grid_cells(torch.zeros(1, 1, 150, 250)).shape == (6, 1, T, T)


# ---------------------------------------------------------------- training on sections


@pytest.fixture(autouse=True)
def _restore_track_meta():
    yield
    set_track_meta(True)  # a failed run may leave MONAI's MetaTensor tracking off


TINY = {"num_folds": 3, "fold": 0, "batch_size": 4, "section_windows_per_epoch": 8, "num_filters": 4,
        "warmup_epochs": 1, "learning_rate": 0.003, "progress": False, "cache_rate": 0.0}


def run_on_sections(sections: Path, run_dir: Path, folds_csv: Path, **overrides):
    args = {**TINY, "sections_dir": str(sections), "run_dir": str(run_dir), "folds_csv": str(folds_csv), **overrides}
    bundle_run("training", config_file=[str(CONFIGS / "train.json"), str(REPO / "configs/pad.json")],
               logging_file=False, **args)


@pytest.fixture(scope="module")
def sections_run(sections_dir, tmp_path_factory):
    """Two epochs on the windows of two sections, validated on the third, whole; returns the run folder and
    what the evaluator saw (its batches' ids and input shapes)."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("section_runs")
    args = {**TINY, "sections_dir": str(sections_dir), "run_dir": str(root / "run"),
            "folds_csv": str(root / "folds.csv"), "max_epochs": 2}
    workflow = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(REPO / "configs/pad.json")],
                              workflow_type="train", logging_file=False, **args)
    try:
        workflow.initialize()
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        trainer = workflow.parser.get_parsed_content("train#trainer")
        seen = {"val_ids": [], "val_shapes": [], "train_ids": []}
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (
            seen["val_ids"].append(list(e.state.output["id"]) if "id" in e.state.output else list(e.state.batch["id"])),
            seen["val_shapes"].append(tuple(e.state.batch["image"].shape))))
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen["train_ids"].append(list(e.state.batch["id"])))
        workflow.run()
        workflow.finalize()
    finally:
        torch.set_num_threads(threads)
    return root / "run", root / "folds.csv", seen


@pytest.mark.slow
def test_training_on_sections_validates_whole_held_out_sections(sections_run, sections_dir):
    run_dir, folds_csv, seen = sections_run
    folds = read_section_folds(folds_csv)
    held_out = set(folds["name"][folds["fold"] == 0])
    assert held_out == {"alpha"}  # the largest section takes fold 0
    # training windows come from the other sections only, 8 per epoch in batches of 4
    assert len(seen["train_ids"]) == 4 and all(len(ids) == 4 for ids in seen["train_ids"])
    assert {i.split("@")[0] for ids in seen["train_ids"] for i in ids} <= {"beta", "gamma"}
    # validation: alpha whole (202 x 202), scored on its three labelled cells; the absent cell is left out
    assert seen["val_shapes"] == [(1, 3, 202, 202)] * 2
    assert seen["val_ids"][0] == ["alpha cell 0,0", "alpha cell 0,1", "alpha cell 1,0"]
    best = torch.load(run_dir / "best_metric.pt", weights_only=True)
    assert best["metric"] == "val_metric" and 0 <= best["score"] <= 1
    assert best["sections"]["dir"] == str(sections_dir.resolve())
    record = json.loads((run_dir / "config.json").read_text())["resolved"]
    sections = record["sections"]
    assert sections["dir"] == str(sections_dir.resolve()) and sections["windows_per_epoch"] == 8
    assert [s["name"] for s in sections["train"]] == ["beta", "gamma"] and sum(s["windows"] for s in sections["train"]) == 8
    assert [s["name"] for s in sections["val"]] == ["alpha"]
    assert all(len(s["fingerprint"]) == 16 for s in sections["train"] + sections["val"])
    assert record["sections_dir"] == str(sections_dir)


@pytest.mark.slow
def test_resume_with_another_sections_folder_is_refused(sections_run, sections_dir, tmp_path):
    run_dir, folds_csv, _ = sections_run
    other = tmp_path / "other"
    shutil.copytree(sections_dir, other)
    mask = np.asarray(Image.open(other / "beta_mask.png")).copy()
    mask[:10] = 128
    Image.fromarray(mask).save(other / "beta_mask.png")
    with pytest.raises(RuntimeError) as info:
        run_on_sections(other, run_dir, folds_csv, max_epochs=3, resume=True)
    cause = info.value.__cause__
    assert isinstance(cause, ConfigError), cause
    assert f"it was trained on the sections of {sections_dir.resolve()}" in str(cause)
    assert f"this config gives the sections of {other.resolve()}" in str(cause)
    assert f"resume with --sections_dir {sections_dir.resolve()}" in str(cause)


@pytest.fixture(scope="module")
def pseudo_sections(tmp_path_factory) -> Path:
    """The sample section (not one of LAYOUT's) pseudo-labelled by a teacher sure of most pixels."""
    from test_pseudo_labels import confident_teacher

    from saltkit.data.layout import sample_dir
    from saltkit.seismic.pseudo_sections import pseudo_label_sections

    root = tmp_path_factory.mktemp("pseudo_sections")
    teacher = confident_teacher(root / "teacher.pt", sample_dir())
    out = root / "round1"
    pseudo_label_sections(REPO / "saltkit/sample_data/sections", [teacher], out, min_confidence=0.0)
    return out


@pytest.mark.slow
def test_pseudo_labelled_sections_fill_their_share_of_every_batch_and_never_validate(sections_dir, pseudo_sections,
                                                                                     tmp_path):
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    args = {**TINY, "sections_dir": str(sections_dir), "run_dir": str(tmp_path / "run"),
            "folds_csv": str(tmp_path / "folds.csv"), "max_epochs": 2, "pseudo_dir": str(pseudo_sections),
            "pseudo_share": 0.5}
    workflow = ConfigWorkflow(config_file=[str(CONFIGS / "train.json"), str(REPO / "configs/pad.json")],
                              workflow_type="train", logging_file=False, **args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        workflow.initialize()
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        trainer = workflow.parser.get_parsed_content("train#trainer")
        seen = {"train": [], "val": []}
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen["train"].append(list(e.state.batch["id"])))
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen["val"].append(
            list(e.state.output["id"]) if "id" in e.state.output else list(e.state.batch["id"])))
        workflow.run()
        workflow.finalize()
    finally:
        torch.set_num_threads(threads)
    # an epoch passes once over the 8 labelled windows, 2 in each batch of 4 beside 2 pseudo-labelled windows
    assert len(seen["train"]) == 2 * 4
    for ids in seen["train"]:
        sources = [i.split("@")[0] for i in ids]
        assert set(sources[:2]) <= {"beta", "gamma"} and sources[2:] == ["mosaic_9_127"] * 2
    assert {i.split(" cell")[0] for ids in seen["val"] for i in ids} == {"alpha"}
    record = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert record["pseudo"]["fingerprint"] == json.loads((pseudo_sections / "manifest.json").read_text())["fingerprint"]
    assert record["pseudo"]["sections"] == 1 and record["pseudo"]["per_batch"] == 2
    assert [s["name"] for s in record["sections"]["pseudo"]] == ["mosaic_9_127"]
    assert [s["name"] for s in record["sections"]["val"]] == ["alpha"]


def refusal(sections: Path, tmp_path: Path, **overrides) -> str:
    with pytest.raises(RuntimeError) as info:
        run_on_sections(sections, tmp_path / "run", tmp_path / "folds.csv", **overrides)
    assert isinstance(info.value.__cause__, ConfigError), info.value.__cause__
    assert not (tmp_path / "run").exists()
    return str(info.value.__cause__)


def test_pseudo_labelled_sections_of_the_labelled_folder_are_refused(sections_dir, pseudo_sections, tmp_path):
    labelled = tmp_path / "labelled"
    shutil.copytree(sections_dir, labelled)
    shutil.copy(pseudo_sections / "mosaic_9_127.png", labelled / "mosaic_9_127.png")  # a section labelled as well
    shutil.copy(pseudo_sections / "mosaic_9_127_mask.png", labelled / "mosaic_9_127_mask.png")
    message = refusal(labelled, tmp_path, pseudo_dir=str(pseudo_sections))
    assert "config key 'pseudo_dir'" in message and "mosaic_9_127" in message
    assert f"--exclude-dataset {labelled}" in message


def test_pseudo_labelled_sections_need_labelled_sections_and_tiles_need_tiles(sections_dir, pseudo_sections,
                                                                               sample_dir, tmp_path):
    with pytest.raises(RuntimeError) as info:
        bundle_run("training", config_file=[str(CONFIGS / "train.json"), str(REPO / "configs/pad.json")],
                   logging_file=False, **{**TINY, "dataset_dir": str(sample_dir), "run_dir": str(tmp_path / "t"),
                                          "pseudo_dir": str(pseudo_sections)})
    assert "holds pseudo-labelled sections" in str(info.value.__cause__) and "--sections_dir" in str(info.value.__cause__)
    assert not (tmp_path / "t").exists()
    # a set of tiles beside sections
    from test_pseudo_labels import confident_teacher

    from saltkit.inference.pseudo_labels import pseudo_label

    teacher = confident_teacher(tmp_path / "teacher.pt", sample_dir)
    pseudo_label(sample_dir / "test" / "images", [teacher], tmp_path / "tiles", 0.0)
    message = refusal(sections_dir, tmp_path, pseudo_dir=str(tmp_path / "tiles"))
    assert "holds pseudo-labelled tiles" in message and "--sections" in message
