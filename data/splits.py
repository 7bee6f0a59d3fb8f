"""Patient-level, stratified train/val/test splits and the leak check.

Images are grouped so that no group straddles two splits: same ``patient_id``, same
manifest ``group_id``, or near-duplicate pixels (perceptual hash within a Hamming
distance) all join one group. Groups, not images, are assigned to splits, per class.
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import imagehash
import numpy as np
from PIL import Image

from data import spec
from data.datasets import DatasetError, FailureLog, Record, open_csv
from data.io import ImageReadError, read_image
from data.preprocess import to_rgb_float

SPLIT_NAMES = ("train", "val", "test")
#: Hamming distance (of 64 bits) at or below which two pHashes are near-duplicates.
#: Measured on ../shared/data: the same X-ray at full resolution and at 512 px is at
#: distance 0; the closest two different patients are at 6. 4 sits between.
DEFAULT_HASH_DISTANCE = 4


@dataclass(frozen=True)
class Leak:
    """An entity present in more than one split."""

    kind: str  # "patient", "group" or "near-duplicate"
    key: str
    files: tuple[str, ...]
    splits: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.kind} {self.key!r} in {' and '.join(self.splits)}: {', '.join(self.files)}"


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash (imagehash.phash) of a decoded image."""
    gray = to_rgb_float(image).mean(axis=2).astype(np.uint8)
    bits = imagehash.phash(Image.fromarray(gray)).hash.flatten()
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def hash_records(
    records: Sequence[Record],
    failures: FailureLog | None = None,
    progress: Callable[[Sequence[Record]], Sequence[Record]] | None = None,
) -> dict[str, int]:
    """pHash of every readable record, by record key; unreadable ones go to ``failures``."""
    hashes: dict[str, int] = {}
    for r in (progress(records) if progress else records):
        try:
            hashes[r.key] = perceptual_hash(read_image(r.path))
        except ImageReadError as err:
            if failures is not None:
                failures.add(err.path, err.reason)
    return hashes


def near_duplicate_pairs(hashes: dict[str, int],
                         max_distance: int = DEFAULT_HASH_DISTANCE) -> list[tuple[str, str, int]]:
    """Pairs (key_a, key_b, distance) whose hashes differ in ≤ ``max_distance`` bits."""
    keys = list(hashes)
    if len(keys) < 2:
        return []
    values = np.array([hashes[k] for k in keys], dtype=np.uint64)
    pairs = []
    for i in range(len(keys) - 1):
        d = np.bitwise_count(values[i] ^ values[i + 1 :])
        for j in np.nonzero(d <= max_distance)[0]:
            pairs.append((keys[i], keys[i + 1 + int(j)], int(d[j])))
    return pairs


class _UnionFind:
    def __init__(self, items: Sequence[str]) -> None:
        self.parent = {x: x for x in items}

    def find(self, x: str) -> str:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_records(records: Sequence[Record], hashes: dict[str, int],
                  max_distance: int = DEFAULT_HASH_DISTANCE) -> dict[str, str]:
    """Group id of every record key: connected components of same patient / group / near-duplicate."""
    uf = _UnionFind([r.key for r in records])
    for attr in ("patient_id", "group_id"):
        first: dict[str, str] = {}
        for r in records:
            value = getattr(r, attr)
            if value:
                if value in first:
                    uf.union(first[value], r.key)
                else:
                    first[value] = r.key
    for a, b, _ in near_duplicate_pairs(hashes, max_distance):
        uf.union(a, b)
    return {r.key: uf.find(r.key) for r in records}


def assign_splits(
    records: Sequence[Record],
    groups: dict[str, str],
    *,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
) -> dict[str, str]:
    """Split name of every record key; whole groups move together, stratified by class.

    Each group is stratified by its most common label. Within a class, groups are
    shuffled with ``seed`` and handed to test, then val, until each holds its share.
    """
    if not (0.0 <= val < 1.0 and 0.0 <= test < 1.0 and val + test < 1.0):
        raise ValueError(f"val={val} and test={test} must be fractions in [0, 1) summing below 1")
    members: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        members[groups[r.key]].append(r)
    by_class: dict[str, list[str]] = defaultdict(list)
    for gid, recs in sorted(members.items()):
        label = Counter(r.label or "" for r in recs).most_common(1)[0][0]
        by_class[label].append(gid)
    rng = np.random.default_rng(seed)
    result: dict[str, str] = {}
    for label in sorted(by_class):
        gids = list(by_class[label])
        rng.shuffle(gids)
        total = sum(len(members[g]) for g in gids)
        targets = {"test": test * total, "val": val * total}
        filled = {"test": 0, "val": 0}
        for gid in gids:
            size = len(members[gid])
            split = "train"
            for name in ("test", "val"):
                # Take the group while this split is short of its share by at least half the group.
                if filled[name] + size / 2 <= targets[name]:
                    split = name
                    break
            if split != "train":
                filled[split] += size
            for r in members[gid]:
                result[r.key] = split
    # Small sets: a requested split that got nothing takes the smallest training group,
    # as long as training keeps at least one group.
    for name, fraction in (("val", val), ("test", test)):
        if fraction <= 0 or name in result.values():
            continue
        train_groups = sorted({groups[k] for k, v in result.items() if v == "train"},
                              key=lambda g: (len(members[g]), g))
        if len(train_groups) >= 2:
            for r in members[train_groups[0]]:
                result[r.key] = name
    return result


