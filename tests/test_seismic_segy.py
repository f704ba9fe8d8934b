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
from saltkit.io import OutputClashError
from saltkit.seismic import Normalization, normalize_section, predict_images, predict_section, predict_volume
from saltkit.seismic.segy import (
    FORMAT_OFFSET,
    TEXT_BYTES,
    TRACE_HEADER_BYTES,
    SegyError,
    annotate_text_header,
    read_layout,
)
from saltkit.seismic.validity import fill_no_data
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
    predict_volume(src, out, net, inferer, dtype=dtype, save_npy=True, progress=False, qc=0)
    text_in, bin_in, ext_in, rows_in = traces_of(src)
    text_out, bin_out, ext_out, rows_out = traces_of(out)
    changed = [n + 1 for n in range(40) if text_in[n * 80:(n + 1) * 80] != text_out[n * 80:(n + 1) * 80]]
    assert changed == [37, 38, 39]  # F3's last blank cards before C40
    cards = segyio.tools.wrap(text_out.decode("cp037"))
    assert "C37 SALTKIT SALT PROBABILITY 0-1" in cards and "C38 SALTKIT AMPLITUDE CLIP" in cards
    assert f"C39 SALTKIT NO DATA (DEAD OR MISSING TRACE, FILL OR NAN SAMPLE) = {'NAN' if dtype == 'float32' else 0}" \
        in cards
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
    predict_volume(src, out, net, inferer, normalization=Normalization(value_range=(0.0, 255.0)), progress=False, qc=0)
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
                       progress=False, qc=0)
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


