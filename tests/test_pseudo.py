"""Pseudo-labelled sets as training data (saltkit.data.pseudo): batches with a fixed number of pseudo-labelled
tiles, and the checks that refuse a set changed after it was made, made for another variant, or holding labelled
ids."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from torch.utils.data import DataLoader

from saltkit.config import ConfigError
from saltkit.data.layout import DatasetError, train_items
from saltkit.data.pseudo import (
    FORMAT,
    MANIFEST,
    MixedBatchSampler,
    check_mixing,
    mixed_sampler,
    pseudo_per_batch,
    read_pseudo_set,
    set_fingerprint,
    training_pseudo_set,
)


def batches(n_labelled: int, n_pseudo: int, batch_size: int, share: float, epochs: int, **kwargs) -> list[list]:
    """Index batches a DataLoader makes with the mixed sampler over `epochs` epochs."""
    sampler = MixedBatchSampler(n_labelled, n_pseudo, batch_size, pseudo_per_batch(share, batch_size), **kwargs)
    loader = DataLoader(list(range(n_labelled + n_pseudo)), batch_size=batch_size, sampler=sampler, drop_last=True)
    return [[b.tolist() for b in loader] for _ in range(epochs)]


@pytest.mark.parametrize("n_labelled, n_pseudo, batch_size, share, per_batch", [
    (40, 25, 8, 0.5, 4), (90, 20, 16, 0.25, 4), (50, 7, 10, 0.3, 3), (30, 30, 5, 0.5, 3), (33, 9, 6, 0.1, 1)])
def test_every_batch_holds_the_share_of_pseudo_labelled_tiles(n_labelled, n_pseudo, batch_size, share, per_batch):
    epochs = batches(n_labelled, n_pseudo, batch_size, share, epochs=3)
    labelled_per_batch = batch_size - per_batch
    for epoch in epochs:
        assert len(epoch) == n_labelled // labelled_per_batch
        for batch in epoch:  # each batch: round(share * batch_size) pseudo-labelled tiles (indices >= n_labelled)
            assert len(batch) == batch_size
            assert sum(i >= n_labelled for i in batch) == per_batch
        labelled = [i for batch in epoch for i in batch if i < n_labelled]
        assert len(set(labelled)) == len(labelled)  # each labelled tile at most once an epoch
        assert len(labelled) == len(epoch) * labelled_per_batch
    assert [sorted(b) for b in epochs[0]] != [sorted(b) for b in epochs[1]]  # reshuffled each epoch
    # the pseudo-labelled tiles are drawn evenly: a pass over all of them before any is drawn again
    draws = Counter(i for epoch in epochs for batch in epoch for i in batch if i >= n_labelled)
    assert set(draws) <= set(range(n_labelled, n_labelled + n_pseudo))
    assert max(draws.values()) - min(draws.get(i, 0) for i in range(n_labelled, n_labelled + n_pseudo)) <= 1


def test_the_same_seed_gives_the_same_batches():
    assert batches(40, 25, 8, 0.5, 2, seed=3) == batches(40, 25, 8, 0.5, 2, seed=3)
    assert batches(40, 25, 8, 0.5, 2, seed=3) != batches(40, 25, 8, 0.5, 2, seed=4)


def test_processes_share_out_the_tiles():
    """Two processes (ranks) shuffle alike and take disjoint labelled and pseudo-labelled tiles."""
    ranks = [batches(40, 24, 8, 0.25, 1, seed=1, rank=r, world_size=2)[0] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 20 // 6
    for b0, b1 in zip(*ranks, strict=True):
        assert sum(i >= 40 for i in b0) == sum(i >= 40 for i in b1) == 2
        assert not set(b0) & set(b1)


@pytest.mark.parametrize("share, batch_size, message", [
    (0, 16, r"'pseudo_share' must be a number in \(0, 1\)"),
    (1.0, 16, r"'pseudo_share' must be a number in \(0, 1\)"),
    ("half", 16, r"'pseudo_share' must be a number in \(0, 1\)"),
    (0.01, 16, r"'pseudo_share' = 0.01 gives 0 pseudo-labelled tiles in a batch of 16"),
    (0.95, 8, r"'pseudo_share' = 0.95 gives 8 pseudo-labelled tiles in a batch of 8"),
])
def test_a_share_that_cannot_make_mixed_batches_is_refused(share, batch_size, message):
    with pytest.raises(ConfigError, match=message):
        pseudo_per_batch(share, batch_size)


def test_sizes_that_cannot_fill_the_batches_are_refused():
    assert check_mixing(32, 0, 8, 0.5) is None and mixed_sampler(32, 0, 8, 0.5) is None  # no pseudo set
    assert check_mixing(32, 20, 8, 0.5) == 4
    with pytest.raises(ConfigError, match=r"'pseudo_dir': its 3 pseudo-labelled tiles cannot fill 4 per batch"):
        check_mixing(32, 3, 8, 0.5)
    assert len(mixed_sampler(32, 20, 8, 0.5)) == 8 * 8  # 8 batches of 8: 32 labelled tiles, 4 a batch


# ---------------------------------------------------------------- reading a set back


def hand_made_set(sample_dir: Path, root: Path, ids: list[str], variant: str = "pad") -> Path:
    """A pseudo-labelled set written by hand: sample tiles with their masks, and a manifest."""
    for sub in ("images", "masks"):
        (root / "train" / sub).mkdir(parents=True)
        for i in ids:
            shutil.copy(sample_dir / "train" / sub / f"{i}.png", root / "train" / sub / f"{i}.png")
    rows = pd.read_csv(sample_dir / "train.csv", dtype=str, keep_default_na=False).set_index("id").loc[ids]
    rows.reset_index().to_csv(root / "train.csv", index=False)
    manifest = {"format": FORMAT, "variant": variant, "teachers": [{"ckpt": "teacher.pt", "weights": "0" * 16}],
                "items": [{"id": i, "source": f"{i}.png", "confidence": 1.0, "kept": True} for i in ids]
                + [{"id": "dropped", "source": "dropped.png", "confidence": 0.1, "kept": False}],
                "fingerprint": set_fingerprint(train_items(root))}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


@pytest.fixture
def labelled(sample_dir, tmp_path) -> Path:
    """A labelled dataset of 10 sample tiles; the set below uses 5 others."""
    from saltkit.data.layout import copy_subset

    ids = sorted(p.stem for p in (sample_dir / "train" / "images").iterdir())
    return copy_subset(sample_dir, tmp_path / "labelled", ids[:10])


def sample_ids(sample_dir: Path) -> list[str]:
    return sorted(p.stem for p in (sample_dir / "train" / "images").iterdir())


def test_a_set_reads_back_with_its_fingerprint(sample_dir, tmp_path, labelled):
    root = hand_made_set(sample_dir, tmp_path / "set", sample_ids(sample_dir)[10:15])
    pseudo = read_pseudo_set(root)
    assert [it["id"] for it in pseudo.items] == sample_ids(sample_dir)[10:15]
    assert pseudo.fingerprint == json.loads((root / MANIFEST).read_text())["fingerprint"]
    assert pseudo.identity() == {"dir": str(root.resolve()), "fingerprint": pseudo.fingerprint}
    assert training_pseudo_set(str(root), "pad", labelled).fingerprint == pseudo.fingerprint
    assert training_pseudo_set(None, "pad", labelled) is None and training_pseudo_set("null", "pad", labelled) is None


def test_a_set_changed_after_it_was_made_is_refused(sample_dir, tmp_path):
    ids = sample_ids(sample_dir)[10:15]
    root = hand_made_set(sample_dir, tmp_path / "set", ids)
    mask = root / "train" / "masks" / f"{ids[0]}.png"
    shutil.copy(sample_dir / "train" / "masks" / f"{ids[1]}.png", mask)  # another mask in its place
    with pytest.raises(DatasetError, match=r"its images or masks changed after saltkit pseudo-label wrote them"):
        read_pseudo_set(root)
    for sub in ("images", "masks"):
        (root / "train" / sub / f"{ids[0]}.png").unlink()
    with pytest.raises(DatasetError, match=rf"other tiles than manifest.json lists as kept \(differ in {ids[0]}\)"):
        read_pseudo_set(root)
    (root / MANIFEST).unlink()
    with pytest.raises(DatasetError, match=r"manifest.json: not found"):
        read_pseudo_set(root)


def test_a_set_of_another_variant_is_refused(sample_dir, tmp_path, labelled):
    root = hand_made_set(sample_dir, tmp_path / "set", sample_ids(sample_dir)[10:15], variant="resize")
    with pytest.raises(ConfigError) as info:
        training_pseudo_set(str(root), "pad", labelled)
    assert str(info.value) == (f"config key 'pseudo_dir': {root / MANIFEST} was made by a teacher of variant "
                               "'resize', this config trains 'pad'; pseudo-label with a pad teacher, or merge "
                               "configs/resize.json")


def test_a_set_holding_labelled_ids_is_refused(sample_dir, tmp_path, labelled):
    ids = sample_ids(sample_dir)
    root = hand_made_set(sample_dir, tmp_path / "set", ids[8:12])  # two of them are labelled tiles
    with pytest.raises(ConfigError, match=rf"pseudo-labels ids of the labelled dataset_dir .* \({ids[8]}, {ids[9]}\)"
                                          r"; labelled tiles are never pseudo-labelled"):
        training_pseudo_set(str(root), "pad", labelled)
    with pytest.raises(ConfigError, match=r"config key 'pseudo_dir': .*manifest.json: not found"):
        training_pseudo_set(str(tmp_path), "pad", labelled)
