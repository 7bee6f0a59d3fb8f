"""Draft masks → every annotation format → back: identical masks, decoded by the independent library."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from fakes import png_bytes, xray_like
from gradcam.brush_rle import decode, encode, mask_to_rle, rle_to_mask
from gradcam.export import Draft, write_coco, write_labelstudio, write_sagemaker
from gradcam.imports import AnnotationError, import_masks, read_coco

CATS = ["pneumonia", "covid"]


@pytest.fixture()
def image_folder(tmp_path):
    """Three images of different sizes and their draft masks (two regions, one region, empty)."""
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    sizes = {"a.png": (60, 50), "sub/b.png": (40, 70), "c.png": (32, 32)}
    drafts = []
    for i, (name, (h, w)) in enumerate(sizes.items()):
        (d / name).write_bytes(png_bytes(xray_like(h, w, seed=i)))
        m = np.zeros((h, w), bool)
        if name == "a.png":
            m[5:20, 5:15] = True
            m[30:50, 20:45] = True  # second region
        elif name == "sub/b.png":
            m[10:30, 30:60] = True
        drafts.append(Draft(name, w, h, CATS[i % 2], 0.9, m))
    return d, drafts


def _read_png_mask(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0


def test_coco_round_trip_with_pycocotools(image_folder, tmp_path):
    from pycocotools.coco import COCO

    d, drafts = image_folder
    path = write_coco(drafts, tmp_path / "coco.json", CATS)
    data = json.loads(path.read_text())
    assert len([a for a in data["annotations"] if a["image_id"] == 1]) == 2  # one per connected region
    assert all(a["iscrowd"] == 1 for a in data["annotations"])
    coco = COCO(str(path))  # the independent reader
    for img in coco.dataset["images"]:
        want = next(x.mask for x in drafts if x.name == img["file_name"])
        got = np.zeros_like(want)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            got |= coco.annToMask(ann).astype(bool)
        np.testing.assert_array_equal(got, want)
    res = import_masks(path, "cvat", d, tmp_path / "out", kind="lesion")
    for x in drafts:
        np.testing.assert_array_equal(_read_png_mask(tmp_path / "out" / "lesion" / (Path(x.name).stem + ".png")),
                                      x.mask)
    assert res.problems == [("c.png", "empty mask (written as all background)")]


def test_cvat_polygons_and_uncompressed_rle_are_read(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "p.png", "width": 20, "height": 20}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 1,
             "segmentation": {"size": [20, 20], "counts": [390, 5, 5]}},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    masks, problems = read_coco(tmp_path / "c.json")
    m = masks["p.png"]
    assert problems == []
    assert m[5:10, 5:10].all() and not m[15:, :15].any()  # polygon interior filled, far corner empty
    assert m.reshape(-1, order="F")[390:395].all()  # the uncompressed run (column-major)


def test_brush_codec_matches_label_studio_converter():
    brush = pytest.importorskip("label_studio_converter.brush",
                                reason="reference codec: pip install --no-deps label-studio-converter")
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (7, 13), (64, 48), (300, 300)]:
        m = (rng.random((h, w)) > 0.7).astype(np.uint8) * 255
        m[: h // 2, : w // 2] = 255  # long runs too
        ours = mask_to_rle(m)
        assert ours == brush.mask2rle(m)  # byte-identical to the reference encoder
        np.testing.assert_array_equal(brush.decode_rle(ours).reshape(h, w, 4)[..., 3] > 0, m > 0)
        np.testing.assert_array_equal(rle_to_mask(ours, h, w), m > 0)
    long = np.zeros(200_000, np.uint8)
    long[150_000:] = 255  # runs above 2^16 are split
    assert encode(long) == brush.encode_rle(long)
    np.testing.assert_array_equal(decode(encode(long)), long)


def test_labelstudio_round_trip(image_folder, tmp_path):
    d, drafts = image_folder
    tasks_path = write_labelstudio(drafts, tmp_path / "tasks.json", tmp_path / "config.xml", CATS,
                                   image_prefix="/data/local-files/?d=images/")
    assert '<BrushLabels name="tag" toName="image">' in (tmp_path / "config.xml").read_text()
    tasks = json.loads(tasks_path.read_text())
    # What Label Studio exports after an annotator accepts the predictions unchanged.
    for i, t in enumerate(tasks):
        t["id"] = i + 1
        t["annotations"] = [{"id": 10 + i, "result": p["result"], "was_cancelled": False} for p in t.pop("predictions",
                                                                                                         [])]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    res = import_masks(tmp_path / "export.json", "labelstudio", d, tmp_path / "out")
    for x in drafts:
        if x.mask.any():
            np.testing.assert_array_equal(_read_png_mask(tmp_path / "out" / "lesion" / (Path(x.name).stem + ".png")),
                                          x.mask)
    assert res.problems == [("images/c.png", "no annotation (only drafts or nothing)")]


def test_sagemaker_round_trip(image_folder, tmp_path):
    d, drafts = image_folder
    (tmp_path / "gt").mkdir()
    manifest = write_sagemaker(drafts, tmp_path / "gt" / "output.manifest", tmp_path / "gt" / "masks", CATS,
                               source_prefix="s3://bucket/xrays/")
    line = json.loads(manifest.read_text().splitlines()[0])
    assert line["source-ref"] == "s3://bucket/xrays/a.png"
    assert line["cxr-draft-ref-metadata"]["internal-color-map"]["0"]["class-name"] == "BACKGROUND"
    res = import_masks(manifest, "sagemaker", d, tmp_path / "out")
    for x in drafts:
        np.testing.assert_array_equal(_read_png_mask(tmp_path / "out" / "lesion" / (Path(x.name).stem + ".png")),
                                      x.mask)
    assert [p for _, p in res.problems] == ["empty mask (written as all background)"]


def test_import_problems_are_listed(image_folder, tmp_path):
    d, drafts = image_folder
    wrong = [Draft("a.png", 10, 10, "covid", 1.0, np.ones((10, 10), bool)),
             Draft("ghost.png", 10, 10, "covid", 1.0, np.ones((10, 10), bool))]
    path = write_coco(wrong, tmp_path / "coco.json", CATS)
    res = import_masks(path, "cvat", d, tmp_path / "out")
    problems = dict(res.problems)
    assert problems["a.png"].startswith("size mismatch: mask 10x10, image 50x60")
    assert problems["ghost.png"].startswith("unknown image")
    assert res.written == []
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(AnnotationError, match="bad.json"):
        import_masks(tmp_path / "bad.json", "cvat", d, tmp_path / "out")