def write_splits(path: str | os.PathLike[str], records: Sequence[Record], splits: dict[str, str],
                 groups: dict[str, str]) -> None:
    """Write ``file,label,patient_id,source,group,split`` rows (atomic replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
        w.writerow(["file", "label", "patient_id", "source", "group", "split"])
        for r in records:
            if r.key in splits:
                w.writerow([r.key, r.label or "", r.patient_id, r.source, groups.get(r.key, ""), splits[r.key]])
    os.replace(tmp, path)


def read_splits(path: str | os.PathLike[str]) -> dict[str, str]:
    """Split name by file key from a splits CSV written by :func:`write_splits`."""
    path = Path(path)
    with open_csv(path, "splits file", "; make one with `cxr data split`") as handle:
        reader = csv.DictReader(handle)
        if not {"file", "split"} <= set(reader.fieldnames or []):
            raise DatasetError(f"{path}: a splits file needs columns file and split (see `cxr data split`)")
        out = {}
        for lineno, row in enumerate(reader, start=2):
            if row["split"] not in SPLIT_NAMES:
                raise DatasetError(f"{path}:{lineno}: unknown split {row['split']!r}; valid: {', '.join(SPLIT_NAMES)}")
            out[row["file"]] = row["split"]
    return out


def select_split(records: Sequence[Record], splits: dict[str, str], name: str) -> list[Record]:
    """Records whose key (or resolved path) is assigned to split ``name``."""
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLIT_NAMES)}")
    return [r for r in records if splits.get(r.key) == name]


def find_leaks(
    records: Sequence[Record],
    splits: dict[str, str],
    hashes: dict[str, int],
    *,
    max_distance: int = DEFAULT_HASH_DISTANCE,
) -> list[Leak]:
    """Every patient, manifest group or near-duplicate pair present in two or more splits."""
    leaks: list[Leak] = []
    assigned = [r for r in records if r.key in splits]
    for attr, kind in (("patient_id", "patient"), ("group_id", "group")):
        seen: dict[str, list[Record]] = defaultdict(list)
        for r in assigned:
            if getattr(r, attr):
                seen[getattr(r, attr)].append(r)
        for key, recs in sorted(seen.items()):
            names = sorted({splits[r.key] for r in recs})
            if len(names) > 1:
                leaks.append(Leak(kind, key, tuple(r.key for r in recs), tuple(names)))
    split_hashes = {k: v for k, v in hashes.items() if k in splits}
    for a, b, d in near_duplicate_pairs(split_hashes, max_distance):
        if splits[a] != splits[b]:
            leaks.append(Leak("near-duplicate", f"distance {d}", (a, b), tuple(sorted({splits[a], splits[b]}))))
    return leaks


def split_counts(records: Sequence[Record], splits: dict[str, str]) -> dict[str, dict[str, int]]:
    """{split: {class: count}} for reports."""
    out: dict[str, dict[str, int]] = {s: {c: 0 for c in spec.CLASS_NAMES} for s in SPLIT_NAMES}
    for r in records:
        s = splits.get(r.key)
        if s is not None and r.label in spec.CLASS_NAMES:
            out[s][r.label] += 1
    return out


@dataclass
class SplitPlan:
    """A patient-level split of the readable records, with what it was made from."""

    usable: list[Record]  # the records whose image could be read (hashed)
    hashes: dict[str, int]  # record key → perceptual hash
    groups: dict[str, str]  # record key → patient / near-duplicate group
    assignment: dict[str, str]  # record key → "train" | "val" | "test"
    leaks: list[Leak]  # near-duplicates or patients across splits


def plan_split(records: Sequence[Record], *, splits: dict[str, str] | None = None, val: float = 0.15,
               test: float = 0.15, seed: int = 0, failures=None, progress=None) -> SplitPlan:
    """Hash every image once, group by patient and near-duplicate once, then take ``splits`` as given
    or make a stratified patient-level split; the leaks across the result are listed."""
    hashes = hash_records(records, failures, progress=progress)
    usable = [r for r in records if r.key in hashes]
    groups = group_records(usable, hashes)
    assignment = splits if splits is not None else assign_splits(usable, groups, val=val, test=test, seed=seed)
    return SplitPlan(usable, hashes, groups, assignment, find_leaks(usable, assignment, hashes))
