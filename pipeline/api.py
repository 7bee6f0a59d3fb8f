"""The one façade: a typed function for every `cxr` command, each checking its inputs before
heavy work. The CLI (pipeline/cli.py) only parses arguments, calls these and prints, so
everything it does is callable from Python here, with the same rules.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

from data.check import DataReport, check_records, orphan_masks
from data.datasets import DatasetError, FailureLog, Record, load_records, pair_masks
from data.errors import UsageError
from data.masks import SEGMENTATION_SCORES
from data.runtime.distribute import STRATEGIES as DISTRIBUTE_STRATEGIES
from data.runtime.engines import ENGINES
from data.spec import CLASS_NAMES, DEFAULT_MAX_PIXELS
from data.splits import plan_split, read_splits, split_counts, write_splits
from gradcam.export import ANNOTATION_FORMATS
from pipeline.config import ServeSettings
from pipeline.experiments import SCALES
from pipeline.export_jobs import DEFAULT_CALIBRATION_COUNT
from pipeline.export_jobs import FORMATS as EXPORT_FORMATS
from pipeline.outputs import describe_os_error
from pipeline.ray_run import RayOptions
from pipeline.report import budget_epochs, ci_text, lesion_size_text, metrics_table
from segmenter.schemes import ARCHS as SEGMENTER_ARCHS
from segmenter.schemes import CLASS_SCHEMES as SEGMENTER_CLASS_SCHEMES
from segmenter.schemes import MODALITIES as SEGMENTER_MODALITIES

# Besides the functions, what the command line reads: argument choices and defaults, and the text
# helpers it prints with.
__all__ = ["ANNOTATION_FORMATS", "CLASS_NAMES", "DEFAULT_CALIBRATION_COUNT", "DEFAULT_MAX_PIXELS",
           "DISTRIBUTE_STRATEGIES", "ENGINES", "EXPORT_FORMATS", "SCALES", "SEGMENTATION_SCORES", "SEGMENTER_ARCHS",
           "SEGMENTER_CLASS_SCHEMES", "SEGMENTER_MODALITIES", "RayOptions", "ServeSettings", "budget_epochs", "ci_text",
           "describe_os_error", "lesion_size_text", "metrics_table", "CheckResult", "ExportResult", "Models",
           "SplitResult", "check_data", "convert_weights", "demo", "evaluate_classifier", "evaluate_segmenter",
           "export_model", "detect_modality", "gather_folders", "gather_records", "gradcam", "import_masks",
           "load_models", "predict", "progress_bar", "reproduce", "run_ct", "run_folder", "segment", "serve",
           "set_threshold", "split_data", "train_classifier", "train_segmenter"]
PathLike = str | os.PathLike[str]
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
    json_out: str | os.PathLike[str] | None = None,
) -> CheckResult:
    """Audit a data folder (see data.check.check_records); ``json_out`` also writes the report as JSON."""
    records = gather_records(data_dir, manifest=manifest, masks=masks)
    split_map = read_splits(splits) if splits is not None else None
    report = check_records(
        records,
        splits=split_map,
        max_pixels=max_pixels,
        progress=lambda rs: progress_bar(rs, desc="checking", total=len(records)),
    )
    orphans = orphan_masks(records, Path(masks)) if masks is not None else {}
    if json_out is not None:
        from data.files import write_json

        write_json(Path(json_out), report.to_dict())
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
        raise UsageError(f"--val {val} and --test {test} must be fractions in [0, 1) summing below 1")
    records = gather_records(data_dir, manifest=manifest)
    failures = FailureLog()
    plan = plan_split(records, val=val, test=test, seed=seed, failures=failures,
                      progress=lambda rs: progress_bar(rs, desc="hashing", total=len(records)))
    write_splits(out, plan.usable, plan.assignment, plan.groups)
    return SplitResult(out, split_counts(plan.usable, plan.assignment), len(set(plan.groups.values())), failures.items,
                       len(plan.leaks))


# --- The commands' work, one function each; pipeline.cli parses arguments, calls these and prints. ---


def train_classifier(data_dir: PathLike | None, out: PathLike, *, manifest: PathLike | None = None,
                     config: PathLike | None = None, overrides: dict[str, Any] | None = None,
                     splits: PathLike | None = None, allow_leaks: bool = False, progress=None):
    """`cxr train-classifier`: a classifier bundle in ``out`` from a class-folder tree or manifest
    (see pipeline.classifier_jobs.train_classifier_job); ``overrides`` (None values ignored) win over ``config``."""
    from pipeline.classifier_jobs import train_classifier_job

    records = gather_records(data_dir, manifest=manifest)
    return train_classifier_job(records, out, config=config, overrides=overrides, splits=splits,
                                allow_leaks=allow_leaks, progress=progress)


def evaluate_classifier(model_dir: PathLike, data_dir: PathLike | None, out: PathLike, *,
                        manifest: PathLike | None = None, splits: PathLike | None = None, split: str = "test",
                        n_boot: int = 1000, engine: str = "keras", include_training: bool = False,
                        progress=None) -> dict[str, Any]:
    """`cxr evaluate`: metrics (held-out images only unless ``include_training``), plots, metrics.json."""
    from pipeline.classifier_jobs import evaluate_classifier_job

    records = gather_records(data_dir, manifest=manifest)
    return evaluate_classifier_job(model_dir, records, out, splits=splits, split=split, n_boot=n_boot, engine=engine,
                                   include_training=include_training, progress=progress)


def predict(model_dir: PathLike, files: Sequence[PathLike], *, batch_size: int = 8):
    """`cxr predict`: pipeline.classifier_jobs.PredictionTable of ``files`` (unreadable ones in failures)."""
    from ensemble.classifier import load_classifier
    from pipeline.classifier_jobs import classify_files

    return classify_files(load_classifier(model_dir), files, batch_size=batch_size)


def gradcam(image_dir: PathLike, model_dir: PathLike, out: PathLike, *, pseudonymize: bool = False,
            pseudonym_map: PathLike | None = None, **options: Any):
    """`cxr gradcam`: heatmaps, overlays, draft masks and annotation exports (options:
    pipeline.gradcam_jobs.gradcam_job's keywords). ``pseudonymize``: as :func:`run_folder`; the
    images annotators see are then de-identified 8-bit PNG copies named by pseudonym."""
    from pipeline.gradcam_jobs import gradcam_job
    from pipeline.privacy import input_names

    names = input_names(out, pseudonymize=pseudonymize, map_path=pseudonym_map)
    return gradcam_job(image_dir, model_dir, out, names=names, **options)


def import_masks(export: PathLike, fmt: str, images: PathLike, out: PathLike, *, kind: str = "lesion"):
    """`cxr import-masks`: annotators' edited masks back as ``out/<kind>/<image stem>.png``."""
    from gradcam.imports import import_masks as _import_masks

    return _import_masks(export, fmt, images, out, kind=kind)


def train_segmenter(images: PathLike, out: PathLike, *, masks: PathLike, manifest: PathLike | None = None,
                    config: PathLike | None = None, overrides: dict[str, Any] | None = None,
                    splits: PathLike | None = None, allow_leaks: bool = False, progress=None):
    """`cxr train-segmenter`: a segmenter bundle in ``out``. Every mask kind under ``masks`` is
    paired (a lung-lesion model needs the lung masks too; the job checks the kinds it needs)."""
    from pipeline.segmenter_jobs import train_segmenter_job

    records = gather_records(images, manifest=manifest, masks=masks)
    return train_segmenter_job(records, out, config=config, overrides=overrides, splits=splits,
                               allow_leaks=allow_leaks, progress=progress)


def evaluate_segmenter(model_dir: PathLike, images: PathLike, out: PathLike, *, masks: PathLike, kind: str,
                       manifest: PathLike | None = None, splits: PathLike | None = None, split: str = "test",
                       n_boot: int = 1000, engine: str = "keras", include_training: bool = False,
                       progress=None) -> dict[str, Any]:
    """`cxr evaluate-segmenter`: Dice, IoU, precision, recall with CIs, HD95, per-image CSV, gallery; per
    class for a model with several (lesion types, lung)."""
    from pipeline.segmenter_jobs import evaluate_segmenter_job

    # every kind is paired (a model with several classes scores each); the asked one must be there
    records = gather_records(images, manifest=manifest, masks=masks)
    if not (Path(masks) / kind).is_dir():
        pair_masks([], masks, [kind])  # DatasetError naming the kinds that are there
    return evaluate_segmenter_job(model_dir, records, out, kind=kind, splits=splits, split=split, n_boot=n_boot,
                                  engine=engine, include_training=include_training, progress=progress)


def set_threshold(model_dir: PathLike, cut: float, *, why: str | None = None) -> tuple[float, float]:
    """`cxr set-threshold`: the segmenter bundle's probability cut becomes ``cut``; (old, new)."""
    from segmenter.model import set_threshold as _set

    return _set(model_dir, cut, why=why or "cxr set-threshold")


def segment(model_dir: PathLike, files: Sequence[PathLike], *, lung_model: PathLike | None = None):
    """`cxr segment`: (rows of (file, segmenter.model.SegmentedImage), failures)."""
    from pipeline.segmenter_jobs import segment_files

    return segment_files(model_dir, files, lung_model=lung_model)


@dataclass
class Models:
    """The loaded bundles `cxr run` and `cxr serve` use, checked and on one engine."""

    classifier: Any
    segmenter: Any
    lung_model: Any = None


def load_models(classifier: PathLike, segmenter: PathLike, lung_model: PathLike | None = None, *,
                engine: str = "keras") -> Models:
    """Load and check the bundles (sidecars, hashes) and put each on ``engine`` before any image is read."""
    from ensemble.classifier import load_classifier
    from segmenter.model import load_segmenter

    models = Models(load_classifier(classifier), load_segmenter(segmenter),
                    load_segmenter(lung_model) if lung_model else None)
    for model in (models.classifier, models.segmenter, models.lung_model):
        if model is not None:
            model.use_engine(engine)
    return models


def run_folder(image_dir: PathLike, out: PathLike, models: Models, *, segment_all: bool = False,
               batch_size: int = 8, max_pixels: int | None = None, pseudonymize: bool = False,
               pseudonym_map: PathLike | None = None, ray: RayOptions | None = None, progress=None):
    """`cxr run`: both stages over a folder, resumable (pipeline.run.run_pipeline). ``pseudonymize``:
    inputs are named by keyed pseudonyms in every output, the key and real names kept in
    ``pseudonym_map`` (default ``<out>.pseudonyms.json``, outside ``out``; pipeline.privacy).
    ``ray``: the analysis runs on Ray (pipeline.ray_run), the files are written here as without it."""
    from pipeline.privacy import input_names
    from pipeline.run import run_pipeline

    names = input_names(out, pseudonymize=pseudonymize, map_path=pseudonym_map)
    return run_pipeline(image_dir, out, classifier=models.classifier, segmenter=models.segmenter,
                        lung_model=models.lung_model, segment_all=segment_all, batch_size=batch_size,
                        progress=progress, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, names=names, ray=ray)


def run_ct(image_dir: PathLike, out: PathLike, segmenter: PathLike, *, lung_model: PathLike | None = None,
           batch_size: int = 8, engine: str = "keras", progress=None):
    """`cxr run --modality ct`: the segmenter slice by slice on NIfTI volumes, DICOM series and CT slice
    images, a lesion and lung NIfTI per volume aligned with its input (pipeline.ct_run)."""
    from pipeline.ct_run import check_ct_segmenter
    from pipeline.ct_run import run_ct as _run_ct
    from segmenter.model import load_segmenter

    seg = load_segmenter(segmenter)
    check_ct_segmenter(seg)  # before any volume is read
    lung = load_segmenter(lung_model) if lung_model else None
    for model in (seg, lung):
        if model is not None:
            model.use_engine(engine)
    return _run_ct(image_dir, out, segmenter=seg, lung_model=lung, batch_size=batch_size, progress=progress)


def detect_modality(image_dir: PathLike) -> str:
    """"ct" for a folder with NIfTI volumes or CT DICOM files, else "xray" (data.volume.detect_modality)."""
    from data.volume import detect_modality as _detect

    return _detect(image_dir)


@dataclass
class ExportResult:
    """What `cxr export` wrote; ``record`` is the int8 export's record (calibration, distance to float)."""

    path: Path
    record: dict[str, Any] | None = None


def export_model(model_dir: PathLike, fmt: str = "onnx", *, calibration: PathLike | None = None,
                 calibration_count: int = DEFAULT_CALIBRATION_COUNT) -> ExportResult:
    """`cxr export`: ONNX (checked against Keras), int8 ONNX (calibrated) or a SavedModel into the bundle."""
    import json

    from pipeline.export_jobs import export_model as _export

    path = _export(model_dir, fmt, calibration=calibration, calibration_count=calibration_count)
    record = None
    if fmt == "onnx-int8":
        record = json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))
    return ExportResult(path, record)


