"""Draft masks into files that annotation tools import unchanged.

* CVAT / COCO 1.0: instances JSON, one annotation per connected region, RLE segmentation
  (pycocotools), ``iscrowd = 1`` as COCO requires for RLE.
* Label Studio: tasks JSON whose ``predictions`` carry BrushLabels results in brush RLE, and
  the matching labelling-config XML.
* SageMaker Ground Truth: an output manifest (JSON lines) in the semantic-segmentation
  layout (``source-ref``, ``<attr>-ref`` colour mask PNG, ``internal-color-map``), usable as
  the input of a label-adjustment job.

Everything is sorted and carries no wall-clock time, so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pycocotools import mask as coco_mask

from data.files import write_json, write_png
from gradcam.brush_rle import mask_to_rle
from gradcam.masks import regions

#: Colours of the lesion classes in the SageMaker colour map and Label Studio config.
#: The annotation tools written for (`cxr gradcam --formats`) and read back (`cxr import-masks --format`).
ANNOTATION_FORMATS = ("cvat", "labelstudio", "sagemaker")
CLASS_COLOURS = {"normal": "#1f77b4", "pneumonia": "#ff7f0e", "covid": "#d62728"}
BACKGROUND_COLOUR = "#ffffff"
SAGEMAKER_ATTRIBUTE = "cxr-draft"
LS_FROM_NAME, LS_TO_NAME = "tag", "image"


@dataclass(frozen=True)
class Draft:
    """One image's draft annotation. ``name`` is its path relative to the image folder."""

    name: str
    width: int
    height: int
    label: str  # target class of the heatmap
    score: float  # classifier probability of that class
    mask: np.ndarray | None  # (height, width) bool, None when no draft was made


