"""Section images of any size: reading (PNG / TIFF / .npy, 8/16-bit, grey in RGB), normalisation to the tiles'
scale, mosaics of real tiles, the predict workflow's outputs and the `saltkit predict` / `saltkit mosaic` commands."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_networks import TinyConv

from saltkit.cli import main
from saltkit.data.layout import load_image, load_mask, sample_dir, train_items
from saltkit.inference import restore_tiles, section_inferer, tile_inferer
from saltkit.networks import SaltUNet
from saltkit.seismic import (
    Normalization,
    assemble_mosaic,
    crop_tiles,
    normalize_section,
    predict_images,
    predict_section,
    read_mosaics,
    read_section,
)
from saltkit.seismic.section_files import list_section_files, outline_overlay, read_section_with_alpha
from saltkit.seismic.validity import fill_no_data
from saltkit.transforms import LoadTiled


@pytest.fixture(scope="module")
def tile_paths():
    return [it["image"] for it in train_items(sample_dir())[:3]]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"network": net.state_dict(), "arch": net.arch, "variant": "pad"}, path)
    return path


def test_read_section_formats_agree(tile_paths, tmp_path):
    """One real tile stored as 8-bit grey, grey in RGB, 16-bit PNG, 16-bit TIFF (little- and big-endian), float
    TIFF and .npy maps to the same [0, 1] section, equal to what training reads (LoadTiled: grey / 255)."""
    tile = load_image(tile_paths[0])
    expected = LoadTiled(keys="image")({"image": tile_paths[0]})["image"][0].numpy()
    stored = {
        "grey.png": tile, "rgb.png": np.repeat(tile[..., None], 3, 2), "rgba.png": np.dstack([tile] * 3 + [tile * 0 + 255]),
        "sixteen.png": tile.astype(np.uint16) * 257, "sixteen.tif": tile.astype(np.uint16) * 257,
        "float.tif": tile.astype(np.float32) / 255,
    }
    for name, arr in stored.items():
        Image.fromarray(arr).save(tmp_path / name)
    np.save(tmp_path / "array.npy", tile)
    big_endian = (tile.astype(np.uint16) * 257).astype(">u2")  # a big-endian 16-bit TIFF, and a .npy of '>u2'
    Image.frombytes("I;16B", (101, 101), big_endian.tobytes()).save(tmp_path / "sixteen_big_endian.tif")
    assert Image.open(tmp_path / "sixteen_big_endian.tif").mode == "I;16B"
    np.save(tmp_path / "big_endian.npy", big_endian)
    for path in list_section_files(tmp_path):
        raw = read_section(path)
        assert raw.shape == (101, 101), path.name
        grey, info = normalize_section(raw, Normalization(), path.name)
        assert grey.dtype == np.float32
        np.testing.assert_allclose(grey, expected, atol=1e-7, err_msg=path.name)
        assert info["method"] == "dtype"


def test_read_section_rejects_colour_and_bad_files(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="colour.png: RGB image whose channels differ"):
        read_section(tmp_path / "colour.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: cannot read the image"):
        read_section(tmp_path / "broken.png")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"cube.npy: section has shape \(2, 3, 4, 5\)"):
        read_section(tmp_path / "cube.npy")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt: unknown input type"):
        list_section_files(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no section images"):
        list_section_files(tmp_path / "empty")


def test_amplitudes_are_clipped_at_percentiles():
    rng = np.random.default_rng(0)
    amp = rng.laplace(0, 1000, size=(300, 200)).astype(np.float32)
    grey, info = normalize_section(amp, Normalization())
    lo, hi = np.percentile(amp.astype(np.float64), [1, 99])
    assert info == {"method": "percentile", "range": [pytest.approx(lo), pytest.approx(hi)]}
    assert grey.min() == 0 and grey.max() == 1
    assert abs((grey == 0).mean() - 0.01) < 0.002 and abs((grey == 1).mean() - 0.01) < 0.002
    np.testing.assert_allclose(grey[1:-1], np.clip((amp[1:-1] - lo) / (hi - lo), 0, 1), atol=1e-6)
    # a fixed range overrides the percentiles; 'dtype' refuses raw amplitudes
    fixed, info = normalize_section(amp, Normalization(value_range=(-500.0, 500.0)))
    assert info["method"] == "range" and fixed[amp > 500].min() == 1
    with pytest.raises(ValueError, match="normalize 'dtype' takes 8-bit or 16-bit grey"):
        normalize_section(amp, Normalization(mode="dtype"), "amp.npy")
    with pytest.raises(ValueError, match="constant section"):
        normalize_section(np.zeros((5, 5), np.float32), Normalization(mode="percentile"))
    # float64 amplitudes beyond float32's range (~3.4e38) map as the same amplitudes in range do
    huge, _ = normalize_section(amp.astype(np.float64) * 1e36, Normalization())
    np.testing.assert_allclose(huge, grey, atol=1e-6)
    assert huge.dtype == np.float32 and np.isfinite(huge).all() and huge.std() > 0.1


@pytest.fixture(scope="module")
def mosaics(tgs_dir):
    return read_mosaics(tgs_dir / "mosaics.csv")


def test_mosaic_places_real_tiles_on_their_grid(tgs_dir, mosaics):
    m = assemble_mosaic(tgs_dir, "mosaic_94_2", mosaics)
    assert m.shape == (1010, 1010) and len(m.cells) == 32
    for tile_id, tile, truth, labelled in zip(m.cells["id"], crop_tiles(m.image, m.cells),
                                              crop_tiles(m.mask, m.cells), m.cells["labelled"], strict=True):
        folder = "train" if labelled else "test"
        np.testing.assert_array_equal(tile, load_image(tgs_dir / folder / "images" / f"{tile_id}.png"))
        if labelled:
            np.testing.assert_array_equal(truth, load_mask(tgs_dir / "train" / "masks" / f"{tile_id}.png"))
    assert m.present.sum() == 32 * 101 * 101 and m.labelled.sum() == m.cells["labelled"].sum() * 101 * 101
    assert (m.image[~m.present] == round(m.image[m.present].mean())).all()


def test_sections_of_any_size(tile_paths):
    """Sizes from 1 pixel to non-multiples of 32 and larger than a window give a probability of the same size; a
    lone tile gets the tile path's probabilities."""
    net, inferer = TinyConv().eval(), section_inferer("pad", tta=True, overlap=0.5)
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (7, 300), (101, 101), (129, 65), (250, 333)]:
        prob = predict_section(net, inferer, rng.random(shape, dtype=np.float32))
        assert prob.shape == shape and prob.dtype == np.float32
        assert 0 <= prob.min() and prob.max() <= 1
    # a lone tile: the tile path (reflect-padded 13 / 14 to 128 as in training, flip TTA, central 101 x 101)
    tile = load_image(tile_paths[0]).astype(np.float32) / 255
    padded = F.pad(torch.from_numpy(tile)[None, None].expand(1, 3, -1, -1), (13, 14, 13, 14), mode="reflect")
    with torch.no_grad():
        tile_path = restore_tiles(tile_inferer(tta=True)(padded, net)["prob"], "pad")[0, 0].numpy()
    np.testing.assert_allclose(predict_section(net, inferer, tile), tile_path, atol=1e-6)



