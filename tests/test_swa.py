"""SWA: equal-weight parameter mean of checkpoints, BatchNorm statistics recomputed, the swa bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from saltkit.networks import SaltUNet
from saltkit.swa import average_checkpoints, recompute_bn, run_swa

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")  # MONAI's eval notice

REPO = Path(__file__).resolve().parents[1]
SWA_CONFIGS = [str(REPO / "bundles" / "saltnet" / "configs" / "swa.json"), str(REPO / "configs" / "pad.json")]

# dropout off, so a manual forward pass sees exactly what update_bn saw
ARCH = {"backbone": "resnet18", "num_filters": 4, "head_dropout": 0.0, "decoder_dropout": 0.0,
        "bottleneck_dropout": 0.0, "upsample_input": False}


def write_checkpoints(folder, n=3, arch=ARCH):
    """n checkpoints of one arch with different random weights and BN statistics."""
    paths, nets = [], []
    for k in range(n):
        torch.manual_seed(k)
        net = SaltUNet(**arch)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
        path = folder / f"ckpt{k}.pt"
        torch.save({"network": net.state_dict(), "arch": net.arch, "epoch": k}, path)
        paths.append(path)
        nets.append(net)
    return paths, nets


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("ckpts"))


def test_equal_weight_parameter_mean(checkpoints):
    paths, nets = checkpoints
    averaged, arch = average_checkpoints(paths)
    assert arch == nets[0].arch
    params = dict(averaged.named_parameters())
    assert len(params) == len(dict(nets[0].named_parameters()))
    for name, p in params.items():
        expected = sum(dict(n.named_parameters())[name] for n in nets) / 3
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)
    # buffers are not averaged: they are recomputed afterwards
    bn = next(m for m in averaged.modules() if isinstance(m, nn.BatchNorm2d))
    last = next(m for m in nets[-1].modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(bn.running_mean, last.running_mean)


def test_bn_recomputed_like_a_manual_pass(checkpoints):
    averaged, _ = average_checkpoints(checkpoints[0][:2])
    before = {k: v.clone() for k, v in averaged.state_dict().items() if "running" in k}
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 3, 64, 64, generator=g) for _ in range(3)]

    # manual: every BN's input in train mode (earlier BNs normalise with batch statistics, as update_bn does)
    seen: dict[str, list[torch.Tensor]] = {}
    bns = {name: m for name, m in averaged.named_modules() if isinstance(m, nn.BatchNorm2d)}
    hooks = [m.register_forward_pre_hook(lambda m, inp, name=name: seen.setdefault(name, []).append(inp[0].detach()))
             for name, m in bns.items()]
    averaged.train()
    with torch.no_grad():
        for x in batches:
            averaged(x)
    for h in hooks:
        h.remove()

    tiles = recompute_bn(averaged, iter(batches))
    assert tiles == 12 and not averaged.training
    state = averaged.state_dict()
    changed = 0
    for name, m in bns.items():
        inputs = seen[name]
        # equal batch sizes: the cumulative average is the mean of per-batch statistics
        mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0)
        var = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in inputs]).mean(0)
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var, var, rtol=1e-4, atol=1e-5)
        changed += not torch.allclose(state[f"{name}.running_mean"], before[f"{name}.running_mean"])
    assert changed == len(bns)


def test_missing_checkpoint_is_named(tmp_path):
    paths, _ = write_checkpoints(tmp_path, n=1)
    with pytest.raises(FileNotFoundError, match="best_accuracy.pt"):
        run_swa([paths[0], tmp_path / "best_accuracy.pt"], [], tmp_path / "swa.pt")
    assert not (tmp_path / "swa.pt").exists()


def test_different_archs_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = write_checkpoints(tmp_path / "a", n=1)
    b, _ = write_checkpoints(tmp_path / "b", n=1, arch={**ARCH, "num_filters": 8})
    with pytest.raises(ValueError, match="differs"):
        average_checkpoints([a[0], b[0]])
    # attention implementation and dropout rates do not change the weights: those average
    (tmp_path / "c").mkdir()
    c, _ = write_checkpoints(tmp_path / "c", n=1, arch={**ARCH, "attention": "plain", "head_dropout": 0.5})
    _, arch = average_checkpoints([a[0], c[0]])
    assert arch == SaltUNet(**ARCH).arch


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "best_loss.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(ValueError, match="best_loss.pt.*'network' and 'arch'"):
        average_checkpoints([bad])


def mini_dataset(sample_dir, root, n=12):
    """The first `n` labelled sample tiles in the competition layout (a fast BN pass)."""
    from saltkit.data import train_items

    for sub in ("train/images", "train/masks"):
        (root / sub).mkdir(parents=True)
    items = train_items(sample_dir)[:n]
    for it in items:
        shutil.copy(it["image"], root / "train" / "images")
        shutil.copy(it["label"], root / "train" / "masks")
    ids = {it["id"] for it in items}
    for name in ("train.csv", "depths.csv"):
        df = pd.read_csv(sample_dir / name, dtype={"id": str}, keep_default_na=False)
        df[df["id"].isin(ids)].to_csv(root / name, index=False)
    return root


def test_swa_bundle(checkpoints, sample_dir, tmp_path, capsys):
    from monai.bundle import run as bundle_run

    data = mini_dataset(sample_dir, tmp_path / "data")
    run_dir = tmp_path / "pad_fold1"
    run_dir.mkdir()
    paths, nets = checkpoints
    for p, name in zip(paths, ("best_loss.pt", "best_accuracy.pt", "best_metric.pt"), strict=True):
        shutil.copy(p, run_dir / name)
    # the run's own record gives the dataset, the fold file and the fold: nothing to retype
    record = {"dataset_dir": str(data), "folds_csv": str(tmp_path / "folds.csv"), "num_folds": 3, "fold": 1,
              "variant": "pad"}
    (run_dir / "config.json").write_text(json.dumps({"resolved": record}))
    bundle_run("swa", config_file=SWA_CONFIGS, run_dir=str(run_dir), batch_size=4)
    swa = torch.load(run_dir / "swa.pt", weights_only=True)
    assert set(swa) >= {"network", "arch", "checkpoints"}
    assert [Path(p).name for p in swa["checkpoints"]] == ["best_loss.pt", "best_accuracy.pt", "best_metric.pt"]
    folds = pd.read_csv(tmp_path / "folds.csv", dtype={"id": str})
    assert swa["bn_tiles"] == int((folds["fold"] != 1).sum()) == 8
    for name, value in swa["network"].items():
        if name in dict(nets[0].named_parameters()):
            expected = sum(n.state_dict()[name] for n in nets) / 3
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    bn_mean = next(k for k in swa["network"] if k.endswith("running_mean"))
    assert not torch.allclose(swa["network"][bn_mean], nets[-1].state_dict()[bn_mean])
    out = capsys.readouterr().out
    assert "recomputed BatchNorm statistics over 8 training tiles" in out
    # the result is a checkpoint the inference bundle can rebuild
    from saltkit.checkpoints import load_network

    assert load_network(run_dir / "swa.pt").arch == swa["arch"]
    # post-processing tuned on the fold's 4 validation tiles after the BN pass, stored with the weights
    entry = swa["postprocessing"]
    assert {k: entry["tuned_on"][k] for k in ("fold", "num_folds", "tiles")} == {"fold": 1, "num_folds": 3, "tiles": 4}
    assert 0 <= entry["metric_before"] <= entry["metric_after"] <= 1
    assert "SWA: post-processing tuned in " in out and "competition metric with TTA" in out
    # the evaluate workflow on swa.pt (tuned values by default) scores what the tuning measured, on the fold the
    # run's record names (no --fold needed); another fold is refused before any work
    evaluate = str(REPO / "bundles" / "saltnet" / "configs" / "evaluate.json")
    with pytest.raises(Exception) as info:
        bundle_run("evaluate", config_file=evaluate, ckpt=str(run_dir / "swa.pt"), fold=0,
                   output_dir=str(tmp_path / "evaluate0"), progress=False)
    assert "pass --fold 1" in repr(info.value) + repr(info.value.__cause__) + repr(info.value.__context__)
    bundle_run("evaluate", config_file=evaluate, ckpt=str(run_dir / "swa.pt"), output_dir=str(tmp_path / "evaluate"),
               progress=False, worst_tiles=0)
    table = pd.read_csv(tmp_path / "evaluate" / "tiles.csv", dtype={"id": str})
    assert sorted(table["id"]) == sorted(folds.loc[folds["fold"] == 1, "id"])
    assert table["metric_tta"].mean() == pytest.approx(entry["metric_after"], abs=1e-9)


def test_swa_and_evaluate_under_bf16_autocast(checkpoints, sample_dir, tmp_path, capsys):
    """`--amp true`: SWA's BatchNorm pass and tuning and the evaluate workflow run the network in bf16 autocast
    (so on any processor); swa.pt stays float32, with statistics and scores close to the float32 run's."""
    from monai.bundle import run as bundle_run

    data = mini_dataset(sample_dir, tmp_path / "data")
    record = {"dataset_dir": str(data), "folds_csv": str(tmp_path / "folds.csv"), "num_folds": 3, "fold": 1,
              "variant": "pad"}
    evaluate = str(REPO / "bundles" / "saltnet" / "configs" / "evaluate.json")
    swa, tiles = {}, {}
    for amp in ("false", "true"):
        run_dir = tmp_path / amp / "pad_fold1"
        run_dir.mkdir(parents=True)
        for p, name in zip(checkpoints[0], ("best_loss.pt", "best_accuracy.pt", "best_metric.pt"), strict=True):
            shutil.copy(p, run_dir / name)
        (run_dir / "config.json").write_text(json.dumps({"resolved": record}))
        bundle_run("swa", config_file=SWA_CONFIGS, run_dir=str(run_dir), batch_size=4, amp=amp)
        bundle_run("evaluate", config_file=evaluate, ckpt=str(run_dir / "swa.pt"), progress=False, worst_tiles=0,
                   output_dir=str(run_dir / "evaluate"), amp=amp)
        swa[amp] = torch.load(run_dir / "swa.pt", weights_only=True)
        tiles[amp] = pd.read_csv(run_dir / "evaluate" / "tiles.csv", dtype={"id": str})
    said = [line for line in capsys.readouterr().out.splitlines() if "amp true: bf16 autocast on the CPU" in line]
    assert len(said) == 2 and said[0].startswith("SWA: amp true")  # SWA's line, then evaluate's log line
    assert {v.dtype for v in swa["true"]["network"].values() if v.is_floating_point()} == {torch.float32}
    stats = [k for k in swa["true"]["network"] if k.endswith(("running_mean", "running_var"))]
    for name in stats:  # re-estimated from bf16 activations: close to the float32 pass, not equal
        torch.testing.assert_close(swa["true"]["network"][name], swa["false"]["network"][name], rtol=0.05, atol=0.02)
    assert any(not torch.equal(swa["true"]["network"][k], swa["false"]["network"][k]) for k in stats)
    assert list(tiles["true"]["id"]) == list(tiles["false"]["id"])
    np.testing.assert_allclose(tiles["true"]["iou_tta"], tiles["false"]["iou_tta"], atol=0.05)