def test_files_saltkit_cannot_read_are_named_for_what_they_are(tiles_volume, net, inferer, tmp_path):
    """Pre-stack gathers, a variable count of extended text headers, revision-2 trace header extensions and trace
    headers stating another trace length (segyio's small-ps, stanzas-unknown-count, trace-header-extensions and
    long.sgy have these) are each refused on one line that says so, and nothing is written."""
    raw = tiles_volume.read_bytes()

    def binary_edit(offset: int, packed: bytes) -> bytes:
        return raw[:offset] + packed + raw[offset + len(packed):]

    def offset_of_second_copy(header: bytearray) -> None:
        header[36:40] = struct.pack(">i", struct.unpack(">i", header[36:40])[0] + 100)

    n = len(traces_of(tiles_volume)[3])
    gathers = rewrite(tiles_volume, tmp_path / "gathers.sgy", order=[i // 2 for i in range(2 * n)])
    body = bytearray(gathers.read_bytes())  # give every second trace (the copy) another offset
    layout = read_layout(gathers)
    for k in range(1, 2 * n, 2):
        at = layout.data_offset + k * layout.trace_bytes
        header = bytearray(body[at:at + TRACE_HEADER_BYTES])
        offset_of_second_copy(header)
        body[at:at + TRACE_HEADER_BYTES] = header
    gathers.write_bytes(bytes(body))
    cases = {
        "gathers.sgy": "share inline 1 and crossline 1 at offsets 1 and 101 \\(bytes 37-40\\): a pre-stack file",
        "doubled.sgy": "share inline 1 and crossline 1; saltkit predicts post-stack volumes, one trace per inline",
        "ext-1.sgy": "bytes 3505-3506 give -1 extended text headers",
        "rev2-extensions.sgy": "revision 2 file with 2 additional 240-byte trace header\\(s\\) per trace",
        "long.sgy": "trace 0's header gives 5000 samples and trace 1's 5001 \\(bytes 115-116; 606 different",
    }
    rewrite(tiles_volume, tmp_path / "doubled.sgy", order=[i // 2 for i in range(2 * n)])
    (tmp_path / "ext-1.sgy").write_bytes(binary_edit(3504, struct.pack(">h", -1)))
    rev2 = binary_edit(3500, bytes([2, 0]))
    (tmp_path / "rev2-extensions.sgy").write_bytes(rev2[:3506] + struct.pack(">h", 2) + rev2[3508:])
    stated = iter(range(5000, 6000))  # trace headers of sample data: each states another trace length
    rewrite(tiles_volume, tmp_path / "long.sgy",
            edit=lambda h: h.__setitem__(slice(114, 116), struct.pack(">h", next(stated))))
    for name, message in cases.items():
        with pytest.raises(SegyError, match=f"{name}: .*{message}"):
            predict_volume(tmp_path / name, tmp_path / "out.sgy", net, inferer, progress=False, qc=0)
    assert not (tmp_path / "out.sgy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases)  # no temporary files


def test_outputs_that_are_folders_are_refused_before_the_work(tiles_volume, inferer, tmp_path):
    def never(x, network):
        raise AssertionError("the network ran")

    for name in ("out.sgy", "out.json", "out.npy"):
        folder = tmp_path / name
        folder.mkdir()
        with pytest.raises(SegyError, match=f"output {folder} is a folder"):
            predict_volume(tiles_volume, tmp_path / "out.sgy", TinyConv(), never, save_npy=True, progress=False,
                           qc=0)
        folder.rmdir()
    assert list(tmp_path.iterdir()) == []


def test_the_sidecar_never_describes_another_volume(tiles_volume, net, inferer, tmp_path, monkeypatch):
    """OUT.json is renamed into place after OUT.sgy and OUT.npy: when their renames fail, the JSON of the previous
    run stays, with the files it describes."""
    out = tmp_path / "out.sgy"
    predict_volume(tiles_volume, out, net, inferer, save_npy=True, progress=False, qc=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_replace = type(out).replace

    def failing_replace(self, target):
        if str(target) == str(out):
            raise OSError(f"cannot replace {target}")
        return real_replace(self, target)

    monkeypatch.setattr(type(out), "replace", failing_replace)
    with pytest.raises(OSError, match="cannot replace"):
        predict_volume(tiles_volume, out, net, inferer, direction="crossline", save_npy=True, progress=False, qc=0)
    assert json.loads((tmp_path / "out.json").read_text())["direction"] == "inline"
    assert (tmp_path / "out.json").read_bytes() == before["out.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # no temporaries


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
    predict_volume(src, out, net, inferer, progress=False, qc=0)
    _, _, _, rows = traces_of(out)
    _, _, _, sorted_rows = traces_of(f3_inline[0])
    for pos, i in enumerate(order):  # trace headers travel with their samples
        assert rows[pos] == sorted_rows[i]


def test_missing_trace(segy_dir, net, inferer, tmp_path):
    src = rewrite(segy_dir / "f3.sgy", tmp_path / "holed.sgy", [i for i in range(414) if i != 50])
    out = tmp_path / "out.sgy"
    summary = predict_volume(src, out, net, inferer, save_npy=True, progress=False, qc=0)
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
    with pytest.raises(SegyError, match="share inline 0 and crossline 0; saltkit predicts post-stack .*: pass --iline-byte and --xline-byte"):
        predict_volume(src, out, net, inferer, progress=False)
    with pytest.raises(SegyError, match="byte 190 .* is not the first byte of a SEG-Y trace header word"):
        predict_volume(src, out, net, inferer, iline_byte=190, progress=False)
    predict_volume(src, out, net, inferer, iline_byte=9, xline_byte=21, progress=False, qc=0)
    samples = [s for _, s in traces_of(out)[3]]
    assert samples == [s for _, s in traces_of(f3_inline[0])[3]]


def test_2d_line(segy_dir, net, inferer, tmp_path):
    src = rewrite(segy_dir / "f3.sgy", tmp_path / "line.sgy", range(18))  # inline 111 only
    with pytest.raises(SegyError, match="2-D line \\(one inline, 111\\).*pass --direction inline"):
        predict_volume(src, tmp_path / "out.sgy", net, inferer, direction="both", progress=False)
    predict_volume(src, tmp_path / "out.sgy", net, inferer, progress=False, qc=0)
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
        ["model.pt", "small.sgy", "one.sgy", "one.json", "one.npy", "one_qc", "two.sgy", "two.json", "two.npy",
         "two_qc"])
    assert sorted(p.name for p in (tmp_path / "two_qc").iterdir()) == sorted(
        p.name for p in (tmp_path / "one_qc").iterdir())


@pytest.mark.parametrize("dtype,direction", [("float32", "inline"), ("uint8", "both")])
def test_dead_traces_and_fill_values_are_no_data(tiles, net, inferer, tmp_path, dtype, direction):
    """Dead traces (all zero) and fill-value samples are not predicted: NaN in OUT.npy, the no-data value in the
    output SEG-Y (NaN for float32, 0 for uint8), left out of the salt share and of the amplitude clip."""
    cube = np.ascontiguousarray(tiles.transpose(0, 2, 1), dtype=np.float32) - 128  # (inline, crossline, sample)
    cube[1, 40:60] = 0  # 20 dead traces
    cube[2, :, 90:] = -999.25  # padding at the bottom of inline 3
    src = tmp_path / "dead.sgy"
    segyio.tools.from_array(str(src), cube)
    no_data = np.zeros(cube.shape, bool)
    no_data[1, 40:60] = True
    no_data[2, :, 90:] = True
    out = tmp_path / "out.sgy"
    summary = predict_volume(src, out, net, inferer, dtype=dtype, direction=direction, fill_value=-999.25,
                             save_npy=True, progress=False, qc=0)
    prob = np.load(out.with_suffix(".npy"))
    np.testing.assert_array_equal(np.isnan(prob), no_data)
    with segyio.open(out) as f:
        stored = segyio.tools.cube(f)
    if dtype == "float32":
        np.testing.assert_array_equal(np.isnan(stored), no_data)
    else:
        assert (stored[no_data] == 0).all()
    assert summary["dead_traces"] == 20 and summary["no_data"] == {"value": "NaN" if dtype == "float32" else 0,
                                                                  "samples": int(no_data.sum())}
    assert summary["salt_share"] == pytest.approx((prob[~no_data] > 0.5).mean())
    lo, hi = np.percentile(cube[~no_data].astype(np.float64), [1, 99])
    assert summary["clip"]["range"] == [pytest.approx(lo), pytest.approx(hi)]
    if direction == "inline":  # inline 2's live traces, predicted with the dead ones filled from their neighbours
        grey, _ = normalize_section(cube[1].T.copy(), Normalization(value_range=(lo, hi)))
        expected = predict_section(net, inferer, fill_no_data(grey, ~no_data[1].T))
        expected[:, 40:60] = np.nan
        np.testing.assert_allclose(prob[1].T, expected, atol=1e-6)


@pytest.fixture(scope="module")
def tiles_volume(tmp_path_factory):
    """A volume of six real tiles, one per inline (samples down, crosslines across): (6, 101, 101)."""
    tiles6 = np.stack([load_image(it["image"]) for it in train_items(sample_dir())[:6]])
    src = tmp_path_factory.mktemp("volume") / "tiles.sgy"
    segyio.tools.from_array(str(src), np.ascontiguousarray(tiles6.transpose(0, 2, 1), dtype=np.float32))
    return src


def test_qc_pictures_of_a_volume_of_real_tiles(tiles_volume, net, inferer, tmp_path):
    """predict_volume writes OUT_qc/ beside OUT.sgy: evenly spaced inlines and crosslines, a map, index.html and
    qc.json; --qc-inlines / --qc-crosslines pick sections; a rerun replaces its own pictures and nothing else."""
    out = tmp_path / "salt.sgy"
    summary = predict_volume(tiles_volume, out, net, inferer, progress=False)  # 3 of each by default
    qc = tmp_path / "salt_qc"
    assert summary["qc"] == str(qc / "index.html")
    pictures = ["inline_2.png", "inline_3.png", "inline_5.png", "crossline_26.png", "crossline_51.png",
                "crossline_76.png", "map.png"]
    assert sorted(p.name for p in qc.iterdir()) == sorted([*pictures, "index.html", "qc.json"])
    listing = json.loads((qc / "qc.json").read_text())
    assert [p["file"] for p in listing["pictures"]] == pictures
    page = (qc / "index.html").read_text()
    assert all(f'src="{name}"' in page for name in pictures) and "saltkit 0." in page
    for name in pictures:
        with Image.open(qc / name) as im:
            assert im.format == "PNG" and im.width >= 640
    with segyio.open(out) as f:
        cube = segyio.tools.cube(f)
    share = [p["salt_share"] for p in listing["pictures"] if p["file"] == "inline_3.png"][0]
    assert share == pytest.approx((cube[2] > 0.5).mean())
    # chosen sections; the earlier pictures are predict's own, so the rerun may replace them
    summary = predict_volume(tiles_volume, out, net, inferer, progress=False, qc_inlines="2,6", qc_crosslines=[10])
    listing = json.loads((qc / "qc.json").read_text())
    assert [p["file"] for p in listing["pictures"]] == ["inline_2.png", "inline_6.png", "crossline_10.png",
                                                        "map.png"]
    with pytest.raises(SegyError, match="--qc-inlines 7: no such inline \\(the volume has inlines 1 to 6\\)"):
        predict_volume(tiles_volume, out, net, inferer, progress=False, qc_inlines="7")
    (qc / "notes.txt").write_text("mine")
    with pytest.raises(OutputClashError, match="salt_qc holds notes.txt .* did not write; pass another --out, "
                                                 "or --qc 0"):
        predict_volume(tiles_volume, out, net, inferer, progress=False)
    predict_volume(tiles_volume, out, net, inferer, progress=False, qc=0)  # no pictures: the folder is left alone
    assert (qc / "notes.txt").read_text() == "mine"


def test_qc_pictures_of_f3(segy_dir, tmp_path, capsys):
    """`saltkit predict f3.sgy --qc-inlines 120,125 --qc-crosslines 880`: those sections and the map, with an
    index page; OUT.json names the model by its weights."""
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False)
    ckpt = tmp_path / "model.pt"
    torch.save({"network": net.state_dict(), "arch": net.arch, "variant": "pad"}, ckpt)
    out = tmp_path / "f3_salt.sgy"
    assert main(["predict", str(segy_dir / "f3.sgy"), "--ckpt", str(ckpt), "--out", str(out), "--tta", "false",
                 "--qc-inlines", "120,125", "--qc-crosslines", "880", "--no-progress"]) == 0
    assert f"QC pictures: {tmp_path / 'f3_salt_qc' / 'index.html'}" in capsys.readouterr().out
    qc = tmp_path / "f3_salt_qc"
    assert sorted(p.name for p in qc.iterdir()) == ["crossline_880.png", "index.html", "inline_120.png",
                                                    "inline_125.png", "map.png", "qc.json"]
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["model"]["name"] == "model.pt" and len(summary["model"]["weights"]) == 16
    assert summary["sample_axis"] == [4.0, 300.0]


def test_two_runs_into_one_output_never_share_a_temporary(tiles, net, inferer, tmp_path, caplog):
    # both runs wrote `.OUT.sgy.partial`: a float32 run and a uint8 one gave a file of the wrong size and format
    src = tmp_path / "tiles.sgy"
    segyio.tools.from_array(str(src), np.ascontiguousarray(tiles.transpose(0, 2, 1), dtype=np.float32))
    out = tmp_path / "out.sgy"
    calls = []

    def with_a_second_run(x, network):
        calls.append(1)
        if len(calls) == 2:  # a second predict into the same output starts and ends while the first one runs
            predict_volume(src, out, net, inferer, dtype="uint8", progress=False, qc=0)
        return inferer(x, network)

    with caplog.at_level("WARNING", logger="saltkit.seismic.volume"):
        predict_volume(src, out, net, with_a_second_run, dtype="float32", progress=False, qc=0)
    assert f"{out} was written by another run while this one ran" in caplog.text
    with segyio.open(out) as f:  # the first run's float32 file, whole
        assert int(f.bin[segyio.BinField.Format]) == 5 and f.tracecount == tiles.shape[0] * tiles.shape[2]
        assert np.isfinite(segyio.tools.cube(f)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.sgy", "tiles.sgy"]


def test_a_killed_runs_temporary_is_removed_by_the_next_run(tiles, net, inferer, tmp_path):
    from saltkit.io import TEMPORARY, host_name, process_alive

    src = tmp_path / "tiles.sgy"
    segyio.tools.from_array(str(src), np.ascontiguousarray(tiles.transpose(0, 2, 1), dtype=np.float32))
    dead = next(pid for pid in range(999_999, 900_000, -1) if not process_alive(pid))
    stale = tmp_path / f".out.sgy.{dead}@{host_name()}.0a1b2c3d-partial.tmp"  # left by kill -9 (17 MB before)
    stale.write_bytes(b"\0" * 1000)
    assert TEMPORARY.match(stale.name)
    predict_volume(src, tmp_path / "out.sgy", net, inferer, progress=False, qc=0)
    assert not stale.exists() and (tmp_path / "out.sgy").is_file()
