"""Stage-2 jobs: train and evaluate segmenters, and segment files (lesions, share of lung affected)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data.datasets import DatasetError, FailureLog, Record, mark_lesion_free
from data.files import write_json
from data.masks import SEGMENTATION_SCORES
from data.splits import read_splits, select_split
from pipeline.common import (
    METRICS_FILE,
    held_out_records,
    load_settings,
    patient_ids,
    prepare_output_dir,
    read_mask_of,
    refuse_finished_output,
    run_training_job,
    write_failures,
)
from pipeline.report import plot_gallery


@dataclass
class SegTrainJobResult:
    out: Path
    history: dict[str, list[float]]
    n_train: int
    n_val: int
    failures: list[tuple[str, str]]
    seconds: float
    n_train_lesion_free: int = 0
    lesion_free_asked: bool = False  # the settings asked for lesion-free images (lesion_free > 0)


def train_segmenter_job(records: Sequence[Record], out, *, config=None, overrides: dict[str, Any] | None = None,
                        splits=None, allow_leaks: bool = False, progress=None,
                        verbose: int | None = None) -> SegTrainJobResult:
    """Train a segmenter on the records that carry the configured mask kind (patient-level split)."""
    from data.runtime.weights import resolve_weights_file
    from segmenter.settings import SegmenterSettings, with_preset
    from segmenter.train import train_segmenter, trainable
    from segmenter.unet import ENCODERS

    settings = load_settings(SegmenterSettings, with_preset, config, overrides)
    if settings.encoder is not None:  # local weight files are checked before any image is read
        resolve_weights_file(settings.weights, imagenet_file=ENCODERS[settings.encoder].weights_file,
                             what=settings.encoder)
    missing = [k for k in settings.mask_kinds if not any(k in r.masks for r in records)]
    if missing:
        raise DatasetError(f"no mask folder for kind(s) {', '.join(missing)} among the paired masks")
    with_mask = trainable(records, settings)  # normal X-rays join as lesion-free images: the trainer draws them
    if len(with_mask) < 3:
        raise DatasetError(f"only {len(with_mask)} image(s) have {' and '.join(settings.mask_kinds)} masks; "
                           "check --masks and --kind")
    run = run_training_job(with_mask, out, settings, train_segmenter, splits=splits, allow_leaks=allow_leaks,
                           progress=progress, verbose=verbose, what=f" with {settings.kind!r} masks",
                           fix=" (add masks or pass --splits)")
    # the trainer's counts: it draws its share of the lesion-free images from the split's
    return SegTrainJobResult(run.out, run.result.history, run.result.n_train, run.result.n_val, run.result.failures,
                             run.seconds, run.result.n_train_lesion_free, bool(settings.lesion_free))


def mean_ci(values: Sequence[float], *, n_boot: int = 1000, seed: int = 0,
            groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Mean with a percentile-bootstrap 95 % interval, resampling patients (``groups``, one id per
    value) when given, else values."""
    from ensemble.evaluate import bootstrap_indices

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"value": None, "ci95": None}
    out: dict[str, Any] = {"value": float(v.mean())}
    if n_boot:
        means = [v[idx].mean() for idx in bootstrap_indices(v.size, n_boot=n_boot, seed=seed, groups=groups)]
        out["ci95"] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return out


def probability_maps(segmenter, paths: Sequence[Path], *, batch_size: int = 4, progress=None,
                     failures: FailureLog | None = None):
    """Yield (index, path, segmenter.model.SegmenterMaps at the file's original size, original image)
    per readable file."""
    batches = segmenter.stream(paths, batch_size=batch_size, failures=failures, keep_original=True)
    for batch in (progress(batches) if progress else batches):
        maps = segmenter.predict_maps(batch.x)
        for i, path, geo, m, orig in zip(batch.indices, batch.paths, batch.geometries, maps, batch.originals):
            yield i, path, segmenter.maps_to_original(m, geo), orig