def test_swa_bundle_missing_checkpoint(tmp_path):
    from monai.bundle import run as bundle_run

    with pytest.raises(Exception) as info:
        bundle_run("swa", config_file=SWA_CONFIGS, run_dir=str(tmp_path), folds_csv=str(tmp_path / "folds.csv"))
    text, e = [], info.value
    while e is not None:
        text.append(str(e))
        e = e.__cause__ or e.__context__
    assert "best_loss.pt" in "\n".join(text)
    assert not (tmp_path / "swa.pt").exists()


def test_run_record_must_match_the_fold(tmp_path):
    from monai.bundle import run as bundle_run

    from saltkit.checkpoints import check_run_matches

    (tmp_path / "config.json").write_text(json.dumps({"resolved": {"fold": 3, "num_folds": 10, "variant": "pad"}}))
    check_run_matches(tmp_path, fold=3, num_folds=10, variant="pad")
    check_run_matches(tmp_path / "elsewhere", fold=0)  # no record: nothing to check
    with pytest.raises(ValueError, match="trained with fold 3 but config key 'fold' is 0; pass --fold 3"):
        check_run_matches(tmp_path, fold=0)
    with pytest.raises(ValueError, match="trained with variant 'pad' but config key 'variant' is 'resize'; "
                                         "merge configs/pad.json"):
        check_run_matches(tmp_path, variant="resize")
    with pytest.raises(Exception) as info:  # the swa bundle refuses a --fold other than the run's before any work
        bundle_run("swa", config_file=SWA_CONFIGS, run_dir=str(tmp_path), folds_csv=str(tmp_path / "folds.csv"),
                   fold=0)
    e, text = info.value, []
    while e is not None:
        text.append(str(e))
        e = e.__cause__ or e.__context__
    assert "pass --fold 3" in "\n".join(text)


