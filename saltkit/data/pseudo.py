"""Pseudo-labelled tiles as training data: the set `saltkit pseudo-label` writes, read back and checked, and the
sampler that puts a fixed number of them into every training batch.

A pseudo-labelled set is a dataset folder in the competition layout (`train/images`, `train/masks`, `train.csv`)
plus `manifest.json`, which records the teacher(s), their weight fingerprints, the post-processing, each item's
source and confidence, and a fingerprint of the set (`set_fingerprint`: every kept tile's image and mask bytes).
Training reads it with `training_pseudo_set`: the fingerprint is recomputed from the files, so a set changed after
it was made is refused, and so is one made by a teacher of another variant than the student's or one that holds
ids of the labelled dataset.

`saltkit pseudo-label` of section images or a SEG-Y volume writes a set of another kind ("kind": "sections" in the
manifest): a sections folder (`NAME.png` + `NAME_mask.png`, 128 where the teacher is unsure) that trains beside
labelled sections (config key `sections_dir`); `training_pseudo_set` then refuses sections of the labelled folder
and crosslines of a volume whose inlines it labels (a crossline crosses the held-out inlines).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import RandomSampler, Sampler

from saltkit.config import ConfigError, as_bool, none_if_null
from saltkit.data.labelled_sections import list_sections
from saltkit.data.layout import DatasetError, id_listing, train_items

MANIFEST = "manifest.json"
FORMAT = "saltkit pseudo-labels"
VERSION = 1


def set_fingerprint(items: Sequence[dict]) -> str:
    """SHA-256 (hex, first 16 digits) of a set's tiles or sections ({"id", "image", "label"}): id, image bytes and
    mask bytes of each, in id order."""
    digest = hashlib.sha256()
    for it in sorted(items, key=lambda it: it["id"]):
        image = hashlib.sha256(Path(it["image"]).read_bytes()).hexdigest()
        mask = hashlib.sha256(Path(it["label"]).read_bytes()).hexdigest()
        digest.update(f"{it['id']}:{image}:{mask}\n".encode())
    return digest.hexdigest()[:16]


def read_manifest(root: str | Path) -> dict:
    """`<root>/manifest.json` of a pseudo-labelled set; DatasetError naming the file when it is missing or not one."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{path}: not found; a pseudo-labelled set is the folder `saltkit pseudo-label` writes "
                           "(its train/, train.csv and manifest.json)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: not a readable manifest ({e}); make the set again with saltkit pseudo-label") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: not a manifest of saltkit pseudo-label (no \"format\": \"{FORMAT}\")")
    missing = [k for k in ("variant", "teachers", "items", "fingerprint") if k not in manifest]
    if missing:
        raise DatasetError(f"{path}: lacks {', '.join(missing)}; make the set again with saltkit pseudo-label")
    return manifest


@dataclass(frozen=True)
class PseudoSet:
    """A checked pseudo-labelled set: its folder, manifest, training items (`train_items` of the folder) and
    fingerprint (recomputed from the files, equal to the manifest's)."""

    root: Path
    manifest: dict
    items: list
    fingerprint: str

    @property
    def variant(self) -> str:
        return self.manifest["variant"]

    @property
    def kind(self) -> str:
        """"tiles" (a dataset folder) or "sections" (a sections folder)."""
        return self.manifest.get("kind", "tiles")

    def identity(self) -> dict:
        """What a run records about the set and a resume must match: its folder and fingerprint."""
        return {"dir": str(self.root.resolve()), "fingerprint": self.fingerprint}


