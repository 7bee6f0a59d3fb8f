"""The autograd path on the other Keras backends, each in a fresh process (the backend is fixed at import).

Skipped, with the reason, where a backend's framework is not installed (CI installs TensorFlow only).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import numpy as np, keras
    from gradcam.cam import cam_from_gradients, closed_form_cam
    from gradcam.gradients import feature_gradients
    assert keras.backend.backend() == BACKEND, keras.backend.backend()
    inp = keras.Input((4, 4, 1))
    a = keras.layers.Conv2D(2, 1, use_bias=False, activation="relu", name="conv")(inp)
    out = keras.layers.Dense(2, activation="softmax", name="head")(keras.layers.GlobalAveragePooling2D()(a))
    model = keras.Model(inp, out)
    model.get_layer("conv").set_weights([np.array([1.0, -1.0], np.float32).reshape(1, 1, 1, 2)])
    model.get_layer("head").set_weights([np.array([[1.0, -1.0], [0.0, 1.0]], np.float32), np.zeros(2, np.float32)])
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    for c, want in ((0, x[0, ..., 0] / 15.0), (1, np.zeros((4, 4), np.float32))):
        feats, grads = feature_gradients(model, x, feature_layer="conv", score_layer="head", class_index=np.array([c]))
        for method in ("gradcam", "gradcam++"):
            np.testing.assert_allclose(cam_from_gradients(feats, grads, method)[0], want, atol=1e-6)
    print("ok", BACKEND)
""")


@pytest.mark.parametrize("backend, module", [("torch", "torch"), ("jax", "jax")])
def test_autograd_path_on_backend(backend, module):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed; install it to check the {backend} Grad-CAM path")
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", f"BACKEND = {backend!r}\n" + SCRIPT], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ok {backend}" in proc.stdout
