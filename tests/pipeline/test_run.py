"""`cxr run`: a mixed folder end to end and refusing a foreign OUT (resuming, collisions, locks and
write failures: test_reliability.py)."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest

from fakes import png_bytes, progress_recorder, xray_like
from pipeline.cli import main


def _rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _run(folder, out, clf, seg, *extra):
    return main(["run", str(folder), "--classifier", str(clf), "--segmenter", str(seg), "--out", str(out),
                 "--batch-size", "4", *extra])


def test_run_on_mixed_folder(mixed_folder, mixed_run):
    folder, good, bad = mixed_folder
    code, out = mixed_run
    assert code == 1  # some inputs failed
    results = _rows(out / "results.csv")
    failures = _rows(out / "failures.csv")
    assert sorted(r["file"] for r in results) == good
    assert sorted(r["file"] for r in failures) == bad
    assert all(r["reason"] for r in failures)
    for r in results:
        assert abs(sum(float(r[f"p_{c}"]) for c in ("normal", "pneumonia", "covid")) - 1.0) < 1e-3
        assert (r["segmented"] == "True") == (r["label"] in ("pneumonia", "covid"))
        assert (out / "overlays" / (r["file"] + ".gradcam.png")).is_file()  # named with the extension
        # The share of lung affected needs a lung field: empty where the (toy, one-epoch) lung model finds none.
        assert r["lung_affected_pct"] == "" or 0.0 <= float(r["lung_affected_pct"]) <= 100.0
        assert r["refer"] in ("True", "False") and (r["refer"] == "True") == bool(r["refer_reason"])
    html = (out / "report.html").read_text()
    referred = [r for r in results if r["refer"] == "True"]
    assert (f"Referred to a reader ({len(referred)})" in html) == bool(referred)
    # A blank PNG in the mixed folder is readable but no X-ray: referred, and listed apart.
    assert any(r["refer_reason"] == "blank image" for r in referred)
    refs = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"href='([^']+)'", html)
    assert refs and all((out / ref.replace("%20", " ")).is_file() for ref in refs)
    assert "Research use only" in html


def test_out_of_another_run_is_refused(light_bundle, seg_model, tmp_path, capsys, models_loaded_once):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(xray_like(70, 70, seed=5)))
    out = tmp_path / "o"
    assert _run(folder, out, light_bundle, seg_model, "--segment-all") == 0
    assert _run(folder, out, light_bundle, seg_model) == 2  # different settings, same OUT
    assert "holds a run with other models or settings" in capsys.readouterr().err


def test_bad_model_dir_is_refused_before_reading_images(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "m").mkdir()
    assert main(["run", str(tmp_path / "imgs"), "--classifier", str(tmp_path / "m"), "--segmenter", str(tmp_path / "m"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "model.json: missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_logs_are_read_line_by_line_keeping_only_what_the_report_needs(tmp_path):
    import json

    from pipeline.report_html import REPORT_LESIONS, write_report
    from pipeline.run import _read_log, _summary

    lesions = [{"box": [i, i, i + 2, i + 2], "area_px": 100 - i, "score": 0.9, "lung_pct": None} for i in range(8)]
    row = {"file": "a.png", "label": "covid", "p_normal": 0.1, "p_pneumonia": 0.1, "p_covid": 0.8,
           "confidence": 0.8, "segmented": True, "lesion_count": 8, "lesion_area_px": 772,
           "lung_affected_pct": None, "lesions": lesions}
    log = tmp_path / "results.jsonl"
    log.write_bytes((json.dumps(row) + "\n").encode() + b'{"file": "b.pn')  # torn last line
    rows = _read_log(log, _summary)
    assert log.read_bytes().endswith(b"\n") and len(rows) == 1  # the torn line is cut off the file
    assert rows[0]["lesions"] == lesions[:REPORT_LESIONS] and rows[0]["lesion_count"] == 8
    html = write_report(tmp_path, rows, [], {}).read_text()
    assert f"and {8 - REPORT_LESIONS} smaller" in html and "box [0, 0, 2, 2]" in html


def _jsonl(path):
    import json

    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_run_writes_lung_masks_lesion_instances_and_their_coco_file(mixed_folder, light_bundle, seg_model, tmp_path,
                                                                    models_loaded_once):
    """Every image stage 2 saw gets its lung mask and a lesion instance map whose k-th label is the
    row's k-th lesion; lesions_coco.json holds the same lesions as RLE."""
    import json

    from PIL import Image
    from pycocotools import mask as coco_mask

    folder, good, _ = mixed_folder
    out = tmp_path / "run"
    assert _run(folder, out, light_bundle, seg_model, "--lung-model", str(seg_model), "--segment-all") == 1
    rows = _jsonl(out / "results.jsonl")
    assert len(rows) == len(good) and all(r["segmented"] for r in rows)
    coco = json.loads((out / "lesions_coco.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(r["file"] for r in rows)
    assert len(coco["annotations"]) == sum(r["lesion_count"] for r in rows)
    by_name = {i["file_name"]: i["id"] for i in coco["images"]}
    for r in rows:
        instances = np.asarray(Image.open(out / r["lesion_instances"]))
        lung = np.asarray(Image.open(out / r["lung_mask"]))
        assert instances.shape == lung.shape == (r["height"], r["width"])
        assert int(instances.max()) == r["lesion_count"]
        anns = [a for a in coco["annotations"] if a["image_id"] == by_name[r["file"]]]
        for k, (lesion, ann) in enumerate(zip(r["lesions"], anns), start=1):
            decoded = coco_mask.decode({"size": ann["segmentation"]["size"],
                                        "counts": ann["segmentation"]["counts"].encode()}).astype(bool)
            assert np.array_equal(decoded, instances == k)
            assert ann["area"] == lesion["area_px"] == int((instances == k).sum()) and ann["iscrowd"] == 1
        if r["lung_affected_pct"] is not None:  # the lesions' shares of the lung add up to the whole
            assert sum(les["lung_pct"] for les in r["lesions"]) == pytest.approx(r["lung_affected_pct"], abs=0.01)


PHI = ("Doe_John_19650304", "19650304", "MRN-4451234", "SMITH_JANE", "Doe^Jane", "SECRET-123", "BROWN_BOB")


def test_pseudonymized_run_leaks_no_names_and_resumes(light_bundle, seg_model, tmp_path, models_loaded_once,
                                                       capsys):
    """Files and folders named like patients and a DICOM with patient tags: with --pseudonymize no
    output file holds a name, a tag or the input folder's path; the map beside OUT holds the names."""
    from fakes import write_monochrome1_dicom

    folder = tmp_path / "ward_MRN-4451234"
    (folder / "MRN-4451234").mkdir(parents=True)
    (folder / "Doe_John_19650304.png").write_bytes(png_bytes(xray_like(90, 80, seed=1)))
    (folder / "MRN-4451234" / "chest.png").write_bytes(png_bytes(xray_like(90, 80, seed=2)))
    write_monochrome1_dicom(folder / "SMITH_JANE.dcm", (xray_like(64, 64, seed=3).astype(np.uint16) * 16))
    (folder / "BROWN_BOB.png").write_bytes(b"\x89PNG\r\n\x1a\n BROWN_BOB truncated")
    out = tmp_path / "out"
    assert _run(folder, out, light_bundle, seg_model, "--lung-model", str(seg_model), "--segment-all",
                "--pseudonymize") == 1
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(_rows(out / "results.csv")) == 3 and len(_rows(out / "failures.csv")) == 1
    for p in files:
        text = p.read_bytes()
        for secret in (*PHI, str(folder.resolve())):
            assert secret.encode() not in text, f"{secret} in {p.relative_to(out)}"
        assert not any(s in str(p.relative_to(out)) for s in PHI), p
    pseudonyms = out.with_name(out.name + ".pseudonyms.json")
    names = __import__("json").loads(pseudonyms.read_text())["names"]
    assert sorted(names.values()) == ["BROWN_BOB.png", "Doe_John_19650304.png", "MRN-4451234/chest.png",
                                      "SMITH_JANE.dcm"]
    assert pseudonyms.stat().st_mode & 0o077 == 0  # the user's alone
    before = (out / "results.jsonl").read_bytes()
    assert _run(folder, out, light_bundle, seg_model, "--lung-model", str(seg_model), "--segment-all",
                "--pseudonymize") == 1  # resumes with the same pseudonyms: nothing redone
    assert (out / "results.jsonl").read_bytes() == before
    capsys.readouterr()
    assert _run(folder, out, light_bundle, seg_model, "--lung-model", str(seg_model), "--segment-all",
                "--pseudonymize", "--pseudonym-map", str(tmp_path / "another.json")) == 2  # another key: refused
    err = capsys.readouterr().err
    assert "pseudonym_key differ" in err and "--pseudonym-map" in err


def test_plain_run_json_has_no_absolute_path_and_the_engine_is_part_of_a_run(light_bundle, seg_model, tmp_path,
                                                                              loaded_bundles, models_loaded_once):
    """run.json keeps the input folder as a hash; the engine is part of what a resume must match
    (a mismatch is refused: test_out_of_another_run_is_refused)."""
    from types import SimpleNamespace

    from pipeline.privacy import InputNames
    from pipeline.run import run_identity

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(xray_like(90, 80, seed=4)))
    out = tmp_path / "out"
    assert _run(folder, out, light_bundle, seg_model) == 0
    assert str(folder.resolve()) not in (out / "run.json").read_text()
    clf, seg = loaded_bundles
    keras_id = run_identity(folder, clf, seg, None, segment_all=False, names=InputNames())
    clf.onnx = SimpleNamespace(engine="onnx")
    try:
        onnx_id = run_identity(folder, clf, seg, None, segment_all=False, names=InputNames())
    finally:
        clf.onnx = None
    assert keras_id["engine"] == "keras" and onnx_id["engine"] == "onnx" and keras_id != onnx_id


def test_a_failed_file_is_retried_when_it_changed(light_bundle, seg_model, tmp_path, models_loaded_once):
    folder = tmp_path / "images"
    folder.mkdir()
    broken = folder / "late.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n still copying")
    out = tmp_path / "out"
    assert _run(folder, out, light_bundle, seg_model) == 1
    assert _run(folder, out, light_bundle, seg_model) == 1  # unchanged: not tried again, still listed
    assert [r["file"] for r in _rows(out / "failures.csv")] == ["late.png"]
    broken.write_bytes(png_bytes(xray_like(90, 80, seed=5)))  # the copy finished
    assert _run(folder, out, light_bundle, seg_model) == 0
    assert [r["file"] for r in _rows(out / "results.csv")] == ["late.png"] and _rows(out / "failures.csv") == []


def test_progress_counts_images_failed_ones_included(loaded_bundles, tmp_path):
    from pipeline.run import run_pipeline

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"g{i}.png").write_bytes(png_bytes(xray_like(90, 80, seed=20 + i)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    seen, progress = progress_recorder()

    clf, seg = loaded_bundles
    res = run_pipeline(folder, tmp_path / "out", classifier=clf, segmenter=seg, batch_size=2, progress=progress)
    assert (res.n_done, res.n_failed) == (3, 1)
    assert seen == {"total": 4, "ticks": 4}
