"""`cxr demo`'s data selection (what its models may train on) and its time budget (no model is trained here)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

import pipeline.demo as demo
from data.datasets import load_records
from data.splits import write_splits
from fakes import png_bytes, xray_like

SAMPLES = load_records(demo.SAMPLES_DIR)


def _folder(root: Path, rows: list[tuple[str, str, str]], masks: dict[str, list[str]]) -> Path:
    """A class-folder tree with a manifest (file, label, patient_id, source) and masks beside it."""
    for i, (name, label, _) in enumerate(rows):
        (root / "cxr" / label).mkdir(parents=True, exist_ok=True)
        (root / "cxr" / label / name).write_bytes(png_bytes(xray_like(24, 24, seed=i)))
    with (root / "cxr" / "manifest.csv").open("w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["file", "label", "patient_id", "source"])
        w.writerows([(f"{label}/{name}", label, patient, "test") for name, label, patient in rows])
    for kind, names in masks.items():
        (root / "cxr_masks" / kind).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / "cxr_masks" / kind / name).write_bytes(png_bytes(xray_like(24, 24, seed=0)))
    return root / "cxr"


@pytest.fixture
def shared(tmp_path, monkeypatch) -> Path:
    """../shared/data as the demo reads it: cxr/ holds one bundled sample by name and one image of a
    sample's patient under another name; large/cxr/ holds only other patients."""
    sample, other_patient = SAMPLES[0], SAMPLES[1]
    small = [(sample.path.name, sample.label, "someone-else"),
             ("renamed_view.png", other_patient.label, other_patient.patient_id)]
    small += [(f"s{i}.png", label, f"p{i}") for i, label in enumerate(["covid", "normal", "pneumonia"] * 2)]
    labels = ["covid"] * 10 + ["normal"] * 6 + ["pneumonia"] * 4
    large = [(f"l{i}.png", label, f"q{i}") for i, label in enumerate(labels)]
    _folder(tmp_path / "cxr_root", small, {"infection": ["s0.png"], "lung": ["s0.png", "s1.png"]})
    both = [f"l{i}.png" for i in range(6)]
    _folder(tmp_path / "large", large, {"infection": both + ["l6.png"], "lung": both + ["l7.png"]})
    (tmp_path / "cxr_root" / "cxr").rename(tmp_path / "cxr")
    (tmp_path / "cxr_root" / "cxr_masks").rename(tmp_path / "cxr_masks")
    monkeypatch.setattr(demo, "SHARED", tmp_path)
    return tmp_path


def test_demo_never_trains_on_the_bundled_samples_or_their_patients(shared):
    records, description, real, lesion_kind = demo._training_records()
    assert real and lesion_kind == "infection"
    names = {r.path.name for r in records}
    patients = {r.patient_id for r in records}
    assert not names & {s.path.name for s in SAMPLES}
    assert not patients & {s.patient_id for s in SAMPLES}
    assert len(records) == 26  # 28 images, less the sample's file and the sample patient's other view
    assert "without the 9 bundled samples" in description


def test_segmenter_subset_has_both_masks_keeps_to_the_cap_and_adds_lesion_free_lungs(shared, tmp_path, monkeypatch):
    records, *_ = demo._training_records()
    with_both = [r for r in records if {"infection", "lung"} <= set(r.masks)]
    assert len(with_both) == 7  # s0 and l0..l5; l6 (infection only) and l7, s1 (lung only) are left out
    splits = tmp_path / "splits.csv"
    assignment = {r.key: ("test" if r is with_both[0] else "train") for r in records}
    write_splits(splits, records, assignment, {r.key: r.key for r in records})
    monkeypatch.setattr(demo, "SEGMENTER_IMAGES", 3)
    subset = demo._subset(records, ("infection", "lung"), splits)
    assert all(r.has_mask("infection") and "lung" in r.masks for r in subset)
    free = [r for r in subset if "infection" not in r.masks]  # known lesion-free: a normal X-ray with lungs
    assert [(r.path.name, r.label) for r in free] == [("s1.png", "normal")]  # l7: COVID, no lesion mask, left out
    train = [r for r in subset if assignment[r.key] == "train" and "infection" in r.masks]
    assert len(train) == 3 and with_both[0] in subset  # capped training images, every held-out one kept
    assert demo._subset(records, ("infection", "lung"), splits) == subset  # seeded: the same draw each time


def test_stratified_draw_keeps_class_shares(shared):
    records, *_ = demo._training_records()
    drawn = demo._stratified(records, 13)
    share = {c: sum(r.label == c for r in drawn) / len(drawn) for c in ("covid", "normal", "pneumonia")}
    full = {c: sum(r.label == c for r in records) / len(records) for c in share}
    assert all(abs(share[c] - full[c]) < 0.1 for c in share), (share, full)
    assert len(set(drawn)) == len(drawn)


def test_sample_only_demo_says_it_cannot_train(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SHARED", tmp_path / "absent")
    records, description, real, lesion_kind = demo._training_records()
    assert not real and lesion_kind == "opacity"
    assert "../shared/data not found" in description
    assert any({"opacity", "lung"} <= set(r.masks) for r in records)  # the one-model segmenter can train


def test_each_demo_fit_gets_its_share_of_the_time_left():
    deadline = time.perf_counter() + 100.0
    budget = demo._budget("classifier", deadline, real=True)["time_budget_s"]
    assert demo.FIT_SHARES["classifier"] * 99 <= budget <= demo.FIT_SHARES["classifier"] * 100
    assert demo._budget("segmenter", time.perf_counter() - 5, real=True) == {"time_budget_s": 1.0}  # past: 1 epoch
    assert demo._budget("classifier", deadline, real=False) == {}  # the sample-only demo takes moments


@pytest.mark.parametrize("run, expect", [(9, "9 epochs"), (6, "6 of 9 epochs in its 347 s budget")])
def test_report_header_says_how_many_epochs_the_budget_allowed(run, expect):
    history = {"densenet121_probs_loss": [1.0] * run, "densenet121_probs_planned_epochs": [9.0] * run}
    assert demo._epochs_text(history, 9, 347.2) == expect
