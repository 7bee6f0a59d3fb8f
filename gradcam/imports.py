"""Edited masks back from annotation tools, as binary PNGs named like their images.

Readers return ``{image reference: mask}`` plus problems; :func:`import_masks` matches the
references to the image folder, checks sizes and writes ``OUT/<kind>/<stem>.png`` (0/255),
the layout the segmenter trains on. Every problem is listed, none is silently dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import cv2
import numpy as np
from pycocotools import mask as coco_mask

from data.datasets import walk_images
from data.errors import CxrError, UsageError
from data.files import write_png
from data.io import ImageReadError, read_image
from gradcam.brush_rle import rle_to_mask
from gradcam.export import ANNOTATION_FORMATS


class AnnotationError(CxrError):
    """An export file that cannot be read at all; names the file and the reason."""


@dataclass
class ImportResult:
    written: list[Path] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (image reference, problem)


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AnnotationError(f"{path}: cannot read as JSON ({err})") from None


def read_coco(path: Path) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """CVAT COCO 1.0 export: RLE (compressed or not) and polygon annotations, unioned per image."""
    coco = _load_json(path)
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise AnnotationError(f"{path}: not a COCO instances file (needs 'images' and 'annotations')")
    images = {im["id"]: im for im in coco["images"]}
    masks = {im["file_name"]: np.zeros((im["height"], im["width"]), bool) for im in coco["images"]}
    problems = []
    for ann in coco["annotations"]:
        im = images.get(ann.get("image_id"))
        if im is None:
            problems.append((f"annotation {ann.get('id')}", "refers to an image id not in 'images'"))
            continue
        h, w = im["height"], im["width"]
        seg = ann.get("segmentation")
        if isinstance(seg, dict):
            rle = coco_mask.frPyObjects(seg, h, w) if isinstance(seg.get("counts"), list) else seg
        elif isinstance(seg, list) and seg:
            rle = coco_mask.merge(coco_mask.frPyObjects(seg, h, w))
        else:
            problems.append((im["file_name"], f"annotation {ann.get('id')} has no segmentation"))
            continue
        if isinstance(rle, dict) and isinstance(rle.get("counts"), str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
        masks[im["file_name"]] |= coco_mask.decode(rle).astype(bool)
    return masks, problems


def read_labelstudio(path: Path) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Label Studio JSON export: the latest non-cancelled annotation's brush results per task."""
    tasks = _load_json(path)
    if not isinstance(tasks, list):
        raise AnnotationError(f"{path}: a Label Studio JSON export is a list of tasks")
    masks, problems = {}, []
    for task in tasks:
        ref = str(task.get("data", {}).get("image", ""))
        name = _ls_image_name(ref)
        annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        if not annotations:
            problems.append((name or f"task {task.get('id')}", "no annotation (only drafts or nothing)"))
            continue
        latest = max(annotations, key=lambda a: (a.get("updated_at") or "", a.get("id") or 0))
        mask = None
        for result in latest.get("result", []):
            if result.get("type", "").lower() != "brushlabels" or result.get("value", {}).get("format") != "rle":
                continue
            h, w = int(result["original_height"]), int(result["original_width"])
            part = rle_to_mask(result["value"]["rle"], h, w)
            mask = part if mask is None else (mask | part)
        if mask is None:
            problems.append((name, "annotation has no brush result"))
            continue
        masks[name] = mask
    return masks, problems


def _ls_image_name(ref: str) -> str:
    parsed = urlparse(ref)
    if "d" in parse_qs(parsed.query):  # /data/local-files/?d=folder/name.png
        return unquote(parse_qs(parsed.query)["d"][0])
    return unquote(parsed.path)