def read_pseudo_set(root: str | Path) -> PseudoSet:
    """The pseudo-labelled set in `root`, checked: the kept items of the manifest are the tiles in train/, and the
    files' fingerprint is the manifest's (DatasetError naming the folder otherwise)."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest.get("kind") == "sections":
        return read_pseudo_sections(root, manifest)
    items = train_items(root)
    kept = {str(it["id"]) for it in manifest["items"] if it.get("kept", True)}
    found = {it["id"] for it in items}
    if kept != found:
        differ = sorted(kept ^ found)
        raise DatasetError(f"{root}: train/images holds other tiles than {MANIFEST} lists as kept (differ in "
                           f"{id_listing(differ)}); make the set again with saltkit pseudo-label")
    fingerprint = set_fingerprint(items)
    if fingerprint != manifest["fingerprint"]:
        raise DatasetError(f"{root}: its images or masks changed after saltkit pseudo-label wrote them (fingerprint "
                           f"{fingerprint}, {MANIFEST} says {manifest['fingerprint']}); make the set again")
    return PseudoSet(root, manifest, items, fingerprint)


def read_pseudo_sections(root: Path, manifest: dict) -> PseudoSet:
    """A set of pseudo-labelled sections, checked as `read_pseudo_set` checks tiles: the kept sections of the
    manifest are the folder's, and their fingerprint is the manifest's. Items: {"id": name, "image", "label"}."""
    try:
        files, _ = list_sections(root)
    except DatasetError:
        files = []
    kept = {str(it["name"]) for it in manifest["items"] if it.get("kept", True)}
    found = {f.name for f in files}
    if kept != found:
        raise DatasetError(f"{root}: holds other sections than {MANIFEST} lists as kept (differ in "
                           f"{id_listing(sorted(kept ^ found))}); make the set again with saltkit pseudo-label")
    items = [f.item() for f in files]
    fingerprint = set_fingerprint(items)
    if fingerprint != manifest["fingerprint"]:
        raise DatasetError(f"{root}: its sections or masks changed after saltkit pseudo-label wrote them (fingerprint "
                           f"{fingerprint}, {MANIFEST} says {manifest['fingerprint']}); make the set again")
    return PseudoSet(root, manifest, items, fingerprint)


VOLUME_LINE = re.compile(r"^(?P<volume>.+)_(?P<direction>inline|crossline)_\d+")


def section_names(folder) -> set[str]:
    """The names of a sections folder: the stems of its files (sections, masks and the rest alike)."""
    return {p.stem for p in Path(str(folder)).iterdir() if p.is_file()}


def labelled_volumes(names) -> set[str]:
    """The volumes (file stems) of which `names` hold inline or crossline sections (`<volume>_inline_<n>` ...)."""
    return {m["volume"] for m in map(VOLUME_LINE.match, names) if m}


def check_beside_sections(pseudo: PseudoSet, sections_dir) -> None:
    """ConfigError unless the pseudo-labelled sections can train beside the labelled `sections_dir`: none of them
    is a labelled section (by name; `saltkit pseudo-label --exclude-dataset SECTIONS` leaves those out), and none is
    a crossline of a volume whose lines the folder labels (it would cross the held-out inlines)."""
    labelled = section_names(sections_dir)
    overlap = sorted(labelled & {it["id"] for it in pseudo.items})
    if overlap:
        raise ConfigError(f"config key 'pseudo_dir': {pseudo.root} pseudo-labels sections of the labelled "
                          f"sections_dir {sections_dir} ({id_listing(overlap)}); labelled sections are never "
                          f"pseudo-labelled: make the set again with --exclude-dataset {sections_dir}")
    volumes = labelled_volumes(labelled)
    crossing = sorted(it["id"] for it in pseudo.items if (m := VOLUME_LINE.match(it["id"]))
                      and m["direction"] == "crossline" and m["volume"] in volumes)
    if crossing:
        raise ConfigError(f"config key 'pseudo_dir': {pseudo.root} holds crosslines of a volume whose lines "
                          f"sections_dir {sections_dir} labels ({id_listing(crossing)}): a crossline crosses the "
                          "held-out inlines; pseudo-label that volume with --direction inline")


def training_pseudo_set(pseudo_dir, variant: str, dataset_dir, sections_dir=None) -> PseudoSet | None:
    """Config key 'pseudo_dir' (null: None): the set, refused with a ConfigError when it cannot be read, was made by
    a teacher of another variant than `variant`, or holds ids of the labelled `dataset_dir`; beside labelled
    sections, a set of sections refused as `check_beside_sections` says.

    Args:
        pseudo_dir: config key `pseudo_dir`, the folder `saltkit pseudo-label` wrote; null / None: no set.
        variant: config key `variant` (pad / resize) of the student.
        dataset_dir: the labelled dataset, whose ids the set may not hold.
        sections_dir: config key `sections_dir`: with labelled sections, the set must be of sections too.
    """
    path = none_if_null(pseudo_dir)
    if path is None:
        return None
    try:
        pseudo = read_pseudo_set(Path(str(path)))
    except DatasetError as e:
        raise ConfigError(f"config key 'pseudo_dir': {e}") from None
    if pseudo.variant != variant:
        raise ConfigError(f"config key 'pseudo_dir': {pseudo.root / MANIFEST} was made by a teacher of variant "
                          f"{pseudo.variant!r}, this config trains {variant!r}; pseudo-label with a {variant} teacher, "
                          f"or merge configs/{pseudo.variant}.json")
    sections = none_if_null(sections_dir)
    if pseudo.kind == "sections" and sections is None:
        raise ConfigError(f"config key 'pseudo_dir': {pseudo.root} holds pseudo-labelled sections, which train beside "
                          "labelled ones: give --sections_dir with your interpreted sections")
    if sections is not None:
        if pseudo.kind != "sections":
            raise ConfigError(f"config key 'pseudo_dir': {pseudo.root} holds pseudo-labelled tiles; beside sections_dir "
                              "give pseudo-labelled sections (saltkit pseudo-label --sections, or a SEG-Y volume)")
        check_beside_sections(pseudo, sections)
        return pseudo
    try:
        labelled = {it["id"] for it in train_items(Path(str(dataset_dir)))}
    except DatasetError as e:
        raise ConfigError(f"config key 'dataset_dir': {e}") from None
    overlap = sorted(labelled & {it["id"] for it in pseudo.items})
    if overlap:
        raise ConfigError(f"config key 'pseudo_dir': {pseudo.root} pseudo-labels ids of the labelled dataset_dir "
                          f"{dataset_dir} ({id_listing(overlap)}); labelled tiles are never pseudo-labelled: make "
                          f"the set again with --exclude-dataset {dataset_dir}")
    return pseudo


def pseudo_items(pseudo: PseudoSet | None) -> list[dict]:
    """The training items of the set (none without one).

    Args:
        pseudo: the pseudo-labelled set (`training_pseudo_set`), or None (sections: none here, their windows are
            drawn beside the labelled sections' by `saltkit.seismic.training_sections.training_dataset`).
    """
    return [] if pseudo is None or pseudo.kind == "sections" else list(pseudo.items)


def pseudo_identity(pseudo: PseudoSet | None) -> dict | None:
    return None if pseudo is None else pseudo.identity()


def pseudo_record(pseudo: PseudoSet | None, share, batch_size: int) -> dict | None:
    """The run record's view of the set: folder, fingerprint, tiles, per-batch count and its teachers."""
    if pseudo is None:
        return None
    return {**pseudo.identity(), pseudo.kind: len(pseudo.items), "per_batch": pseudo_per_batch(share, batch_size),
            "variant": pseudo.variant,
            "teachers": [{k: t.get(k) for k in ("ckpt", "weights")} for t in pseudo.manifest["teachers"]]}


# ---------------------------------------------------------------- batches of labelled and pseudo-labelled tiles


def pseudo_per_batch(share, batch_size: int) -> int:
    """Pseudo-labelled tiles per batch: `share` x `batch_size` rounded to the nearest integer (halves up); a
    ConfigError naming 'pseudo_share' unless that leaves at least one tile of each kind in a batch."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise ConfigError(f"config key 'pseudo_share' must be a number in (0, 1): the share of each training batch "
                          f"drawn from pseudo_dir, got {share!r}")
    count = math.floor(share * batch_size + 0.5)
    if not 1 <= count <= batch_size - 1:
        raise ConfigError(f"config key 'pseudo_share' = {share} gives {count} pseudo-labelled tiles in a batch of "
                          f"{batch_size}; choose a share that leaves at least one pseudo-labelled and one labelled "
                          "tile per batch")
    return count


class MixedBatchSampler(Sampler[int]):
    """Indices into `labelled + pseudo` items (labelled first) such that every `batch_size` consecutive indices,
    one DataLoader batch, hold exactly `per_batch` pseudo-labelled tiles.

    An epoch passes once over the labelled tiles (shuffled, `batch_size - per_batch` per batch, the last incomplete
    batch dropped); the pseudo-labelled tiles are drawn from their own shuffled stream, which carries on across
    epochs and is reshuffled when used up, so each is drawn equally often. With several processes (`world_size`)
    every process shuffles alike (one seeded generator) and takes its own share of each. Order within a batch:
    labelled, then pseudo-labelled (BatchNorm and the loss do not see the order).
    """

    def __init__(self, n_labelled: int, n_pseudo: int, batch_size: int, per_batch: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, unit: str = "tiles"):
        self.n_labelled, self.n_pseudo, self.unit = int(n_labelled), int(n_pseudo), unit
        self.batch_size, self.per_batch = int(batch_size), int(per_batch)
        self.labelled_per_batch = self.batch_size - self.per_batch
        self.rank, self.world_size = int(rank), int(world_size)
        if not 1 <= self.per_batch < self.batch_size:
            raise ValueError(f"per_batch must be in 1..{self.batch_size - 1}, got {per_batch}")
        if self.n_pseudo < self.per_batch * self.world_size:
            raise ValueError(f"{self.n_pseudo} pseudo-labelled tiles cannot fill {self.per_batch} per batch "
                             f"on {self.world_size} process(es)")
        self.batches = self.n_labelled // self.world_size // self.labelled_per_batch
        if self.batches < 1:
            raise ValueError(f"{self.n_labelled} labelled tiles cannot fill {self.labelled_per_batch} per batch "
                             f"on {self.world_size} process(es)")
        self.generator = torch.Generator().manual_seed(int(seed))
        self._stream: list[int] = []

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def _pseudo(self, count: int) -> list[int]:
        """The next `count` pseudo-labelled indices of the shared stream."""
        while len(self._stream) < count:
            self._stream += (self.n_labelled + torch.randperm(self.n_pseudo, generator=self.generator)).tolist()
        drawn, self._stream = self._stream[:count], self._stream[count:]
        return drawn

    def __iter__(self) -> Iterator[int]:
        labelled = torch.randperm(self.n_labelled, generator=self.generator).tolist()
        per_rank = self.n_labelled // self.world_size
        mine = labelled[self.rank * per_rank:(self.rank + 1) * per_rank]
        step = self.labelled_per_batch
        for b in range(self.batches):
            pseudo = self._pseudo(self.per_batch * self.world_size)
            yield from mine[b * step:(b + 1) * step]
            yield from pseudo[self.rank * self.per_batch:(self.rank + 1) * self.per_batch]

    def summary(self) -> str:
        """'2880 training tiles + 4000 pseudo-labelled, 8 of each batch of 16' (for the training's first log line)."""
        return (f"{self.n_labelled} training {self.unit} + {self.n_pseudo} pseudo-labelled, {self.per_batch} of each batch "
                f"of {self.batch_size}")


def check_mixing(n_labelled: int, n_pseudo: int, batch_size: int, share, unit: str = "tiles") -> int | None:
    """Pseudo-labelled tiles (or section windows: `unit`) per batch (None without a pseudo-labelled set); a
    ConfigError naming the key when `share` or the sizes cannot make such batches (on every process of a
    distributed run)."""
    if n_pseudo == 0:
        return None
    import ignite.distributed as idist

    per_batch = pseudo_per_batch(share, batch_size)
    world = idist.get_world_size()
    on = f" on {world} processes" if world > 1 else ""
    if n_pseudo < per_batch * world:
        raise ConfigError(f"config key 'pseudo_dir': its {n_pseudo} pseudo-labelled {unit} cannot fill {per_batch} "
                          f"per batch{on}; lower pseudo_share or keep more of them (saltkit pseudo-label "
                          "--min-confidence)")
    if n_labelled // world < batch_size - per_batch:
        raise ConfigError(f"config keys 'batch_size' / 'pseudo_share': {n_labelled} labelled training {unit} cannot "
                          f"fill {batch_size - per_batch} per batch{on}; lower batch_size")
    return per_batch


def mixed_sampler(n_labelled: int, n_pseudo: int, batch_size: int, share, seed: int = 0,
                  unit: str = "tiles") -> MixedBatchSampler | None:
    """The training sampler with a pseudo-labelled set (None without one: the DataLoader shuffles as usual); a
    ConfigError naming the key when `share` or the set's size cannot make such batches."""
    per_batch = check_mixing(n_labelled, n_pseudo, batch_size, share, unit)
    if per_batch is None:
        return None
    import ignite.distributed as idist

    return MixedBatchSampler(n_labelled, n_pseudo, batch_size, per_batch, seed, idist.get_rank(),
                             idist.get_world_size(), unit)


def training_sampler(labelled: Sized, pseudo: Sized, batch_size: int, share, seed: int = 0,
                     distributed=False) -> Sampler:
    """The training DataLoader's sampler over `labelled + pseudo` items: with pseudo-labelled items, the
    `MixedBatchSampler` (`mixed_sampler`); without, the labelled items shuffled every epoch, by MONAI's
    DistributedSampler (each process its share) when `distributed`, else as `DataLoader(shuffle=True)` would.

    Args:
        labelled: the fold's labelled training items; or the windows of training sections
            (`saltkit.seismic.training_sections.SectionWindows`), whose `n_labelled` / `n_pseudo` say which
            windows are of pseudo-labelled sections.
        pseudo: the pseudo-labelled items (empty without a pseudo-labelled set, and with sections).
        batch_size: config key `batch_size`.
        share: config key `pseudo_share`.
        seed: config key `seed` (the MixedBatchSampler's own generator).
        distributed: config key `distributed`.
    """
    n_labelled, n_pseudo = len(labelled), len(pseudo)
    unit = "tiles"
    if hasattr(labelled, "n_pseudo"):  # windows of sections, pseudo-labelled ones last
        n_labelled, n_pseudo, unit = labelled.n_labelled, labelled.n_pseudo, labelled.unit
    mixed = mixed_sampler(n_labelled, n_pseudo, batch_size, share, seed, unit)
    if mixed is not None:
        return mixed
    if as_bool(distributed, "distributed"):
        from monai.data import DistributedSampler

        return DistributedSampler(range(n_labelled), even_divisible=True, shuffle=True)
    return RandomSampler(range(n_labelled))
