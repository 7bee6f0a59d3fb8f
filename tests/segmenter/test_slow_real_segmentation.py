"""Slow, not in CI (`make test-slow`): train the U-Net on the 50 COVID infection masks and the
lung model on the 233 lung masks of ../shared/data, evaluate on held-out patients, print the figures."""

from __future__ import annotations

import json
import os
import time

import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["infection", "lung"])
def test_train_and_evaluate_segmenter_on_real_masks(shared_cxr, shared_masks, tmp_path, capsys, kind):
    size = int(os.environ.get("CXR_SLOW_SEG_SIZE", "128"))
    epochs = int(os.environ.get("CXR_SLOW_SEG_EPOCHS", "6"))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'arch = "unet-densenet121"\nimage_size = {size}\nepochs = {epochs}\nbatch_size = 8\n'
                   'weights = "none"\nlearning_rate = 0.001\n')
    t0 = time.perf_counter()
    assert main(["train-segmenter", "--images", str(shared_cxr), "--masks", str(shared_masks), "--kind", kind,
                 "--out", str(tmp_path / "m"), "--config", str(cfg)]) == 0
    t_train = time.perf_counter() - t0
    assert main(["evaluate-segmenter", "--model", str(tmp_path / "m"), "--images", str(shared_cxr),
                 "--masks", str(shared_masks), "--kind", kind, "--splits", str(tmp_path / "m" / "splits.csv"),
                 "--out", str(tmp_path / "e")]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    with capsys.disabled():
        print(f"\n[slow] {kind}: U-Net {size}px {epochs} epochs weights=None, train {t_train:.0f} s; test n={m['n']}: "
              f"Dice {m['dice']['value']:.3f} {m['dice']['ci95']}, IoU {m['iou']['value']:.3f} {m['iou']['ci95']}")
    assert m["n"] >= 3 and 0.0 <= m["dice"]["value"] <= 1.0