def encode_coco_rle(mask: np.ndarray) -> dict:
    """(H, W) bool → COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@dataclass(frozen=True)
class Instance:
    """One object of a COCO instances file: its mask as COCO RLE, box (x, y, w, h), area, score."""

    label: str
    rle: dict
    bbox: tuple[int, int, int, int]
    area: int
    score: float


def write_coco_instances(images: Sequence[tuple[str, int, int, Sequence[Instance]]], path: Path,
                         categories: Sequence[str], *, description: str, source: str) -> Path:
    """COCO instances JSON (CVAT "COCO 1.0"): every image (name, width, height) listed, one RLE
    annotation (``iscrowd`` 1, as CVAT writes masks) per instance."""
    cat_ids = {name: i + 1 for i, name in enumerate(categories)}
    coco_images, annotations = [], []
    for image_id, (name, width, height, instances) in enumerate(sorted(images, key=lambda i: i[0]), start=1):
        coco_images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for inst in instances:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat_ids[inst.label],
                "segmentation": inst.rle,
                "area": inst.area,
                "bbox": list(inst.bbox),
                "iscrowd": 1,
                "attributes": {"score": round(inst.score, 6), "source": source},
            })
    coco = {
        "info": {"description": description, "version": "1.0"},
        "licenses": [],
        "categories": [{"id": i, "name": n, "supercategory": ""} for n, i in cat_ids.items()],
        "images": coco_images,
        "annotations": annotations,
    }
    return write_json(path, coco, sort_keys=True)


def write_coco(drafts: Sequence[Draft], path: Path, categories: Sequence[str], *, file_prefix: str = "") -> Path:
    """The drafts as COCO instances: every image listed (``file_name``: ``file_prefix`` + its
    reference), one RLE annotation per connected region."""
    images = [(file_prefix + d.name, d.width, d.height,
               [] if d.mask is None else [Instance(d.label, encode_coco_rle(r.mask), r.bbox, r.area, d.score)
                                          for r in regions(d.mask)])
              for d in drafts]
    return write_coco_instances(images, path, categories, description="cxr Grad-CAM draft masks",
                                source="grad-cam draft")


def labelstudio_config(categories: Sequence[str]) -> str:
    """Labelling-config XML for the tasks written by :func:`write_labelstudio`."""
    labels = "\n".join(
        f'    <Label value="{c}" background="{CLASS_COLOURS.get(c, "#9467bd")}"/>' for c in categories
    )
    return (
        "<View>\n"
        f'  <Image name="{LS_TO_NAME}" value="$image" zoom="true"/>\n'
        f'  <BrushLabels name="{LS_FROM_NAME}" toName="{LS_TO_NAME}">\n{labels}\n  </BrushLabels>\n'
        "</View>\n"
    )


def write_labelstudio(drafts: Sequence[Draft], tasks_path: Path, config_path: Path, categories: Sequence[str],
                      *, image_prefix: str = "", model_version: str = "") -> Path:
    """Label Studio tasks (one per image) with brush-RLE predictions, plus the config XML."""
    tasks = []
    for d in sorted(drafts, key=lambda d: d.name):
        task = {"data": {"image": image_prefix + d.name}, "meta": {"file": d.name}}
        if d.mask is not None and d.mask.any():
            task["predictions"] = [{
                "model_version": model_version,
                "score": round(float(d.score), 6),
                "result": [{
                    "id": "draft",
                    "from_name": LS_FROM_NAME,
                    "to_name": LS_TO_NAME,
                    "type": "brushlabels",
                    "original_width": d.width,
                    "original_height": d.height,
                    "image_rotation": 0,
                    "value": {"format": "rle", "rle": mask_to_rle(d.mask), "brushlabels": [d.label]},
                }],
            }]
        tasks.append(task)
    config_path.write_text(labelstudio_config(categories), encoding="utf-8")
    return write_json(tasks_path, tasks, sort_keys=True)


def _hex_to_rgb(colour: str) -> tuple[int, int, int]:
    c = colour.lstrip("#")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def sagemaker_color_map(categories: Sequence[str]) -> dict[str, dict[str, str]]:
    """GT ``internal-color-map``: index 0 is BACKGROUND, then one entry per class."""
    cmap = {"0": {"class-name": "BACKGROUND", "hex-color": BACKGROUND_COLOUR}}
    for i, c in enumerate(categories, start=1):
        cmap[str(i)] = {"class-name": c, "hex-color": CLASS_COLOURS.get(c, "#9467bd")}
    return cmap


def write_sagemaker(drafts: Sequence[Draft], manifest_path: Path, mask_dir: Path, categories: Sequence[str],
                    *, source_prefix: str = "", mask_prefix: str | None = None, job_name: str = "cxr-gradcam-drafts",
                    creation_date: str = "1970-01-01T00:00:00") -> Path:
    """GT semantic-segmentation output manifest and its colour mask PNGs (RGB, background white)."""
    mask_dir.mkdir(parents=True, exist_ok=True)
    cmap = sagemaker_color_map(categories)
    index = {v["class-name"]: int(k) for k, v in cmap.items()}
    mask_prefix = mask_prefix if mask_prefix is not None else f"{mask_dir.name}/"
    lines = []
    for d in sorted(drafts, key=lambda d: d.name):
        png_name = Path(d.name).with_suffix(".png").as_posix().replace("/", "__")
        colour = np.zeros((d.height, d.width, 3), np.uint8)
        colour[:] = _hex_to_rgb(BACKGROUND_COLOUR)
        if d.mask is not None:
            colour[d.mask] = _hex_to_rgb(cmap[str(index[d.label])]["hex-color"])
        write_png(mask_dir / png_name, colour)
        lines.append(json.dumps({
            "source-ref": source_prefix + d.name,
            f"{SAGEMAKER_ATTRIBUTE}-ref": mask_prefix + png_name,
            f"{SAGEMAKER_ATTRIBUTE}-ref-metadata": {
                "internal-color-map": cmap,
                "type": "groundtruth/semantic-segmentation",
                "human-annotated": "no",
                "creation-date": creation_date,
                "job-name": f"labeling-job/{job_name}",
            },
        }, sort_keys=True))
    manifest_path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return manifest_path


def save_maps(path: Path, maps: dict[str, np.ndarray]) -> Path:
    """Compressed ``.npz`` of float32 maps with fixed zip timestamps (np.savez stamps the clock),
    so regenerating gives byte-identical files. ``np.load(path)`` reads it."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(maps):
            buf = io.BytesIO()
            np.save(buf, np.asarray(maps[key], dtype=np.float32), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())
    return path
