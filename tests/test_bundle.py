"""The bundle in MONAI's shape: the keys each workflow needs, and MONAI's own bundle commands on it."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "saltnet" / "configs"

# as the model zoo's CI checks them: what each workflow file must define
REQUIRED = {
    "inference.json": ["imports", "bundle_root", "ckpt", "dataset_dir", "device", "network_def", "network", "inferer",
                       "preprocessing", "dataset", "dataloader", "postprocessing", "handlers", "evaluator",
                       "initialize", "run"],
    "evaluate.json": ["imports", "bundle_root", "ckpt", "dataset_dir", "device", "network_def", "network", "inferer",
                      "preprocessing", "dataset", "dataloader", "postprocessing", "key_metric", "additional_metrics",
                      "handlers", "evaluator", "initialize", "run"],
    "train.json": ["imports", "bundle_root", "dataset_dir", "device", "network_def", "network", "loss", "optimizer",
                   "inferer", "postprocessing", "train#preprocessing", "train#dataset", "train#dataloader",
                   "train#handlers", "train#trainer", "validate#preprocessing", "validate#dataset",
                   "validate#dataloader", "validate#handlers", "validate#evaluator", "initialize", "run"],
}


def lookup(config: dict, key: str):
    for part in key.split("#"):
        config = config[part]
    return config


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_workflow_files_have_the_keys_their_workflow_needs(name):
    config = json.loads((CONFIGS / name).read_text())
    missing = []
    for key in REQUIRED[name]:
        try:
            lookup(config, key)
        except (KeyError, TypeError):
            missing.append(key)
    assert not missing, f"{name} lacks {missing}"
    if name != "train.json":
        assert config["run"] == ["$saltkit.config.check_command_line()", "$@evaluator.run()"]
        targets = [h.get("_target_") for h in config["handlers"]]
        assert "CheckpointLoader" in targets
        assert config["evaluator"]["_target_"] == "SupervisedEvaluator"
    # one inferer key, the same flip-TTA inferer in every workflow
    assert config["inferer"]["_target_"] == "saltkit.inference.FlipTTAInferer"



def saltkit_targets() -> list[str]:
    """Every saltkit class or function a bundle config or an override file builds through `_target_`."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if isinstance(target, str) and target.startswith("saltkit."):
                found.add(target)
            nodes = node.values()
        else:
            nodes = node if isinstance(node, list) else ()
        for child in nodes:
            walk(child)

    for path in sorted([*CONFIGS.glob("*.json"), *(REPO / "configs").glob("*.json")]):
        walk(json.loads(path.read_text()))
    return sorted(found)