def test_checkpoint_names_resolve_in_the_run_folder(tmp_path):
    from saltkit.swa import run_checkpoints

    run = tmp_path / "pad_fold0"
    assert run_checkpoints(run) == [run / "best_loss.pt", run / "best_accuracy.pt", run / "best_metric.pt"]
    assert run_checkpoints(run, "best_loss.pt, last.pt") == [run / "best_loss.pt", run / "last.pt"]
    other = tmp_path / "elsewhere" / "epoch7.pt"
    assert run_checkpoints(run, ["last.pt", str(other)]) == [run / "last.pt", other]


def test_swa_bundle_over_a_list_with_last_pt(checkpoints, sample_dir, tmp_path):
    from monai.bundle import run as bundle_run

    data = mini_dataset(sample_dir, tmp_path / "data")
    run_dir = tmp_path / "pad_fold0"
    run_dir.mkdir()
    paths, nets = checkpoints
    shutil.copy(paths[0], run_dir / "best_loss.pt")
    last = torch.load(paths[2], weights_only=True)  # last.pt also holds the optimizer and trainer state
    last.update({"optimizer": {"state": {}, "param_groups": []}, "trainer": {"epoch": 7}, "best": {}})
    torch.save(last, run_dir / "last.pt")
    bundle_run("swa", config_file=SWA_CONFIGS, run_dir=str(run_dir), dataset_dir=str(data),
               folds_csv=str(tmp_path / "folds.csv"), num_folds=3, fold=0, batch_size=4,
               checkpoints="best_loss.pt,last.pt")
    swa = torch.load(run_dir / "swa.pt", weights_only=True)
    assert [Path(p).name for p in swa["checkpoints"]] == ["best_loss.pt", "last.pt"]
    assert swa["postprocessing"]["tuned_on"]["tiles"] == 4  # tuned by default
    bundle_run("swa", config_file=SWA_CONFIGS, run_dir=str(run_dir), dataset_dir=str(data),
               folds_csv=str(tmp_path / "folds.csv"), num_folds=3, fold=0, batch_size=4,
               checkpoints="best_loss.pt,last.pt", tune_postprocessing=False)
    assert "postprocessing" not in torch.load(run_dir / "swa.pt", weights_only=True)
    name = next(iter(dict(nets[0].named_parameters())))
    expected = (nets[0].state_dict()[name] + nets[2].state_dict()[name]) / 2
    torch.testing.assert_close(swa["network"][name], expected, rtol=1e-5, atol=1e-6)