class _Terminal:
    """A stderr that says it is a terminal, writing into `text`."""

    def __init__(self):
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal(tile_paths, tmp_path, capsys, monkeypatch):
    # `saltkit predict ... 2> log.txt` filled the log with the redraws of the section and window bars
    section = tmp_path / "sections" / "wide.npy"
    section.parent.mkdir()
    np.save(section, np.tile(load_image(tile_paths[0]), (2, 3)))  # 202 x 303: sliding windows
    net = TinyConv().eval()

    def predict(out: str) -> None:
        predict_images([section], tmp_path / out, net, section_inferer("pad", tta=False, progress=True),
                       threshold=0.5, progress=True)

    predict("redirected")  # capsys: stderr is no terminal
    err = capsys.readouterr().err
    assert "\r" not in err and "section" not in err and "%|" not in err, err
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    predict("terminal")
    assert "\r" in terminal.text and "section" in terminal.text  # the same run on a terminal draws them


def test_predict_folder_writes_outputs_and_index(tile_paths, tmp_path):
    sections = tmp_path / "sections"
    sections.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(load_image(tile_paths[0])).save(sections / "tile.png")
    Image.fromarray((rng.random((150, 230)) * 65535).astype(np.uint16)).save(sections / "wide16.tif")
    np.save(sections / "amplitudes.npy", rng.normal(0, 300, (90, 140)).astype(np.float32))
    net, inferer = TinyConv().eval(), section_inferer("pad", tta=False)
    rows = predict_images(sorted(sections.iterdir()), tmp_path / "out", net, inferer, threshold=0.5, index=True,
                          progress=False)
    out = tmp_path / "out"
    assert [r["name"] for r in rows] == ["amplitudes.npy", "tile.png", "wide16.tif"]
    for row, raw_path in zip(rows, sorted(sections.iterdir()), strict=True):
        grey, _ = normalize_section(read_section(raw_path), Normalization(), raw_path.name)
        prob = np.load(row["outputs"]["prob_npy"])
        assert prob.dtype == np.float32 and prob.shape == grey.shape
        np.testing.assert_array_equal(prob, predict_section(net, inferer, grey))
        mask = np.asarray(Image.open(row["outputs"]["mask"]))
        np.testing.assert_array_equal(mask, np.where(prob > 0.5, 255, 0))
        for kind in ("prob_png", "overlay"):  # pictures for people: the section scaled up, axes, legend, caption
            with Image.open(row["outputs"][kind]) as picture:
                assert picture.width >= 640 and picture.height > max(prob.shape), kind
        assert row["salt_share"] == pytest.approx((prob > 0.5).mean()) and row["valid_share"] == 1
    page = (out / "index.html").read_text()
    assert all(f'src="{name}_overlay.png"' in page for name in ("tile", "wide16", "amplitudes"))
    assert json.loads((out / "predictions.json").read_text())[0]["normalization"]["method"] == "percentile"


