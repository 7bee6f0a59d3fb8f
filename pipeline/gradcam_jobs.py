"""`cxr gradcam`: heatmaps, overlays and draft masks for annotators, and the files each annotation
tool imports (the edited masks come back through gradcam.imports, `cxr import-masks`).

Predictions and every member's heatmap come from one batched forward pass (closed-form
Grad-CAM over the conv maps the classifier already returns, see gradcam.cam).
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data import spec
from data.datasets import DatasetError, FailureLog, walk_images
from data.errors import UsageError
from data.files import write_json, write_png
from data.masks import iou
from gradcam.cam import METHODS, member_heatmaps
from gradcam.export import ANNOTATION_FORMATS, Draft, save_maps, write_coco, write_labelstudio, write_sagemaker
from gradcam.masks import colorize, draft_mask, mass_inside, overlay, pointing_hit
from pipeline.common import ImageTicks, read_mask_of
from pipeline.outputs import claim_output, output_name
from pipeline.privacy import InputNames

#: Where the CVAT export goes: the path CVAT's "COCO 1.0" export uses, and Datumaro's importer expects.
COCO_FILE = "annotations/instances_default.json"


@dataclass
class GradcamResult:
    out: Path
    n_images: int
    n_drafts: int
    failures: list[tuple[str, str]]
    audit: dict[str, Any] = field(default_factory=dict)


def _mask_index(folder: Path | None) -> dict[str, Path]:
    if folder is None:
        return {}
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such mask folder")
    return {p.stem: p for p in walk_images(folder)}


def gradcam_job(
    image_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    members: Sequence[str] | None = None,
    target: str = "predicted",
    threshold: float = 0.5,
    method: str = "gradcam",
    lung_masks: str | os.PathLike[str] | None = None,
    lesion_masks: str | os.PathLike[str] | None = None,
    formats: Sequence[str] = ANNOTATION_FORMATS,
    image_prefix: str = "",
    prefixes: dict[str, str] | None = None,
    copy_images: bool = False,
    names: InputNames | None = None,
    batch_size: int = 8,
    progress=None,
) -> GradcamResult:
    """Write per-image heatmap, overlay, raw maps and draft mask, plus the folder-level exports.

    Image references in the exports: ``prefixes[tool]`` (tool: "cvat", "labelstudio", "sagemaker";
    default ``image_prefix``) + the image's path. Images a browser cannot show as they are (DICOM,
    16-bit, TIFF, BMP), and every image with ``copy_images``, pseudonyms (``names``) or a
    ``s3://``-style SageMaker prefix, are written once under ``OUT/images/`` as 8-bit PNG, as the
    model sees them, and referenced there (so the SageMaker manifest's refs are all absolute under
    the prefix where OUT is uploaded).
    """
    from ensemble.classifier import load_classifier

    image_dir, out = Path(image_dir), Path(out)
    _check_options(target=target, threshold=threshold, method=method, formats=formats)
    names = names or InputNames()
    prefixes = {tool: (prefixes or {}).get(tool) or image_prefix for tool in ANNOTATION_FORMATS}
    copy_images = copy_images or names.pseudonymous or "://" in prefixes["sagemaker"]
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: no such image folder")
    paths = list(walk_images(image_dir))
    if not paths:
        raise DatasetError(f"{image_dir}: no images (PNG, JPEG, BMP, TIFF, DICOM) found")
    lungs = _mask_index(Path(lung_masks) if lung_masks else None)
    lesions = _mask_index(Path(lesion_masks) if lesion_masks else None)
    clf = load_classifier(model_dir)
    chosen = tuple(members) if members else clf.members
    bad = [m for m in chosen if m not in clf.members]
    if bad:
        raise UsageError(f"member(s) {', '.join(bad)} not in this model; it has {', '.join(clf.members)}")
    weights = [w for m, w in zip(clf.members, clf.member_weights) if m in chosen]
    heads = clf.head_weights()
    with claim_output(out, job="gradcam"):
        failures = FailureLog()
        drafts: list[Draft] = []
        rows: list[list[Any]] = []
        audit_rows: list[dict[str, Any]] = []
        batches = clf.stream(paths, batch_size=batch_size, failures=failures, keep_original=True)
        ticks, counted = ImageTicks(progress, len(paths)), 0
        for batch in batches:
            ticks.advance(len(batch.paths) + len(failures.items) - counted)
            counted = len(failures.items)
            pred = clf.predict(batch.x)
            cls = pred.probs.argmax(axis=1) if target == "predicted" else np.full(len(batch.x),
                                                                                  spec.class_index(target))
            maps, fused = member_heatmaps({m: pred.features[m] for m in chosen}, heads, cls,
                                          member_weights=weights, size=clf.image_size, method=method)
            for j, (path, geo, original) in enumerate(zip(batch.paths, batch.geometries, batch.originals)):
                rel = path.relative_to(image_dir).as_posix()
                name = names.name(rel)
                label = spec.CLASS_NAMES[int(cls[j])]
                score = float(pred.probs[j, cls[j]])
                per_image = {"ensemble": geo.map_to_original(fused[j])}
                per_image.update({m: geo.map_to_original(maps[m][j]) for m in chosen})
                lung = read_mask_of(lungs.get(path.stem), per_image["ensemble"].shape, failures)
                lesion = read_mask_of(lesions.get(path.stem), per_image["ensemble"].shape, failures)
                mask = draft_mask(per_image["ensemble"], threshold, lung) if label in spec.SEGMENT_CLASSES else None
                files = _write_image_files(out, name, per_image, original, mask)
                ref = _annotator_image(out, name, path, original, copy=copy_images)
                drafts.append(Draft(ref, original.shape[1], original.shape[0], label, score, mask))
                head = [name, label, spec.CLASS_NAMES[int(pred.probs[j].argmax())], f"{score:.6f}"]
                tail = [clf.checkpoint_sha256, threshold, method]
                for m in ("ensemble", *chosen):
                    rows.append([*head, m, *tail, files[f"overlay:{m}"], files["heatmap"] if m == "ensemble" else "",
                                 files["map"], files.get("mask", "")])
                    audit_rows.append(_audit_row(name, label, m, per_image[m], lung, lesion,
                                                 mask if m == "ensemble" else None))
        ticks.advance(len(failures.items) - counted)
        ticks.close()
        _write_manifest(out / "manifest.csv", rows)
        failed = [(names.name(rel), names.scrub(reason, rel))
                  for rel, reason in ((_relative(Path(p), image_dir), r) for p, r in failures.items)]
        with (out / "failures.csv").open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([["file", "reason"], *failed])
        categories = list(spec.SEGMENT_CLASSES) if target == "predicted" else [target]
        drafts = [d for d in drafts if d.mask is None or d.label in categories]
        _write_exports(out, drafts, categories, formats=formats, prefixes=prefixes, clf=clf)
        audit = summarise_audit(audit_rows) if (lungs or lesions) else {}
        if audit:
            write_json(out / "audit.json", audit)
        n_drafts = sum(1 for d in drafts if d.mask is not None)
        names.save()
        return GradcamResult(out, len(drafts), n_drafts, failed, audit)


def _check_options(*, target: str, threshold: float, method: str, formats: Sequence[str]) -> None:
    if target != "predicted" and target not in spec.CLASS_NAMES:
        raise UsageError(f"--target {target!r}: use 'predicted' or one of {', '.join(spec.CLASS_NAMES)}")
    if not 0.0 < threshold <= 1.0:
        raise UsageError(f"--threshold {threshold} must be in (0, 1]")
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    unknown_formats = [f for f in formats if f not in ANNOTATION_FORMATS]
    if unknown_formats:
        raise UsageError(f"unknown format(s) {', '.join(unknown_formats)}; valid: {', '.join(ANNOTATION_FORMATS)}")


def _write_image_files(out: Path, name: str, per_image: dict[str, np.ndarray], original: np.ndarray,
                       mask: np.ndarray | None) -> dict[str, str]:
    """One image's heatmap, raw maps (.npz), an overlay per map and the draft mask; paths relative to OUT."""
    map_path = out / output_name(f"maps/{name}", ".npz")
    map_path.parent.mkdir(parents=True, exist_ok=True)
    files = {"heatmap": write_png(out / output_name(f"heatmaps/{name}", ".heatmap.png"),
                                  colorize(per_image["ensemble"])),
             "map": save_maps(map_path, per_image)}
    for m, heat in per_image.items():
        suffix = ".gradcam.png" if m == "ensemble" else f".{m}.png"
        files[f"overlay:{m}"] = write_png(out / output_name(f"overlays/{name}", suffix), overlay(original, heat))
    if mask is not None:
        files["mask"] = write_png(out / output_name(f"masks/{name}", ".png"), mask.astype(np.uint8) * 255)
    return {k: v.relative_to(out).as_posix() for k, v in files.items()}


