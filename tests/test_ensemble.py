"""Saved probabilities (uint16 npz) and their ensembling into one submission."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from saltkit.cli import main
from saltkit.inference.ensemble import average_probabilities, ensemble_files
from saltkit.inference.probabilities import Probabilities, load_probabilities, save_probabilities


def make(ids, seed, image=True):
    rng = np.random.default_rng(seed)
    n = len(ids)
    return Probabilities(
        np.array(ids), rng.random((n, 101, 101)).astype(np.float32), rng.random(n).astype(np.float32) if image else None
    )


def test_round_trip_quantisation(tmp_path):
    p = make(["a", "b", "c"], 0)
    p.probs[0, 0, :3] = [0.0, 1.0, 0.5]
    path = save_probabilities(tmp_path / "sub" / "probs.npz", p)
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    with np.load(path) as d:
        assert d["probs"].dtype == np.uint16 and d["ids"].tolist() == ["a", "b", "c"]
    q = load_probabilities(path)
    assert q.ids.tolist() == ["a", "b", "c"]
    assert np.abs(q.probs - p.probs).max() <= 0.5 / 65535 + 1e-7
    assert np.abs(q.image_probs - p.image_probs).max() <= 0.5 / 65535 + 1e-7
    assert q.probs[0, 0, :3].tolist() == [0.0, 1.0, pytest.approx(0.5, abs=1e-5)]


def test_average_aligns_ids_and_weights_equally(tmp_path):
    ids = ["t1", "t2", "t3", "t4"]
    a, b, c = make(ids, 1), make(ids, 2), make(ids, 3, image=False)
    perm = np.array([2, 0, 3, 1])
    b_shuffled = Probabilities(b.ids[perm], b.probs[perm], b.image_probs[perm])
    avg = average_probabilities([a, b_shuffled])
    assert avg.ids.tolist() == ids
    np.testing.assert_allclose(avg.probs, (a.probs + b.probs) / 2, atol=1e-6)
    np.testing.assert_allclose(avg.image_probs, (a.image_probs + b.image_probs) / 2, atol=1e-6)
    # one input without image probabilities: the average has none
    assert average_probabilities([a, c]).image_probs is None
    paths = [save_probabilities(tmp_path / f"{k}.npz", p) for k, p in enumerate([a, b_shuffled, c])]
    files = ensemble_files(paths)
    np.testing.assert_allclose(files.probs, (a.probs + b.probs + c.probs) / 3, atol=2e-5)


def test_mismatched_ids_name_the_file(tmp_path):
    a = save_probabilities(tmp_path / "a.npz", make(["x", "y"], 0))
    b = save_probabilities(tmp_path / "b.npz", make(["x", "z"], 1))
    with pytest.raises(ValueError, match=r"b\.npz.*missing \['y'\].*unexpected \['z'\]"):
        ensemble_files([a, b])
    with pytest.raises(ValueError, match="nothing to ensemble"):
        average_probabilities([])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_probabilities(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        load_probabilities(bad)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz.*missing arrays"):
        load_probabilities(other)


def test_cli_ensemble_writes_beside_its_inputs(tmp_path, monkeypatch, capsys):
    ids = ["t1", "t2", "t3"]
    a, b = make(ids, 1), make(ids, 2)
    a.probs[0], b.probs[0] = 0.9, 0.9  # tile t1: all salt, one 10201-pixel component
    paths = [save_probabilities(tmp_path / "runs" / run / "inference" / "probabilities.npz", p)
             for run, p in (("pad_fold0", a), ("resize_fold0", b))]
    monkeypatch.chdir(tmp_path)
    # no --out: runs/ensemble/submission.csv, not the current folder; underscore spelling accepted
    assert main(["ensemble", *map(str, paths), "--min_component_size", "20000"]) == 0
    out = Path("runs") / "ensemble" / "submission.csv"
    assert f"wrote {out}" in capsys.readouterr().out
    rows = out.read_text().splitlines()
    assert rows[0] == "id,rle_mask" and rows[1] == "t1,"  # the component is smaller than 20000 pixels: removed
    assert not (tmp_path / "submission.csv").exists()


@pytest.mark.parametrize("options, message", [
    (["--out", "a.npz"], "--out a.npz is the input PROBS.npz a.npz"),
    (["--out", "sub.csv", "--save-probs", "./a.npz"], "--save-probs a.npz is the input PROBS.npz a.npz"),
    (["--out", "same.csv", "--save-probs", "same.csv"], "--out same.csv and --save-probs same.csv name the same file"),
])
def test_ensemble_never_writes_over_an_input_or_its_other_output(tmp_path, monkeypatch, capsys, options, message):
    # --out a.npz turned an input into CSV text; --out X --save-probs X kept the npz and lost the submission
    monkeypatch.chdir(tmp_path)
    paths = [save_probabilities(Path(name), make(["t1", "t2"], seed)) for seed, name in enumerate(("a.npz", "b.npz"))]
    before = {p: p.read_bytes() for p in paths}
    assert main(["ensemble", "a.npz", "b.npz", *options]) == 2
    assert message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in paths} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz"]


def test_a_file_given_twice_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for seed, name in enumerate(("a.npz", "b.npz")):
        save_probabilities(Path(name), make(["t1", "t2"], seed))
    assert main(["ensemble", "a.npz", "./a.npz", "b.npz", "--out", "sub.csv"]) == 2
    assert "a.npz and a.npz are the same file: it would count twice" in capsys.readouterr().err
    assert not Path("sub.csv").exists()
