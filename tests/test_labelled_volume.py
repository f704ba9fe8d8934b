"""`saltkit sections`: a SEG-Y volume and its mask volume (1 / 0 / -1) as labelled sections with folds by inline
range; bad mask volumes refused by name; and the survey round trip: the volume's sections fine-tune a teacher
(init_ckpt), its unlabelled lines are pseudo-labelled, and the fine-tuned model predicts the volume back in its
own geometry.

The volume holds real sample tiles as its inlines, the mask volume their real masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_pseudo_labels import confident_teacher
from test_sections import run_on_sections

from saltkit.cli import main
from saltkit.data.labelled_sections import list_sections, read_section_folds
from saltkit.data.layout import load_image, load_mask, sample_dir, train_items
from saltkit.seismic import pseudo_sections as ps
from saltkit.seismic.labelled_volume import inline_ranges, volume_to_sections

segyio = pytest.importorskip("segyio")
N = 6  # inlines


def write_volume(path, sections: np.ndarray) -> None:
    """(inlines, samples, crosslines) sections -> SEG-Y (inlines 1.., crosslines 1.., traces of samples)."""
    segyio.tools.from_array(str(path), np.ascontiguousarray(sections.transpose(0, 2, 1)).astype(np.float32))


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """(volume, mask volume, tiles, labels): six real tiles and their masks; inline 2's right third and all of
    inline 5 are not interpreted (-1)."""
    items = train_items(sample_dir())[:N]
    tiles = np.stack([load_image(it["image"]) for it in items]).astype(np.float32)
    labels = np.stack([load_mask(it["label"]) for it in items]).astype(np.float32)
    labels[2, :, 67:] = -1
    labels[5] = -1
    root = tmp_path_factory.mktemp("survey")
    write_volume(root / "survey.sgy", tiles)
    write_volume(root / "survey_mask.sgy", labels)
    return root / "survey.sgy", root / "survey_mask.sgy", tiles, labels


def read_mask(folder, name) -> np.ndarray:
    return np.asarray(Image.open(folder / f"{name}_mask.png"))


def test_inline_ranges_are_contiguous_and_cover_every_inline():
    assert inline_ranges(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    assert [len(r) for r in inline_ranges(10, 3)] == [3, 4, 3]
    with pytest.raises(ValueError, match="--k must be between 2 and the number of inlines"):
        inline_ranges(3, 4)


def test_inlines_and_crossline_pieces_carry_the_mask_and_never_cross_a_fold(survey, tmp_path):
    volume, mask, tiles, labels = survey
    out = tmp_path / "sections"
    summary = volume_to_sections(volume, mask, out, direction="both", k=3)
    names = {s.name for s in list_sections(out)[0]}
    inlines = {f"survey_inline_{n}" for n in range(1, N)}  # inline 6 (index 5) has no labelled pixel
    pieces = {f"survey_crossline_{x}_inlines_{a}-{b}" for x in range(1, 102) for a, b in ((1, 2), (3, 4), (5, 6))}
    assert names == inlines | pieces and summary["sections"] == len(names)
    assert summary["inline_ranges"] == [[1, 2], [3, 4], [5, 6]]
    for k in range(N - 1):  # each inline's mask is the tile's real mask; -1 became 128
        expected = np.where(labels[k] == -1, 128, labels[k] * 255)
        np.testing.assert_array_equal(read_mask(out, f"survey_inline_{k + 1}"), expected)
    # crossline 40 over inlines 3-4: columns are inlines, rows samples
    piece = read_mask(out, "survey_crossline_40_inlines_3-4")
    expected = np.where(labels[2:4, :, 39] == -1, 128, labels[2:4, :, 39] * 255).T
    np.testing.assert_array_equal(piece, expected)
    # folds: fold j holds inline range j and only its crossline pieces, so no held-out pixel trains
    folds = read_section_folds(summary["folds_csv"])
    fold_of = dict(zip(folds["name"], folds["fold"], strict=True))
    assert [fold_of[f"survey_inline_{n}"] for n in range(1, N)] == [0, 0, 1, 1, 2]
    assert all(fold_of[p] == ["1-2", "3-4", "5-6"].index(p.rsplit("_", 1)[1]) for p in pieces)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mask"] == str(mask.resolve()) and manifest["folds"]["k"] == 3
    assert {it["name"] for it in manifest["items"]} == names
    assert all(it["line"] in range(1, 102) and it["direction"] in ("inline", "crossline")
               for it in manifest["items"])


def test_a_mask_volume_of_another_geometry_is_refused_by_name(survey, tmp_path):
    volume, _, _, labels = survey
    other = tmp_path / "short_mask.sgy"
    write_volume(other, labels[:4].clip(min=0))
    with pytest.raises(ValueError, match=r"short_mask.sgy: the mask volume's geometry differs from the volume's "
                                         r"\(inlines 1-4 x crosslines 1-101, not 1-6 x 1-101\)"):
        volume_to_sections(volume, other, tmp_path / "out")
    shorter = tmp_path / "shorter_mask.sgy"
    write_volume(shorter, labels[:, :90].clip(min=0))
    with pytest.raises(ValueError, match=r"shorter_mask.sgy: .* \(90 samples per trace, not 101\)"):
        volume_to_sections(volume, shorter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mask_values_other_than_1_0_minus_1_are_refused_and_nothing_is_left(survey, tmp_path):
    volume, _, _, labels = survey
    bad = tmp_path / "bad_mask.sgy"
    write_volume(bad, np.where(labels == 1, 255, labels))
    with pytest.raises(ValueError, match=r"bad_mask.sgy: mask values \[255.0\] are not allowed"):
        volume_to_sections(volume, bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_mask.sgy"]


@pytest.mark.slow
def test_a_survey_round_trip_fine_tunes_a_teacher_and_predicts_the_volume_back(survey, tmp_path, capsys, caplog):
    volume, mask, _, _ = survey
    arch = {"backbone": "resnet18", "num_filters": 4, "upsample_input": False}
    teacher = confident_teacher(tmp_path / "teacher.pt", sample_dir())
    out = tmp_path / "labelled"
    assert main(["sections", str(volume), "--mask", str(mask), "--out", str(out), "--k", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"folds by inline range (1-2, 3-4, 5-6) in {out / 'folds-k3.csv'}" in printed
    # the unlabelled lines of the survey pseudo-labelled by the teacher: a sections folder as well
    pseudo = tmp_path / "pseudo"
    ps.pseudo_label_sections(volume, [teacher], pseudo, min_confidence=0.0)
    assert len(list_sections(pseudo)[0]) == N
    # fine-tune the teacher on the labelled inlines, fold 0 (inlines 1-2) held out; then on its pseudo-labels
    run = tmp_path / "run"
    caplog.set_level("INFO")
    run_on_sections(out, run, out / "folds-k3.csv", init_ckpt=str(teacher), max_epochs=1, **arch)
    assert "(8 training section windows, batch 4), validating 2 whole sections" in caplog.text
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["init_ckpt"]["path"] == str(teacher.resolve())
    best = torch.load(run / "best_metric.pt", weights_only=True)
    assert best["metric"] == "val_metric" and 0 <= best["score"] <= 1  # scored on the held-out inlines
    student = tmp_path / "student"
    run_on_sections(pseudo, student, tmp_path / "pseudo_folds.csv", init_ckpt=str(run / "last.pt"), max_epochs=1,
                    **arch)
    # the fine-tuned model predicts the volume back in its geometry
    pred = tmp_path / "salt.sgy"
    assert main(["predict", str(volume), "--ckpt", str(student / "last.pt"), "--out", str(pred)]) == 0
    with segyio.open(volume) as src, segyio.open(pred) as dst:
        assert list(dst.ilines) == list(src.ilines) and list(dst.xlines) == list(src.xlines)
        prob = segyio.tools.cube(dst)
    assert prob.shape == (N, 101, 101) and 0 <= prob.min() and prob.max() <= 1
