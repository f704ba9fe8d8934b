"""`saltkit pseudo-label` on the shipped sample's 20 test tiles: a dataset that check-data accepts, masks equal to the
teacher's post-processed predictions (as the inference workflow makes them), a manifest that traces each tile,
selection by confidence, labelled ids left out, several teachers averaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run as bundle_run

from saltkit.checkpoints import weights_fingerprint
from saltkit.cli import main
from saltkit.data.layout import load_mask, read_rle_masks, train_items
from saltkit.data.layout import test_items as list_test_items
from saltkit.data.pseudo import MANIFEST, read_pseudo_set
from saltkit.inference import PostProcessingSettings, load_probabilities, postprocess
from saltkit.inference.pseudo_labels import (
    CERTAIN_HIGH,
    CERTAIN_LOW,
    DEFAULT_MIN_CONFIDENCE,
    load_teachers,
    predict_tiles,
    pseudo_label,
    teacher_postprocessing,
    tile_confidence,
)
from saltkit.networks import SaltUNet
from saltkit.submission import read_submission, submission_masks
from saltkit.transforms import tile_inputs

REPO = Path(__file__).resolve().parents[1]
INFERENCE = REPO / "bundles/saltnet/configs/inference.json"
TUNED = {"threshold": 0.4, "min_component_size": 30, "image_threshold": None, "min_area": 300,
         "metric_before": None, "metric_after": None, "metric_heldout": None, "tuned_on": {}}


def confident_teacher(path: Path, sample_dir: Path, seed: int = 0, variant: str = "pad", tuned: dict | None = TUNED):
    """A small SaltUNet whose outputs are spread out like a trained model's (random weights give probabilities near
    0.5): the final logit scaled up, the image logit scaled and centred on the sample's test tiles; saved with a
    tuned post-processing entry."""
    torch.manual_seed(seed)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False).eval()
    with torch.no_grad():
        net.final[2].weight.mul_(3000)
        net.final[2].bias.zero_()
        tiles = [it["image"] for it in list_test_items(sample_dir)][:8]
        x = torch.stack([tile_inputs(variant, "image")({"image": t})["image"] for t in tiles])
        logits = net(x).image_logit.flatten()
        net.image_logit.weight.mul_(2 / float(logits.std()))
        net.image_logit.bias.sub_(float(net(x).image_logit.mean()))
    ckpt = {"network": net.state_dict(), "arch": net.arch, "variant": variant, "epoch": 7}
    if tuned is not None:
        ckpt["postprocessing"] = dict(tuned)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def teacher(sample_dir, tmp_path_factory) -> Path:
    return confident_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", sample_dir)


@pytest.fixture(scope="module")
def made(sample_dir, teacher, tmp_path_factory) -> Path:
    """Every one of the 20 test tiles pseudo-labelled (--min-confidence 0)."""
    out = tmp_path_factory.mktemp("sets") / "all"
    summary = pseudo_label(sample_dir / "test" / "images", [teacher], out, min_confidence=0.0)
    assert summary["predicted"] == summary["kept"] == 20
    return out


def test_the_set_is_a_dataset_that_check_data_accepts(made, capsys):
    assert main(["check-data", str(made)]) == 0
    assert "ok: 20 train tiles with masks" in capsys.readouterr().out
    assert {p.name for p in made.iterdir()} == {"train", "train.csv", MANIFEST}
    assert not list(made.parent.glob(".*partial*"))  # written beside it, then renamed into place


def test_masks_are_the_teachers_post_processed_predictions(made, teacher, sample_dir, tmp_path):
    """The inference workflow, run with the same checkpoint on the same tiles, writes the same masks: flip TTA and
    the post-processing tuned into the checkpoint."""
    bundle_run("inference", config_file=str(INFERENCE), ckpt=str(teacher), dataset_dir=str(sample_dir),
               output_dir=str(tmp_path), progress=False, logging_file=False)
    sub = read_submission(tmp_path / "submission.csv").set_index("id")
    ids = [it["id"] for it in train_items(made)]
    inferred = submission_masks(sub.loc[ids].reset_index(), tmp_path / "submission.csv")
    df, pseudo = read_rle_masks(made / "train.csv")
    pseudo = pseudo[np.argsort(df["id"].to_numpy())]
    pngs = np.stack([load_mask(made / "train" / "masks" / f"{i}.png") for i in ids])
    assert (pngs == pseudo).all()  # train.csv and the mask PNGs agree
    assert (pseudo != inferred).mean() < 1e-4  # a pixel right at the threshold may flip (other batch sizes)
    # the tuned settings were applied: plain thresholding of the same probabilities gives other masks
    probs = load_probabilities(tmp_path / "probabilities.npz")
    order = np.argsort(probs.ids)
    plain = postprocess(probs.probs[order], probs.image_probs[order], PostProcessingSettings())
    assert (plain != pseudo).mean() > 0.01
    areas = pseudo.sum(axis=(1, 2))
    assert ((areas == 0) | (areas >= TUNED["min_area"])).all() and (areas == 0).any() and (areas > 0).any()
    manifest = json.loads((made / MANIFEST).read_text())
    assert manifest["postprocessing"] == {k: TUNED[k] for k in ("threshold", "min_component_size",
                                                                "image_threshold", "min_area")}


def test_the_manifest_traces_each_tile(made, teacher, sample_dir):
    manifest = json.loads((made / MANIFEST).read_text())
    ckpt = torch.load(teacher, weights_only=True)
    assert manifest["variant"] == "pad" and manifest["tta"] is True
    assert manifest["teachers"] == [{"ckpt": str(teacher.resolve()), "weights": weights_fingerprint(ckpt["network"]),
                                     "variant": "pad", "arch": ckpt["arch"], "epoch": 7, "postprocessing": TUNED}]
    assert manifest["source"] == str((sample_dir / "test" / "images").resolve())
    assert manifest["fingerprint"] == read_pseudo_set(made).fingerprint
    sources = {it["id"]: it for it in list_test_items(sample_dir)}
    assert sorted(it["id"] for it in manifest["items"]) == sorted(sources)
    for item in manifest["items"]:
        source = Path(item["source"])
        assert source == Path(sources[item["id"]]["image"]).resolve()
        assert (made / "train" / "images" / f"{item['id']}.png").read_bytes() == source.read_bytes()
        mask = load_mask(made / "train" / "masks" / f"{item['id']}.png")
        assert item["coverage"] == pytest.approx(mask.mean(), abs=1e-6)
        assert 0 <= item["confidence"] <= item["pixel_certainty"] <= 1 and item["kept"] is True
        has_salt = mask.any()
        agree = item["image_prob"] if has_salt else 1 - item["image_prob"]
        assert item["confidence"] == pytest.approx(item["pixel_certainty"] * max(0.0, 2 * agree - 1), abs=1e-5)
    assert manifest["confidence"]["low"] == CERTAIN_LOW and manifest["confidence"]["high"] == CERTAIN_HIGH
    assert sum(r["predicted"] for r in manifest["coverage_classes"]) == 20


def test_confidence_selects_the_tiles_kept(made, teacher, sample_dir, tmp_path, capsys):
    items = json.loads((made / MANIFEST).read_text())["items"]
    confidence = {it["id"]: it["confidence"] for it in items}
    cut = float(np.median(list(confidence.values())))
    out = tmp_path / "confident"
    assert main(["pseudo-label", str(sample_dir / "test" / "images"), "--ckpt", str(teacher), "--out", str(out),
                 "--min-confidence", str(cut)]) == 0
    printed = capsys.readouterr().out
    kept = {it["id"] for it in train_items(out)}
    assert kept == {i for i, c in confidence.items() if c >= cut} and 0 < len(kept) < 20
    manifest = json.loads((out / MANIFEST).read_text())
    assert {it["id"] for it in manifest["items"] if it["kept"]} == kept and len(manifest["items"]) == 20
    assert manifest["confidence"]["min_confidence"] == cut
    # the report: per predicted coverage class (empty, then tenths), tiles predicted and kept
    rows = {line.split()[0]: line.split()[1:3] for line in printed.splitlines()
            if line and line.split()[0] in ("empty", "all") or line[:1].isdigit()}
    assert list(rows)[:2] == ["empty", "0-10%"] and list(rows)[-2:] == ["90-100%", "all"]
    assert rows["all"] == ["20", str(len(kept))]
    empty = [it for it in items if it["coverage"] == 0]
    assert rows["empty"] == [str(len(empty)), str(sum(it["id"] in kept for it in empty))]
    assert f"kept {len(kept)} of 20 tiles (confidence >= {cut})" in printed
    assert "min_component_size 30" in printed and "as stored in" in printed  # the tuned settings, said where from


def test_confidence_rule():
    probs = np.full((3, 10, 10), 0.95, dtype=np.float32)
    probs[1, :5] = 0.5  # half the pixels uncertain
    probs[2] = 0.02  # a certain empty tile
    masks = (probs > 0.5).astype(np.uint8)
    scores = tile_confidence(probs, np.array([0.9, 0.9, 0.9]), masks)
    assert scores["pixel_certainty"] == pytest.approx([1, 0.5, 1])
    # the image head agrees with tiles 0 and 1 (salt, p 0.9: certainty 0.8), disagrees with the empty tile 2
    assert scores["confidence"] == pytest.approx([0.8, 0.4, 0.0])
    assert tile_confidence(probs, None, masks)["confidence"] == pytest.approx([1, 0.5, 1])  # no image head


def test_labelled_ids_are_never_pseudo_labelled(teacher, sample_dir, tmp_path, capsys):
    tiles = tmp_path / "tiles"
    shutil.copytree(sample_dir / "test" / "images", tiles)
    labelled = sorted(p.stem for p in (sample_dir / "train" / "images").iterdir())[:3]
    for i in labelled:
        shutil.copy(sample_dir / "train" / "images" / f"{i}.png", tiles)
    assert main(["pseudo-label", str(tiles), "--ckpt", str(teacher), "--out", str(tmp_path / "set"),
                 "--min-confidence", "0", "--exclude-dataset", str(sample_dir)]) == 0
    assert f"skipped 3 labelled tile(s) of {sample_dir}" in capsys.readouterr().out
    ids = {it["id"] for it in train_items(tmp_path / "set")}
    assert len(ids) == 20 and not ids & set(labelled)
    manifest = json.loads((tmp_path / "set" / MANIFEST).read_text())
    assert manifest["excluded"] == {"dataset": str(sample_dir.resolve()), "ids": labelled}
    assert not {it["id"] for it in manifest["items"]} & set(labelled)


def test_several_teachers_are_averaged(teacher, sample_dir, tmp_path):
    other = confident_teacher(tmp_path / "other.pt", sample_dir, seed=1,
                              tuned={**TUNED, "threshold": 0.6})
    items = [{"image": it["image"], "id": it["id"]} for it in list_test_items(sample_dir)]
    (a,), (b,) = load_teachers([teacher]), load_teachers([other])
    both = predict_tiles([a, b], items)
    alone = [predict_tiles([t], items) for t in (a, b)]
    np.testing.assert_allclose(both.probs, (alone[0].probs + alone[1].probs) / 2, atol=1e-6)
    np.testing.assert_allclose(both.image_probs, (alone[0].image_probs + alone[1].image_probs) / 2, atol=1e-6)
    # the tuned values they agree on are used; the threshold they disagree on falls back to the plain default
    settings, line = teacher_postprocessing([a, b])
    assert settings == PostProcessingSettings(0.5, 30, None, 300)
    assert "the teachers' values [0.4, 0.6] differ" in line
    assert teacher_postprocessing([a, b], threshold=0.45)[0].threshold == 0.45  # a value given wins


def test_teachers_of_two_variants_are_refused(teacher, sample_dir, tmp_path, capsys):
    resize = confident_teacher(tmp_path / "resize.pt", sample_dir, variant="resize")
    code = main(["pseudo-label", str(sample_dir), "--ckpt", str(teacher), str(resize), "--out", str(tmp_path / "s")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the teachers are of different variants" in err[0]
    assert not (tmp_path / "s").exists()


def test_what_cannot_be_written_fails_before_the_work(teacher, sample_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    assert main(["pseudo-label", str(sample_dir), "--ckpt", str(teacher), "--out", str(tmp_path / "full")]) == 2
    assert f"--out {tmp_path / 'full'} exists and is not an empty folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"no tile reached --min-confidence 1.0 \(the highest confidence is"):
        pseudo_label(sample_dir, [teacher], tmp_path / "none", min_confidence=1.0, threshold=0.5, min_area=0,
                     min_component_size=0)
    assert not (tmp_path / "none").exists() and not list(tmp_path.glob(".none.partial*"))


def test_default_min_confidence_is_the_command_lines():
    from saltkit.cli.inference_commands import MIN_CONFIDENCE

    assert MIN_CONFIDENCE == DEFAULT_MIN_CONFIDENCE


def test_saved_probabilities_teach_like_the_checkpoint_that_wrote_them(teacher, sample_dir, tmp_path, capsys):
    """`saltkit inference`'s probabilities.npz as the teacher gives the checkpoint's own pseudo-labels (the same
    post-processing given); averaged with a checkpoint, each counts once; missing tiles or variant refused."""
    bundle_run("inference", config_file=str(INFERENCE), ckpt=str(teacher), dataset_dir=str(sample_dir),
               output_dir=str(tmp_path / "inf"), progress=False, logging_file=False)
    saved = tmp_path / "inf" / "probabilities.npz"
    post = ["--threshold", "0.4", "--min-component-size", "30", "--image-threshold", "none", "--min-area", "300",
            "--min-confidence", "0"]
    assert main(["pseudo-label", str(sample_dir), "--ckpt", str(teacher), "--out", str(tmp_path / "ckpt"), *post]) == 0
    assert main(["pseudo-label", str(sample_dir), "--probabilities", str(saved), "--variant", "pad",
                 "--out", str(tmp_path / "npz"), *post]) == 0
    assert "(saved probabilities carry no tuned values)" in capsys.readouterr().out
    (_, from_ckpt), (_, from_npz) = (read_rle_masks(tmp_path / d / "train.csv") for d in ("ckpt", "npz"))
    assert from_ckpt.shape == from_npz.shape and (from_ckpt != from_npz).mean() < 1e-4
    manifest = json.loads((tmp_path / "npz" / MANIFEST).read_text())
    [record] = manifest["teachers"]
    assert record["probabilities"] == str(saved.resolve()) and len(record["sha256"]) == 16
    assert manifest["variant"] == "pad" and read_pseudo_set(tmp_path / "npz").variant == "pad"
    # a checkpoint and a probabilities file: one share each
    other = confident_teacher(tmp_path / "other.pt", sample_dir, seed=1)
    items = [{"image": it["image"], "id": it["id"]} for it in list_test_items(sample_dir)]
    summary = pseudo_label(sample_dir, [other], tmp_path / "both", probabilities=[saved], min_confidence=0.0,
                           threshold=0.5, min_component_size=0, image_threshold=None, min_area=0)
    assert summary["kept"] == len(items)
    mixed = json.loads((tmp_path / "both" / MANIFEST).read_text())
    assert [("ckpt" in t, "probabilities" in t) for t in mixed["teachers"]] == [(True, False), (False, True)]
    expected = (predict_tiles(load_teachers([other]), items).probs + load_probabilities(saved).probs[
        np.argsort(load_probabilities(saved).ids)]) / 2 > 0.5
    _, masks = read_rle_masks(tmp_path / "both" / "train.csv")
    assert (masks != expected).mean() < 1e-4
    # refused, by name
    assert main(["pseudo-label", str(sample_dir), "--probabilities", str(saved), "--out", str(tmp_path / "x")]) == 2
    assert "--variant: pseudo-labels from saved probabilities" in capsys.readouterr().err
    np.savez(tmp_path / "few.npz", ids=np.asarray(["a"]), probs=np.zeros((1, 101, 101), np.uint16))
    assert main(["pseudo-label", str(sample_dir), "--probabilities", str(tmp_path / "few.npz"), "--variant", "pad",
                 "--out", str(tmp_path / "x")]) == 2
    assert "few.npz: holds no probabilities for 20 of the tiles to pseudo-label" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_bundle_workflow_writes_the_commands_set(made, teacher, sample_dir, tmp_path):
    """bundles/saltnet/configs/pseudo_label.json runs what `saltkit pseudo-label` runs: the same masks and items."""
    bundle_run("pseudo_label", config_file=str(INFERENCE.parent / "pseudo_label.json"), input=str(sample_dir),
               output=str(tmp_path / "set"), ckpt=str(teacher), min_confidence=0.0, device="cpu", progress=False,
               logging_file=False)
    assert (read_rle_masks(tmp_path / "set" / "train.csv")[1] == read_rle_masks(made / "train.csv")[1]).all()
    ours, theirs = (json.loads((d / MANIFEST).read_text()) for d in (tmp_path / "set", made))
    assert [it["id"] for it in ours["items"]] == [it["id"] for it in theirs["items"]]
    assert ours["teachers"][0]["weights"] == theirs["teachers"][0]["weights"]
    with pytest.raises(RuntimeError) as info:  # a section folder needs a checkpoint, not saved probabilities
        bundle_run("pseudo_label", config_file=str(INFERENCE.parent / "pseudo_label.json"), input=str(sample_dir),
                   output=str(tmp_path / "s"), sections=True, probabilities=["x.npz"], ckpt=None, progress=False,
                   logging_file=False)
    assert "saved probabilities teach tiles" in str(info.value.__cause__)
