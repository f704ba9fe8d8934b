"""The shipped recipes: the key values the bundle docs state are what the config files hold, and the original
recipe's config asks for ImageNet weights (with a clear error when they cannot be had)."""

from __future__ import annotations

import inspect
import json
import pydoc
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "bundles/saltnet/docs/README.md"
TRAIN = REPO / "bundles/saltnet/configs/train.json"
RECIPES = {"cpu.json": REPO / "configs/cpu.json", "senet154.json": REPO / "configs/senet154.json"}


def table_after(text: str, marker: str) -> list[list[str]]:
    """Cells of the first markdown table after the line containing `marker` (header and rule left out)."""
    lines = text[text.index(marker):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def doc_value(cell: str):
    """A value as the docs write it: null / true / false / numbers / bare words (strings)."""
    cell = cell.strip().strip("`")
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        return cell


def config_value(config: dict, key: str):
    """`key` (`a#b` for nested) from a config dict; a component argument the config leaves out -> its default."""
    node = config
    parts = key.split("#")
    for i, part in enumerate(parts):
        if part not in node:
            target = pydoc.locate(node.get("_target_", "")) if i == len(parts) - 1 else None
            if target is None:
                raise KeyError(key)
            return inspect.signature(target).parameters[part].default
        node = node[part]
    return node


def same(doc, value) -> bool:
    if isinstance(doc, (int, float)) and not isinstance(doc, bool) and isinstance(value, (int, float)):
        return not isinstance(value, bool) and float(doc) == float(value)
    return doc == value


def test_recipe_table_matches_the_config_files():
    train = json.loads(TRAIN.read_text())
    recipes = {name: json.loads(p.read_text()) for name, p in RECIPES.items()}
    rows = table_after(DOCS.read_text(), "What each recipe sets, key by key")
    documented = set()
    for key_cell, *cells in rows:
        key = key_cell.strip("`")
        documented.add(key)
        base = config_value(train, key)
        for (name, override), cell in zip(recipes.items(), cells[1:], strict=True):
            value = override.get(key, base)
            if cell.startswith("("):  # a computed default, e.g. "(cuda if present)"
                assert isinstance(value, str) and value.startswith("$"), f"{name}: {key} is {value!r}, not computed"
            else:
                assert same(doc_value(cell), value), f"docs say {name} {key} = {cell}, the files give {value!r}"
        if not cells[0].startswith("("):
            assert same(doc_value(cells[0]), base), f"docs say train.json {key} = {cells[0]}, file has {base!r}"
    for name, override in recipes.items():
        missing = set(override) - documented
        assert not missing, f"configs/{name} sets {sorted(missing)}, which the docs' recipe table leaves out"


def test_keys_table_defaults_are_train_json_values():
    train = json.loads(TRAIN.read_text())
    for keys_cell, defaults_cell, _ in table_after(DOCS.read_text(), "## Keys"):
        keys = re.findall(r"`([^`]+)`", keys_cell)
        defaults = [d.strip() for d in defaults_cell.split(", ")]
        assert len(keys) == len(defaults), f"docs' key row {keys} gives {len(defaults)} defaults: {defaults_cell!r}"
        for key, default in zip(keys, defaults, strict=True):
            assert key in train, f"docs list key {key!r}, which train.json does not define"
            value = train[key]
            if isinstance(value, str) and value.startswith("$") or isinstance(value, dict):
                continue  # computed or a component: the meaning column describes it
            assert same(doc_value(default), value), f"docs say {key} defaults to {default}, train.json has {value!r}"


def test_postprocessing_keys_are_documented_as_the_configs_set_them():
    from saltkit.inference import PostProcessingSettings

    configs = {name: json.loads((REPO / "bundles/saltnet/configs" / name).read_text())
               for name in ("inference.json", "evaluate.json", "predict.json", "swa.json")}
    keys = ["threshold", "min_component_size", "image_threshold", "min_area"]
    for name in ("inference.json", "evaluate.json"):
        assert [configs[name][k] for k in keys] == ["auto"] * 4, name
    docs = DOCS.read_text()
    rows = {cells[0]: cells[1:] for cells in table_after(docs, "`evaluate.json` and `inference.json` read like")}
    meaning = rows[", ".join(f"`{k}`" for k in keys)][0]
    plain = PostProcessingSettings()
    defaults = ", ".join(json.dumps(getattr(plain, k)) for k in keys)  # 0.5, 0, null, 0
    assert meaning.startswith("`auto` each") and f"the plain default ({defaults})" in meaning
    assert rows["`tune_postprocessing`"][0].startswith(f"evaluate only, {json.dumps(configs['evaluate.json']['tune_postprocessing'])}")
    assert configs["swa.json"]["tune_postprocessing"] is True and "`--tune_postprocessing false`" in docs
    predict = {cells[0]: cells[1] for cells in table_after(docs, "## Predict: section images")}
    assert doc_value(predict["`threshold`"]) == configs["predict.json"]["threshold"] == "auto"


def test_docs_cpu_recipe_lines_are_the_file():
    """The one-line descriptions of configs/cpu.json in the README and the bundle docs say what the file sets."""
    cpu = json.loads(RECIPES["cpu.json"].read_text())
    train = json.loads(TRAIN.read_text())
    assert cpu["head_dropout"] == cpu["decoder_dropout"] == 0.0 and cpu["cutout_prob"] == 0.0
    assert cpu["geometric_prob"] == train["geometric_prob"] / 2 and cpu["intensity_prob"] == train["intensity_prob"] / 2
    readme = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `cpu.json`"))
    bundle = next(line for line in (REPO / "bundles/saltnet/docs/README.md").read_text().splitlines()
                  if line.startswith("- `cpu.json`"))
    for line in (readme, bundle):
        assert cpu["backbone"] in line and f"{cpu['time_limit_minutes']}-minute" in line
        assert "no head or decoder dropout" in line and "half the augmentation rates" in line


def test_senet154_recipe_uses_imagenet_weights_and_says_so_offline(tmp_path, monkeypatch):
    from monai.bundle import ConfigParser

    from saltkit.networks import WeightsNotFoundError, encoders

    parser = ConfigParser()
    parser.read_config([str(TRAIN), str(REPO / "configs/pad.json"), str(RECIPES["senet154.json"])])
    parser["folds_csv"] = str(tmp_path / "folds.csv")
    parser.parse()
    assert parser["pretrained"] == "imagenet" and parser["backbone"] == "senet154"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(Exception) as info:  # MONAI wraps the constructor's error; the cause names file and URL
        parser.get_parsed_content("network_def")
    err = info.value
    while err is not None and not isinstance(err, WeightsNotFoundError):
        err = err.__cause__ or err.__context__
    assert err is not None, f"expected WeightsNotFoundError, got {info.value!r}"
    path = tmp_path / "hub" / "checkpoints" / "senet154-c7b49a05.pth"
    url = encoders.backbone_spec("senet154").url
    assert url.startswith("https://") and str(path) in str(err) and url in str(err)
