"""The pin of the bundle's shipped model: its weight fingerprint and its masks of the sample's 20 test tiles, as
the inference workflow makes them with no `--ckpt` (flip TTA, the model's tuned post-processing), stored in
`tests/data/shipped_model_masks.csv` (a comment line with the fingerprint, then `id,rle_mask` rows).

    python tests/pin_shipped_model.py          # compare bundles/saltnet/models/model.pt with the stored pin
    python tests/pin_shipped_model.py --write  # store the current model's pin (after replacing the model on purpose)

`tests/test_bundle.py` fails when the model and the pin disagree, so a changed model.pt is noticed on purpose.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "saltnet"
MODEL = BUNDLE / "models" / "model.pt"
EXPECTED = REPO / "tests" / "data" / "shipped_model_masks.csv"
REWRITE = "python tests/pin_shipped_model.py --write"
WEIGHTS_PREFIX = "# weights "


def shipped_masks(work_dir: str | Path) -> tuple[str, dict[str, str]]:
    """(weight fingerprint of the shipped model, {tile id: RLE mask}) from the inference workflow run with no
    checkpoint on the sample's test tiles, writing into `work_dir`."""
    from monai.bundle import run

    from saltkit.checkpoints import read_checkpoint, weights_fingerprint

    run("inference", config_file=str(BUNDLE / "configs" / "inference.json"), bundle_root=str(BUNDLE),
        output_dir=str(work_dir), progress=False)
    with open(Path(work_dir) / "submission.csv", newline="") as f:
        masks = {row["id"]: row["rle_mask"] for row in csv.DictReader(f)}
    return weights_fingerprint(read_checkpoint(MODEL)["network"]), masks


def read_expectation(path: Path = EXPECTED) -> tuple[str, dict[str, str]]:
    """(weight fingerprint, {tile id: RLE mask}) stored in the pin file."""
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith(WEIGHTS_PREFIX):
        raise ValueError(f"{path}: the first line must be '{WEIGHTS_PREFIX}FINGERPRINT ...'; rewrite it: {REWRITE}")
    weights = lines[0][len(WEIGHTS_PREFIX):].split()[0]
    return weights, {row["id"]: row["rle_mask"] for row in csv.DictReader(lines[1:])}


def write_expectation(weights: str, masks: dict[str, str], path: Path = EXPECTED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write(f"{WEIGHTS_PREFIX}{weights} of {MODEL.relative_to(REPO)}: its masks of the sample's test tiles "
                f"(inference.json, no --ckpt); rewrite on purpose with {REWRITE}\n")
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "rle_mask"])
        writer.writerows(sorted(masks.items()))
    return path


def differences(expected: tuple[str, dict[str, str]], found: tuple[str, dict[str, str]]) -> list[str]:
    """What differs between the stored pin and the model's, one line each (empty: they agree)."""
    (want_weights, want), (got_weights, got) = expected, found
    lines = []
    if got_weights != want_weights:
        lines.append(f"{MODEL.relative_to(REPO)} has weights {got_weights}, the pin {want_weights}")
    if sorted(got) != sorted(want):
        lines.append(f"tile ids differ: only in the pin {sorted(set(want) - set(got))}, only in the model's "
                     f"masks {sorted(set(got) - set(want))}")
    changed = sorted(i for i in set(want) & set(got) if want[i] != got[i])
    if changed:
        lines.append(f"masks differ on {len(changed)} of {len(want)} tiles: {', '.join(changed)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"store the current model's pin in {EXPECTED}")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        found = shipped_masks(tmp)
    if args.write:
        write_expectation(*found)
        print(f"wrote {EXPECTED}: weights {found[0]}, masks of {len(found[1])} tiles")
        return 0
    problems = differences(read_expectation(), found) if EXPECTED.is_file() else [f"{EXPECTED} does not exist"]
    for line in problems:
        print(line)
    print("the shipped model matches its pin" if not problems else f"if the change is on purpose: {REWRITE}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
