"""`cxr run`: a mixed folder end to end and refusing a foreign OUT (resuming, collisions, locks and
write failures: test_reliability.py)."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fakes import BAD_CORPUS_EXPECT, png_bytes, xray_like
from pipeline.cli import main


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, bad_corpus):
    """Good X-rays (real ones from ../shared/data when present, generated otherwise) plus the bad corpus."""
    d = tmp_path_factory.mktemp("mixed")
    real = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr"
    good = []
    if (real / "manifest.csv").is_file():
        for label in ("covid", "pneumonia", "normal"):
            for p in sorted((real / label).glob("*.png"))[:2]:
                shutil.copy(p, d / f"real_{p.name}")
                good.append(f"real_{p.name}")
    for i in range(3):
        (d / "gen").mkdir(exist_ok=True)
        (d / "gen" / f"g{i}.png").write_bytes(png_bytes(xray_like(90, 80, seed=300 + i)))
        good.append(f"gen/g{i}.png")
    (d / "gen" / "blank.png").write_bytes(png_bytes(np.full((90, 80), 128, np.uint8)))  # readable, not an X-ray
    good.append("gen/blank.png")
    (d / "bad").mkdir()
    bad = []
    for name, expect in BAD_CORPUS_EXPECT.items():
        shutil.copy(bad_corpus / name, d / "bad" / name)
        (bad if expect != "ok" else good).append(f"bad/{name}")
    return d, sorted(good), sorted(bad)


def _rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _run(folder, out, clf, seg, *extra):
    return main(["run", str(folder), "--classifier", str(clf), "--segmenter", str(seg), "--out", str(out),
                 "--batch-size", "4", *extra])


def test_run_on_mixed_folder(mixed_folder, light_bundle, seg_model, tmp_path):
    folder, good, bad = mixed_folder
    out = tmp_path / "run"
    assert _run(folder, out, light_bundle, seg_model, "--lung-model", str(seg_model)) == 1  # some inputs failed
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


def test_out_of_another_run_is_refused(light_bundle, seg_model, tmp_path, capsys):
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
