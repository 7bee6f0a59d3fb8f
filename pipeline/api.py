"""Typed entry points behind the command line. Each validates its inputs before heavy work.

The CLI (pipeline/cli.py) only parses arguments and prints; everything it does is
callable from Python here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence, TypeVar

from data.check import DataReport, check_records, orphan_masks
from data.datasets import DatasetError, FailureLog, Record, load_records, pair_masks
from data.splits import (
    assign_splits,
    find_leaks,
    group_records,
    hash_records,
    read_splits,
    split_counts,
    write_splits,
)

T = TypeVar("T")


def progress_bar(items: Iterable[T], *, desc: str, total: int | None = None) -> Iterable[T]:
    """tqdm on stderr, quiet when stderr is not a terminal unless CXR_PROGRESS=1."""
    from tqdm.auto import tqdm

    enabled = sys.stderr.isatty() or os.environ.get("CXR_PROGRESS") == "1"
    return tqdm(items, desc=desc, total=total, unit="img", disable=not enabled, file=sys.stderr)


def gather_records(
    data_dir: str | os.PathLike[str] | None,
    *,
    manifest: str | os.PathLike[str] | None = None,
    masks: str | os.PathLike[str] | None = None,
    mask_kinds: Iterable[str] | None = None,
) -> list[Record]:
    """Records of a class-folder tree or a manifest, with masks paired when ``masks`` is given."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DatasetError(f"{data_dir}: no such folder")
    if manifest is not None and not Path(manifest).is_file():
        raise DatasetError(f"{manifest}: no such manifest file")
    records = load_records(data_dir, manifest=manifest)
    if not records:
        where = manifest or data_dir
        raise DatasetError(f"{where}: no images found (supported: PNG, JPEG, BMP, TIFF, DICOM)")
    if masks is not None:
        records = pair_masks(records, masks, mask_kinds)
    return records


def gather_folders(data_dirs: Sequence[str | os.PathLike[str]], mask_dirs: Sequence[str | os.PathLike[str] | None] = (),
                   mask_kinds: Iterable[str] | None = None) -> list[Record]:
    """Records of several class-folder trees (each with its manifest), as one list.

    Each record's key is prefixed with its folder's name (with the parent's where two folders
    share a name, e.g. ``data/cxr/…`` and ``large/cxr/…``) so keys stay unique; ``mask_dirs[i]``
    (absent or None: no masks) pairs masks of ``mask_kinds`` present there with folder i.
    """
    dirs = [Path(d) for d in data_dirs]
    tags = [d.name for d in dirs]
    if len(set(tags)) < len(tags):
        tags = [f"{d.parent.name}/{d.name}" for d in dirs]
    out: list[Record] = []
    for i, (d, tag) in enumerate(zip(dirs, tags)):
        records = gather_records(d)
        masks = Path(mask_dirs[i]) if i < len(mask_dirs) and mask_dirs[i] is not None else None
        if masks is not None and masks.is_dir():
            present = [k for k in (mask_kinds or sorted(p.name for p in masks.iterdir() if p.is_dir()))
                       if (masks / k).is_dir()]
            records = pair_masks(records, masks, present)
        out += [replace(r, name=f"{tag}/{r.key}", source=r.source or tag) for r in records]
    return out


@dataclass
class CheckResult:
    """A data audit with the mask files that match no image."""

    report: DataReport
    orphans: dict[str, list[str]]


def check_data(
    data_dir: str | os.PathLike[str] | None,
    *,
    manifest: str | os.PathLike[str] | None = None,
    masks: str | os.PathLike[str] | None = None,
    splits: str | os.PathLike[str] | None = None,
    max_pixels: int | None = None,
) -> CheckResult:
    """Audit a data folder (see data.check.check_records)."""
    records = gather_records(data_dir, manifest=manifest, masks=masks)
    split_map = read_splits(splits) if splits is not None else None
    report = check_records(
        records,
        splits=split_map,
        max_pixels=max_pixels,
        progress=lambda rs: progress_bar(rs, desc="checking", total=len(records)),
    )
    orphans = orphan_masks(records, Path(masks)) if masks is not None else {}
    return CheckResult(report, orphans)


@dataclass
class SplitResult:
    """Outcome of :func:`split_data`."""

    path: Path
    counts: dict[str, dict[str, int]]
    n_groups: int
    failures: list[tuple[str, str]]
    leaks: int


def split_data(
    data_dir: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    manifest: str | os.PathLike[str] | None = None,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
) -> SplitResult:
    """Write a patient-level stratified splits CSV; unreadable images are left out and listed."""
    out = Path(out)
    if not out.parent.is_dir():
        raise DatasetError(f"{out.parent}: output folder does not exist; create it first")
    if not (0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0):
        raise DatasetError(f"--val {val} and --test {test} must be fractions in [0, 1) summing below 1")
    records = gather_records(data_dir, manifest=manifest)
    failures = FailureLog()
    hashes = hash_records(records, failures, progress=lambda rs: progress_bar(rs, desc="hashing", total=len(records)))
    usable = [r for r in records if r.key in hashes]
    groups = group_records(usable, hashes)
    assignment = assign_splits(usable, groups, val=val, test=test, seed=seed)
    leaks = find_leaks(usable, assignment, hashes)
    write_splits(out, usable, assignment, groups)
    return SplitResult(out, split_counts(usable, assignment), len(set(groups.values())), failures.items, len(leaks))