def _write_exports(out: Path, drafts: list[Draft], categories: list[str], *, formats: Sequence[str],
                   prefixes: dict[str, str], clf) -> None:
    """The folder-level files each annotation tool imports, each with its own image prefix."""
    if "cvat" in formats:
        (out / "annotations").mkdir(exist_ok=True)  # CVAT's own "COCO 1.0" layout: zip annotations/ to upload
        write_coco(drafts, out / COCO_FILE, categories, file_prefix=prefixes["cvat"])
    if "labelstudio" in formats:
        write_labelstudio(drafts, out / "labelstudio_tasks.json", out / "labelstudio_config.xml", categories,
                          image_prefix=prefixes["labelstudio"], model_version=clf.checkpoint_sha256[:12])
    if "sagemaker" in formats:
        uri = "://" in prefixes["sagemaker"]  # OUT is uploaded there: the masks' refs are absolute too
        write_sagemaker(drafts, out / "sagemaker_manifest.jsonl", out / "sagemaker_masks", categories,
                        source_prefix=prefixes["sagemaker"],
                        mask_prefix=prefixes["sagemaker"] + "sagemaker_masks/" if uri else None,
                        creation_date=str(clf.sidecar.get("created", "")))


def _annotator_image(out: Path, name: str, path: Path, original: np.ndarray, *, copy: bool) -> str:
    """The image reference the exports use: the input itself, or its 8-bit PNG copy under OUT/images/
    (written when ``copy`` or when annotation tools cannot show the input as it is)."""
    if not copy and _browser_ready(path):
        return name
    return write_png(out / output_name(f"images/{name}", ".png"), _as_uint8(original)).relative_to(out).as_posix()