def test_overlay_tints_and_outlines_salt():
    grey = np.full((20, 20), 0.5, np.float32)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    rgb = outline_overlay(grey, mask)
    assert (rgb[0, 0] == 128).all()  # background stays grey
    assert tuple(rgb[5, 5]) == (255, 255, 0) and tuple(rgb[10, 5]) == (255, 255, 0)  # outline on the border
    assert rgb[10, 10, 0] > rgb[10, 10, 2]  # inside: orange tint


def test_predict_command_on_images(tiny_ckpt, tile_paths, tmp_path, capsys):
    """`saltkit predict IMAGE|FOLDER --ckpt --out DIR` with the options of the issue; bad input is a one-line error."""
    image = tmp_path / "section.png"
    Image.fromarray(np.tile(load_image(tile_paths[1]), (1, 2))).save(image)  # 101 x 202
    out = tmp_path / "pred"
    assert main(["predict", str(image), "--ckpt", str(tiny_ckpt), "--out", str(out), "--overlap", "0.25",
                 "--tta", "false", "--no-progress"]) == 0
    assert "predicted 1 section(s)" in capsys.readouterr().out
    prob = np.load(out / "section_prob.npy")
    assert prob.shape == (101, 202)
    assert not (out / "index.html").exists()
    assert main(["predict", str(tmp_path / "missing.png"), "--ckpt", str(tiny_ckpt), "--out", str(out)]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["predict", str(image), "--ckpt", str(tmp_path / "none.pt"), "--out", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["predict", str(image), "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "x.sgy")]) == 2
    assert "is not a SEG-Y volume" in capsys.readouterr().err


def test_predict_command_amp(tiny_ckpt, tile_paths, tmp_path, capsys):
    """`saltkit predict --amp true`: the network in bf16 autocast (said on the console), float32 probabilities within
    2e-2 of the float32 prediction; `--amp` takes auto / true / false (bf16 / fp16), nothing else."""
    image = Path(tile_paths[0])
    args = ["predict", str(image), "--ckpt", str(tiny_ckpt), "--tta", "false", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "f32")]) == 0
    assert "predict: amp" not in capsys.readouterr().out  # the default, false: float32 without a word
    assert main([*args, "--out", str(tmp_path / "bf16"), "--amp", "true"]) == 0
    assert "predict: amp true: bf16 autocast on the CPU" in capsys.readouterr().out
    f32, bf16 = (np.load(tmp_path / side / f"{image.stem}_prob.npy") for side in ("f32", "bf16"))
    assert bf16.dtype == np.float32 and not np.array_equal(f32, bf16)  # it ran in another precision
    assert np.abs(f32 - bf16).max() <= 2e-2
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "x"), "--amp", "maybe"])
    assert "--amp: invalid choice: 'maybe'" in capsys.readouterr().err


def test_mosaic_command(tgs_dir, tmp_path, capsys):
    assert main(["mosaic", str(tgs_dir)]) == 0
    assert "mosaic_90_5" in capsys.readouterr().out
    assert main(["mosaic", str(tgs_dir), "mosaic_94_2", "--out", str(tmp_path)]) == 0
    image = np.asarray(Image.open(tmp_path / "mosaic_94_2.png"))  # grey + alpha: absent cells transparent
    mask = np.asarray(Image.open(tmp_path / "mosaic_94_2_mask.png"))
    assert image.shape == (1010, 1010, 2) and mask.shape == (1010, 1010) and set(np.unique(mask)) <= {0, 128, 255}
    assert (image[..., 1] == 255).sum() == 32 * 101 * 101 and set(np.unique(image[..., 1])) == {0, 255}


