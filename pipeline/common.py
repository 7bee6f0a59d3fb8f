"""Helpers shared by the training and evaluation jobs: output folders, splits, run records."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any, Sequence

from data.datasets import DatasetError, FailureLog, Record, open_csv
from data.runtime.bundle import SIDECAR, git_revision, package_versions
from data.splits import assign_splits, find_leaks, group_records, hash_records, read_splits, write_splits


def prepare_output_dir(out: str | os.PathLike[str], *, marker: str = SIDECAR) -> Path:
    """Create ``out`` unless it already holds a finished result (never overwritten)."""
    out = Path(out)
    if (out / marker).exists():
        raise DatasetError(f"{out}: already holds a result ({marker}); choose another --out or remove it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(f"{out}: cannot create output folder ({err.strerror or err})") from None
    if not os.access(out, os.W_OK):
        raise DatasetError(f"{out}: output folder is not writable")
    return out


def resolve_splits(records: Sequence[Record], splits: str | os.PathLike[str] | None, out: Path, *,
                   seed: int, allow_leaks: bool, progress=None) -> dict[str, str]:
    """Read ``splits`` (or make a patient-level split), check for leaks, save a copy in ``out``."""
    failures = FailureLog()
    hashes = hash_records(records, failures, progress=progress)
    usable = [r for r in records if r.key in hashes]
    if splits is not None:
        assignment = read_splits(splits)
        unknown = [r.key for r in usable if r.key not in assignment]
        if len(unknown) == len(usable):
            raise DatasetError(f"{splits}: names none of the images (e.g. {usable[0].key}); "
                           "was it made for this folder?")
    else:
        assignment = assign_splits(usable, group_records(usable, hashes), seed=seed)
    leaks = find_leaks(usable, assignment, hashes)
    if leaks and not allow_leaks:
        shown = "; ".join(leak.describe() for leak in leaks[:5])
        raise DatasetError(
            f"{len(leaks)} leak(s) across splits: {shown}. Fix the splits (cxr data split) or pass --allow-leaks"
        )
    write_splits(out / "splits.csv", usable, assignment, group_records(usable, hashes))
    return assignment


def held_out_records(records: Sequence[Record], model_dir: str | os.PathLike[str], *,
                     include_training: bool = False) -> tuple[list[Record], dict[str, Any]]:
    """The records a bundle did not train or validate on, and what was done (for metrics.json).

    A bundle's ``splits.csv`` lists the images it was trained and validated on; scoring those is
    not a held-out result, so they are left out unless ``include_training``, and so are other images
    of their patients. Images the bundle never saw (absent from its splits.csv, of other patients)
    are kept. DatasetError when nothing is left.
    """
    side = Path(model_dir) / "splits.csv"
    if include_training or not side.is_file():
        why = "--include-training" if include_training else "the bundle has no splits.csv"
        return list(records), {"scored": "all images", "why": why, "excluded_training_images": 0}
    assignment = read_splits(side)
    seen = _seen_patients(side)
    kept = [r for r in records if assignment.get(r.key) == "test"
            or (r.key not in assignment and not (r.patient_id and r.patient_id in seen))]
    excluded = len(records) - len(kept)
    if not kept:
        raise DatasetError(f"all {len(records)} images were used to train or validate {model_dir} (its splits.csv); "
                           "evaluate on other images, or pass --include-training to score them anyway")
    return kept, {"scored": "held-out images only", "excluded_training_images": excluded, "splits": str(side)}


def _seen_patients(splits_csv: Path) -> set[str]:
    """Patient ids of a bundle's train and val rows: their other images are not held out either."""
    import csv

    with open_csv(splits_csv, "splits file") as handle:
        return {row["patient_id"] for row in csv.DictReader(handle)
                if row.get("split") in ("train", "val") and row.get("patient_id")}


def patient_ids(records: Sequence[Record]) -> list[str]:
    """One id per record for patient-level bootstraps: patient id, else group id, else the file."""
    return [r.patient_id or r.group_id or r.key for r in records]


def run_metadata(settings: dict[str, Any], *, seed: int) -> dict[str, Any]:
    """What a run directory records besides its results."""
    return {"config": settings, "seed": seed, "git_revision": git_revision(), "package_versions": package_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_failures(path: Path, failures: Sequence[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
        w.writerow(["file", "reason"])
        w.writerows(failures)
