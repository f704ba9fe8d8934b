"""The saltnet bundle's workflows as `saltkit` subcommands: `saltkit train configs/pad.json --max_epochs 2`.

Each one runs, in this process, exactly the command line

    python -m monai.bundle run RUN_ID --config_file "['bundles/saltnet/configs/WORKFLOW.json', FILES...]" --KEY VALUE ...

(the run's config.json records that command line), with MONAI's notes about the configs we ship silenced: the
eval() warning printed for every config file, "Not all config files are in ..." (every override file in
`configs/` triggers it), "Setting logging properties based on config" and the deprecation notice about
metadata.json's `optional_packages_version` (its schema requires the key; MONAI 1.6 renames it). A config file from anywhere else keeps
them. `python -m monai.bundle run` itself prints them before any saltkit code runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[2]
BUNDLE_CONFIGS = Path("bundles") / "saltnet" / "configs"
OVERRIDE_CONFIGS = Path("configs")


@dataclass(frozen=True)
class Workflow:
    """A bundle workflow: `saltkit NAME` runs `python -m monai.bundle run RUN_ID` on bundle config `config`."""

    name: str
    run_id: str
    config: str
    help: str
    keys: tuple[str, ...] = ()  # --KEY VALUE pairs put before the user's (which may override them)


WORKFLOWS = (
    Workflow("train", "training", "train.json", "train one fold, writing runs/<dataset>/<variant>_fold<k>/"),
    Workflow("swa", "swa", "swa.json", "average a run's best checkpoints (SWA), BatchNorm re-estimated"),
    Workflow("evaluate", "evaluate", "evaluate.json", "score a checkpoint on its validation fold, with and without TTA"),
    Workflow("tune", "evaluate", "evaluate.json", "evaluate, and tune the post-processing on the validation fold into "
             "the checkpoint", ("--tune_postprocessing", "true")),
    Workflow("inference", "inference", "inference.json", "predict DATASET_DIR/test/images into a submission"),
    Workflow("predict", "predict", "predict.json", "predict images or sections of any size"),
)


def checkout_dir() -> Path:
    """The repository checkout holding bundles/ and configs/: beside the package, else the current folder."""
    for root in (REPO_DIR, Path.cwd()):
        if (root / BUNDLE_CONFIGS).is_dir():
            return root
    return REPO_DIR


def shown_path(path: Path) -> str:
    """`path` relative to the current folder when it lies below it (as a user types it), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def bundle_config(workflow: Workflow) -> Path:
    """Path of the workflow's bundle config; FileNotFoundError naming it when the checkout has none."""
    path = checkout_dir() / BUNDLE_CONFIGS / workflow.config
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such bundle config; `saltkit {workflow.name}` runs the saltnet bundle "
                                "of a repository checkout (bundles/saltnet/configs)")
    return path


def override_file(name: str) -> str:
    """An override file as given when it exists, else the checkout's file of that name (`configs/pad.json` from
    any folder); FileNotFoundError naming both places when neither exists."""
    if Path(name).is_file():
        return name
    in_checkout = checkout_dir() / name
    if not Path(name).is_absolute() and in_checkout.is_file():
        return shown_path(in_checkout)
    raise FileNotFoundError(f"config file {name} not found (nor {in_checkout}); override files come first, "
                            f"e.g. configs/pad.json, then --KEY VALUE pairs")


def bundle_argv(workflow: Workflow, args: Sequence[str]) -> list[str]:
    """`python -m monai.bundle run ...` arguments (argv[0] = monai.bundle's __main__) for `saltkit NAME ARGS`.

    ARGS: override files (before the first `--` option) then `--KEY VALUE` pairs passed on unchanged.
    """
    import monai.bundle.__main__ as bundle_main

    from saltkit.config import ConfigError, stray_word_message, stray_words

    args = list(args)
    split = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    for word, previous in stray_words(args[split:])[:1]:
        raise ConfigError(stray_word_message(word, previous))
    files = [shown_path(bundle_config(workflow))] + [override_file(f) for f in args[:split]]
    return [bundle_main.__file__, "run", workflow.run_id, "--config_file", repr(files), *workflow.keys, *args[split:]]