def test_predict_bundle_matches_command(tiny_ckpt, tile_paths, tmp_path):
    """bundles/saltnet/configs/predict.json runs the same workflow as `saltkit predict`."""
    from monai.bundle import run

    image = tmp_path / "section.npy"
    np.save(image, np.tile(load_image(tile_paths[2]), (2, 1)))  # 202 x 101
    assert main(["predict", str(image), "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "cli"), "--tta", "false",
                 "--no-progress"]) == 0
    config = Path(__file__).resolve().parents[1] / "bundles" / "saltnet" / "configs" / "predict.json"
    run(run_id="predict", config_file=str(config), input=str(image), output=str(tmp_path / "bundle"),
        ckpt=str(tiny_ckpt), tta=False, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "bundle" / "section_prob.npy"),
                                  np.load(tmp_path / "cli" / "section_prob.npy"))


def test_predict_with_onnxruntime_matches_torch(tiny_ckpt, tile_paths, tmp_path):
    """`saltkit predict --runtime onnxruntime` and the bundle's `runtime` key: a 202 x 303 section (sliding windows,
    TTA) predicted through the checkpoint's ONNX export equals the torch prediction to 1e-4."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    from monai.bundle import run

    image = tmp_path / "section.npy"
    np.save(image, np.tile(load_image(tile_paths[0]), (2, 3)))
    assert main(["predict", str(image), "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "torch"),
                 "--no-progress"]) == 0
    assert main(["predict", str(image), "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "ort"),
                 "--runtime", "onnxruntime", "--threads", "2", "--no-progress"]) == 0
    assert tiny_ckpt.with_suffix(".onnx").is_file()
    expected = np.load(tmp_path / "torch" / "section_prob.npy")
    np.testing.assert_allclose(np.load(tmp_path / "ort" / "section_prob.npy"), expected, atol=1e-4)
    config = Path(__file__).resolve().parents[1] / "bundles" / "saltnet" / "configs" / "predict.json"
    run(run_id="predict", config_file=str(config), input=str(image), output=str(tmp_path / "bundle"),
        ckpt=str(tiny_ckpt), runtime="onnxruntime", progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "bundle" / "section_prob.npy"), expected, atol=1e-4)


def test_predict_never_writes_over_the_users_files(tiny_ckpt, tile_paths, tmp_path, capsys):
    # `saltkit predict DIR --out DIR` wrote its x_mask.png over the user's x_mask.png, then predicted that as a section
    folder = tmp_path / "sections"
    folder.mkdir()
    Image.fromarray(load_image(tile_paths[0])).save(folder / "x.png")
    Image.fromarray(np.where(load_mask(train_items(sample_dir())[0]["label"]) > 0, 255, 0).astype(np.uint8)).save(
        folder / "x_mask.png")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["predict", str(folder), "--ckpt", str(tiny_ckpt), "--out", str(folder), "--no-progress"]) == 2
    assert f"would write {folder / 'x_mask.png'}, which is the input image" in capsys.readouterr().err
    # the same mask beside a single section (as `saltkit mosaic` writes NAME.png and NAME_mask.png)
    assert main(["predict", str(folder / "x.png"), "--ckpt", str(tiny_ckpt), "--out", str(folder),
                 "--no-progress"]) == 2
    assert f"would replace {folder / 'x_mask.png'}, a file saltkit predict did not write" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_predict_reruns_into_its_own_output_folder(tiny_ckpt, tile_paths, tmp_path):
    out = tmp_path / "pred"
    images = []
    for k, name in enumerate(("a.png", "b.png")):
        Image.fromarray(load_image(tile_paths[k])).save(tmp_path / name)
        images.append(tmp_path / name)
    for image in (images[0], images[1], images[0]):  # the files predict wrote are its own to replace
        assert main(["predict", str(image), "--ckpt", str(tiny_ckpt), "--out", str(out), "--tta", "false",
                     "--no-progress"]) == 0
    listed = json.loads((out / "predictions.json").read_text())
    assert [r["name"] for r in listed] == ["a.png", "b.png"]
    assert all(Path(p).is_file() for r in listed for p in r["outputs"].values())


@pytest.mark.parametrize("row, message", [
    ("m1,1.5,0,a", "row 3: row must be a non-negative integer, got '1.5'"),  # was truncated to 1
    ("m1,2,0,../../outside/evil_tile", "row 3: id '../../outside/evil_tile' is not a plain name"),  # read outside
    ("../../../escaped_mosaic,0,0,b", "row 3: mosaic '../../../escaped_mosaic' is not a plain name"),  # wrote outside
])
def test_mosaics_csv_rows_are_integers_and_plain_names(tmp_path, row, message):
    path = tmp_path / "mosaics.csv"
    path.write_text(f"mosaic,row,col,id\nm1,0,0,0a1b2c\n{row}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        read_mosaics(path)


def test_sizes_beyond_memory_are_one_line_errors(tmp_path, monkeypatch):
    """A mosaics.csv row far out on the grid, a .npy declaring a huge array, a PNG past Pillow's decompression-bomb
    limit and an .npz of probabilities declaring huge arrays: each refused naming the file, nothing allocated."""
    from saltkit.inference.probabilities import load_probabilities
    from saltkit.seismic.mosaics import assemble_mosaic

    path = tmp_path / "mosaics.csv"
    path.write_text("mosaic,row,col,id\nm1,0,0,a\nm1,900000,900000,b\n")
    with pytest.raises(ValueError, match="mosaic 'm1': rows up to 900000 and columns up to 900000 make a"):
        assemble_mosaic(tmp_path, "m1", read_mosaics(path))
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float64))
    header["shape"] = (4_000_000, 4_000_000)  # 128 TB of float64 declared, a few bytes stored
    with open(tmp_path / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)
    with pytest.raises(ValueError, match="huge.npy: "):
        read_section_with_alpha(tmp_path / "huge.npy")
    big = tmp_path / "bomb.png"
    Image.new("L", (200, 200)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # as a 20000 x 20000 PNG against Pillow's 89 Mpx
    with pytest.raises(ValueError, match="bomb.png: cannot read the image .*decompression bomb"):
        read_section_with_alpha(big)
    with open(tmp_path / "probs.npz", "wb") as f:  # an npz whose 'probs' member declares a huge array
        import zipfile

        with zipfile.ZipFile(f, "w") as z:
            with z.open("probs.npy", "w") as member:
                header = np.lib.format.header_data_from_array_1_0(np.zeros((1,), np.uint16))
                header["shape"] = (4_000_000, 101, 101, 101)
                np.lib.format.write_array_header_1_0(member, header)
    with pytest.raises(ValueError, match="probs.npz: "):
        load_probabilities(tmp_path / "probs.npz")


def _section_of_tiles(tile_paths) -> np.ndarray:
    """A 101 x 202 uint8 section: two real tiles side by side."""
    return np.concatenate([load_image(tile_paths[0]), load_image(tile_paths[1])], axis=1)


def _expected_prob(net, inferer, raw, valid):
    """What predict makes of `raw` with no data outside `valid`: the valid pixels set the intensity mapping, the
    others are fed as the valid pixels' mean grey, and their probability is NaN."""
    grey, _ = normalize_section(raw, Normalization(), "section", valid)
    prob = predict_section(net, inferer, grey)
    prob[~valid] = np.nan
    return prob


