"""Stage-1 jobs: train, evaluate and predict with the ensemble classifier.

Every job checks its inputs (folders, model directory and sidecar, output location)
before reading images or building models.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data import spec
from data.datasets import DatasetError, FailureLog, Record
from data.files import write_json
from data.splits import SPLIT_NAMES, read_splits, select_split
from pipeline.common import (
    METRICS_FILE,
    held_out_records,
    load_settings,
    patient_ids,
    prepare_output_dir,
    refuse_finished_output,
    run_training_job,
    write_failures,
)
from pipeline.report import plot_confusion, plot_reliability, plot_roc


@dataclass
class TrainJobResult:
    out: Path
    history: dict[str, list[float]]
    temperature: float
    split_counts: dict[str, int]
    failures: list[tuple[str, str]]
    seconds: float


def train_classifier_job(
    records: Sequence[Record],
    out: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    splits: str | os.PathLike[str] | None = None,
    allow_leaks: bool = False,
    progress=None,
    verbose: int | None = None,
):
    """Train a classifier on the train split of ``records`` and validate on its val split."""
    from ensemble.members import resolve_weights
    from ensemble.train import ClassifierSettings, train_classifier, with_preset

    settings = load_settings(ClassifierSettings, with_preset, config, overrides)
    # local weight files are checked before any image is read
    weight_files = {m: resolve_weights(m, settings.weights) for m in settings.members}
    run = run_training_job(records, out, settings, train_classifier, splits=splits, allow_leaks=allow_leaks,
                           progress=progress, verbose=verbose,
                           check_split=lambda a: check_encoder_leaks(records, a, weight_files, allow_leaks))
    counts = {s: sum(1 for v in run.assignment.values() if v == s) for s in SPLIT_NAMES}
    return TrainJobResult(run.out, run.result.history, run.result.temperature, counts, run.result.failures,
                          run.seconds)


def check_encoder_leaks(records: Sequence[Record], assignment: dict[str, str], weight_files: dict[str, str | None],
                        allow_leaks: bool) -> None:
    """DatasetError when a member starts from a segmenter's encoder (`cxr export --format encoder`)
    that trained or validated on images, or patients, of this run's test split: its test scores
    would not be held-out ones. ``--allow-leaks`` lets it through."""
    from pipeline.export_jobs import encoder_record

    test = select_split(records, assignment, "test")
    for member, path in weight_files.items():
        record = encoder_record(path) if path not in (None, "imagenet") else None
        if record is None or allow_leaks:
            continue
        files, patients = set(record["trained_on"]["files"]), set(record["trained_on"]["patients"])
        seen = [r.key for r in test if r.key in files or (r.patient_id and r.patient_id in patients)]
        if seen:
            raise DatasetError(
                f"{path}: {member}'s initial encoder trained on {len(seen)} image(s) of this run's test split "
                f"(or their patients), e.g. {', '.join(seen[:3])}; train the segmenter on this run's training "
                "split (cxr train-segmenter --splits with the same splits file) or pass --allow-leaks")


@dataclass
class PredictionTable:
    """Per-image outputs of a classifier over a list of files (rows in input order)."""

    indices: list[int]
    probs: np.ndarray  # (N, C) calibrated
    raw_probs: np.ndarray  # (N, C)
    member_probs: dict[str, np.ndarray]
    failures: list[tuple[str, str]]


def classify_files(classifier, paths: Sequence[str | os.PathLike[str]], *, batch_size: int = 8,
                   progress=None) -> PredictionTable:
    """Run ``classifier`` over ``paths`` in batches; unreadable files are listed, not fatal."""
    failures = FailureLog()
    idx, probs, raw = [], [], []
    members: dict[str, list[np.ndarray]] = {}
    batches = classifier.stream(paths, batch_size=batch_size, failures=failures)
    for batch in (progress(batches) if progress else batches):
        pred = classifier.predict(batch.x)
        idx.extend(batch.indices)
        probs.append(pred.probs)
        raw.append(pred.raw_probs)
        for m, p in pred.member_probs.items():
            members.setdefault(m, []).append(p)
    empty = np.zeros((0, spec.NUM_CLASSES), np.float32)
    return PredictionTable(
        idx,
        np.concatenate(probs) if probs else empty,
        np.concatenate(raw) if raw else empty,
        {m: np.concatenate(v) for m, v in members.items()},
        list(failures.items),
    )


def evaluate_classifier_job(
    model_dir: str | os.PathLike[str],
    records: Sequence[Record],
    out: str | os.PathLike[str],
    *,
    splits: str | os.PathLike[str] | None = None,
    split: str = "test",
    n_boot: int = 1000,
    batch_size: int = 8,
    engine: str = "keras",
    include_training: bool = False,
    progress=None,
) -> dict[str, Any]:
    """metrics.json (+ per source, per member), predictions.csv, failures.csv and plots in ``out``.

    Without ``splits``, images the bundle trained or validated on (its splits.csv) are left out
    unless ``include_training`` (metrics.json says which). CIs resample patients.
    ``engine`` runs the model on Keras, ONNX Runtime or its int8 export (data.runtime.engines.ENGINES).
    """
    from ensemble.classifier import load_classifier
    from ensemble.evaluate import classification_metrics, metrics_by_group, reliability, roc_curves

    refuse_finished_output(out, marker=METRICS_FILE)
    classifier = load_classifier(model_dir)
    classifier.use_engine(engine)
    out = prepare_output_dir(out, marker=METRICS_FILE)
    if splits is not None:
        records = select_split(records, read_splits(splits), split)
        if not records:
            raise DatasetError(f"{splits}: no images of this folder are in split {split!r}")
        scope: dict[str, Any] = {"scored": f"split {split!r} of {splits}", "excluded_training_images": 0}
    else:
        records, scope = held_out_records(records, model_dir, include_training=include_training)
    if any(r.label is None for r in records):
        raise DatasetError("evaluation needs a label for every image (class folders or a manifest label column)")
    table = classify_files(classifier, [r.path for r in records], batch_size=batch_size, progress=progress)
    if not table.indices:
        raise DatasetError("no image could be read; see failures.csv")
    kept = [records[i] for i in table.indices]
    labels = np.array([spec.class_index(r.label) for r in kept])
    patients = patient_ids(kept)
    metrics = classification_metrics(labels, table.probs, uncalibrated=table.raw_probs, n_boot=n_boot, groups=patients)
    metrics["evaluated"] = scope
    metrics["model"] = {"path": str(model_dir), "sha256": classifier.checkpoint_sha256,
                        "members": list(classifier.members), "variant": classifier.variant, "engine": engine,
                        "temperature": classifier.temperature}
    sources = [r.source for r in kept]
    if any(sources):
        metrics["per_source"] = metrics_by_group(labels, table.probs, sources, patients=patients, n_boot=n_boot)
    if len(classifier.members) > 1 and table.member_probs:
        metrics["per_member"] = {m: classification_metrics(labels, p, n_boot=n_boot, groups=patients)
                                 for m, p in table.member_probs.items()}
    metrics["failures"] = len(table.failures)
    write_json(out / METRICS_FILE, metrics)
    _write_predictions(out / "predictions.csv", kept, table)
    write_failures(out / "failures.csv", table.failures)
    plot_confusion(metrics["confusion_matrix"]["counts"], spec.CLASS_NAMES, out / "confusion_matrix.png")
    plot_roc(roc_curves(labels, table.probs), {n: e["auc"]["value"] for n, e in metrics["per_class"].items()},
             out / "roc.png")
    plot_reliability(reliability(labels, table.probs), out / "reliability.png",
                     title=f"after temperature {classifier.temperature:.2f}: ECE {metrics['ece']['value']:.3f}")
    return metrics


def _write_predictions(path: Path, records: Sequence[Record], table: PredictionTable) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
        w.writerow(["file", "label", "source", "predicted", *[f"p_{c}" for c in spec.CLASS_NAMES]])
        for r, p in zip(records, table.probs):
            w.writerow([r.key, r.label, r.source, spec.CLASS_NAMES[int(p.argmax())], *[f"{v:.6f}" for v in p]])
