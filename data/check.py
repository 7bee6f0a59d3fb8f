"""Audit a data folder: counts, sizes, masks, unreadable files, near-duplicates, leaks.

Each image is decoded once; its size and perceptual hash come from that one decode.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from data.datasets import FailureLog, Record
from data.io import ImageReadError, read_image, read_mask
from data.splits import DEFAULT_HASH_DISTANCE, Leak, find_leaks, near_duplicate_pairs, perceptual_hash


@dataclass
class DataReport:
    """What :func:`check_records` found. ``failures`` holds (path, reason) pairs."""

    n_images: int = 0
    n_readable: int = 0
    per_class: Counter = field(default_factory=Counter)
    per_source: Counter = field(default_factory=Counter)
    per_class_source: Counter = field(default_factory=Counter)
    min_size: tuple[int, int] | None = None  # (width, height) of the smallest area
    max_size: tuple[int, int] | None = None
    masks_per_kind: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)
    near_duplicates: list[tuple[str, str, int]] = field(default_factory=list)
    leaks: list[Leak] = field(default_factory=list)
    hashes: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.leaks

    def to_dict(self) -> dict[str, object]:
        return {
            "n_images": self.n_images,
            "n_readable": self.n_readable,
            "per_class": dict(self.per_class),
            "per_source": dict(self.per_source),
            "min_size": self.min_size,
            "max_size": self.max_size,
            "masks_per_kind": dict(self.masks_per_kind),
            "failures": [{"file": f, "reason": r} for f, r in self.failures],
            "near_duplicates": [{"a": a, "b": b, "distance": d} for a, b, d in self.near_duplicates],
            "leaks": [leak.describe() for leak in self.leaks],
        }


def check_records(
    records: Sequence[Record],
    *,
    splits: dict[str, str] | None = None,
    max_pixels: int | None = None,
    max_distance: int = DEFAULT_HASH_DISTANCE,
    progress: Callable[[Iterable[Record]], Iterable[Record]] | None = None,
) -> DataReport:
    """Decode every record (and its masks) once and summarise; never raises for a bad file."""
    report = DataReport(n_images=len(records))
    failures = FailureLog()
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    sizes: list[tuple[int, int]] = []
    for r in progress(records) if progress else records:
        report.per_class[r.label or "(unlabelled)"] += 1
        if r.source:
            report.per_source[r.source] += 1
            report.per_class_source[(r.label or "(unlabelled)", r.source)] += 1
        try:
            image = read_image(r.path, **kwargs)
        except ImageReadError as err:
            failures.add(err.path, err.reason)
            continue
        report.n_readable += 1
        h, w = image.shape[:2]
        sizes.append((w, h))
        report.hashes[r.key] = perceptual_hash(image)
        for kind, mpath in sorted(r.masks.items()):
            try:
                mask = read_mask(mpath)
            except ImageReadError as err:
                failures.add(err.path, f"mask: {err.reason}")
                continue
            if mask.shape != (h, w):
                failures.add(str(mpath),
                             f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image {w}x{h} ({r.path})")
                continue
            report.masks_per_kind[kind] += 1
    if sizes:
        report.min_size = min(sizes, key=lambda s: s[0] * s[1])
        report.max_size = max(sizes, key=lambda s: s[0] * s[1])
    report.failures = sorted(failures.items)
    report.near_duplicates = near_duplicate_pairs(report.hashes, max_distance)
    if splits is not None:
        report.leaks = find_leaks(records, splits, report.hashes, max_distance=max_distance)
    return report


def orphan_masks(records: Sequence[Record], mask_root: Path) -> dict[str, list[str]]:
    """Mask files per kind whose stem matches no image, so typos in names show up."""
    stems = {r.path.stem for r in records}
    out: dict[str, list[str]] = {}
    for kind_dir in sorted(p for p in mask_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        extra = sorted(p.name for p in kind_dir.iterdir() if p.is_file() and p.stem not in stems)
        if extra:
            out[kind_dir.name] = extra
    return out
