"""`cxr demo`: train small demo models once (cached), then run the full pipeline on the bundled sample.

Demo models are trained from scratch (weights "none": no download needed, the "scratch" preset)
at 64 px on ../shared/data without the 9 bundled sample X-rays and their patients, so the report
on the samples is a held-out result; its header states the classifier's accuracy on held-out
patients. Each fit has a share of a fixed wall-time budget (DEMO_SECONDS), so a cold demo ends
within 10 minutes and a slower machine trains fewer epochs (the header says how many). They show the
tool working end to end; they are not fit for any clinical use. Without
../shared/data the demo says plainly that 9 images cannot train a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from data.datasets import SAMPLE_MASKS_DIR, SAMPLES_DIR, load_records, pair_masks
from data.runtime.bundle import SIDECAR

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEMO_VERSION = 7  # bump when the demo models would train differently

#: Demo models: trained from scratch ("scratch" preset) at 64 px in graph mode, sized so that a cold
#: cache finishes on the 2-core reference CPU within 10 minutes (README: "cxr demo"). Measured on
#: the same 1,600 drawn images: 14 epochs at batch 32 gave held-out 0.737 [0.707, 0.765] with a
#: 532 s classifier job; 10 epochs at batch 16 (twice the updates per epoch) gave 0.737 [0.708, 0.762]
#: in 431-458 s, and a whole cold demo of 604 s, too close to the limit: 9 epochs and BatchNorm
#: statistics from 16 batches instead of 32 buy the margin. The first epoch carries ~60 s of tracing.
CLASSIFIER = {"members": ["densenet121"], "image_size": 64, "epochs": 9, "batch_size": 16, "weights": "none",
              "bn_reestimate_batches": 16}
#: One stage-2 model for lesion and lung field (classes "lung-lesion": background / lung / lesion), so
#: the share of lung affected needs no second model. MobileNetV2 U-Net in graph mode: measured on 2
#: cores at 64 px, ~25 s of tracing then ~50 img/s, against 6 img/s eager for the DenseNet121 U-Net
#: the demo used before. The demo split's training patients have 304 images with both masks, so the
#: cap of 400 takes them all (250 drawn instead: held-out lesion Dice 0.48, lung 0.86); the scratch
#: preset adds 152 lesion-free normal X-rays and fits the cut (segmenter.settings.PRESETS): held-out
#: lesion Dice 0.615, lung 0.896, in a job of ~106 s (README: "cxr demo"). The earlier eager U-Nets
#: (64 images x 2 epochs) reached a validation Dice of 0.23 and marked most of the lung as lesion.
SEGMENTER = {"arch": "unet-mobilenetv2", "classes": "lung-lesion", "image_size": 64, "epochs": 6, "batch_size": 16,
             "weights": "none", "min_lesion_area": 8}
#: Wall seconds a cold demo has from its start to the report, so that with Python's and TensorFlow's
#: start-up it ends within 10 minutes (README: "cxr demo"). Each fit runs the epochs of its schedule
#: (at most the ones above) that fit its share of the time left when it starts, its cosine decaying
#: over those (data.runtime.training.WallTimeBudget): on a slower machine the demo trains fewer
#: epochs, and the report's header says how many. The steps after the fits are not budgeted, so
#: this leaves a margin for a machine that slows during the run: at 560 s one run on the AMD machine
#: below took 10 min 39 s, its segmenter's first epoch and the steps after it 1.5x slower than before.
DEMO_SECONDS = 540
#: Share of the time left that each fit may take; the rest is for what follows it (BatchNorm
#: re-estimate, calibration and saving; the segmenter; scoring held-out patients; the pipeline).
#: Measured on a slower 2-core AMD EPYC (2026-11-27, README "cxr demo", with 560 s): the classifier's
#: share 0.62 gave 6 of 9 epochs and held-out 0.686 in 9 min 8 s; 0.7 gave 7 epochs, 0.708, 9 min 12 s.
FIT_SHARES = {"classifier": 0.7, "segmenter": 0.5}
#: X-rays drawn (stratified by class, seeded) for the demo classifier's patient-level split.
CLASSIFIER_IMAGES = 1600
#: Most lesion training images of the segmenter (drawn from the classifier's training patients, seeded).
SEGMENTER_IMAGES = 400
#: Without ../shared/data the demo can only train on the 9 bundled images, eagerly, for a moment.
SAMPLE_ONLY = {"classifier": {**CLASSIFIER, "epochs": 2, "run_eagerly": True},
               "segmenter": {**SEGMENTER, "epochs": 1, "run_eagerly": True}}
#: The folders of a complete demo cache.
MODELS = ("classifier", "lesion")


@dataclass
class DemoResult:
    report: Path
    models: Path
    trained: bool
    seconds: float
    data_source: str
    held_out: str  # one line on the demo classifier's held-out accuracy (or why there is none)


def default_cache() -> Path:
    """$CXR_CACHE, else ~/.cache/cxr-triage."""
    return Path(os.environ.get("CXR_CACHE", Path.home() / ".cache" / "cxr-triage"))


def _training_records() -> tuple[list, str, bool, str]:
    """(records, description, real, lesion mask kind): ../shared/data's X-rays without the bundled
    samples (nor their patients) when present, else the bundled sample itself."""
    from pipeline.api import gather_folders

    folders = [SHARED / "cxr", SHARED / "large" / "cxr"]
    if not all((f / "manifest.csv").is_file() for f in folders):
        records = pair_masks(load_records(SAMPLES_DIR), SAMPLE_MASKS_DIR, ["opacity", "lung"])
        return records, f"{SAMPLES_DIR} only (../shared/data not found)", False, "opacity"
    samples = load_records(SAMPLES_DIR)
    names = {r.path.name for r in samples}
    patients = {r.patient_id for r in samples if r.patient_id}
    records = gather_folders(folders, [SHARED / "cxr_masks", SHARED / "large" / "cxr_masks"], ["infection", "lung"])
    kept = [r for r in records if r.path.name not in names and r.patient_id not in patients]
    return kept, f"{', '.join(map(str, folders))} without the {len(samples)} bundled samples or their patients", True, \
        "infection"


def run_demo(out: Path, *, cache: Path | None = None, progress=None, verbose: int = 0) -> DemoResult:
    """Train (or reuse) the demo models and run the pipeline on data/samples into ``out``."""
    from ensemble.classifier import load_classifier
    from pipeline.classifier_jobs import evaluate_classifier_job, train_classifier_job
    from pipeline.run import run_pipeline
    from pipeline.segmenter_jobs import train_segmenter_job
    from segmenter.model import load_segmenter

    t0 = time.perf_counter()
    records, description, real, lesion_kind = _training_records()
    clf_settings, seg_settings = ((CLASSIFIER, SEGMENTER) if real
                                  else (SAMPLE_ONLY["classifier"], SAMPLE_ONLY["segmenter"]))
    key = hashlib.sha256(json.dumps([DEMO_VERSION, description, clf_settings, seg_settings, CLASSIFIER_IMAGES,
                                     SEGMENTER_IMAGES, DEMO_SECONDS, FIT_SHARES]).encode()).hexdigest()[:12]
    models = (cache or default_cache()) / f"demo-{key}"
    trained = False
    held_out = models / "held_out" / "note.json"  # written last: its presence means the cache is complete
    if not (held_out.is_file() and all((models / m / SIDECAR).is_file() for m in MODELS)):
        shutil.rmtree(models, ignore_errors=True)  # a half-trained cache from an interrupted demo
        models.mkdir(parents=True)
        deadline = t0 + DEMO_SECONDS
        clf_budget = _budget("classifier", deadline, real)
        clf = train_classifier_job(_stratified(records, CLASSIFIER_IMAGES) if real else records,
                                   models / "classifier", overrides={**clf_settings, **clf_budget},
                                   progress=progress, verbose=verbose)
        splits = models / "classifier" / "splits.csv"  # patient-level; the segmenters keep to it
        subset = _subset(records, (lesion_kind, "lung"), splits if real else None)
        train_segmenter_job(subset, models / "lesion",
                            overrides={**seg_settings, "kind": lesion_kind, "lung_kind": "lung",
                                       **_budget("segmenter", deadline, real)},
                            splits=splits if real else None, progress=progress, verbose=verbose)
        (models / "held_out").mkdir()
        if real:
            metrics = evaluate_classifier_job(models / "classifier", records, models / "held_out" / "eval", n_boot=500)
            acc = metrics["accuracy"]
            lo, hi = acc["ci95"]
            note = (f"Demo classifier ({', '.join(clf_settings['members'])}, {clf_settings['image_size']} px, "
                    f"from scratch, {_epochs_text(clf.history, clf_settings['epochs'], clf_budget['time_budget_s'])}): "
                    f"held-out accuracy {acc['value']:.3f} (95 % CI {lo:.3f}–{hi:.3f}, bootstrap "
                    f"over patients) on {metrics['n']} X-rays of patients it never saw; trained on {description}.")
        else:
            note = ("../shared/data was not found, so the demo models were trained on the 9 bundled X-rays alone: "
                    "nine images cannot train a model, and these outputs show the pipeline working, not a diagnosis "
                    "or even a meaningful guess.")
        held_out.write_text(json.dumps({"note": note}) + "\n")
        trained = True
    note = json.loads(held_out.read_text())["note"]
    if out.exists():
        shutil.rmtree(out)  # the demo output is regenerated each time
    res = run_pipeline(SAMPLES_DIR, out, classifier=load_classifier(models / "classifier"),
                       segmenter=load_segmenter(models / "lesion"), progress=progress, model_note=note)
    return DemoResult(res.report, models, trained, time.perf_counter() - t0, description, note)


def _budget(fit: str, deadline: float, real: bool) -> dict:
    """The ``time_budget_s`` override of one demo fit: its share of the seconds left before ``deadline``
    (none for the sample-only demo, whose fits take moments)."""
    if not real:
        return {}
    return {"time_budget_s": round(max(FIT_SHARES[fit] * (deadline - time.perf_counter()), 1.0), 1)}


def _epochs_text(history: dict, epochs: int, budget: float) -> str:
    """'9 epochs', or '5 of 9 epochs in its 340 s budget' where the time budget ended the fit."""
    from pipeline.report import budget_epochs

    run = sum(budget_epochs(history).values())
    return f"{run} epochs" if run >= epochs else f"{run} of {epochs} epochs in its {budget:.0f} s budget"


def _stratified(records, n: int) -> list:
    """About ``n`` records, the same share of each class, drawn with a fixed seed."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for label in sorted({r.label for r in records}):
        of_class = [r for r in records if r.label == label]
        k = min(len(of_class), round(n * len(of_class) / len(records)))
        out += [of_class[i] for i in sorted(rng.choice(len(of_class), k, replace=False))]
    return out


def _subset(records, kinds: tuple[str, ...], splits: Path | None) -> list:
    """Up to SEGMENTER_IMAGES training images with a mask of each of ``kinds`` (the lesion kind first),
    plus every validation and test one (the job keeps to ``splits``), plus the lesion-free X-rays
    of those splits with the other masks (the trainer draws its share of them: "lesion_free")."""
    import numpy as np

    from data.datasets import mark_lesion_free
    from data.splits import read_splits

    marked = mark_lesion_free(records, kinds[:1])
    with_mask = [r for r in marked if all(r.has_mask(k) for k in kinds)]
    if splits is None:
        return with_mask
    assignment = read_splits(splits)
    lesion = [r for r in with_mask if kinds[0] in r.masks]
    free = [r for r in with_mask if kinds[0] not in r.masks and assignment.get(r.key) in ("train", "val", "test")]
    train = [r for r in lesion if assignment.get(r.key) == "train"]
    rest = [r for r in lesion if assignment.get(r.key) in ("val", "test")]
    if len(train) > SEGMENTER_IMAGES:
        pick = np.random.default_rng(0).choice(len(train), SEGMENTER_IMAGES, replace=False)
        train = [train[i] for i in sorted(pick)]
    return train + rest + free
