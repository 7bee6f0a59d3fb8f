"""ONNX engine: export next to the bundle, checked against Keras, reused by hash; `cxr export`;
`cxr run --engine onnx`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the ONNX engine needs onnxruntime (pip install -e .)")

from data.runtime.engines import ONNX_FILE, ONNX_RECORD, select_engine  # noqa: E402
from ensemble.classifier import load_classifier  # noqa: E402
from pipeline.cli import main  # noqa: E402
from segmenter.model import load_segmenter  # noqa: E402


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
    clf.use_engine("onnx")  # chosen again: the record and both hashes are read anew
    assert (bundles[0] / ONNX_FILE).stat().st_mtime_ns == mtime  # reused, not exported again


def test_unknown_engine_is_refused(bundles):
    with pytest.raises(ValueError, match="valid: keras, onnx, onnx-int8"):
        select_engine("tensorrt", bundles[0], None, image_size=64)


def test_cli_export_run_and_evaluate_on_onnx_agree_with_keras(bundles, seg_data, tmp_path):
    from fakes import png_bytes, xray_like

    clf, seg = bundles
    assert main(["export", "--model", str(seg), "--format", "onnx"]) == 0
    assert (seg / ONNX_FILE).is_file()
    dice = {}
    for engine in ("keras", "onnx"):
        assert main(["evaluate-segmenter", "--model", str(seg), "--images", str(seg_data / "images"), "--masks",
                     str(seg_data / "masks"), "--kind", "lesion", "--out", str(tmp_path / f"ev_{engine}"),
                     "--bootstrap", "0", "--engine", engine]) == 0
        m = json.loads((tmp_path / f"ev_{engine}" / "metrics.json").read_text())
        assert m["model"]["engine"] == engine
        dice[engine] = m["dice"]["value"]
    assert abs(dice["onnx"] - dice["keras"]) < 1e-3
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


def _xray_folder(folder, n, seed):
    from fakes import png_bytes, xray_like

    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"c{i}.png").write_bytes(png_bytes(xray_like(80, 72, seed=seed + i)))
    return folder


def test_int8_export_is_close_to_float_and_refused_when_stale(bundles, tmp_path, capsys):
    from data.runtime.bundle import BundleError
    from data.runtime.engines import INT8_FILE, INT8_RECORD
    from data.stream import stream_images

    clf = bundles[0]
    assert main(["export", "--model", str(clf), "--format", "onnx-int8"]) == 2  # no calibration images
    assert "--calibration" in capsys.readouterr().err
    flt, q = load_classifier(clf), load_classifier(clf)  # the engine is chosen (and checked) at each use_engine
    with pytest.raises(BundleError, match="no int8 export"):
        q.use_engine("onnx-int8")
    cal = _xray_folder(tmp_path / "cal", 6, seed=700)
    assert main(["export", "--model", str(clf), "--format", "onnx-int8", "--calibration", str(cal),
                 "--calibration-count", "3"]) == 0
    record = json.loads((clf / INT8_RECORD).read_text())
    assert record["calibration_images"] == 3 and len(record["calibration_files"]) == 3
    assert (clf / INT8_FILE).stat().st_size < 0.5 * (clf / ONNX_FILE).stat().st_size  # int8 weights
    flt.use_engine("onnx")
    q.use_engine("onnx-int8")
    assert q.engine == "onnx-int8"
    x = next(iter(stream_images(sorted(cal.iterdir()), size=flt.image_size, batch_size=6))).x
    a, b = flt.predict(x), q.predict(x)
    np.testing.assert_allclose(b.probs, a.probs, atol=0.05)
    for m in flt.members:  # the CAM inputs survive quantisation
        f, g = a.features[m], b.features[m]
        assert np.linalg.norm(g - f) <= 0.2 * np.linalg.norm(f)
    record["source_sha256"] = "0" * 64  # as if model.keras had been retrained since
    (clf / INT8_RECORD).write_text(json.dumps(record))
    with pytest.raises(BundleError, match="--format onnx-int8 --calibration"):
        q.use_engine("onnx-int8")


def test_calibration_uses_only_the_bundles_training_split(tmp_path):
    from data.datasets import DatasetError
    from pipeline.export_jobs import calibration_files

    images = _xray_folder(tmp_path / "imgs" / "covid", 6, seed=800).parent
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert len(calibration_files(bundle, images, 4)) == 4  # no splits.csv: any image of the folder
    rows = [f"covid/c{i}.png,{'train' if i < 3 else 'test'}" for i in range(6)]
    (bundle / "splits.csv").write_text("file,split\n" + "\n".join(rows) + "\n")
    assert [p.name for p in calibration_files(bundle, images, 10)] == ["c0.png", "c1.png", "c2.png"]
    (bundle / "splits.csv").write_text("file,split\n" + "\n".join(r.replace("train", "val") for r in rows) + "\n")
    with pytest.raises(DatasetError, match="none of its images is in the training split"):
        calibration_files(bundle, images, 10)
