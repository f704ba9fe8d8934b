"""`saltkit` command line: folds, score, check-data, the subcommand registry and error handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from saltkit.cli import Subcommand, builtin_subcommands, main, register_subcommand
from saltkit.data.folds import read_folds
from saltkit.data.layout import copy_subset, read_rle_masks, sample_dir, train_items
from saltkit.metrics import competition_metric
from saltkit.submission import write_submission

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tmp_path):
    ids = [it["id"] for it in train_items(sample_dir())][:12]
    return copy_subset(sample_dir(), tmp_path / "tgs", ids)


def test_folds_command(sample_dir, tmp_path, capsys):
    out = tmp_path / "folds.csv"
    assert main(["folds", str(sample_dir), "--k", "5", "--out", str(out), "--seed", "3"]) == 0
    assert "100 ids in 5 folds of 20-20" in capsys.readouterr().out
    folds = read_folds(out, k=5)
    assert len(folds) == 100
    out2 = tmp_path / "again.csv"
    main(["folds", str(sample_dir), "--k", "5", "--out", str(out2), "--seed", "3"])
    assert out.read_text() == out2.read_text()


def test_folds_command_errors(tmp_path, capsys):
    out = tmp_path / "folds.csv"
    assert main(["folds", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saltkit folds: error: ") and "nope: dataset folder not found" in err
    assert main(["folds", str(sample_dir()), "--k", "1000", "--out", str(out)]) == 2
    assert "k=1000" in capsys.readouterr().err
    assert not out.exists()


def _predictions(tmp_path):
    truth_df, truths = read_rle_masks(sample_dir() / "train.csv")
    preds = np.roll(truths, 3, axis=2)
    preds[::7] = 0
    path = tmp_path / "pred.csv"
    write_submission(truth_df["id"].tolist()[::-1], preds[::-1], path)  # row order differs from the truth's
    return path, competition_metric(preds, truths)


def test_score_command(tmp_path, capsys):
    truth_csv = sample_dir() / "train.csv"
    assert main(["score", str(truth_csv), str(truth_csv)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1.000000"
    pred, expected = _predictions(tmp_path)
    per_image = tmp_path / "per_image.csv"
    assert main(["score", str(truth_csv), str(pred), "--per-image", str(per_image)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{expected.mean():.6f}" and float(out[-1]) < 1
    assert "tiles: 100" in "\n".join(out)
    table = np.genfromtxt(per_image, delimiter=",", names=True, dtype=None, encoding="utf-8")
    np.testing.assert_allclose(table["metric"], expected, rtol=0, atol=1e-12)


def test_score_command_errors(tmp_path, capsys):
    truth_csv = sample_dir() / "train.csv"
    rows = truth_csv.read_text().splitlines()
    short = tmp_path / "short.csv"
    short.write_text("\n".join(rows[:-1]) + "\n")
    per_image = tmp_path / "per_image.csv"
    assert main(["score", str(truth_csv), str(short), "--per-image", str(per_image)]) == 2
    err = capsys.readouterr().err
    assert f"{short}: 1 expected ids are missing: {rows[-1].split(',')[0]}" in err
    assert not per_image.exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([rows[0], rows[1].split(",")[0] + ",3 2 1 1", *rows[2:]]) + "\n")
    assert main(["score", str(truth_csv), str(bad)]) == 2
    assert f"{bad} line 2 (id {rows[1].split(',')[0]}): RLE run 2" in capsys.readouterr().err
    assert main(["score", str(sample_dir() / "depths.csv"), str(truth_csv)]) == 2
    assert "header is id,z; expected id,rle_mask" in capsys.readouterr().err


def test_check_data_command(tiny, capsys):
    assert main(["check-data", str(sample_dir())]) == 0
    assert capsys.readouterr().out.startswith("ok: 100 train tiles with masks (100 with depth), 20 test tiles")
    mask = tiny / "train" / "masks" / (train_items(tiny)[3]["id"] + ".png")
    mask.write_bytes(b"junk")
    (tiny / "depths.csv").write_text("id,depth\n")
    assert main(["check-data", str(tiny)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(str(mask) in line and "cannot read the mask" in line for line in out)
    assert any("depths.csv: header is id,depth" in line for line in out)
    assert out[-1] == f"2 problem(s) in {tiny}"


def test_registry_and_extension():
    registry = builtin_subcommands()
    assert list(registry) == ["folds", "score", "check-data"]
    with pytest.raises(ValueError, match="'score' is already registered"):
        register_subcommand(registry, registry["score"])
    seen = []
    register_subcommand(registry, Subcommand("hello", "say hello", lambda p: p.add_argument("name"),
                                             lambda a: seen.append(a.name) or 0))
    assert main(["hello", "salt"], registry=registry) == 0 and seen == ["salt"]


def test_console_errors_have_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "saltkit.cli", "score", str(tmp_path / "t.csv"),
                             str(tmp_path / "p.csv")], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"saltkit score: error: {tmp_path / 't.csv'}: file not found " \
                                    "(expected a CSV with header id,rle_mask)"


def test_help_lists_the_bundle_workflows(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name, run_id in (("train", "training"), ("swa", "swa"), ("evaluate", "evaluate"), ("inference", "inference")):
        assert f"    {name} " in out or f"    {name}\n" in out
        assert f"monai.bundle run {run_id})" in " ".join(out.split())
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ("python -m monai.bundle run training --config_file \"['bundles/saltnet/configs/train.json', FILES...]\""
            in out)


def test_workflow_command_line_is_the_bundle_command_line():
    from saltkit.cli.workflows import WORKFLOWS, bundle_argv, is_shipped

    train = next(w for w in WORKFLOWS if w.name == "train")
    argv = bundle_argv(train, ["configs/pad.json", "configs/cpu.json", "--max-epochs", "2", "--fold=1"])
    assert Path(argv[0]).parent.name == "bundle" and argv[1:3] == ["run", "training"]
    assert argv[3] == "--config_file" and argv[5:] == ["--max-epochs", "2", "--fold=1"]
    files = eval(argv[4])  # the repr of a list, as fire reads it
    assert Path(files[0]).resolve() == (REPO / "bundles/saltnet/configs/train.json").resolve()
    assert files[1:] == ["configs/pad.json", "configs/cpu.json"]
    assert all(is_shipped(REPO / f) for f in files[1:]) and is_shipped(files[0])
    assert not is_shipped("/tmp/my_recipe.json")


def test_tune_is_the_evaluate_workflow_with_tuning_on():
    from saltkit.cli.workflows import WORKFLOWS, bundle_argv

    tune = next(w for w in WORKFLOWS if w.name == "tune")
    argv = bundle_argv(tune, ["--ckpt", "runs/sample/pad_fold0/swa.pt"])
    assert argv[1:3] == ["run", "evaluate"] and Path(eval(argv[4])[0]).name == "evaluate.json"
    assert argv[5:] == ["--tune_postprocessing", "true", "--ckpt", "runs/sample/pad_fold0/swa.pt"]


def test_workflow_override_files_are_found_from_any_folder(tmp_path, monkeypatch):
    from saltkit.cli.workflows import WORKFLOWS, bundle_argv

    # as from an editable install (the README's): the package sits in the checkout; tox installs a copy elsewhere
    monkeypatch.setattr("saltkit.cli.workflows.REPO_DIR", REPO)
    monkeypatch.chdir(tmp_path)
    swa = next(w for w in WORKFLOWS if w.name == "swa")
    files = eval(bundle_argv(swa, ["configs/resize.json", "--run_dir", "runs/sample/resize_fold0"])[4])
    assert Path(files[1]) == REPO / "configs" / "resize.json"
    with pytest.raises(FileNotFoundError, match="config file configs/rezise.json not found"):
        bundle_argv(swa, ["configs/rezise.json"])


def test_workflow_without_a_checkout_names_the_bundle_config(tmp_path, monkeypatch, capsys):
    from saltkit.cli import main

    # a copy installed with `pip install .`, run from a folder that is not a checkout
    monkeypatch.setattr("saltkit.cli.workflows.REPO_DIR", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "configs/pad.json"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("saltkit train: error: ") and "bundles/saltnet/configs/train.json" in last, last


def test_warnings_about_shipped_configs_are_silenced(recwarn):
    import logging
    import warnings

    from saltkit.cli.workflows import shipped_config_warnings_silenced

    monai_log = logging.getLogger("monai.bundle.workflows")  # MONAI's own handler, no propagation
    logged: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: logged.append(record.getMessage())
    monai_log.addHandler(collect)
    shipped = [str(REPO / "bundles/saltnet/configs/train.json"), str(REPO / "configs/pad.json")]
    try:
        for files, shown in ((shipped, False), (shipped + ["/tmp/mine.json"], True)):
            recwarn.clear()
            logged.clear()
            with shipped_config_warnings_silenced(files):
                warnings.warn("parsing config_file ['x']: any `_target_` value ...", UserWarning, stacklevel=1)
                monai_log.warning("Not all config files are in bundles/saltnet/configs. If logging_file ...")
                monai_log.warning("Cannot find the config file")
                warnings.warn("another warning", UserWarning, stacklevel=1)
            messages = [str(w.message) for w in recwarn]
            assert ("parsing config_file ['x']: any `_target_` value ..." in messages) == shown
            assert any(m.startswith("Not all config files") for m in logged) == shown
            assert "another warning" in messages and "Cannot find the config file" in logged  # only those two
    finally:
        monai_log.removeHandler(collect)


def test_option_spellings(tmp_path, capsys):
    from saltkit.cli import hyphenated_options

    assert hyphenated_options(["--min_component_size", "5", "--out=a_b.csv", "x_y"]) == \
        ["--min-component-size", "5", "--out=a_b.csv", "x_y"]
    out = tmp_path / "per_image.csv"
    truth = sample_dir() / "train.csv"
    assert main(["score", str(truth), str(truth), "--per_image", str(out)]) == 0
    assert out.is_file() and capsys.readouterr().out.splitlines()[-1] == "1.000000"


def test_debug_switch_shows_the_traceback(tmp_path, monkeypatch, capsys):
    argv = ["score", str(tmp_path / "t.csv"), str(tmp_path / "p.csv")]
    assert main(argv) == 2
    monkeypatch.setenv("SALTKIT_DEBUG", "1")
    with pytest.raises(ValueError, match="t.csv: file not found"):
        main(argv)


@pytest.mark.parametrize("tokens, expected", [
    (["--fold", "1", "--max_epochs=2"], []),
    (["--fold", "1", "stray"], [("stray", "--fold 1")]),
    (["--flag", "--fold", "1", "configs/pad.json"], [("configs/pad.json", "--fold 1")]),
    (["word"], [("word", None)]),
])
def test_stray_words(tokens, expected):
    from saltkit.config import stray_words

    assert stray_words(tokens) == expected


def _finished_run_folder(root: Path) -> dict[Path, bytes]:
    """A run folder as a finished run leaves it (its files' bytes), for the data-loss checks below."""
    run = root / "runs" / "A"
    run.mkdir(parents=True)
    files = {run / "config.json": b'{"variant": "pad", "fold": 0}', run / "best_metric.pt": b"weights of run A"}
    for path, data in files.items():
        path.write_bytes(data)
    return files


def test_stray_word_after_the_options_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    # a stray word reached MONAI as init_id, which skipped the bundle's checks and retrained over run A
    monkeypatch.chdir(tmp_path)
    files = _finished_run_folder(tmp_path)
    assert main(["train", "configs/pad.json", "--max_epochs", "1", "--run_dir", "runs/A", "stray"]) == 2
    assert "stray word 'stray' after --run_dir runs/A" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in files} == files and sorted(p.name for p in (tmp_path / "runs/A").iterdir()) \
        == sorted(p.name for p in files)


