"""SEG-Y volumes: headers kept byte for byte (F3, both endiannesses), geometry round trip, a volume of real tiles
predicted as the image path predicts them, irregular and bad input, the missing extra, and torchrun."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_networks import TinyConv

from saltkit.cli import main
from saltkit.data.layout import load_image, sample_dir, train_items
from saltkit.inference import section_inferer
from saltkit.seismic import Normalization, normalize_section, predict_images, predict_section, predict_volume
from saltkit.seismic.segy import (
    FORMAT_OFFSET,
    TEXT_BYTES,
    TRACE_HEADER_BYTES,
    SegyError,
    annotate_text_header,
    read_layout,
)
from saltkit.seismic.volume import sidecar_path

segyio = pytest.importorskip("segyio")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def net():
    return TinyConv().eval()


@pytest.fixture(scope="module")
def inferer():
    return section_inferer("pad", tta=True, overlap=0.5)


def traces_of(path):
    """(text, binary, ext, [(trace header bytes, sample bytes)]) of a SEG-Y file, read with plain file I/O."""
    lay = read_layout(path)
    raw = path.read_bytes()
    rows = [raw[lay.data_offset + i * lay.trace_bytes:lay.data_offset + (i + 1) * lay.trace_bytes]
            for i in range(lay.tracecount)]
    return (raw[:TEXT_BYTES], raw[TEXT_BYTES:3600], raw[3600:lay.data_offset],
            [(r[:TRACE_HEADER_BYTES], r[TRACE_HEADER_BYTES:]) for r in rows])


def rewrite(src, dst, order=None, edit=None):
    """Copy the SEG-Y `src` to `dst` keeping traces `order` (indices, default all) and applying
    `edit(header: bytearray)` to each trace header."""
    text, binary, ext, rows = traces_of(src)
    order = range(len(rows)) if order is None else order
    with open(dst, "wb") as f:
        f.write(text + binary + ext)
        for i in order:
            header = bytearray(rows[i][0])
            if edit is not None:
                edit(header)
            f.write(bytes(header) + rows[i][1])
    return dst


@pytest.fixture(scope="module")
def f3_inline(segy_dir, net, inferer, tmp_path_factory):
    out = tmp_path_factory.mktemp("f3") / "prob.sgy"
    summary = predict_volume(segy_dir / "f3.sgy", out, net, inferer, save_npy=True, progress=False)
    return out, summary


@pytest.mark.parametrize("name,dtype", [("f3.sgy", "float32"), ("f3-lsb.sgy", "float32"), ("f3.sgy", "uint8")])
def test_headers_kept_byte_for_byte(segy_dir, net, inferer, tmp_path, name, dtype):
    src, out = segy_dir / name, tmp_path / "prob.sgy"
    predict_volume(src, out, net, inferer, dtype=dtype, save_npy=True, progress=False)
    text_in, bin_in, ext_in, rows_in = traces_of(src)
    text_out, bin_out, ext_out, rows_out = traces_of(out)
    changed = [n + 1 for n in range(40) if text_in[n * 80:(n + 1) * 80] != text_out[n * 80:(n + 1) * 80]]
    assert changed == [38, 39]  # F3's last blank cards before C40
    cards = segyio.tools.wrap(text_out.decode("cp037"))
    assert "C38 SALTKIT SALT PROBABILITY 0-1" in cards and "C39 SALTKIT AMPLITUDE CLIP" in cards
    at = FORMAT_OFFSET - TEXT_BYTES
    assert bin_out[:at] == bin_in[:at] and bin_out[at + 2:] == bin_in[at + 2:]
    order = ">" if name == "f3.sgy" else "<"
    assert struct.unpack(order + "h", bin_out[at:at + 2])[0] == (5 if dtype == "float32" else 16)
    assert ext_out == ext_in == b""
    assert len(rows_out) == len(rows_in) == 414
    assert all(h_out == h_in for (h_out, _), (h_in, _) in zip(rows_out, rows_in, strict=True))
    # samples: the probabilities (npy holds them as float32) in the output type and the input's byte order
    prob = np.load(out.with_suffix(".npy"))
    with segyio.open(src, endian="big" if order == ">" else "little") as f:
        cells = [(np.flatnonzero(f.ilines == il)[0], np.flatnonzero(f.xlines == xl)[0])
                 for il, xl in zip(f.attributes(189)[:], f.attributes(193)[:], strict=True)]
    kind = "f4" if dtype == "float32" else "u1"
    for (_, samples), (i, j) in zip(rows_out, cells, strict=True):
        expected = prob[i, j] if dtype == "float32" else np.rint(prob[i, j] * 255)
        np.testing.assert_array_equal(np.frombuffer(samples, order + kind), expected.astype(kind))


def test_geometry_round_trip(segy_dir, f3_inline):
    out, summary = f3_inline
    with segyio.open(segy_dir / "f3.sgy") as f, segyio.open(out) as g:
        for attr in ("ilines", "xlines", "offsets", "samples"):
            np.testing.assert_array_equal(getattr(g, attr), getattr(f, attr), err_msg=attr)
        assert (g.sorting, g.tracecount) == (f.sorting, f.tracecount)
        assert g.bin[segyio.BinField.Format] == 5
        cube, amplitudes = segyio.tools.cube(g), segyio.tools.cube(f)
    np.testing.assert_array_equal(cube, np.load(out.with_suffix(".npy")))
    assert cube.shape == (23, 18, 75) and 0 <= cube.min() and cube.max() <= 1
    assert json.loads(sidecar_path(out).read_text()) == summary
    lo, hi = np.percentile(amplitudes.astype(np.float64), [1, 99])  # every trace sampled (414 < 2000)
    assert summary["clip"]["range"] == [pytest.approx(lo), pytest.approx(hi)] and summary["clip"]["traces"] == 414
    assert summary["ilines"] == {"first": 111, "last": 133, "count": 23}
    assert summary["missing_traces"] == 0


@pytest.fixture(scope="module")
def tiles():
    """Three real tiles, (3, 101, 101) uint8."""
    return np.stack([load_image(it["image"]) for it in train_items(sample_dir())[3:6]])


def test_volume_of_real_tiles_matches_image_path(tiles, net, inferer, tmp_path):
    """Inline k of the volume is tile k (samples down, traces across); the SEG-Y path, with the tiles' own
    0..255 range as clip, predicts each section exactly as the image path predicts the tile PNG."""
    src = tmp_path / "tiles.sgy"
    segyio.tools.from_array(str(src), np.ascontiguousarray(tiles.transpose(0, 2, 1), dtype=np.float32))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for k, tile in enumerate(tiles):
        Image.fromarray(tile).save(folder / f"tile{k}.png")
    predict_images(sorted(folder.iterdir()), tmp_path / "images", net, inferer, progress=False)
    out = tmp_path / "inline.sgy"
    predict_volume(src, out, net, inferer, normalization=Normalization(value_range=(0.0, 255.0)), progress=False)
    with segyio.open(out) as f:
        cube = segyio.tools.cube(f)  # (inline, crossline, sample)
    for k in range(len(tiles)):
        np.testing.assert_array_equal(cube[k].T, np.load(tmp_path / "images" / f"tile{k}_prob.npy"))


def test_crossline_and_both_directions(tiles, net, inferer, tmp_path):
    """Crossline j is column j of every tile side by side; "both" is the mean of the two directions."""
    narrow = tiles[:, :, :12]  # 12 crosslines keep the crossline pass short
    src = tmp_path / "narrow.sgy"
    segyio.tools.from_array(str(src), np.ascontiguousarray(narrow.transpose(0, 2, 1), dtype=np.float32))
    cubes = {}
    for direction in ("inline", "crossline", "both"):
        out = tmp_path / f"{direction}.sgy"
        predict_volume(src, out, net, inferer, direction=direction, normalization=Normalization(value_range=(0, 255)),
                       progress=False)
        with segyio.open(out) as f:
            cubes[direction] = segyio.tools.cube(f)
    for j in range(12):
        grey, _ = normalize_section(narrow[:, :, j].T.copy(), Normalization())
        np.testing.assert_array_equal(cubes["crossline"][:, j, :].T, predict_section(net, inferer, grey))
    np.testing.assert_allclose(cubes["both"], (cubes["inline"] + cubes["crossline"]) / 2, atol=1e-7)


def test_bad_input_gets_a_clear_error_and_no_output(segy_dir, net, inferer, tmp_path):
    raw = (segy_dir / "f3.sgy").read_bytes()
    cases = {
        "random.sgy": (os.urandom(5000), "not a SEG-Y file, or a sample format"),
        "short.sgy": (raw[:1000], "not a SEG-Y file \\(1000 bytes"),
        "truncated.sgy": (raw[:-100], "truncated"),
        "format13.sgy": (raw[:FORMAT_OFFSET] + struct.pack(">h", 13) + raw[FORMAT_OFFSET + 2:], "format code 13"),
    }
    out = tmp_path / "out.sgy"
    out.write_bytes(b"an earlier result")
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SegyError, match=f"{name}: .*{message}"):
            predict_volume(tmp_path / name, out, net, inferer, progress=False)
    assert out.read_bytes() == b"an earlier result"
    with pytest.raises(SegyError, match="is the input"):
        predict_volume(out, out, net, inferer)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*cases, "out.sgy"])  # no temporary files


def test_interrupted_run_leaves_nothing(segy_dir, net, tmp_path):
    calls = []

    def failing(x, network):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return section_inferer("pad", tta=False)(x, network)

    with pytest.raises(KeyboardInterrupt):
        predict_volume(segy_dir / "f3.sgy", tmp_path / "out.sgy", net, failing, save_npy=True, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unsorted_traces(segy_dir, net, inferer, f3_inline, tmp_path):
    order = np.random.default_rng(0).permutation(414)
    src = rewrite(segy_dir / "f3.sgy", tmp_path / "shuffled.sgy", order)
    out = tmp_path / "out.sgy"
    predict_volume(src, out, net, inferer, progress=False)
    _, _, _, rows = traces_of(out)
    _, _, _, sorted_rows = traces_of(f3_inline[0])
    for pos, i in enumerate(order):  # trace headers travel with their samples
        assert rows[pos] == sorted_rows[i]


def test_missing_trace(segy_dir, net, inferer, tmp_path):
    src = rewrite(segy_dir / "f3.sgy", tmp_path / "holed.sgy", [i for i in range(414) if i != 50])
    out = tmp_path / "out.sgy"
    summary = predict_volume(src, out, net, inferer, save_npy=True, progress=False)
    assert summary["missing_traces"] == 1
    prob = np.load(out.with_suffix(".npy"))
    assert np.isnan(prob[50 // 18, 50 % 18]).all() and np.isnan(prob).sum() == 75
    _, _, _, rows_in = traces_of(src)
    _, _, _, rows_out = traces_of(out)
    assert [h for h, _ in rows_out] == [h for h, _ in rows_in]


def test_inline_crossline_at_other_header_bytes(segy_dir, net, inferer, f3_inline, tmp_path):
    """F3 also stores inline / crossline at bytes 9 and 21; with 189-196 zeroed, the default bytes fail with a
    message naming the options, and --iline-byte 9 --xline-byte 21 give the same probabilities."""
    def clear(header):
        header[188:196] = bytes(8)

    src = rewrite(segy_dir / "f3.sgy", tmp_path / "bytes.sgy", edit=clear)
    out = tmp_path / "out.sgy"
    with pytest.raises(SegyError, match="share inline 0 and crossline 0; pass --iline-byte and --xline-byte"):
        predict_volume(src, out, net, inferer, progress=False)
    with pytest.raises(SegyError, match="byte 190 .* is not the first byte of a SEG-Y trace header word"):
        predict_volume(src, out, net, inferer, iline_byte=190, progress=False)
    predict_volume(src, out, net, inferer, iline_byte=9, xline_byte=21, progress=False)
    samples = [s for _, s in traces_of(out)[3]]
    assert samples == [s for _, s in traces_of(f3_inline[0])[3]]


def test_2d_line(segy_dir, net, inferer, tmp_path):
    src = rewrite(segy_dir / "f3.sgy", tmp_path / "line.sgy", range(18))  # inline 111 only
    with pytest.raises(SegyError, match="2-D line \\(one inline, 111\\).*pass --direction inline"):
        predict_volume(src, tmp_path / "out.sgy", net, inferer, direction="both", progress=False)
    predict_volume(src, tmp_path / "out.sgy", net, inferer, progress=False)
    with segyio.open(tmp_path / "out.sgy", ignore_geometry=True) as f:
        section = np.stack([f.trace[i] for i in range(18)])
    with segyio.open(src, ignore_geometry=True) as f:
        amplitudes = np.stack([f.trace[i] for i in range(18)])
    grey, _ = normalize_section(amplitudes.T, Normalization(mode="percentile"))
    np.testing.assert_array_equal(section.T, predict_section(net, inferer, grey))


def test_text_header_cards_in_its_own_encoding():
    ascii_full = "".join(f"C{n:2d} {'X' * 70}".ljust(80) for n in range(1, 41)).encode("ascii")
    out, cards = annotate_text_header(ascii_full, ["ONE", "TWO"])
    assert cards == [38, 39] and out[37 * 80:38 * 80].decode().startswith("C38 ONE")
    assert out[:37 * 80] == ascii_full[:37 * 80] and out[39 * 80:] == ascii_full[39 * 80:]
    ebcdic = "".join(f"C{n:2d}".ljust(80) if n in (5, 6) else f"C{n:2d} TEXT".ljust(80)
                     for n in range(1, 41)).encode("cp037")
    out, cards = annotate_text_header(ebcdic, ["ONE", "TWO"])
    assert cards == [5, 6] and out[4 * 80:5 * 80].decode("cp037").startswith("C 5 ONE")


def test_missing_segyio_names_the_extra(segy_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "segyio", None)
    assert main(["predict", str(segy_dir / "f3.sgy"), "--ckpt", "unused.pt", "--out", str(tmp_path / "o.sgy")]) == 2
    assert "pip install 'saltkit[segy]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(segy_dir, tmp_path):
    """`saltkit predict VOLUME.sgy` under torchrun with 2 CPU processes writes the same file as 1 process."""
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False)
    ckpt = tmp_path / "model.pt"
    torch.save({"network": net.state_dict(), "arch": net.arch, "variant": "pad"}, ckpt)
    corner = [i for i in range(414) if i // 18 < 4 and i % 18 < 6]  # 4 inlines x 6 crosslines keep it quick
    src = rewrite(segy_dir / "f3.sgy", tmp_path / "small.sgy", corner)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    args = ["predict", str(src), "--ckpt", str(ckpt), "--direction", "both", "--tta", "false", "--npy",
            "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "saltkit.cli", *args, "--out", str(tmp_path / "one.sgy")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not found")
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "saltkit.cli", *args,
                          "--out", str(tmp_path / "two.sgy")], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert (tmp_path / "two.sgy").read_bytes() == (tmp_path / "one.sgy").read_bytes()
    assert np.array_equal(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"))
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.pt", "small.sgy", "one.sgy", "one.json", "one.npy", "two.sgy", "two.json", "two.npy"])
