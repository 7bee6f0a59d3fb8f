"""ONNX engine: export next to the bundle, checked against Keras, reused by hash; `cxr export`; `cxr run --engine onnx`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the ONNX engine needs onnxruntime (pip install -e .)")

from data.export import ONNX_FILE, ONNX_RECORD, select_engine  # noqa: E402
from ensemble.classifier import load_classifier  # noqa: E402
from pipeline.cli import main  # noqa: E402
from segmenter.train import load_segmenter  # noqa: E402


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, light_bundle, seg_model):
    d = tmp_path_factory.mktemp("export")
    shutil.copytree(light_bundle, d / "clf")
    shutil.copytree(seg_model, d / "seg")
    return d / "clf", d / "seg"


def test_classifier_on_onnx_matches_keras_and_reuses_the_export(bundles):
    clf = load_classifier(bundles[0])
    x = np.random.default_rng(3).uniform(0, 255, (5, clf.image_size, clf.image_size, 3)).astype(np.float32)
    ref = clf.predict(x)
    clf.use_engine("onnx")
    assert clf.engine == "onnx" and (bundles[0] / ONNX_FILE).is_file()
    record = json.loads((bundles[0] / ONNX_RECORD).read_text())
    assert record["max_abs_diff"] <= 1e-4 and record["source_sha256"] == clf.checkpoint_sha256
    got = clf.predict(x)  # batch of 5: no padding needed on ONNX Runtime
    np.testing.assert_allclose(got.probs, ref.probs, atol=1e-5)
    for m in clf.members:
        np.testing.assert_allclose(got.features[m], ref.features[m], atol=1e-4)
    mtime = (bundles[0] / ONNX_FILE).stat().st_mtime_ns
    load_classifier(bundles[0]).use_engine("onnx")
    assert (bundles[0] / ONNX_FILE).stat().st_mtime_ns == mtime  # reused, not exported again


def test_a_changed_export_is_redone(bundles):
    clf = load_classifier(bundles[0])
    clf.use_engine("onnx")
    (bundles[0] / ONNX_FILE).write_bytes(b"not the exported graph")
    clf.use_engine("onnx")  # sha256 no longer matches the record: exported again
    x = np.full((1, clf.image_size, clf.image_size, 3), 100.0, np.float32)
    np.testing.assert_allclose(clf.predict(x).probs, clf.predict(x).probs)
    assert (bundles[0] / ONNX_FILE).read_bytes() != b"not the exported graph"


def test_unknown_engine_is_refused(bundles):
    with pytest.raises(ValueError, match="valid: keras, onnx"):
        select_engine("tensorrt", bundles[0], None, image_size=64)


def test_cli_export_and_run_on_onnx_agree_with_keras(bundles, tmp_path):
    from fakes import png_bytes, xray_like

    clf, seg = bundles
    assert main(["export", "--model", str(seg), "--format", "onnx"]) == 0
    assert (seg / ONNX_FILE).is_file()
    keras_seg, onnx_seg = load_segmenter(seg), load_segmenter(seg)
    onnx_seg.use_engine("onnx")  # reuses the export just written
    x = np.random.default_rng(4).uniform(0, 255, (3, keras_seg.image_size, keras_seg.image_size, 3)).astype(np.float32)
    np.testing.assert_allclose(onnx_seg.predict(x), keras_seg.predict(x), atol=1e-4)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"g{i}.png").write_bytes(png_bytes(xray_like(90, 80, seed=500 + i)))
    rows = {}
    for engine in ("keras", "onnx"):
        out = tmp_path / engine
        assert main(["run", str(folder), "--classifier", str(clf), "--segmenter", str(seg), "--out", str(out),
                     "--segment-all", "--engine", engine]) == 0
        rows[engine] = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for a, b in zip(sorted(rows["keras"], key=lambda r: r["file"]), sorted(rows["onnx"], key=lambda r: r["file"])):
        assert a["file"] == b["file"] and a["label"] == b["label"]
        assert abs(a["p_covid"] - b["p_covid"]) < 1e-4 and abs(a["p_normal"] - b["p_normal"]) < 1e-4
        assert abs(a["lesion_area_px"] - b["lesion_area_px"]) <= 0.01 * max(a["lesion_area_px"], 100)
