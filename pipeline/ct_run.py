"""`cxr run DIR --modality ct`: the stage-2 segmenter slice by slice on CT volumes.

Stage 1 is an X-ray classifier, so CT skips it. Each input (a NIfTI file, a folder holding one DICOM
series, or one CT slice image; data.volume) is windowed as the segmenter's bundle says, segmented
slice by slice, and reported per volume under OUT/ct/<input>/:

- ``mask.nii.gz``: the lesion labels (0 background, k the k-th of the segmenter's lesion types) and
  ``lung.nii.gz`` the lung field, each with the input's stored shape and affine, so they overlay
  the input voxel for voxel (a slice image gets ``mask.png`` and ``lung.png`` instead);
- ``slices.csv``: per slice, the lesion area per type and the lung area (px and mm²);
- ``strip.png``: up to five slices around the middle of the volume with the lesions drawn in.

``ct_results.csv`` / ``ct_results.jsonl`` hold one row per volume: lesion and lung volume (mL),
the infected share of the lung, the lesion volume per type, where the lung field came from. The
lung field is, in order: a ``--lung-model``, the segmenter's own lung class, else a rule on
Hounsfield units (data.volume.lung_field_hu) joined with the lesions. A rerun into the same OUT
skips the volumes already done; unreadable inputs go to failures.csv with the reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from data.datasets import DatasetError, FailureLog
from data.errors import UsageError
from data.files import encode_png, write_bytes_atomic
from data.io import ImageReadError
from data.volume import LUNG_WINDOW, CTVolume, find_ct_inputs, lung_field_hu, pixels_to_hu, read_ct
from gradcam.masks import mask_overlay
from pipeline.outputs import claim_output, describe_os_error, output_name, write_rows_csv

CT_RESULT_COLUMNS = ("file", "source", "slices", "lesion_ml", "lung_ml", "lung_affected_pct", "lesion_ml_by_type",
                     "lesion_px", "lung_source", "mask_volume", "lung_volume", "slices_csv", "strip")
STRIP_SLICES = 5


@dataclass
class CTRunResult:
    out: Path
    n_done: int
    n_skipped: int
    n_failed: int


@dataclass
class VolumeSegmentation:
    """A volume's segmentation over its canonical slices (data.volume)."""

    labels: np.ndarray  # uint8 (Z, H, W): 0 background, k the k-th lesion type
    lung: np.ndarray  # bool (Z, H, W)
    lung_source: str  # "lung-model", "segmenter" or "hu-threshold"
    windowed: np.ndarray  # uint8 (Z, H, W): what the model saw


def check_ct_segmenter(segmenter) -> tuple[float, float]:
    """The window (centre, width HU) a CT segmenter was trained in; UsageError for an X-ray model."""
    if segmenter.modality != "ct":
        raise UsageError(f"{segmenter.path}: this segmenter was trained on {segmenter.modality} images; "
                         "--modality ct needs one trained on CT slices (cxr train-segmenter … --modality ct)")
    return segmenter.ct_window or LUNG_WINDOW


def segment_volume(volume: CTVolume, segmenter, lung_model=None, *, batch_size: int = 8) -> VolumeSegmentation:
    """Every slice of ``volume`` through ``segmenter`` (and ``lung_model``), at the slices' own size."""
    from segmenter.model import segment_image

    window = check_ct_segmenter(segmenter)
    win = volume.windowed(window)
    labels = np.zeros(win.shape, np.uint8)
    lung = np.zeros(win.shape, bool)
    types = segmenter.lesion_types
    source = "lung-model" if lung_model is not None else "segmenter" if segmenter.has_lung else "hu-threshold"
    for start in range(0, len(win), batch_size):
        rgb = [np.repeat(s[..., None], 3, axis=-1).astype(np.float32) for s in win[start:start + batch_size]]
        xs, geos = zip(*[segmenter.preprocess(r) for r in rgb])
        maps = segmenter.predict_maps(np.stack(xs))
        lung_maps = None
        if lung_model is not None:
            lx, lgeos = zip(*[lung_model.preprocess(r) for r in rgb])
            lung_maps = [lung_model.to_original(p, g) for p, g in zip(lung_model.predict(np.stack(lx)), lgeos)]
        for k in range(len(rgb)):
            z = start + k
            res = segment_image(segmenter.maps_to_original(maps[k], geos[k]), segmenter,
                                lung_maps[k] if lung_maps is not None else None)
            lut = np.array([0] + [types.index(les.type) + 1 for les in res.lesions], np.uint8)
            labels[z] = lut[res.instances]  # instance k → its type's label, in one pass
            if res.lung is not None:
                lung[z] = res.lung
            else:
                hu = volume.hu[z] if volume.hu is not None else pixels_to_hu(win[z], *window)
                lung[z] = lung_field_hu(hu) | res.mask
    return VolumeSegmentation(labels, lung, source, win)


