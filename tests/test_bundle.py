"""The bundle in MONAI's shape: the keys each workflow needs, and MONAI's own bundle commands on it."""

from __future__ import annotations

import json
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


def test_metadata_holds_the_model_zoo_fields():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in ("schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "name", "task", "description", "authors", "copyright",
                "data_source", "data_type", "image_classes", "label_classes", "pred_classes", "eval_metrics",
                "intended_use", "references", "network_data_format"):
        assert key in meta, key
    assert meta["version"] in meta["changelog"]
    assert all(isinstance(v, (int, float)) for v in meta["eval_metrics"].values()), meta["eval_metrics"]
    inputs, outputs = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
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
