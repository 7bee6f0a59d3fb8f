"""Patient-level stratified splits and the leak check."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data.datasets import Record
from data.splits import (
    assign_splits,
    find_leaks,
    group_records,
    near_duplicate_pairs,
    perceptual_hash,
    read_splits,
    write_splits,
)
from fakes import xray_like


def _records(n_patients=20, per_patient=3):
    recs = []
    for p in range(n_patients):
        label = ("normal", "pneumonia", "covid")[p % 3]
        for k in range(per_patient):
            recs.append(Record(path=Path(f"{label}/p{p}_{k}.png"), label=label, name=f"{label}/p{p}_{k}.png",
                               patient_id=f"P{p}"))
    return recs


def test_patients_never_straddle_splits_and_classes_are_stratified():
    recs = _records()
    groups = group_records(recs, hashes={})
    splits = assign_splits(recs, groups, val=0.2, test=0.2, seed=1)
    by_patient = {}
    for r in recs:
        by_patient.setdefault(r.patient_id, set()).add(splits[r.key])
    assert all(len(s) == 1 for s in by_patient.values())
    per = Counter((splits[r.key], r.label) for r in recs)
    for label in ("normal", "pneumonia", "covid"):
        assert per[("test", label)] >= 3 and per[("val", label)] >= 3 and per[("train", label)] >= 6
    assert find_leaks(recs, splits, hashes={}) == []


def test_split_is_seeded():
    recs = _records()
    groups = group_records(recs, hashes={})
    assert assign_splits(recs, groups, seed=5) == assign_splits(recs, groups, seed=5)
    assert assign_splits(recs, groups, seed=5) != assign_splits(recs, groups, seed=6)


def test_near_duplicates_are_grouped_and_leaks_reported():
    img = xray_like(128, 128, seed=1)
    other = xray_like(128, 128, seed=2)[::-1].copy()
    h_a = perceptual_hash(img)
    h_b = perceptual_hash(np.clip(img.astype(int) + 3, 0, 255).astype(np.uint8))  # re-encoded copy
    h_c = perceptual_hash(other)
    assert bin(h_a ^ h_b).count("1") <= 4 < bin(h_a ^ h_c).count("1")
    recs = [Record(Path(n), "normal", name=n) for n in ("a.png", "b.png", "c.png")]
    hashes = {"a.png": h_a, "b.png": h_b, "c.png": h_c}
    assert [(a, b) for a, b, _ in near_duplicate_pairs(hashes)] == [("a.png", "b.png")]
    groups = group_records(recs, hashes)
    assert groups["a.png"] == groups["b.png"] != groups["c.png"]
    leaks = find_leaks(recs, {"a.png": "train", "b.png": "test", "c.png": "val"}, hashes)
    assert [leak.kind for leak in leaks] == ["near-duplicate"]
    patient_leak = find_leaks(
        [Record(Path("x"), "normal", name="x", patient_id="P"), Record(Path("y"), "normal", name="y", patient_id="P")],
        {"x": "train", "y": "val"},
        {},
    )
    assert patient_leak[0].kind == "patient" and patient_leak[0].splits == ("train", "val")


def test_splits_csv_round_trip(tmp_path):
    recs = _records(6, 1)
    groups = group_records(recs, {})
    splits = assign_splits(recs, groups, seed=0)
    write_splits(tmp_path / "s.csv", recs, splits, groups)
    assert read_splits(tmp_path / "s.csv") == splits


@pytest.mark.parametrize("val, test", [(0.6, 0.5), (-0.1, 0.1), (0.1, 1.0)])
def test_bad_fractions(val, test):
    recs = _records(3, 1)
    with pytest.raises(ValueError):
        assign_splits(recs, group_records(recs, {}), val=val, test=test)


def test_real_data_split_has_no_leaks(shared_cxr):
    from data.datasets import load_records
    from data.splits import hash_records

    recs = load_records(shared_cxr)
    hashes = hash_records(recs)
    groups = group_records(recs, hashes)
    splits = assign_splits(recs, groups, seed=0)
    assert find_leaks(recs, splits, hashes) == []
    assert Counter(splits.values())["test"] >= 30


def test_small_sets_still_get_val_and_test():
    recs = _records(5, 1)  # 5 patients, one image each
    splits = assign_splits(recs, group_records(recs, {}), val=0.15, test=0.15, seed=0)
    assert sorted(set(splits.values())) == ["test", "train", "val"]
    assert list(splits.values()).count("train") == 3
