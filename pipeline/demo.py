"""`cxr demo`: train small demo models once (cached), then run the full pipeline on the bundled sample.

Demo models are trained from scratch (weights=None: no download needed) at 64 px for a few
epochs. They show the tool working end to end; they are not fit for any clinical use.
Training runs eagerly here: for a few dozen steps, tracing DenseNet121 into a graph costs
~70 s, more than the whole eager training (measured on the 2-core reference machine).
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

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEMO_VERSION = 1

CLASSIFIER = {"members": ["densenet121", "efficientnetb0", "vgg19"], "image_size": 64, "epochs": 2, "batch_size": 16,
              "weights": "none", "learning_rate": 1e-3, "freeze_fraction": 0.0, "run_eagerly": True}
SEGMENTER = {"arch": "unet-densenet121", "image_size": 64, "epochs": 2, "batch_size": 8, "weights": "none",
             "learning_rate": 1e-3, "run_eagerly": True, "min_lesion_area": 8}


@dataclass
class DemoResult:
    report: Path
    models: Path
    trained: bool
    seconds: float
    data_source: str


def default_cache() -> Path:
    """$CXR_CACHE, else ~/.cache/cxr-triage."""
    return Path(os.environ.get("CXR_CACHE", Path.home() / ".cache" / "cxr-triage"))


def _data_source() -> tuple[Path, Path, str]:
    """(images, masks, lesion kind): the shared real set when present, else the bundled sample."""
    if (SHARED / "cxr" / "manifest.csv").is_file() and (SHARED / "cxr_masks").is_dir():
        return SHARED / "cxr", SHARED / "cxr_masks", "infection"
    return SAMPLES_DIR, SAMPLE_MASKS_DIR, "opacity"


def run_demo(out: Path, *, cache: Path | None = None, progress=None, verbose: int = 0) -> DemoResult:
    """Train (or reuse) the demo models and run the pipeline on data/samples into ``out``."""
    from ensemble.classifier import load_classifier
    from pipeline.classifier_jobs import train_classifier_job
    from pipeline.run import run_pipeline
    from pipeline.segmenter_jobs import train_segmenter_job
    from segmenter.train import load_segmenter

    t0 = time.perf_counter()
    images, masks, lesion_kind = _data_source()
    key = hashlib.sha256(json.dumps([DEMO_VERSION, str(images), CLASSIFIER, SEGMENTER, lesion_kind]).encode()).hexdigest()[:12]
    models = (cache or default_cache()) / f"demo-{key}"
    trained = False
    if not all((models / m / "model.json").is_file() for m in ("classifier", "lesion", "lung")):
        shutil.rmtree(models, ignore_errors=True)  # a half-trained cache from an interrupted demo
        models.mkdir(parents=True)
        records = pair_masks(load_records(images), masks, [lesion_kind, "lung"])
        train_classifier_job(records, models / "classifier", overrides=CLASSIFIER, progress=progress, verbose=verbose)
        train_segmenter_job(records, models / "lesion", overrides={**SEGMENTER, "kind": lesion_kind},
                            progress=progress, verbose=verbose)
        train_segmenter_job(records, models / "lung", overrides={**SEGMENTER, "kind": "lung", "epochs": 1},
                            progress=progress, verbose=verbose)
        trained = True
    if out.exists():
        shutil.rmtree(out)  # the demo output is regenerated each time
    res = run_pipeline(SAMPLES_DIR, out, classifier=load_classifier(models / "classifier"),
                       segmenter=load_segmenter(models / "lesion"), lung_model=load_segmenter(models / "lung"),
                       progress=progress)
    return DemoResult(res.report, models, trained, time.perf_counter() - t0, str(images))