def test_no_data_pixels_are_not_predicted(tile_paths, tmp_path):
    """Four ways to say 'no data' (NaN in a .npy, a fill value, a valid-data mask image, a transparent alpha
    channel): those pixels are NaN in `_prob.npy`, left out of the salt share and of the intensity mapping."""
    raw = _section_of_tiles(tile_paths)
    valid = np.ones(raw.shape, bool)
    valid[:, 150:] = False  # the right half of the second tile
    valid[:30, :40] = False
    sections = tmp_path / "sections"
    sections.mkdir()
    amplitudes = (raw.astype(np.float32) - 128) * 40  # raw amplitudes, mapped by percentiles
    np.save(sections / "nan.npy", np.where(valid, amplitudes, np.nan).astype(np.float32))
    np.save(sections / "fill.npy", np.where(valid, amplitudes, -999.25).astype(np.float32))
    Image.fromarray(np.dstack([raw, np.where(valid, 255, 0).astype(np.uint8)])).save(sections / "alpha.png")
    net, inferer = TinyConv().eval(), section_inferer("pad", tta=False)
    rows = predict_images(sorted(sections.iterdir()), tmp_path / "out", net, inferer, fill_value=-999.25,
                          progress=False, index=True)
    assert [r["name"] for r in rows] == ["alpha.png", "fill.npy", "nan.npy"]
    for row, values in zip(rows, (raw, amplitudes, amplitudes), strict=True):
        prob = np.load(row["outputs"]["prob_npy"])
        np.testing.assert_array_equal(np.isnan(prob), ~valid, err_msg=row["name"])
        np.testing.assert_allclose(prob, _expected_prob(net, inferer, values, valid), atol=1e-6,
                                   err_msg=row["name"])
        assert row["salt_share"] == pytest.approx((prob[valid] > 0.5).mean())
        assert row["valid_share"] == pytest.approx(valid.mean())
        mask = np.asarray(Image.open(row["outputs"]["mask"]))
        assert not mask[~valid].any()  # no salt where there is no data
    assert "with data" in (tmp_path / "out" / "index.html").read_text()
    # a percentile mapping of the valid amplitudes only: the fill value does not stretch it
    _, info = normalize_section(amplitudes, Normalization(), "fill", valid)
    assert info["range"] == pytest.approx(list(np.percentile(amplitudes[valid].astype(np.float64), [1, 99])))


