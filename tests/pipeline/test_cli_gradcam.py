"""`cxr gradcam` end to end on a trained tiny classifier: files, drafts, audit, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fakes import png_bytes, progress_recorder
from pipeline.cli import main


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lung_dir(tiny_tree, tmp_path_factory):
    d = tmp_path_factory.mktemp("lungs")
    for p in tiny_tree.rglob("*.png"):
        m = np.zeros((80, 72), np.uint8)
        m[10:70, 8:64] = 255
        (d / p.name).write_bytes(png_bytes(m))
    return d


def test_gradcam_writes_everything_and_is_deterministic(trained_bundle, tiny_tree, lung_dir, tmp_path, capsys,
                                                       classifiers_loaded_once):
    model, _ = trained_bundle
    args = ["gradcam", str(tiny_tree), "--model", str(model), "--target", "covid", "--threshold", "0.4",
            "--lung-masks", str(lung_dir), "--lesion-masks", str(lung_dir)]
    # Both runs are handed the one loaded classifier (conftest): what must not vary between runs is
    # everything after loading.
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert classifiers_loaded_once[model.resolve()] == 2
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert a == b  # same checkpoint, same images → byte-identical outputs
    out = tmp_path / "a"
    for name in ("annotations/instances_default.json", "labelstudio_tasks.json", "labelstudio_config.xml",
                 "sagemaker_manifest.jsonl", "manifest.csv", "audit.json", "failures.csv"):
        assert (out / name).is_file(), name
    maps = np.load(out / "maps" / "covid" / "covid_0.png.npz")  # named with the input's extension
    assert set(maps.files) == {"ensemble", "densenet121", "efficientnetb0", "vgg19"}
    heat = maps["ensemble"]
    assert heat.shape == (80, 72) and heat.dtype == np.float32 and 0.0 <= heat.min() and heat.max() <= 1.0
    mask = out / "masks" / "covid" / "covid_0.png.png"
    import cv2
    m = cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE) > 0
    np.testing.assert_array_equal(m, (heat >= 0.4) & _lung_box())  # threshold, restricted to the lung field
    rows = (out / "manifest.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 * 4  # header + (ensemble + 3 members) per image
    audit = json.loads((out / "audit.json").read_text())
    entry = audit["per_class_member"]["covid"]["ensemble"]
    assert 0.0 <= entry["lung_mass"]["mean"] <= 1.0 and entry["lung_mass"]["n"] == 12
    assert "draft_iou" in entry and "pointing_hit" in entry
    assert "audit covid" in capsys.readouterr().out


def _lung_box():
    box = np.zeros((80, 72), bool)
    box[10:70, 8:64] = True
    return box


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target", "cancer"], "--target 'cancer'"),
        (["--members", "resnet50"], "not in this model"),
        (["--threshold", "0"], "must be in (0, 1]"),
        (["--formats", "coco"], "unknown format"),
    ],
)
def test_gradcam_bad_arguments(trained_bundle, tiny_tree, tmp_path, capsys, extra, message, classifiers_loaded_once):
    model, _ = trained_bundle
    assert main(["gradcam", str(tiny_tree), "--model", str(model), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_gradcam_on_a_full_disk_says_so_without_a_traceback(light_bundle, tiny_tree, tmp_path, monkeypatch, capsys,
                                                           classifiers_loaded_once):
    import errno

    from data import files

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "write_bytes_atomic", full)
    assert main(["gradcam", str(tiny_tree), "--model", str(light_bundle), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and "Traceback" not in err


PHI = ("Doe_John_19650304", "19650304", "MRN-4451234", "SMITH_JANE", "Doe^Jane", "SECRET-123")


def test_pseudonymized_exports_reference_deidentified_pngs_under_absolute_s3_refs(light_bundle, tmp_path,
                                                                                   classifiers_loaded_once):
    """Patient-like names, a DICOM with patient tags and a 16-bit PNG: with --pseudonymize and an s3://
    SageMaker prefix, every image is an 8-bit PNG copy under OUT/images/ named by pseudonym, every
    SageMaker ref is absolute under the prefix and resolves inside OUT, Label Studio gets its own
    prefix, and no output holds a name or a tag."""
    from PIL import Image

    from fakes import write_monochrome1_dicom, xray_like

    folder = tmp_path / "MRN-4451234"
    folder.mkdir()
    (folder / "Doe_John_19650304.png").write_bytes(png_bytes(xray_like(90, 80, seed=1)))
    (folder / "gray16.png").write_bytes(png_bytes(xray_like(70, 60, seed=2).astype(np.uint16) * 250))
    write_monochrome1_dicom(folder / "SMITH_JANE.dcm", xray_like(64, 64, seed=3).astype(np.uint16) * 16)
    out = tmp_path / "g"
    assert main(["gradcam", str(folder), "--model", str(light_bundle), "--out", str(out), "--target", "covid",
                 "--pseudonymize", "--sagemaker-prefix", "s3://bucket/cxr-out/",
                 "--labelstudio-prefix", "/data/local-files/?d=cxr-out/"]) == 0
    for p in (p for p in out.rglob("*") if p.is_file()):
        assert not any(s.encode() in p.read_bytes() or s in p.as_posix() for s in PHI), p
    lines = [json.loads(line) for line in (out / "sagemaker_manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for line in lines:
        meta = line["cxr-draft-ref-metadata"]
        assert meta["type"] == "groundtruth/semantic-segmentation" and meta["human-annotated"] == "no"
        assert {"internal-color-map", "creation-date", "job-name"} <= set(meta)
        assert meta["internal-color-map"]["0"]["class-name"] == "BACKGROUND"
        image_ref, mask_ref = line["source-ref"], line["cxr-draft-ref"]
        assert image_ref.startswith("s3://bucket/cxr-out/images/") and mask_ref.startswith("s3://bucket/cxr-out/")
        image = Image.open(out / image_ref.removeprefix("s3://bucket/cxr-out/"))
        mask = Image.open(out / mask_ref.removeprefix("s3://bucket/cxr-out/"))
        assert image.mode == "RGB" and mask.mode == "RGB" and image.size == mask.size
    sizes = sorted(Image.open(p).size for p in (out / "images").iterdir())
    assert sizes == [(60, 70), (64, 64), (80, 90)]  # each input once, at its own size
    tasks = json.loads((out / "labelstudio_tasks.json").read_text())
    assert all(t["data"]["image"].startswith("/data/local-files/?d=cxr-out/images/") for t in tasks)
    coco = json.loads((out / "annotations" / "instances_default.json").read_text())
    copies = sorted(f"images/{p.name}" for p in (out / "images").iterdir())
    assert sorted(i["file_name"] for i in coco["images"]) == copies
    names = json.loads(out.with_name("g.pseudonyms.json").read_text())["names"]
    assert sorted(names.values()) == ["Doe_John_19650304.png", "SMITH_JANE.dcm", "gray16.png"]
    # The annotators' edits come back through the same manifest (masks downloaded beside it).
    masks = tmp_path / "masks"
    assert main(["import-masks", str(out / "sagemaker_manifest.jsonl"), "--format", "sagemaker",
                 "--images", str(out / "images"), "--out", str(masks)]) in (0, 1)
    assert len(list((masks / "lesion").glob("*.png"))) == 3


def test_cvat_export_loads_in_datumaro_with_the_drafts(light_bundle, tiny_tree, tmp_path, classifiers_loaded_once):
    """CVAT imports "COCO 1.0" with Datumaro: the export, in CVAT's layout beside the images, loads
    there as crowd RLE masks whose union per image is the draft mask."""
    import subprocess

    import cv2
    from tools import ROOT, tool_python

    python = tool_python("datumaro")
    out = tmp_path / "g"
    assert main(["gradcam", str(tiny_tree), "--model", str(light_bundle), "--out", str(out), "--target", "covid",
                 "--formats", "cvat"]) == 0
    dataset = tmp_path / "cvat_upload"  # what a user zips for CVAT: annotations/ beside the task's images/
    (dataset / "annotations").mkdir(parents=True)
    (dataset / "annotations" / "instances_default.json").write_bytes(
        (out / "annotations" / "instances_default.json").read_bytes())
    (dataset / "images").symlink_to(tiny_tree, target_is_directory=True)
    proc = subprocess.run([python, str(ROOT / "tests" / "datumaro_load.py"), str(dataset), str(tmp_path / "m.npz")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    images = sorted(p.relative_to(tiny_tree).with_suffix("").as_posix() for p in tiny_tree.rglob("*.png"))
    assert loaded["items"] == images
    assert loaded["masks"] and all(m["is_crowd"] and m["label"] == "covid" and m["kind"] == "RleMask"
                                   for m in loaded["masks"])
    arrays = np.load(tmp_path / "m.npz")
    for item in images:
        union = np.zeros((80, 72), bool)
        for k, m in enumerate(loaded["masks"]):
            if m["item"] == item:
                union |= arrays[f"m{k}"]
        draft = cv2.imread(str(out / "masks" / f"{item}.png.png"), cv2.IMREAD_GRAYSCALE)
        expected = draft > 0 if draft is not None else np.zeros((80, 72), bool)
        np.testing.assert_array_equal(union, expected)


@pytest.mark.slow
def test_labelstudio_live_round_trip_gives_back_the_drafts(light_bundle, tiny_tree, tmp_path):
    """A real Label Studio on 127.0.0.1: a project from labelstudio_config.xml, the tasks imported
    with their predictions, every draft accepted, the project exported, and `cxr import-masks`
    gives back exactly the draft masks."""
    import os
    import socket
    import subprocess
    import time
    import urllib.request

    import cv2
    from tools import ROOT, tool_python

    python = tool_python("label_studio_sdk", venv=".venv-labelstudio", env="CXR_LABELSTUDIO_PYTHON",
                         install="make install-labelstudio")
    out = tmp_path / "g"
    assert main(["gradcam", str(tiny_tree), "--model", str(light_bundle), "--out", str(out), "--target", "covid",
                 "--formats", "labelstudio"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token, url = "cxr-live-test-token-0123456789", f"http://127.0.0.1:{port}"
    env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(tmp_path / "ls"), "DJANGO_DB": "sqlite",
           "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true"}
    server = subprocess.Popen([str(Path(python).with_name("label-studio")), "start", "--no-browser", "--host",
                               "127.0.0.1", "--port", str(port), "--username", "annotator@example.com",
                               "--password", "cxr-live-test", "--user-token", token],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "Label Studio did not start"
                time.sleep(1)
        export = tmp_path / "export.json"
        proc = subprocess.run([python, str(ROOT / "tests" / "labelstudio_client.py"), url, token,
                               str(out / "labelstudio_config.xml"), str(out / "labelstudio_tasks.json"), str(export)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    drafts = sorted(p for p in (out / "masks").rglob("*.png") if cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).any())
    assert report["tasks"] == 12 and report["accepted"] == report["predictions"] == len(drafts) > 0
    masks = tmp_path / "masks"
    main(["import-masks", str(export), "--format", "labelstudio", "--images", str(tiny_tree), "--out", str(masks)])
    for draft in drafts:  # masks/<rel>.png.png ↔ MASKS/lesion/<stem>.png
        back = cv2.imread(str(masks / "lesion" / (Path(draft.stem).stem + ".png")), cv2.IMREAD_GRAYSCALE)
        assert back is not None, draft
        np.testing.assert_array_equal(back > 0, cv2.imread(str(draft), cv2.IMREAD_GRAYSCALE) > 0)


def test_gradcam_progress_counts_images(light_bundle, tiny_tree, tmp_path, classifiers_loaded_once):
    from pipeline import api

    seen, progress = progress_recorder()

    n = len(list(tiny_tree.rglob("*.png")))
    api.gradcam(tiny_tree, light_bundle, tmp_path / "g", formats=["cvat"], batch_size=5, progress=progress)
    assert seen == {"total": n, "ticks": n}
