"""Session-wide tiny models and data for the stage-1 tests (built once: DenseNet is slow to build)."""

from __future__ import annotations

from pathlib import Path

import keras
import pytest
from fakes import png_bytes, xray_like

from data import spec
from data.datasets import load_records


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory) -> Path:
    """3 classes × 4 images, 80×72 px, with a class-dependent bright blob so there is signal."""
    root = tmp_path_factory.mktemp("tiny")
    for ci, label in enumerate(spec.CLASS_NAMES):
        (root / label).mkdir()
        for i in range(4):
            img = xray_like(80, 72, seed=100 * ci + i)
            img[10 + 20 * ci : 25 + 20 * ci, 20:50] = 250
            (root / label / f"{label}_{i}.png").write_bytes(png_bytes(img))
    return root


@pytest.fixture(scope="session")
def tiny_records(tiny_tree):
    return load_records(tiny_tree)


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, tiny_records):
    """One eager epoch of the full three-member soft-vote ensemble at 64 px, saved."""
    from ensemble.train import ClassifierSettings, train_classifier

    keras.utils.set_random_seed(0)
    out = tmp_path_factory.mktemp("clf")
    settings = ClassifierSettings(image_size=64, weights=None, epochs=1, batch_size=4, run_eagerly=True,
                                  freeze_fraction=0.3, augment=True)
    train = tiny_records[::2] + tiny_records[1::4]
    val = tiny_records[3::4]
    result = train_classifier(settings, train, val, out, verbose=0)
    return out, result