def read_sagemaker(path: Path) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """GT semantic-segmentation output manifest: any pixel not of the BACKGROUND colour is foreground.

    Mask references are looked up beside the manifest (by relative path, then by file name),
    since ``s3://`` objects are downloaded next to it.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: cannot read ({err})") from None
    masks, problems = {}, []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}:{lineno}: not JSON ({err})") from None
        source = str(entry.get("source-ref", ""))
        name = source.split("://", 1)[-1].split("/", 1)[-1] if source.startswith("s3://") else source
        refs = [k for k in entry if k.endswith("-ref") and k != "source-ref"]
        if not refs:
            problems.append((name, "no label attribute (<name>-ref) in the manifest line"))
            continue
        meta = entry.get(f"{refs[0]}-metadata", {})
        cmap = meta.get("internal-color-map", {})
        background = next((v["hex-color"] for v in cmap.values() if v.get("class-name") == "BACKGROUND"), "#ffffff")
        ref = str(entry[refs[0]])
        parts = (ref.split("://", 1)[-1].split("/", 1)[-1] if "://" in ref else ref).split("/")
        # the longest tail of the reference that exists beside the manifest (an s3:// prefix dropped)
        local = next((path.parent.joinpath(*parts[i:]) for i in range(len(parts))
                      if path.parent.joinpath(*parts[i:]).is_file()), path.parent / parts[-1])
        colour = cv2.imread(str(local), cv2.IMREAD_COLOR)
        if colour is None:
            problems.append((name, f"mask file {ref} not found or unreadable beside {path}"))
            continue
        bg = np.array([int(background.lstrip("#")[i : i + 2], 16) for i in (4, 2, 0)], np.uint8)  # BGR
        masks[name] = (colour != bg).any(axis=2)
    return masks, problems


_LS_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")


def import_masks(export: str | Path, fmt: str, images: str | Path, out: str | Path, *,
                 kind: str = "lesion") -> ImportResult:
    """Read an annotation export and write ``out/<kind>/<image stem>.png`` for every matched image."""
    export, images, out = Path(export), Path(images), Path(out)
    if fmt not in ANNOTATION_FORMATS:
        raise UsageError(f"unknown format {fmt!r}; valid: {', '.join(ANNOTATION_FORMATS)}")
    if not export.is_file():
        raise AnnotationError(f"{export}: no such export file")
    if not images.is_dir():
        raise AnnotationError(f"{images}: no such image folder")
    reader = {"cvat": read_coco, "labelstudio": read_labelstudio, "sagemaker": read_sagemaker}[fmt]
    masks, problems = reader(export)
    by_rel = {p.relative_to(images).as_posix(): p for p in walk_images(images)}
    by_name: dict[str, list[Path]] = {}
    for p in by_rel.values():
        by_name.setdefault(p.name, []).append(p)
    result = ImportResult(problems=list(problems))
    target = out / kind
    target.mkdir(parents=True, exist_ok=True)
    for ref, mask in sorted(masks.items()):
        image = _match(ref, by_rel, by_name)
        if image is None:
            result.problems.append((ref, f"unknown image: not found in {images}"))
            continue
        try:
            h, w = read_image(image).shape[:2]
        except ImageReadError as err:
            result.problems.append((ref, f"image unreadable: {err.reason}"))
            continue
        if mask.shape != (h, w):
            result.problems.append((ref, f"size mismatch: mask {mask.shape[1]}x{mask.shape[0]}, image {w}x{h}"))
            continue
        if not mask.any():
            result.problems.append((ref, "empty mask (written as all background)"))
        dest = target / (image.stem + ".png")
        write_png(dest, mask.astype(np.uint8) * 255)
        result.written.append(dest)
    return result


def _match(ref: str, by_rel: dict[str, Path], by_name: dict[str, list[Path]]) -> Path | None:
    ref = ref.lstrip("/")
    for i in range(ref.count("/") + 1):  # longest relative suffix first
        tail = ref.split("/", i)[-1]
        if tail in by_rel:
            return by_rel[tail]
    base = ref.rsplit("/", 1)[-1]
    for candidate in (base, _LS_UPLOAD_PREFIX.sub("", base)):
        found = by_name.get(candidate, [])
        if len(found) == 1:
            return found[0]
    return None