def test_config_file_among_the_options_is_refused(tmp_path, monkeypatch, capsys):
    # `saltkit tune --ckpt B --fold 0 configs/pad.json` tuned a fold-1 model on its own training tiles
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--ckpt", "runs/B/best_metric.pt", "--fold", "0", "configs/pad.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "config file configs/pad.json comes after --fold 0" in err and "config files go first" in err


@pytest.mark.slow
def test_stray_word_on_the_monai_bundle_command_line(tmp_path):
    # the same word on MONAI's own command line: initialize is skipped, so each workflow's `run` checks first
    files = _finished_run_folder(tmp_path)
    configs = [str(REPO / "bundles/saltnet/configs/train.json"), str(REPO / "configs/pad.json")]
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr(configs),
                           "--max_epochs", "1", "--run_dir", "runs/A", "stray"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "stray word 'stray' after --run_dir runs/A" in done.stderr.strip().splitlines()[-1]
    assert {p: p.read_bytes() for p in files} == files


def test_words_after_a_bare_double_dash_and_negative_numbers_are_values():
    # `saltkit predict -- --my_file.png` looked for --my-file.png; `--clip-range -1e4 1e4` was read as options
    from saltkit.cli import all_subcommands, build_parser, parse_command_line

    registry = all_subcommands()
    args = parse_command_line(build_parser(registry), registry,
                              ["predict", "--ckpt", "m.pt", "--out", "o", "--clip-range", "-1e4", "1e4",
                               "--overlap", "-.5", "--", "--my_file.png"])
    assert args.input == Path("--my_file.png") and args.clip_range == [-1e4, 1e4] and args.overlap == -0.5


def test_help_and_data_commands_start_without_torch():
    # `saltkit --help` took seconds: every area's module (so torch and MONAI) was imported to list commands
    code = ("import sys\nfrom saltkit.cli import main\n"
            "heavy = lambda: sorted({'torch', 'monai'} & set(sys.modules))\n"
            "print(heavy())\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint(heavy())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == lines[-1] == "[]", lines[:1] + lines[-1:]
    assert "    predict" in done.stdout and "    ensemble" in done.stdout  # listed all the same


def test_listed_commands_are_the_ones_their_modules_register():
    import importlib

    from saltkit.cli import AREA_COMMANDS

    for module in {m for m, _ in AREA_COMMANDS.values()}:
        registry: dict[str, Subcommand] = {}
        importlib.import_module(module).register(registry)
        assert {name: c.help for name, c in registry.items()} == \
            {name: summary for name, (m, summary) in AREA_COMMANDS.items() if m == module}, module
