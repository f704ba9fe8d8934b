"""MDIO volumes over Dask: a volume of real tiles converted by mdio's own SEG-Y import predicts as `saltkit predict`
predicts the SEG-Y (to 1e-6), and mdio's SEG-Y export of the output carries the input's trace headers; a worker
killed mid-run is replaced without changing the output; a failed run leaves nothing; fsspec memory:// round trip;
the missing extra is one line."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pseudo_labels import confident_teacher
from torch import nn

from saltkit.cli import main
from saltkit.data.layout import load_image, sample_dir, train_items
from saltkit.io import OutputClashError

HAS_MDIO = all(importlib.util.find_spec(m) is not None for m in ("mdio", "distributed", "segyio"))
needs_mdio = pytest.mark.skipif(not HAS_MDIO, reason="pip install 'saltkit[mdio]' (and segyio) to run")
CHUNKS = (2, 64, 128)  # three blocks of inlines, two of crosslines: several tasks write one output
DEAD = (2, 50)  # inline index, crossline index of an all-zero trace: no data


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return confident_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", sample_dir())


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> tuple[Path, Path]:
    """(SEG-Y, MDIO) of six real tiles as inlines (samples down, crosslines across), one trace dead, the MDIO made
    by mdio's SEG-Y import with the PostStack3DTime template, chunks `CHUNKS`."""
    import segyio
    from mdio import segy_to_mdio
    from mdio.builder.template_registry import get_template

    from saltkit.seismic.mdio_volume import segy_spec

    tiles = np.stack([load_image(it["image"]) for it in train_items(sample_dir())[:6]]).astype(np.float32)
    tiles[DEAD[0], :, DEAD[1]] = 0
    folder = tmp_path_factory.mktemp("survey")
    sgy = folder / "survey.sgy"
    segyio.tools.from_array(str(sgy), np.ascontiguousarray(tiles.transpose(0, 2, 1)))
    with segyio.open(sgy, "r+") as f:
        f.text[0] = segyio.tools.create_text_header({1: "SALTKIT TEST SURVEY: SIX TILES AS INLINES"})
        for i in range(f.tracecount):  # mdio's import wants a coordinate scalar and coordinates
            il, xl = f.header[i][segyio.TraceField.INLINE_3D], f.header[i][segyio.TraceField.CROSSLINE_3D]
            f.header[i] = {segyio.TraceField.SourceGroupScalar: 1, segyio.TraceField.CDP_X: 5000 + 25 * il,
                           segyio.TraceField.CDP_Y: 9000 + 25 * xl}
    template = get_template("PostStack3DTime")
    template.full_chunk_shape = CHUNKS
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MDIO__IMPORT__SAVE_SEGY_FILE_HEADER", "true")  # the export needs the file headers
        mp.setenv("MDIO__IMPORT__CPU_COUNT", "1")
        segy_to_mdio(segy_spec(float_samples=False), template, sgy, folder / "survey.mdio")
    return sgy, folder / "survey.mdio"


@pytest.fixture(scope="module")
def client():
    """A local Dask cluster of two worker processes, one thread each."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def predicted(survey, teacher, client, tmp_path_factory) -> tuple[Path, Path]:
    """(salt.mdio from `saltkit predict survey.mdio --scheduler`, seg.sgy from `saltkit predict survey.sgy`), both
    directions averaged."""
    sgy, volume = survey
    out = tmp_path_factory.mktemp("predicted")
    common = ["--ckpt", str(teacher), "--direction", "both", "--no-progress"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Dask worker runs; also, several threads crawl on a busy small machine
    try:
        assert main(["predict", str(sgy), "--out", str(out / "seg.sgy"), "--npy", "--qc", "0", *common]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(["predict", str(volume), "--out", str(out / "salt.mdio"), "--scheduler",
                 client.scheduler.address, *common]) == 0
    return out / "salt.mdio", out / "seg.sgy"


def probabilities(path) -> np.ndarray:
    import mdio

    return mdio.open_mdio(path)["salt_probability"].values


@needs_mdio
def test_mdio_prediction_equals_the_segy_path_and_exports_to_segy_with_the_input_headers(survey, predicted, tmp_path):
    import mdio
    import segyio

    from saltkit.seismic.mdio_volume import check_complete, segy_spec

    sgy, volume = survey
    out, seg = predicted
    expected = np.load(seg.with_suffix(".npy"))
    prob = probabilities(out)
    np.testing.assert_allclose(prob, expected, atol=1e-6, rtol=0)
    assert np.isnan(prob[DEAD]).all() and np.isfinite(np.delete(prob.reshape(-1, 101), DEAD[0] * 101 + DEAD[1],
                                                                0)).all()
    source, result = mdio.open_mdio(volume), mdio.open_mdio(out)
    assert result["salt_probability"].dims == source["amplitude"].dims
    assert result["salt_probability"].encoding["chunks"] == CHUNKS
    for name in ("inline", "crossline", "time", "cdp_x", "cdp_y", "trace_mask"):
        np.testing.assert_array_equal(result[name].values, source[name].values)
    record = check_complete(out)
    summary = json.loads(seg.with_suffix(".json").read_text())
    assert record["clip"] == summary["clip"] and record["version"] and record["ckpt"].endswith("teacher.pt")
    assert record["direction"] == "both" and record["settings"]["tta"] is True

    mdio.mdio_to_segy(segy_spec(), out, tmp_path / "back.sgy")
    with segyio.open(tmp_path / "back.sgy") as back, segyio.open(sgy) as original:
        assert back.tracecount == original.tracecount
        assert all(back.header[i].buf == original.header[i].buf for i in range(back.tracecount))
        assert list(back.ilines) == list(original.ilines) and list(back.xlines) == list(original.xlines)
        np.testing.assert_allclose(segyio.tools.cube(back), expected, atol=1e-6, rtol=0)
        assert back.bin[segyio.BinField.Format] == 5
        assert "SALTKIT SALT PROBABILITY" in back.text[0].decode("ascii", errors="replace")


class KilledOnce(nn.Module):
    """The network, but the first call anywhere (tracked by the file `marker`) ends its process as a crash would."""

    def __init__(self, network: nn.Module, marker: str):
        super().__init__()
        self.network, self.marker = network, marker

    def forward(self, x):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return self.network(x)


@dataclass(frozen=True)
class DiesOnce:
    """A worker's predictor whose network kills its worker on its first call."""

    ckpt: str
    marker: str

    def __call__(self):
        from saltkit.seismic.mdio_volume import PredictorSettings

        network, inferer = PredictorSettings(self.ckpt)()
        return KilledOnce(network, self.marker), inferer


