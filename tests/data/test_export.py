"""data.runtime.engines on a tiny Keras model: an export is cached next to the model, reused while
both hashes match, redone otherwise."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the ONNX engine needs onnxruntime (pip install -e .)")

import keras  # noqa: E402

from data.runtime.engines import ONNX_FILE, ONNX_RECORD, ExportError, ensure_onnx, export_onnx  # noqa: E402


def _tiny_model():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3), name="image")
    scaled = keras.layers.Rescaling(1 / 255)(inp)  # pixels in 0..255 like the bundles' models take them
    conv = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(scaled)
    pooled = keras.layers.GlobalAveragePooling2D()(conv)
    probs = keras.layers.Dense(3, activation="softmax", name="probs")(pooled)
    return keras.Model(inp, {"probs": probs, "conv": conv})


def test_export_is_reused_while_hashes_match_and_redone_otherwise(tmp_path):
    model = _tiny_model()
    (tmp_path / "model.keras").write_bytes(b"stand-in for the weights file")  # only its sha256 is read
    x = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
    ref = model.predict_on_batch(x)
    fwd = ensure_onnx(tmp_path, model, image_size=16)
    got = fwd(x)
    for k in ("probs", "conv"):
        np.testing.assert_allclose(got[k], np.asarray(ref[k]), rtol=1e-5, atol=1e-5)
    record = json.loads((tmp_path / ONNX_RECORD).read_text())
    assert record["max_abs_diff"] <= 1e-4
    mtime = (tmp_path / ONNX_FILE).stat().st_mtime_ns
    ensure_onnx(tmp_path, model, image_size=16)
    assert (tmp_path / ONNX_FILE).stat().st_mtime_ns == mtime  # reused
    (tmp_path / ONNX_FILE).write_bytes(b"not the exported graph")
    np.testing.assert_allclose(ensure_onnx(tmp_path, model, image_size=16)(x)["probs"], np.asarray(ref["probs"]),
                               atol=1e-5)  # onnx sha256 no longer matches the record: exported again
    mtime = (tmp_path / ONNX_FILE).stat().st_mtime_ns
    (tmp_path / "model.keras").write_bytes(b"retrained weights")
    ensure_onnx(tmp_path, model, image_size=16)
    assert (tmp_path / ONNX_FILE).stat().st_mtime_ns != mtime  # the source changed: exported again


def test_export_that_differs_from_keras_is_refused_and_writes_nothing(tmp_path):
    model = _tiny_model()
    x = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    with pytest.raises(ExportError, match="differ from Keras"):
        export_onnx(model, tmp_path / ONNX_FILE, sample=x, atol=-1.0)  # no difference passes a negative bound
    assert list(tmp_path.iterdir()) == []
