"""Training on the PyTorch backend: the production trainers, fed by the backend-neutral stream
(data.batches.RecordBatches), in a fresh process (the backend is fixed at import).

Skipped, with the reason, where torch is not installed (CI installs TensorFlow only)."""

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
    import json, sys, numpy as np, keras
    from pathlib import Path
    from data.datasets import load_records, pair_masks
    from ensemble.train import ClassifierSettings, train_classifier, with_preset
    from segmenter.settings import SegmenterSettings
    from segmenter.train import train_segmenter
    assert keras.backend.backend() == "torch"
    tree, masks, out = map(Path, sys.argv[1:4])
    recs = load_records(tree)
    s = ClassifierSettings(**with_preset({"weights": "none", "members": ["efficientnetb0", "densenet121"],
                                          "image_size": 64, "epochs": 2, "batch_size": 4}))
    res = train_classifier(s, recs[::2] + recs[1::4], recs[3::4], out / "clf", verbose=0)
    p = res.classifier.predict(np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32))
    assert np.allclose(p.probs.sum(1), 1, atol=1e-5) and set(p.features) == {"efficientnetb0", "densenet121"}
    assert res.validation["bn_reestimate_batches"] > 0 and sum(res.validation["member_weights"]) > 0.99
    seg = SegmenterSettings(arch="unet-densenet121", weights=None, kind="lesion", classes="lung-lesion",
                            lung_kind="lesion", loss="cce_dice", image_size=64, epochs=1, batch_size=2)
    srecs = pair_masks(load_records(masks.parent / "images"), masks)
    sres = train_segmenter(seg, srecs[:6], srecs[6:], out / "seg", verbose=0)
    assert sres.segmenter.predict(np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 64, 64)
    print("ok torch", json.dumps(res.validation["member_accuracy"]))
""")


def test_both_trainers_run_on_the_torch_backend(tiny_tree, seg_data, tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed; install it to check training on the PyTorch backend")
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_tree), str(seg_data / "masks"), str(tmp_path)],
                          env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok torch" in proc.stdout
