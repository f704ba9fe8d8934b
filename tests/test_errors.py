"""saltkit's own errors end a program with one line (exit code 2); other errors keep their traceback."""

from __future__ import annotations

import sys

import pytest

from saltkit.checkpoints import read_checkpoint
from saltkit.config import ConfigError
from saltkit.data.layout import DatasetError, read_id_csv
from saltkit.errors import excepthook, is_user_error, one_line, program_name, user_error
from saltkit.handlers.noam import schedule_steps
from saltkit.recipe import check_config


def raised(fn, *args, **kwargs) -> BaseException:
    try:
        fn(*args, **kwargs)
    except Exception as e:
        return e
    raise AssertionError(f"{fn.__name__} raised nothing")


def wrapped(error: BaseException) -> RuntimeError:
    """What MONAI's config resolver raises around an error in a config expression."""
    try:
        raise RuntimeError("Failed to evaluate ConfigExpression: $@recipe.check()") from error
    except RuntimeError as outer:
        return outer


def test_saltkit_errors_are_found_inside_monai_wrappers(tmp_path):
    config = raised(check_config, tmp_path / "nope", 0, 10, "resnet18", "pad", 16, 12, 0.002, 2)
    assert isinstance(config, ConfigError) and is_user_error(config)
    assert user_error(wrapped(config)) is config
    assert user_error(wrapped(wrapped(config))) is config
    data = raised(read_id_csv, tmp_path / "x.csv", ["id", "z"])
    assert isinstance(data, DatasetError) and user_error(wrapped(data)) is data
    # a plain FileNotFoundError raised by saltkit itself, with its message
    missing = raised(read_checkpoint, tmp_path / "best_metric.pt")
    assert type(missing) is FileNotFoundError and user_error(wrapped(missing)) is missing


def test_library_errors_keep_their_traceback(tmp_path):
    # a ValueError of a builtin called in saltkit code (float("abc")): Python's words, not saltkit's message
    library = raised(schedule_steps, "abc", 10)
    assert str(library) == "could not convert string to float: 'abc'" and not is_user_error(library)
    assert user_error(wrapped(library)) is None
    # an error raised outside saltkit, and a context (not an explicit cause), are not followed
    assert user_error(wrapped(ValueError("elsewhere"))) is None
    try:
        try:
            raise ConfigError("config key 'x': bad")
        except ConfigError:
            raise RuntimeError("a bug while handling it")  # noqa: B904 - the implicit context is the point
    except RuntimeError as e:
        assert user_error(e) is None


def test_hook_prints_one_line_and_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SALTKIT_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["/x/monai/bundle/__main__.py", "run", "training", "--fold", "10"])
    error = wrapped(ConfigError("config key 'fold' must be an integer in 0..9\n  (num_folds=10), got 10"))
    seen = []
    with pytest.raises(SystemExit) as info:
        excepthook(type(error), error, error.__traceback__, fallback=lambda *a: seen.append(a))
    assert info.value.code == 2 and not seen
    err = capsys.readouterr().err
    assert err == "saltkit training: error: config key 'fold' must be an integer in 0..9 (num_folds=10), got 10\n"
    # anything else goes to the previous hook untouched
    other = wrapped(KeyError("x"))
    excepthook(type(other), other, other.__traceback__, fallback=lambda *a: seen.append(a))
    assert seen == [(RuntimeError, other, other.__traceback__)]
    # SALTKIT_DEBUG=1: the full traceback of saltkit's errors too
    monkeypatch.setenv("SALTKIT_DEBUG", "1")
    excepthook(type(error), error, error.__traceback__, fallback=lambda *a: seen.append(a))
    assert seen[-1][1] is error


def test_names_and_lines():
    assert program_name(["/x/monai/bundle/__main__.py", "run", "swa", "--run_dir", "r"]) == "saltkit swa"
    assert program_name(["/x/monai/bundle/__main__.py", "run", "--config_file", "f"]) == "saltkit run"
    assert program_name(["/usr/bin/python", "train.py"]) == "saltkit"
    assert one_line(ValueError("a\n  b\tc ")) == "a b c"


def test_error_from_a_loader_worker(tmp_path):
    import torch
    from torch.utils.data import DataLoader

    from saltkit.transforms import LoadTiled

    class Tiles(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, k):
            return LoadTiled(keys="image")({"image": tmp_path / f"{k}.png"})

    error = raised(lambda: next(iter(DataLoader(Tiles(), num_workers=1))))
    assert type(error) is DatasetError and "Original Traceback" in str(error)  # re-raised by the main process
    assert one_line(wrapped(error).__cause__) == f"{tmp_path / '0.png'}: image file not found"


def test_installed_by_import_saltkit():
    import saltkit  # noqa: F401

    assert getattr(sys.excepthook, "saltkit", False)