def test_valid_mask_image_and_fill_value_options(tiny_ckpt, tile_paths, tmp_path, capsys):
    """`saltkit predict --valid-mask MASK.png` (non-zero = data) and `--fill-value`; one-line errors for a mask
    of another size and a section without data."""
    raw = _section_of_tiles(tile_paths)
    Image.fromarray(raw).save(tmp_path / "section.png")
    mask = np.full(raw.shape, 255, np.uint8)
    mask[60:, :] = 0
    Image.fromarray(mask).save(tmp_path / "valid.png")
    out = tmp_path / "pred"
    assert main(["predict", str(tmp_path / "section.png"), "--ckpt", str(tiny_ckpt), "--out", str(out), "--tta",
                 "false", "--valid-mask", str(tmp_path / "valid.png"), "--no-progress"]) == 0
    prob = np.load(out / "section_prob.npy")
    assert np.isnan(prob[60:]).all() and np.isfinite(prob[:60]).all()
    listed = json.loads((out / "predictions.json").read_text())[0]
    assert listed["salt_share"] == pytest.approx((prob[:60] > 0.5).mean())
    # the fill value of an 8-bit picture (black borders, say)
    edged = raw.copy()
    edged[:, :20] = 0
    Image.fromarray(edged).save(tmp_path / "edged.png")
    assert main(["predict", str(tmp_path / "edged.png"), "--ckpt", str(tiny_ckpt), "--out", str(out), "--tta",
                 "false", "--fill-value", "0", "--no-progress"]) == 0
    prob = np.load(out / "edged_prob.npy")
    np.testing.assert_array_equal(np.isnan(prob), edged == 0)
    capsys.readouterr()
    Image.fromarray(mask[:50]).save(tmp_path / "small.png")
    assert main(["predict", str(tmp_path / "section.png"), "--ckpt", str(tiny_ckpt), "--out", str(out),
                 "--valid-mask", str(tmp_path / "small.png"), "--no-progress"]) == 2
    assert "the valid-data mask is 50x202 pixels but the section is 101x202" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "section.png"), "--ckpt", str(tiny_ckpt), "--out", str(out),
                 "--valid-mask", str(tmp_path / "none.png"), "--no-progress"]) == 2
    assert "valid-data mask not found" in capsys.readouterr().err
    Image.fromarray(np.zeros(raw.shape, np.uint8)).save(tmp_path / "empty.png")
    assert main(["predict", str(tmp_path / "section.png"), "--ckpt", str(tiny_ckpt), "--out", str(out),
                 "--valid-mask", str(tmp_path / "empty.png"), "--no-progress"]) == 2
    assert "no pixel holds data" in capsys.readouterr().err


def test_mosaic_absent_cells_are_not_predicted(tgs_dir, tiny_ckpt, tmp_path):
    """`saltkit mosaic` writes absent cells transparent; predicting its picture with no extra option leaves
    them out: NaN in the .npy, not in the salt share."""
    assert main(["mosaic", str(tgs_dir), "mosaic_14_102", "--out", str(tmp_path / "mosaics")]) == 0
    m = assemble_mosaic(tgs_dir, "mosaic_14_102", read_mosaics(tgs_dir / "mosaics.csv"))
    assert 0 < m.present.mean() < 1
    raw, alpha = read_section_with_alpha(tmp_path / "mosaics" / "mosaic_14_102.png")
    np.testing.assert_array_equal(raw, m.image)
    np.testing.assert_array_equal(alpha > 0, m.present)
    assert main(["predict", str(tmp_path / "mosaics" / "mosaic_14_102.png"), "--ckpt", str(tiny_ckpt), "--out",
                 str(tmp_path / "pred"), "--tta", "false", "--no-progress"]) == 0
    prob = np.load(tmp_path / "pred" / "mosaic_14_102_prob.npy")
    np.testing.assert_array_equal(np.isnan(prob), ~m.present)
    row = json.loads((tmp_path / "pred" / "predictions.json").read_text())[0]
    assert row["salt_share"] == pytest.approx((prob[m.present] > 0.5).mean())
    assert row["valid_share"] == pytest.approx(m.present.mean())


