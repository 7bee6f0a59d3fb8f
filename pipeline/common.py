"""Helpers shared by the training and evaluation jobs: output folders, splits, run records."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any, Sequence

from data.bundle import git_revision, package_versions
from data.datasets import DatasetError, FailureLog, Record
from data.splits import assign_splits, find_leaks, group_records, hash_records, read_splits, write_splits


def prepare_output_dir(out: str | os.PathLike[str], *, marker: str = "model.json") -> Path:
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
            raise DatasetError(f"{splits}: names none of the images (e.g. {usable[0].key}); was it made for this folder?")
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


def run_metadata(settings: dict[str, Any], *, seed: int) -> dict[str, Any]:
    """What a run directory records besides its results."""
    return {"config": settings, "seed": seed, "git_revision": git_revision(), "package_versions": package_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_failures(path: Path, failures: Sequence[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
        w.writerow(["file", "reason"])
        w.writerows(failures)