def documented_arguments(doc: str | None) -> list[str] | None:
    """The names a docstring's Google-style `Args:` section describes, one entry a line (None: no section)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    stripped = [line.strip() for line in lines]
    if "Args:" not in stripped:
        return None
    names, indent = [], None
    for line in lines[stripped.index("Args:") + 1:]:
        if not line.strip():
            continue
        own = len(line) - len(line.lstrip())
        if own == 0:
            break
        indent = own if indent is None else indent
        match = re.match(r"\s*(\w+)( \([^)]*\))?:", line) if own == indent else None
        if match:
            names.append(match.group(1))
    return names


def test_bundle_targets_document_their_arguments():
    # as segmentation_models_pytorch's classes do: a config's reader finds each key's meaning and units in the
    # docstring of the class (or function) it builds
    import importlib

    targets = saltkit_targets()
    assert "saltkit.networks.SaltUNet" in targets and "saltkit.handlers.BestCheckpoint" in targets
    undocumented = {}
    for target in targets:
        module, _, name = target.rpartition(".")
        obj = getattr(importlib.import_module(module), name)
        signature = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
        params = [p.name for p in signature.parameters.values()
                  if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not params:
            continue
        names = documented_arguments(obj.__doc__)
        missing = params if names is None else [p for p in params if p not in names]
        if missing:
            undocumented[target] = missing
    assert not undocumented, f"add these to the docstring's Args: section, one line each: {undocumented}"


def test_the_args_reader_needs_one_entry_per_argument():
    doc = """Summary.

    Args:
        network, optimizer: the run's.
        best: the handlers,
            continued here: not an entry.
    """
    assert documented_arguments(doc) == ["best"]
    assert documented_arguments("No section.") is None


# The keys MONAI's bundle specification makes mandatory in metadata.json (its schema meta_schema_20220324 and
# MONAI's current one require them too), and those of every input / output tensor format.
SPEC_METADATA_KEYS = ("version", "monai_version", "pytorch_version", "numpy_version", "optional_packages_version",
                      "task", "description", "authors", "copyright", "network_data_format")
SPEC_TENSOR_KEYS = ("type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range",
                    "is_patch_data", "channel_def")


def test_metadata_holds_the_model_zoo_fields():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in ("schema", "changelog", "required_packages_version", "name", "data_source", "data_type",
                "image_classes", "label_classes", "pred_classes", "eval_metrics", "intended_use", "references",
                *SPEC_METADATA_KEYS):
        assert key in meta, key
    assert meta["schema"].endswith("/meta_schema_20220324.json")
    assert isinstance(meta["optional_packages_version"], dict) and isinstance(meta["required_packages_version"], dict)
    assert meta["version"] in meta["changelog"]
    assert all(isinstance(v, (int, float)) for v in meta["eval_metrics"].values()), meta["eval_metrics"]
    formats = meta["network_data_format"]
    for name, tensor in [*formats["inputs"].items(), *formats["outputs"].items()]:
        assert not [k for k in SPEC_TENSOR_KEYS if k not in tensor], (name, tensor)
    inputs, outputs = formats["inputs"]["image"], formats["outputs"]["pred"]
    assert inputs["spatial_shape"] == [128, 128] and inputs["num_channels"] == 3 and inputs["value_range"] == [0, 1]
    assert outputs["num_channels"] == 1 and len(outputs["value_range"]) == 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from saltkit.networks import SaltUNet

    torch.manual_seed(0)
    net = SaltUNet(backbone="resnet18", num_filters=4, upsample_input=False).eval()
    path = tmp_path_factory.mktemp("run") / "best_metric.pt"
    torch.save({"network": net.state_dict(), "arch": net.arch, "variant": "pad"}, path)
    return path


def monai_bundle(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "monai.bundle", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_ckpt_export_as_the_model_zoo_readme_writes_it(checkpoint, tmp_path):
    """`python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file ... --meta_file ...
    --config_file .../inference.json` on a saltkit checkpoint, with nothing else to pass."""
    out = tmp_path / "models" / "model.ts"
    out.parent.mkdir()
    monai_bundle("ckpt_export", "network_def", "--filepath", str(out), "--ckpt_file", str(checkpoint),
                 "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.json"),
                 "--ckpt", str(checkpoint))
    from saltkit.checkpoints import load_network

    module = torch.jit.load(str(out), map_location="cpu").eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(module(x), load_network(checkpoint)(x).logit, rtol=1e-5, atol=1e-5)


def test_verify_net_in_out_and_a_bundle_with_its_model(checkpoint, tmp_path):
    monai_bundle("verify_net_in_out", "network_def", "--meta_file", str(CONFIGS / "metadata.json"),
                 "--config_file", str(CONFIGS / "inference.json"), "--ckpt", str(checkpoint),
                 "--network_def#outputs", "logit", "--device", "cpu")
    # a bundle folder holding models/model.pt runs inference with no --ckpt (the model zoo's layout)
    bundle_root = tmp_path / "saltnet"
    (bundle_root / "models").mkdir(parents=True)
    (bundle_root / "models" / "model.pt").write_bytes(checkpoint.read_bytes())
    monai_bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(bundle_root),
                 "--progress", "false")
    assert (bundle_root / "models" / "inference" / "model" / "submission.csv").is_file()


# ---------------------------------------------------------------- the shipped model (models/model.pt)

BUNDLE = REPO / "bundles" / "saltnet"
SHIPPED = BUNDLE / "models" / "model.pt"
# what the model zoo's CI (ci/verify_bundle.py, verify_bundle_directory) looks for in a bundle, with the model card
# and, as the zoo asks of bundles whose data has terms, docs/data_license.txt
ZOO_FILES = ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md", "LICENSE",
             "docs/data_license.txt")


def test_bundle_directory_holds_what_the_model_zoo_requires():
    assert not [f for f in ZOO_FILES if not (BUNDLE / f).is_file()]
    assert "Apache License" in (BUNDLE / "LICENSE").read_text()
    assert "competition's rules" in (BUNDLE / "docs" / "data_license.txt").read_text()


def test_shipped_model_file():
    """At most 16 MB, read with weights_only=True, holding its weights, arch, variant, scores and run record;
    float32 weights however it is stored."""
    from saltkit.checkpoints import read_checkpoint

    assert SHIPPED.stat().st_size <= 16 * 1024 * 1024
    stored = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    assert {"network", "arch", "variant", "metrics", "record", "source", "storage"} <= set(stored)
    assert stored["variant"] in ("pad", "resize") and stored["storage"] in ("float32", "float16")
    resolved = stored["record"]["resolved"]
    assert resolved["fold"] is not None and resolved["train_tiles"] >= 1000 and stored["record"]["command"]
    assert {t.dtype for t in read_checkpoint(SHIPPED)["network"].values() if t.is_floating_point()} == {torch.float32}


def test_model_zoo_ckpt_export_and_verify_net_in_out_on_the_shipped_bundle(tmp_path):
    """As the zoo's CI runs them (ci/verify_bundle.py): `ckpt_export` of models/model.pt to TorchScript and
    `verify_net_in_out` of network_def, given only the bundle's own files and bundle_root."""
    from monai.bundle import ckpt_export, verify_net_in_out

    from saltkit.checkpoints import load_network

    meta, config = str(BUNDLE / "configs" / "metadata.json"), str(BUNDLE / "configs" / "inference.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=str(BUNDLE), device="cpu")
    out = tmp_path / "verify_model.ts"
    ckpt_export(net_id="network_def", filepath=str(out), ckpt_file=str(SHIPPED), meta_file=meta, config_file=config,
                bundle_root=str(BUNDLE))
    module = torch.jit.load(str(out), map_location="cpu").eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(module(x), load_network(SHIPPED)(x).logit, rtol=1e-4, atol=1e-4)


def test_shipped_model_is_pinned(tmp_path):
    """The inference workflow with no --ckpt predicts the sample's 20 test tiles with the shipped model (flip TTA,
    its tuned post-processing): the same weights and masks as stored in tests/data/shipped_model_masks.csv."""
    import pin_shipped_model as pin

    found = pin.shipped_masks(tmp_path)
    assert len(found[1]) == 20
    problems = pin.differences(pin.read_expectation(), found)
    assert not problems, "; ".join(problems) + f"; if the change is on purpose, rewrite the pin: {pin.REWRITE}"


def test_predict_uses_the_shipped_model_when_no_checkpoint_is_given(tmp_path, capsys, caplog, monkeypatch):
    """`saltkit predict SECTION --out DIR` from any folder: the checkout's bundle model, named in the output, whose
    embedded run record says it is no toy."""
    from saltkit.cli import main

    monkeypatch.chdir(tmp_path)
    section = REPO / "saltkit" / "sample_data" / "sections" / "mosaic_9_127.png"
    with caplog.at_level("WARNING", logger="saltkit.seismic.provenance"):
        assert main(["predict", str(section), "--out", "pred", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"predict: checkpoint {SHIPPED} (the bundle's model; --ckpt FILE uses another)" in out
    assert "mask threshold" in out and str(SHIPPED) in out.split("mask threshold")[1].splitlines()[0]
    assert not caplog.records  # the toy-model warning
    assert {p.name for p in (tmp_path / "pred").iterdir()} >= {"mosaic_9_127_prob.npy", "mosaic_9_127_mask.png",
                                                                "mosaic_9_127_overlay.png"}


def test_default_checkpoint_is_the_bundles_model_and_says_so(tmp_path, caplog):
    from saltkit.checkpoints import default_checkpoint, shipped_model

    run_dir = tmp_path / "runs" / "pad_fold0"
    with caplog.at_level("INFO", logger="saltkit.checkpoints"):
        assert default_checkpoint(BUNDLE, run_dir) == str(SHIPPED)
    assert caplog.records[-1].getMessage() == f"checkpoint {SHIPPED} (the bundle's model; --ckpt FILE uses another)"
    bare = tmp_path / "bare_bundle"
    with pytest.raises(FileNotFoundError) as info:
        default_checkpoint(bare, run_dir)
    assert str(info.value).startswith(f"checkpoint not found: neither the bundle's model {bare}/models/model.pt nor "
                                      f"the run's {run_dir}/best_metric.pt exists (config key 'ckpt'); pass --ckpt")
    with pytest.raises(FileNotFoundError, match=f"the bundle's model {bare}/models/model.pt does not exist; pass "
                                                 "--ckpt FILE"):
        shipped_model(bare)
    run_dir.mkdir(parents=True)
    (run_dir / "best_metric.pt").write_bytes(SHIPPED.read_bytes())
    with caplog.at_level("INFO", logger="saltkit.checkpoints"):
        assert default_checkpoint(bare, run_dir) == str(run_dir / "best_metric.pt")
    assert "(the run's; no bundle model at" in caplog.records[-1].getMessage()