@dataclass(frozen=True)
class Fails:
    """A worker's predictor that cannot load."""

    def __call__(self):
        raise RuntimeError("this network cannot load")


def by_value():
    """Send this module's classes to the workers by value: they cannot import a test module."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@needs_mdio
def test_a_worker_killed_mid_run_is_replaced_and_the_output_equals_the_uninterrupted_one(survey, teacher, client,
                                                                                         predicted, tmp_path):
    from saltkit.seismic.mdio_volume import check_complete, predict_mdio

    by_value()
    marker = tmp_path / "killed"
    before = set(client.scheduler_info()["workers"])
    out = tmp_path / "salt.mdio"
    predict_mdio(survey[1], out, DiesOnce(str(teacher), str(marker)), direction="both", threshold=0.4,
                 client=client, progress=False)
    assert marker.exists()  # a worker did die
    assert set(client.scheduler_info()["workers"]) != before  # and was replaced
    np.testing.assert_array_equal(probabilities(out), probabilities(predicted[0]))
    assert check_complete(out)["salt_share"] == check_complete(predicted[0])["salt_share"]


@needs_mdio
def test_a_failed_run_leaves_nothing_and_an_existing_output_needs_overwrite(survey, teacher, client, predicted,
                                                                           tmp_path):
    from saltkit.seismic.mdio_volume import predict_mdio

    by_value()
    out = tmp_path / "salt.mdio"
    with pytest.raises(RuntimeError, match="cannot load"):
        predict_mdio(survey[1], out, Fails(), client=client, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary
    with pytest.raises(OutputClashError, match="exists; pass --overwrite"):
        _raise_from_main(["predict", str(survey[1]), "--out", str(predicted[0]), "--ckpt", str(teacher)])
    with pytest.raises(ValueError, match="not for MDIO volumes"):
        _raise_from_main(["predict", str(survey[1]), "--out", str(out), "--npy"])


def _raise_from_main(args):
    """`saltkit ARGS` with its one-line error raised instead of printed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SALTKIT_DEBUG", "1")
        main(args)


@needs_mdio
def test_memory_filesystem_round_trip(survey, teacher, predicted):
    import fsspec
    from distributed import Client

    from saltkit.seismic.mdio_volume import PredictorSettings, check_complete, predict_mdio

    fs = fsspec.filesystem("memory")
    fs.put(str(survey[1]), "/round_trip/survey.mdio", recursive=True)
    try:
        with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
            predict_mdio("memory://round_trip/survey.mdio", "memory://round_trip/salt.mdio",
                         PredictorSettings(str(teacher)), direction="both", threshold=0.4, client=client,
                         progress=False)
            with pytest.raises(ValueError, match="exists; pass --overwrite"):
                predict_mdio("memory://round_trip/survey.mdio", "memory://round_trip/salt.mdio",
                             PredictorSettings(str(teacher)), client=client)
        assert sorted(Path(p).name for p in fs.ls("/round_trip", detail=False)) == ["salt.mdio", "survey.mdio"]
        assert check_complete("memory://round_trip/salt.mdio")["complete"] is True
        np.testing.assert_allclose(probabilities("memory://round_trip/salt.mdio"), probabilities(predicted[0]),
                                   atol=1e-6, rtol=0)
    finally:
        fs.rm("/round_trip", recursive=True)


def test_without_the_extra_the_error_names_it(monkeypatch, capsys, tmp_path):
    for name in ("mdio", "distributed"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert main(["predict", str(tmp_path / "survey.mdio"), "--out", str(tmp_path / "salt.mdio")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'saltkit[mdio]'" in err and len(err.splitlines()) == 1
