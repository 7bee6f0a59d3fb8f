"""Training on several devices (data.runtime.distribute): MirroredStrategy over two logical CPU
devices gives the one-device loss curve for the same global batch; what cannot be set up is refused
with the reason. The two-device runs need a fresh process (tests/distribute_check.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.runtime.distribute import (
    Distribution,
    DistributionError,
    check_distribute,
    check_fit_sizes,
    start_distribution,
)
from pipeline.cli import main

HERE = Path(__file__).resolve().parents[1]
#: measured 2026-11-26: training losses agree to 2e-7, validation losses to 9e-5 (the moving
#: statistics of the synchronised BatchNorm are averaged across replicas in another order)
LOSS_TOLERANCE = 1e-3


def _check(out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, "-P", str(HERE / "distribute_check.py"), str(out), *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "losses.json").read_text())


def test_two_replicas_follow_the_one_device_loss_curve(tmp_path):
    runs = _check(tmp_path)
    one, two = runs["none"], runs["mirrored"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    assert two["synchronized"] == 1 and one["synchronized"] == 0
    assert len(one["loss"]) == len(two["loss"]) == 3
    assert one["loss"][0] > one["loss"][-1]  # it trained
    for key in ("loss", "val_loss"):
        assert two[key] == pytest.approx(one[key], abs=LOSS_TOLERANCE)


@pytest.mark.slow
def test_train_classifier_on_two_replicas_records_it_in_the_bundle(tmp_path, tiny_tree):
    """EfficientNetB0 in graph mode (about a minute on 2 cores): the bundle says how it was spread
    and is saved as plain BatchNorm, so it loads on any backend."""
    _check(tmp_path, str(tiny_tree))
    meta = json.loads((tmp_path / "bundle" / "model.json").read_text())["meta"]
    assert meta["distribute"] == {"strategy": "mirrored", "devices": ["/cpu:0", "/cpu:1"], "replicas": 2,
                                  "global_batch": 2, "per_replica_batch": 1, "learning_rate_scale": 1.0,
                                  "sync_batchnorm": True, "drop_remainder": True}
    import zipfile

    with zipfile.ZipFile(tmp_path / "bundle" / "model.keras") as bundle:
        assert '"synchronized": true' not in bundle.read("config.json").decode()


def test_what_cannot_be_spread_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="keras-team/keras#20585"):
        check_distribute("multiworker", 0)
    with pytest.raises(ValueError, match="unknown distribute 'ring'"):
        check_distribute("ring", 0)
    with pytest.raises(ValueError, match="replicas needs distribute = 'mirrored'"):
        check_distribute("none", 2)
    assert start_distribution("none", replicas=0, global_batch=8) is None
    two = Distribution("mirrored", ("/cpu:0", "/cpu:1"), global_batch=4, per_replica_batch=2)
    check_fit_sizes(two, n_train=4, n_val=4)
    with pytest.raises(DistributionError, match=r"validation split has 3 image\(s\), fewer than one global batch"):
        check_fit_sizes(two, n_train=40, n_val=3)
    with pytest.raises(DistributionError, match="no GPU here.*replicas = N"):
        start_distribution("mirrored", replicas=0, global_batch=8)
    # This process already runs TensorFlow on one CPU device: two logical ones cannot be added now.
    import tensorflow as tf

    tf.constant(1.0) + 1.0
    with pytest.raises(DistributionError, match="already started.*its own cxr command"):
        start_distribution("mirrored", replicas=2, global_batch=8)


def test_the_training_commands_refuse_multiworker_before_making_anything(tiny_tree, seg_data, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["train-classifier", "--data", str(tiny_tree), "--out", str(out), "--distribute", "multiworker"]) == 2
    assert "keras-team/keras#20585" in capsys.readouterr().err
    assert main(["train-segmenter", "--images", str(seg_data / "images"), "--masks", str(seg_data / "masks"),
                 "--kind", "lesion",
                 "--out", str(out), "--distribute", "mirrored"]) == 2
    assert "no GPU here" in capsys.readouterr().err
    assert not out.exists()
