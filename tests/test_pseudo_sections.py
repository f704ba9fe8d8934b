"""`saltkit pseudo-label` of whole sections: every line of a SEG-Y volume of real tiles, or section images, into a
sections folder (grey PNG, mask with 128 where the teacher is unsure, a manifest tracing each section to its
file and line), selection by confidence, and no half-written folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pseudo_labels import confident_teacher

from saltkit.cli import main
from saltkit.data.layout import load_image, sample_dir, train_items
from saltkit.data.pseudo import MANIFEST
from saltkit.inference import section_inferer
from saltkit.inference.pseudo_labels import load_teachers
from saltkit.seismic import predict_section
from saltkit.seismic import pseudo_sections as ps

segyio = pytest.importorskip("segyio")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return confident_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", sample_dir())


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Six real tiles as the inlines of a SEG-Y volume (samples down, crosslines across): (6, 101, 101)."""
    tiles = np.stack([load_image(it["image"]) for it in train_items(sample_dir())[:6]]).astype(np.float32)
    src = tmp_path_factory.mktemp("volume") / "survey.sgy"
    segyio.tools.from_array(str(src), np.ascontiguousarray(tiles.transpose(0, 2, 1)))
    return src, tiles


def read_pair(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    grey = np.asarray(Image.open(folder / f"{name}.png"), dtype=np.float64) / 65535
    return grey, np.asarray(Image.open(folder / f"{name}_mask.png"))


def test_every_line_of_a_volume_is_traced_and_labelled_as_the_teacher_predicts(volume, teacher, tmp_path):
    src, tiles = volume
    out = tmp_path / "pseudo"
    summary = ps.pseudo_label_sections(src, [teacher], out, min_confidence=0.0, direction="both")
    manifest = json.loads((out / MANIFEST).read_text())
    with segyio.open(src) as f:
        ilines, xlines = list(f.ilines), list(f.xlines)
    assert summary["predicted"] == manifest["predicted"] == len(ilines) + len(xlines)
    inlines = [it for it in manifest["items"] if it["direction"] == "inline"]
    assert [it["line"] for it in inlines] == ilines
    assert {it["name"] for it in manifest["items"]} == {f"survey_inline_{n}" for n in ilines} | \
        {f"survey_crossline_{n}" for n in xlines}
    assert all(it["file"] == str(src.resolve()) for it in manifest["items"])
    assert manifest["teachers"][0]["weights"] and manifest["clip"]["range"][0] < manifest["clip"]["range"][1]
    [net] = load_teachers([teacher])
    inferer = section_inferer("pad")
    lo, hi = manifest["clip"]["range"]
    for k, n in enumerate(ilines):
        grey, mask = read_pair(out, f"survey_inline_{n}")
        expected_grey = np.clip((tiles[k] - lo) / (hi - lo), 0, 1)  # inline k is tile k
        np.testing.assert_allclose(grey, expected_grey, atol=1 / 65535 + 1e-6)
        # the teacher saw the volume's amplitudes scaled by the clip, before the PNG's 16-bit rounding
        prob = predict_section(net.network, inferer, expected_grey.astype(np.float32))
        assert set(np.unique(mask)) <= {0, 128, 255}
        certain = (prob < 0.1) | (prob > 0.9)
        assert (mask[~certain] == 128).all() and (mask[certain] != 128).all()
        assert ((mask == 255) == (certain & (prob > manifest["threshold"]))).all()
        item = next(it for it in inlines if it["line"] == n)
        assert item["confidence"] == pytest.approx(certain.mean(), abs=1e-6)


def test_min_confidence_keeps_the_confident_sections(volume, teacher, tmp_path):
    src, _ = volume
    everything = ps.pseudo_label_sections(src, [teacher], tmp_path / "all", min_confidence=0.0)
    confidences = sorted(it["confidence"] for it in json.loads((tmp_path / "all" / MANIFEST).read_text())["items"])
    assert everything["kept"] == 6 and confidences[0] < confidences[-1]
    cut = (confidences[2] + confidences[3]) / 2
    ps.pseudo_label_sections(src, [teacher], tmp_path / "cut", min_confidence=cut)
    items = json.loads((tmp_path / "cut" / MANIFEST).read_text())["items"]
    kept = [it["name"] for it in items if it["kept"]]
    assert kept and all((it["confidence"] >= cut) == it["kept"] for it in items)
    assert sorted(p.name for p in (tmp_path / "cut").glob("*_mask.png")) == sorted(f"{n}_mask.png" for n in kept)
    with pytest.raises(ValueError, match="no section reached --min-confidence"):
        ps.pseudo_label_sections(src, [teacher], tmp_path / "none", min_confidence=1.0)


def test_section_images_from_the_command_line(teacher, tmp_path, capsys):
    sections = tmp_path / "sections"
    shutil.copytree(REPO / "saltkit/sample_data/sections", sections)  # a section and its mask beside it
    out = tmp_path / "pseudo"
    assert main(["pseudo-label", str(sections), "--sections", "--ckpt", str(teacher), "--out", str(out),
                 "--min-confidence", "0"]) == 0
    assert "kept 1 of 1 sections" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    [item] = manifest["items"]
    assert item["name"] == "mosaic_9_127" and item["file"].endswith("mosaic_9_127.png")
    grey, mask = read_pair(out, "mosaic_9_127")
    assert grey.shape == mask.shape == np.asarray(Image.open(sections / "mosaic_9_127.png")).shape[:2]


def test_no_half_written_set(volume, teacher, tmp_path, monkeypatch):
    src, _ = volume
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not an empty folder"):
        ps.pseudo_label_sections(src, [teacher], tmp_path / "used")
    calls = []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return predict_section(*args, **kwargs)

    monkeypatch.setattr(ps, "predict_section", dies)
    with pytest.raises(KeyboardInterrupt):
        ps.pseudo_label_sections(src, [teacher], tmp_path / "killed", min_confidence=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]


def test_exclude_dataset_leaves_out_the_labelled_sections(volume, teacher, tmp_path, capsys):
    src, _ = volume
    with segyio.open(src) as f:
        ilines = list(f.ilines)
    labelled = tmp_path / "labelled"  # a labelled sections folder of this volume, as saltkit sections names them
    labelled.mkdir()
    for n in ilines[1:3]:
        (labelled / f"survey_inline_{n}.png").write_bytes(b"")
        (labelled / f"survey_inline_{n}_mask.png").write_bytes(b"")
    out = tmp_path / "pseudo"
    assert main(["pseudo-label", str(src), "--ckpt", str(teacher), "--out", str(out), "--min-confidence", "0",
                 "--exclude-dataset", str(labelled)]) == 0
    assert "skipped 2 labelled section(s)" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert [it["line"] for it in manifest["items"]] == [ilines[0]] + ilines[3:]
    assert manifest["excluded"] == {"dataset": str(labelled.resolve()),
                                    "skipped": [f"survey_inline_{n}" for n in ilines[1:3]]}
    # crosslines would cross the labelled (held-out) inlines: refused before anything is written
    with pytest.raises(ValueError, match="--direction both: .* pseudo-label it with --direction inline"):
        ps.pseudo_label_sections(src, [teacher], tmp_path / "both", min_confidence=0.0, direction="both",
                                 exclude_dataset=labelled)
    assert not (tmp_path / "both").exists()


def test_crosslines_of_a_labelled_volume_are_refused_beside_its_sections(volume, teacher, tmp_path):
    from saltkit.config import ConfigError
    from saltkit.data.pseudo import training_pseudo_set

    src, _ = volume
    with segyio.open(src) as f:
        first = list(f.ilines)[0]
    out = tmp_path / "pseudo"
    ps.pseudo_label_sections(src, [teacher], out, min_confidence=0.0, direction="crossline")
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    (labelled / f"survey_inline_{first}.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="crosslines of a volume whose lines sections_dir .* labels"):
        training_pseudo_set(str(out), "pad", None, str(labelled))
    with pytest.raises(ConfigError, match="holds pseudo-labelled sections, which train beside labelled ones"):
        training_pseudo_set(str(out), "pad", None, None)
    with pytest.raises(ConfigError, match="variant 'pad', this config trains 'resize'"):
        training_pseudo_set(str(out), "resize", None, str(labelled))