def evaluate_segmenter_job(model_dir, records: Sequence[Record], out, *, kind: str | None = None, splits=None,
                           split: str = "test", n_boot: int = 1000, gallery: int = 8, engine: str = "keras",
                           include_training: bool = False, progress=None) -> dict[str, Any]:
    """metrics.json (Dice, IoU, precision, recall with 95 % CIs over patients; pooled; HD95), per_image.csv,
    gallery.png. Without ``splits``, images the bundle trained or validated on are left out unless
    ``include_training`` (see pipeline.common.held_out_records).

    The scores are over the images with a ``kind`` mask. For a lesion kind, labelled lesion-free X-rays
    without one (data.datasets.mark_lesion_free: normal ones) are scored apart, as false alarms
    (metrics["lesion_free"]): the share of them with a lesion found, and the share of lung (else of
    the image) marked. The lung is the model's own where it segments one, else the drawn lung
    (``seg.lung_kind`` masks) when every lesion-free record has one, else the whole image
    (metrics["lesion_free"]["marked_of"] says which). cut_sweep.csv gives both at every cut of
    segmenter.metrics.THRESHOLD_GRID. For a lesion kind, metrics["by_lesion_size"] gives the Dice within
    each band of drawn-lesion size (segmenter.metrics.LESION_SIZE_EDGES_PCT; per_image.csv's lesion_pct).

    ``engine`` runs the model on Keras, ONNX Runtime or its int8 export (data.runtime.engines.ENGINES).
    """
    from data.masks import confusion, scores_from_counts, segmentation_scores
    from segmenter.metrics import hausdorff95, lesion_size_band, lesion_size_bands
    from segmenter.model import class_masks, load_segmenter

    refuse_finished_output(out, marker=METRICS_FILE)
    seg = load_segmenter(model_dir)
    seg.use_engine(engine)
    kind = kind or seg.kind
    out = prepare_output_dir(out, marker=METRICS_FILE)
    if kind != seg.lung_kind:
        records = mark_lesion_free(records, [kind])
    records = [r for r in records if r.has_mask(kind)]
    if splits is not None:
        records = select_split(records, read_splits(splits), split)
        scope: dict[str, Any] = {"scored": f"split {split!r} of {splits}", "excluded_training_images": 0}
    elif records:
        records, scope = held_out_records(records, model_dir, include_training=include_training)
    if not records:
        raise DatasetError(f"no image with a {kind!r} mask to evaluate on")
    failures = FailureLog()
    rows, tp_fp_fn, hd = [], np.zeros(3, np.int64), []
    examples = []
    classes = seg.class_kinds if len(seg.channels) > 2 else {}  # several classes: each scored on its own
    per_class: dict[str, list[tuple[dict[str, float], str]]] = {c: [] for c in classes}
    free: list[tuple[bool, float, str]] = []  # lesion-free images: (a lesion found, % marked, patient)
    marked_of = _marked_of(seg, [r for r in records if kind not in r.masks])
    sweep = _CutSweep()
    for i, _, maps, orig in probability_maps(seg, [r.path for r in records], progress=progress, failures=failures):
        prob = maps.lesion
        if kind not in records[i].masks:  # known lesion-free
            lung = None
            if marked_of == "drawn lung":
                lung = read_mask_of(records[i].masks[seg.lung_kind], prob.shape, failures)
                if lung is None:
                    continue
                lung = lung.astype(np.float32)
            free.append((*_false_alarm(maps, seg, None, lung), patient_ids([records[i]])[0]))
            sweep.add_lesion_free([_false_alarm(maps, seg, cut, lung) for cut in sweep.cuts])
            continue
        truth = read_mask_of(records[i].masks[kind], prob.shape, failures)
        if truth is None:
            continue
        sweep.add_lesion(truth, prob)
        pred = prob >= seg.threshold
        patient = patient_ids([records[i]])[0]
        predicted = class_masks(maps, seg) if classes else {}
        for c, ckind in classes.items():
            ctruth = read_mask_of(records[i].masks.get(ckind), prob.shape, failures)
            if ctruth is not None:
                per_class[c].append((segmentation_scores(ctruth, predicted[c]), patient))
        counts = confusion(truth, pred)
        scores = scores_from_counts(*counts)
        tp_fp_fn += counts
        h = hausdorff95(truth, pred)
        if h is not None:
            hd.append(h)
        rows.append({"file": records[i].key, **scores, "hd95": h, "lesion_pct": 100.0 * float(truth.mean()),
                     "_patient": patient})
        if len(examples) < gallery:
            examples.append((records[i].key, orig, truth, pred))
    if not rows:
        raise DatasetError(f"no image with a {kind!r} mask could be evaluated; see failures.csv")
    tp, fp, fn = (int(v) for v in tp_fp_fn)
    patients = [r.pop("_patient") for r in rows]
    metrics: dict[str, Any] = {k: mean_ci([r[k] for r in rows], n_boot=n_boot,
                                          groups=patients) for k in SEGMENTATION_SCORES}
    metrics["evaluated"] = {**scope, "bootstrap": "percentile, resampling patients"}
    if classes:
        metrics["per_class"] = {
            c: {"mask_kind": classes[c], "n": len(found),
                **{k: mean_ci([sc[k] for sc, _ in found], n_boot=n_boot, groups=[g for _, g in found])
                   for k in ("dice", "iou")}}
            for c, found in per_class.items()}
    if free:
        groups = [g for _, _, g in free]
        metrics["lesion_free"] = {
            "n": len(free), "what": "labelled lesion-free X-rays (no lesion mask): false alarms",
            "with_lesion_found": mean_ci([float(f) for f, _, _ in free], n_boot=n_boot, groups=groups),
            "marked_pct": mean_ci([p for _, p, _ in free], n_boot=n_boot, groups=groups),
            "marked_of": marked_of}
    if kind != seg.lung_kind:  # Dice falls with lesion size: each band of it scored apart
        bands = [lesion_size_band(r["lesion_pct"]) for r in rows]
        metrics["by_lesion_size"] = {
            "of": "share of the image the drawn lesion covers, %",
            "bands": {b: {"n": bands.count(b),
                          "dice": mean_ci([r["dice"] for r, rb in zip(rows, bands) if rb == b], n_boot=n_boot,
                                          groups=[g for g, rb in zip(patients, bands) if rb == b])}
                      for b in lesion_size_bands() if b in bands}}
    metrics["hd95"] = {"value": float(np.mean(hd)) if hd else None, "n": len(hd)}
    metrics["pooled"] = {"dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
                         "iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0}
    metrics.update(n=len(rows), kind=kind, threshold=seg.threshold, tta=seg.tta, failures=len(failures),
                   empty_mask_convention="both empty scores 1; one empty scores 0",
                   model={"path": str(model_dir), "sha256": seg.checkpoint_sha256, "arch": seg.meta["arch"],
                          "engine": engine})
    write_json(out / METRICS_FILE, metrics)
    with (out / "per_image.csv").open("w", newline="", encoding="utf-8") as handle:
        w = csv.DictWriter(handle, fieldnames=["file", *SEGMENTATION_SCORES, "hd95", "lesion_pct"])
        w.writeheader()
        w.writerows(rows)
    sweep.write(out / "cut_sweep.csv")
    write_failures(out / "failures.csv", failures.items)
    if examples:
        plot_gallery(examples, out / "gallery.png")
    return metrics


def _marked_of(seg, lesion_free: Sequence[Record]) -> str:
    """What a false alarm on a lesion-free X-ray is a share of: the model's own "lung", the "drawn
    lung" (a model without a lung class, every such record with a ``seg.lung_kind`` mask), else the
    "image". One definition for all of them, so their mean is of like figures."""
    if seg.has_lung:
        return "lung"
    if lesion_free and all(seg.lung_kind in r.masks for r in lesion_free):
        return "drawn lung"
    return "image"


def _false_alarm(maps, seg, cut: float | None, lung: np.ndarray | None = None) -> tuple[bool, float]:
    """(a lesion found, % of the lung marked, else of the image) on a lesion-free image, at ``cut``
    (None: the bundle's), lesions as `cxr run` reports them (small components dropped, wherever they
    lie; the share counts the marked pixels inside the drawn ``lung`` when given, as with a lung model)."""
    from segmenter.model import segment_image

    found = segment_image(maps, seg, lung_prob=lung, threshold=cut)
    pct = found.lung_affected_pct if found.lung_affected_pct is not None else 100.0 * float(found.mask.mean())
    return bool(found.lesions), float(pct)


class _CutSweep:
    """Per cut of the lesion probability (segmenter.metrics.THRESHOLD_GRID): mean and pooled Dice over
    the images with a mask, and the false alarms on the lesion-free ones, so a user can choose an
    operating point (``threshold``) from held-out data instead of taking the fitted one."""

    def __init__(self) -> None:
        from segmenter.metrics import CutCounts

        self.pooled = CutCounts()
        self.cuts = self.pooled.cuts
        self.dice: list[list[float]] = []
        self.free: list[list[tuple[bool, float]]] = []

    def add_lesion(self, truth: np.ndarray, prob: np.ndarray) -> None:
        from data.masks import scores_from_counts

        self.dice.append([scores_from_counts(*c)["dice"] for c in self.pooled.add(truth, prob)])

    def add_lesion_free(self, alarms: list[tuple[bool, float]]) -> None:
        self.free.append(alarms)

    def write(self, path: Path) -> None:
        dice = np.asarray(self.dice, np.float64).reshape(-1, len(self.cuts))
        free = np.asarray(self.free, np.float64).reshape(-1, len(self.cuts), 2)
        with path.open("w", newline="", encoding="utf-8") as handle:
            w = csv.writer(handle)
            w.writerow(["cut", "dice", "pooled_dice", "n", "lesion_free_found", "lesion_free_marked_pct",
                        "n_lesion_free"])
            for k, (cut, pooled) in enumerate(zip(self.cuts, self.pooled.pooled_dice())):
                found, marked = ((f"{free[:, k, 0].mean():.4f}", f"{free[:, k, 1].mean():.2f}") if len(free)
                                 else ("", ""))
                w.writerow([cut, f"{dice[:, k].mean():.4f}" if len(dice) else "", f"{pooled:.4f}", len(dice),
                            found, marked, len(free)])


def segment_files(model_dir, files: Sequence[str | os.PathLike[str]], *, lung_model=None):
    """(rows of (file, SegmentedImage), failures) for each file, with the lung model when given."""
    from segmenter.model import load_segmenter, segment_image

    seg = load_segmenter(model_dir)
    lung_seg = load_segmenter(lung_model) if lung_model else None
    paths = [Path(f) for f in files]
    failures = FailureLog()
    lung_maps = {}
    if lung_seg is not None:
        lung_maps = {i: m.lesion for i, _, m, _ in probability_maps(lung_seg, paths, failures=FailureLog())}
    rows = [(paths[i], segment_image(maps, seg, lung_maps.get(i)))
            for i, _, maps, _ in probability_maps(seg, paths, failures=failures)]
    return rows, failures.items