def _run_folder_checkpoint(folder, record: dict | None):
    """A checkpoint in a run folder whose config.json records `record` (none: no config.json)."""
    folder.mkdir(parents=True)
    net = TinyConv()
    torch.save({"network": net.state_dict(), "arch": {}, "variant": "pad"}, folder / "swa.pt")
    if record is not None:
        (folder / "config.json").write_text(json.dumps({"resolved": record, "command": []}))
    return folder / "swa.pt"


def test_toy_model_warns(tmp_path, caplog):
    """A model trained on the embedded sample, or on a few hundred tiles, says so when it predicts; a model of
    the full data set and one with no record do not."""
    from saltkit.seismic import model_provenance

    toy = _run_folder_checkpoint(tmp_path / "toy", {"dataset_dir": str(sample_dir()), "train_tiles": 90})
    few = _run_folder_checkpoint(tmp_path / "few", {"dataset_dir": "/data/tgs", "train_tiles": 400})
    real = _run_folder_checkpoint(tmp_path / "real", {"dataset_dir": "/data/tgs", "train_tiles": 2880})
    bare = _run_folder_checkpoint(tmp_path / "bare", None)
    with caplog.at_level("WARNING", logger="saltkit.seismic.provenance"):
        info = model_provenance(toy)
    assert info["toy"] and info["sample"] and info["train_tiles"] == 90 and len(info["weights"]) == 16
    message = caplog.records[-1].getMessage()
    assert f"{toy} was trained on 90 tiles of the embedded sample" in message
    assert "saltkit train configs/pad.json configs/cpu.json" in message and "README" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="saltkit.seismic.provenance"):
        assert model_provenance(few)["toy"]
        assert "trained on 400 tiles of /data/tgs" in caplog.records[-1].getMessage()
        caplog.clear()
        assert not model_provenance(real)["toy"] and not model_provenance(bare)["toy"]
    assert not caplog.records
    assert model_provenance(bare)["train_tiles"] is None


def test_a_self_trained_model_names_its_pseudo_labelled_tiles(tmp_path):
    from saltkit.seismic import model_provenance
    from saltkit.seismic.figures import model_text

    student = _run_folder_checkpoint(tmp_path / "student", {"dataset_dir": "/data/tgs", "train_tiles": 2880,
                                                            "pseudo": {"tiles": 3139, "fingerprint": "0bbec2903af04e0d"}})
    plain = _run_folder_checkpoint(tmp_path / "plain", {"dataset_dir": "/data/tgs", "train_tiles": 2880,
                                                        "pseudo": None})
    assert "trained on 2880 + 3139 pseudo-labelled tiles of tgs" in model_text(model_provenance(student))
    assert "trained on 2880 tiles of tgs" in model_text(model_provenance(plain))