def _relative(path: Path, image_dir: Path) -> str:
    """An input's path relative to the image folder (a mask file elsewhere: its name)."""
    try:
        return path.relative_to(image_dir).as_posix()
    except ValueError:
        return path.name


def _browser_ready(path: Path) -> bool:
    """Whether annotation tools show the file as it is: JPEG, or 8-bit PNG (bit depth in the IHDR)."""
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        return True
    if suffix != ".png":
        return False
    with path.open("rb") as handle:
        header = handle.read(26)
    return len(header) == 26 and header[24] == 8


def _as_uint8(original: np.ndarray) -> np.ndarray:
    """The decoded image as the model sees it (float32 RGB in [0, 255]) as 8-bit RGB."""
    return np.clip(np.rint(original), 0, 255).astype(np.uint8)


def _write_manifest(path: Path, rows: list[list[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
        w.writerow(["image", "class", "predicted", "score", "member", "checkpoint_sha256", "threshold", "method",
                    "overlay", "heatmap", "map", "mask"])
        w.writerows(rows)


def _audit_row(name, label, member, heatmap, lung, lesion, mask) -> dict[str, Any]:
    row: dict[str, Any] = {"image": name, "class": label, "member": member}
    if lung is not None:
        row["lung_mass"] = mass_inside(heatmap, lung)
    if lesion is not None:
        row["pointing_hit"] = pointing_hit(heatmap, lesion)
        if mask is not None:
            row["draft_iou"] = iou(mask, lesion)
    return row


def summarise_audit(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean lung-mass share, pointing-game hit rate and draft IoU per (class, member)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["class"], r["member"])].append(r)
    summary: dict[str, Any] = {}
    for (label, member), rs in sorted(groups.items()):
        entry: dict[str, Any] = {"n": len(rs)}
        for key in ("lung_mass", "pointing_hit", "draft_iou"):
            vals = [float(r[key]) for r in rs if r.get(key) is not None]
            if vals:
                entry[key] = {"mean": float(np.mean(vals)), "n": len(vals)}
        summary.setdefault(label, {})[member] = entry
    return {"per_class_member": summary, "per_image": rows}