def test_swa_never_writes_over_one_of_its_checkpoints(tmp_path):
    # `saltkit swa ... --output runs/X/best_metric.pt` replaced one of its own inputs with the average
    from monai.bundle import run as bundle_run

    paths, _ = write_checkpoints(tmp_path, n=3)
    named = []
    for path, name in zip(paths, ("best_loss.pt", "best_accuracy.pt", "best_metric.pt"), strict=True):
        named.append(path.rename(tmp_path / name))
    before = {p: p.read_bytes() for p in named}
    with pytest.raises(Exception) as info:
        bundle_run("swa", config_file=SWA_CONFIGS, run_dir=str(tmp_path), folds_csv=str(tmp_path / "folds.csv"),
                   output=str(tmp_path / "best_metric.pt"))
    text, e = [], info.value
    while e is not None:
        text.append(str(e))
        e = e.__cause__ or e.__context__
    assert f"output {tmp_path / 'best_metric.pt'} is the input checkpoints" in "\n".join(text)
    assert {p: p.read_bytes() for p in named} == before


def test_checkpoints_of_another_fold_are_refused(tmp_path):
    """best_*.pt record their run's fold split: SWA refuses to average two runs' checkpoints, or to average another
    fold's checkpoints into a run, and swa.pt keeps the record."""
    paths, _ = write_checkpoints(tmp_path, n=3)

    def record(path, **keys):
        ckpt = torch.load(path, weights_only=True)
        torch.save({**ckpt, **keys}, path)

    record(paths[0], fold=1, num_folds=3, split="aaaa")
    record(paths[1], fold=1, num_folds=3, split="aaaa")
    record(paths[2], fold=2, num_folds=3, split="bbbb")
    with pytest.raises(ValueError, match=f"{paths[2]} was trained on fold 2, {paths[0]} on fold 1"):
        average_checkpoints(paths)
    with pytest.raises(ValueError, match=f"{paths[0]} was trained on fold 1, but the run .* holds fold 2 out"):
        run_swa(paths[:2], [], tmp_path / "swa.pt", fold=2)
    assert not (tmp_path / "swa.pt").exists()
    images = [{"image": torch.rand(2, 3, 128, 128)}]
    run_swa(paths[:2], images, tmp_path / "swa.pt", fold=1)
    swa = torch.load(tmp_path / "swa.pt", weights_only=True)
    assert (swa["fold"], swa["num_folds"], swa["split"]) == (1, 3, "aaaa")