def volume_summary(volume: CTVolume, seg: VolumeSegmentation, types: tuple[str, ...]) -> tuple[dict[str, Any],
                                                                                              list[dict[str, Any]]]:
    """(the volume's row, one row per slice): areas per type, volumes in mL where the voxel size is known."""
    spacing = volume.spacing_mm
    voxel_ml = float(np.prod(spacing)) / 1000.0 if spacing else None
    pixel_mm2 = spacing[1] * spacing[2] if spacing else None
    lesion = seg.labels > 0
    lung_px = int(seg.lung.sum())
    per_type = {t: int((seg.labels == k).sum()) for k, t in enumerate(types, start=1)}
    rows = []
    for z in range(len(seg.labels)):
        row: dict[str, Any] = {"slice": z, "lesion_px": int(lesion[z].sum()), "lung_px": int(seg.lung[z].sum())}
        row.update({f"{t}_px": int((seg.labels[z] == k).sum()) for k, t in enumerate(types, start=1)})
        if pixel_mm2 is not None:
            row["lesion_mm2"] = round(row["lesion_px"] * pixel_mm2, 3)
            row["lung_mm2"] = round(row["lung_px"] * pixel_mm2, 3)
        rows.append(row)

    def ml(voxels: int) -> float | None:
        return None if voxel_ml is None else round(voxels * voxel_ml, 4)

    summary = {
        "source": volume.source, "slices": volume.n_slices, "lesion_px": int(lesion.sum()),
        "lesion_ml": ml(int(lesion.sum())), "lung_ml": ml(lung_px),
        "lung_affected_pct": round(100.0 * float((lesion & seg.lung).sum()) / lung_px, 3) if lung_px else None,
        "lesion_px_by_type": per_type,
        "lesion_ml_by_type": {t: ml(v) for t, v in per_type.items()} if voxel_ml is not None else None,
        "lung_source": seg.lung_source, "labels": {str(k): t for k, t in enumerate(types, start=1)},
        "spacing_mm": list(spacing) if spacing else None,
    }
    return summary, rows


def strip_picture(seg: VolumeSegmentation, n: int = STRIP_SLICES) -> np.ndarray:
    """Up to ``n`` evenly spaced slices around the middle of the volume, lesions drawn in, side by side."""
    z = len(seg.labels)
    mid = z // 2
    half = min(n // 2, mid, z - 1 - mid)
    step = max(1, z // (2 * n)) if z > n else 1
    picks = sorted({min(z - 1, max(0, mid + k * step)) for k in range(-half, half + 1)})
    tiles = [mask_overlay(np.repeat(seg.windowed[k][..., None], 3, axis=-1).astype(np.float32), seg.labels[k] > 0)
             for k in picks]
    return np.concatenate(tiles, axis=1)


def run_ct(image_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, segmenter, lung_model=None,
           batch_size: int = 8, progress: Callable[[Iterable], Iterable] | None = None) -> CTRunResult:
    """Segment every CT input under ``image_dir`` into ``out`` (module docstring)."""
    image_dir, out = Path(image_dir), Path(out)
    check_ct_segmenter(segmenter)
    inputs = find_ct_inputs(image_dir)
    if not inputs:
        raise DatasetError(f"{image_dir}: no CT input found (NIfTI .nii/.nii.gz, a folder of DICOM slices, or "
                           "slice images)")
    with claim_output(out, job="run-ct"):
        try:
            return _run(image_dir, out, inputs, segmenter, lung_model, batch_size, progress)
        except OSError as err:
            raise DatasetError(f"run stopped: {describe_os_error(err)}") from None


def _run(image_dir, out, inputs, segmenter, lung_model, batch_size, progress) -> CTRunResult:
    log = out / "ct_results.jsonl"
    done = {json.loads(line)["file"] for line in log.read_text(encoding="utf-8").splitlines()
            if line.strip()} if log.is_file() else set()
    failures = FailureLog()
    todo = [p for p in inputs if _rel(p, image_dir) not in done]
    n_done = 0
    with log.open("a", encoding="utf-8") as handle:
        for path in (progress(todo) if progress else todo):
            rel = _rel(path, image_dir)
            try:
                volume = read_ct(path)
            except ImageReadError as err:
                failures.add(rel, err.reason)
                continue
            record = _write_volume(out, rel, volume, segment_volume(volume, segmenter, lung_model,
                                                                    batch_size=batch_size), segmenter.lesion_types)
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            n_done += 1
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    write_rows_csv(out / "ct_results.csv", CT_RESULT_COLUMNS, records)
    write_rows_csv(out / "failures.csv", ("file", "reason"), [{"file": f, "reason": r} for f, r in failures.items])
    return CTRunResult(out, n_done, len(inputs) - len(todo), len(failures))


def _write_volume(out: Path, rel: str, volume: CTVolume, seg: VolumeSegmentation, types) -> dict[str, Any]:
    folder = Path(output_name(f"ct/{rel}", ""))
    summary, slices = volume_summary(volume, seg, types)
    files = {"strip": folder / "strip.png"}
    write_bytes_atomic(out / files["strip"], encode_png(strip_picture(seg)))
    if volume.affine is not None:
        from data.volume import write_mask_volume

        files.update(mask_volume=folder / "mask.nii.gz", lung_volume=folder / "lung.nii.gz")
        write_mask_volume(volume, seg.labels, out / files["mask_volume"])
        write_mask_volume(volume, seg.lung.astype(np.uint8), out / files["lung_volume"])
    else:
        files.update(mask_volume=folder / "mask.png", lung_volume=folder / "lung.png")
        write_bytes_atomic(out / files["mask_volume"], encode_png(seg.labels[0]))
        write_bytes_atomic(out / files["lung_volume"], encode_png(seg.lung[0].astype(np.uint8) * 255))
    files["slices_csv"] = folder / "slices.csv"
    write_rows_csv(out / files["slices_csv"], tuple(slices[0]), slices, sort_by=None)
    return {"file": rel, **summary, **{k: v.as_posix() for k, v in files.items()}}


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path != root else path.name
