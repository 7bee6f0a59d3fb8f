"""Slow, not in CI (`make test-slow`): train on ../shared/data/cxr with a patient-level split
and evaluate on its held-out test split. Prints the metrics for the issue note."""

from __future__ import annotations

import json
import os
import time

import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow


def test_train_and_evaluate_on_real_xrays(shared_cxr, tmp_path, capsys):
    size = int(os.environ.get("CXR_SLOW_SIZE", "128"))
    epochs = int(os.environ.get("CXR_SLOW_EPOCHS", "8"))
    members = os.environ.get("CXR_SLOW_MEMBERS", "efficientnetb0")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'members = {json.dumps(members.split(","))}\nimage_size = {size}\nepochs = {epochs}\n'
                   'batch_size = 16\nweights = "none"\nfreeze_fraction = 0.0\nlearning_rate = 0.001\n')
    t0 = time.perf_counter()
    assert main(["train-classifier", "--data", str(shared_cxr), "--out", str(tmp_path / "m"), "--config", str(cfg)]) == 0
    t_train = time.perf_counter() - t0
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(shared_cxr),
                 "--splits", str(tmp_path / "m" / "splits.csv"), "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    with capsys.disabled():
        print(f"\n[slow] {members} {size}px {epochs} epochs, weights=None: train {t_train:.0f} s")
        print(f"[slow] test accuracy {metrics['accuracy']['value']:.3f} CI {metrics['accuracy']['ci95']}, "
              f"macro AUC {metrics['macro']['auc']['value']}")
        for src, m in metrics.get("per_source", {}).items():
            print(f"[slow] source {src}: accuracy {m['accuracy']['value']:.3f} (n = {m['n']})")
    assert metrics["n"] >= 30
    assert 0.0 <= metrics["accuracy"]["value"] <= 1.0