def test_toy_model_warning_when_predicting(tile_paths, tmp_path, caplog):
    """`saltkit predict` with a checkpoint of the quick start's sample run: the warning, and the pictures' caption
    and predictions name the model."""
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False)
    run = tmp_path / "runs" / "pad_fold0"
    run.mkdir(parents=True)
    torch.save({"network": net.state_dict(), "arch": net.arch, "variant": "pad"}, run / "swa.pt")
    (run / "config.json").write_text(json.dumps({"resolved": {"dataset_dir": "saltkit/sample_data/tgs",
                                                              "train_tiles": 90}}))
    Image.fromarray(load_image(tile_paths[0])).save(tmp_path / "tile.png")
    with caplog.at_level("WARNING"):
        assert main(["predict", str(tmp_path / "tile.png"), "--ckpt", str(run / "swa.pt"), "--out",
                     str(tmp_path / "pred"), "--tta", "false", "--no-progress"]) == 0
    assert any("a toy model" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_that_is_not_there_is_a_one_line_error(tiny_ckpt, tile_paths, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(load_image(tile_paths[0])).save(image)
    for device, message in (("cuda", "--device cuda: this process sees no CUDA GPU; use --device cpu"),
                            ("gpu7", "--device 'gpu7' is not a device")):
        assert main(["predict", str(image), "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "out"),
                     "--device", device]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_no_data_is_filled_by_reflection():
    """The network sees no-data pixels as the data mirrored across the nearest edge (as training pads tiles), or
    the mean grey where the mirror has no data either; the data pixels are unchanged."""
    grey = np.random.default_rng(0).random((20, 30), dtype=np.float32)
    valid = np.zeros(grey.shape, bool)
    valid[:, :10] = True
    filled = fill_no_data(grey, valid)
    np.testing.assert_array_equal(filled[:, :10], grey[:, :10])
    np.testing.assert_array_equal(filled[:, 10:19], grey[:, 8::-1])
    np.testing.assert_allclose(filled[:, 19:], grey[:, :10].mean(), rtol=1e-6)


def test_onnx_export_in_an_unwritable_place_fails_before_the_work_and_onnx_path_moves_it(tiny_ckpt, tile_paths,
                                                                                          tmp_path, capsys):
    """`--runtime onnxruntime` where the export cannot be written fails at once naming --onnx-path (here the folder
    is a file; a read-only folder fails the same write check), and `--onnx-path FILE` puts the export there."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    image = tmp_path / "tile.png"
    shutil.copy(tile_paths[0], image)
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the export's folder would be")
    code = main(["predict", str(image), "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "a"), "--no-progress",
                 "--runtime", "onnxruntime", "--onnx-path", str(blocked / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write to" in err and "--onnx-path FILE puts the ONNX export elsewhere" in err
    assert not (tmp_path / "a").exists()
    elsewhere = tmp_path / "exports" / "m.onnx"
    assert main(["predict", str(image), "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "b"), "--no-progress",
                 "--runtime", "onnxruntime", "--onnx-path", str(elsewhere)]) == 0
    assert elsewhere.is_file() and (tmp_path / "b" / "tile_prob.npy").is_file()


def test_a_folder_with_an_unreadable_section_predicts_the_rest_and_lists_it(tiny_ckpt, tile_paths, tmp_path, capsys):
    """One truncated PNG in a folder: the other sections (one with a file name that is not UTF-8) are predicted,
    predictions.json and index.html list all, the unreadable one with why, and the command fails naming it."""
    folder = tmp_path / "sections"
    folder.mkdir()
    shutil.copy(tile_paths[0], folder / "a.png")
    (folder / "b.png").write_bytes(Path(tile_paths[1]).read_bytes()[:200])  # truncated
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    shutil.copy(tile_paths[2], folder / odd)
    out = tmp_path / "pred"
    code = main(["predict", str(folder), "--ckpt", str(tiny_ckpt), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "1 of 3 sections could not be read, the other 2 were predicted" in err
    assert f"{folder / 'b.png'}: cannot read the image" in err
    listed = {r["name"]: r for r in json.loads((out / "predictions.json").read_text())}
    assert set(listed) == {"a.png", "b.png", odd} and listed["b.png"]["outputs"] == {}
    assert "cannot read the image" in listed["b.png"]["error"]
    assert (out / "a_prob.npy").is_file() and (out / os.fsdecode(b"caf\xe9_prob.npy")).is_file()
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "Not predicted (1 sections could not be read)" in page and "caf\ufffd.png" in page
    assert 'href="caf%E9_overlay.png"' in page


def test_a_section_larger_than_memory_is_refused_before_it_is_read(tiny_ckpt, tile_paths, tmp_path, capsys,
                                                                    monkeypatch):
    """The size from the file's header against the memory available: a 20000 x 20000 .npy (its header only: a few
    bytes on disk) is refused naming what it needs, before anything is allocated; a tile beside it is predicted."""
    import saltkit.seismic.predict as predict_module

    folder = tmp_path / "sections"
    folder.mkdir()
    shutil.copy(tile_paths[0], folder / "tile.png")
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.float32))
    header["shape"] = (20000, 20000)
    with open(folder / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
    monkeypatch.setattr(predict_module, "available_memory", lambda: 16 * 10**9)
    code = main(["predict", str(folder), "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "1 of 2 sections could not be read, the other 1 were predicted" in err
    assert re.search(r"huge.npy: predicting a 20000 x 20000 section needs about 40.0 GB \(100 bytes a pixel\) and "
                     r"16.0 GB are available", err), err[-600:]
    assert (tmp_path / "out" / "tile_prob.npy").is_file()