def serve(models: Models, *, host: str = "127.0.0.1", port: int = 8000,
          settings: ServeSettings = ServeSettings()) -> None:
    """`cxr serve`: the web API and upload page until interrupted."""
    from pipeline.serve import serve as _serve

    _serve(models.classifier, models.segmenter, models.lung_model, host=host, port=port, settings=settings)


def demo(out: PathLike, *, cache: PathLike | None = None, progress=None):
    """`cxr demo`: train (or reuse) the small demo models and run the pipeline on the bundled sample."""
    from pipeline.demo import run_demo

    return run_demo(Path(out), cache=Path(cache) if cache else None, progress=progress)


def reproduce(experiment: PathLike, out: PathLike | None = None, *, scale: str = "paper", progress=None) -> Path:
    """`cxr reproduce`: one experiments/*.toml at the paper's settings or ``scale`` "small" (the file's
    [small] table); returns the run directory (its comparison.md is the summary)."""
    from pipeline.experiments import reproduce as _reproduce

    return _reproduce(experiment, out, scale=scale, progress=progress)


def convert_weights(source: PathLike, out: PathLike) -> dict[str, Any]:
    """`cxr convert-weights`: a torchxrayvision-layout DenseNet121 state dict (.pt/.pth, or .npz) → a Keras
    DenseNet121 backbone weights file ``out`` (*.weights.h5) with its sidecar (ensemble.convert)."""
    from ensemble.convert import convert_weights as _convert

    return _convert(source, out)