def is_shipped(config_file: str | Path) -> bool:
    """True for a config file of this checkout's bundle or its `configs/` override folder."""
    path = Path(config_file).resolve()
    root = checkout_dir().resolve()
    return path.parent in (root / BUNDLE_CONFIGS, root / OVERRIDE_CONFIGS)


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def shipped_config_warnings_silenced(config_files: Sequence[str]) -> Iterator[None]:
    """Silence MONAI's eval() notice, its 'Not all config files are in' warning, its note that it applies
    logging.conf and its notice about metadata.json's `optional_packages_version` while running `config_files`,
    when every one of them is a config we ship (see `is_shipped`)."""
    if not all(is_shipped(f) for f in config_files):
        yield
        return
    workflows_logger = logging.getLogger("monai.bundle.workflows")
    folders = _DropMessages("Not all config files are in ", "Setting logging properties based on config: ")
    workflows_logger.addFilter(folders)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"parsing config_file ", category=UserWarning)
            # metadata.json names optional_packages_version, as its schema requires; MONAI 1.6 reads it as a
            # deprecated spelling of required_packages_version and says so on every run
            warnings.filterwarnings("ignore", message=r"Detected deprecated name 'optional_packages_version'",
                                    category=UserWarning)
            yield
    finally:
        workflows_logger.removeFilter(folders)


def run_workflow(workflow: Workflow, args: Sequence[str]) -> int:
    """Run the workflow in this process as `python -m monai.bundle run` would; returns 0.

    sys.argv is the equivalent monai.bundle command line while it runs, so the bundle's checks of command-line
    keys and the run's recorded command see exactly that.
    """
    import fire
    from monai.bundle import scripts

    from saltkit.config import config_file_list
    from saltkit.logs import details_at_debug

    argv = bundle_argv(workflow, args)
    details_at_debug()  # MONAI's input summary, logged through its own handlers, whatever the workflow's config
    saved = sys.argv
    sys.argv = argv
    try:
        with shipped_config_warnings_silenced(config_file_list(argv[4])):
            fire.Fire({"run": scripts.run}, command=argv[1:], name="python -m monai.bundle")
    finally:
        sys.argv = saved
    return 0


def equivalent_command(workflow: Workflow) -> str:
    """The README spelling of the workflow, for help texts."""
    keys = "".join(f" {k}" for k in workflow.keys)
    return (f"python -m monai.bundle run {workflow.run_id} --config_file "
            f"\"['{(BUNDLE_CONFIGS / workflow.config).as_posix()}', FILES...]\"{keys} --KEY VALUE ...")


def _add_arguments(workflow: Workflow):
    def add(p) -> None:
        p.usage = f"saltkit {workflow.name} [FILE.json ...] [--KEY VALUE ...]"
        p.description = f"{workflow.help}; runs\n  {equivalent_command(workflow)}"
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.add_argument("args", nargs="*", metavar="FILE.json / --KEY VALUE",
                       help="override files (configs/pad.json, configs/cpu.json, ...), then bundle keys "
                            "(--dataset_dir DIR --fold 3; --max-epochs works too), listed in "
                            "bundles/saltnet/docs/README.md")
    return add


def register(registry: dict) -> None:
    """Add a passthrough subcommand per bundle workflow that no other module registered.

    Registered even where no checkout is found (a copy installed with `pip install .`, run from another folder):
    running it then ends with one line naming the bundle config it looked for, not "invalid choice".
    """
    from saltkit.cli.subcommand import Subcommand, register_subcommand

    for wf in WORKFLOWS:
        if wf.name in registry:
            continue
        register_subcommand(registry, Subcommand(
            wf.name, f"{wf.help} (monai.bundle run {wf.run_id})", _add_arguments(wf),
            lambda args, wf=wf: run_workflow(wf, args.args), passthrough=True, one_line_errors=()))
