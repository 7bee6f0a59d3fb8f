"""Fits on one device and on two (MirroredStrategy over two logical CPU devices) in one fresh
process, for tests/data/test_distribute.py: the logical devices must exist before TensorFlow
starts, which a pytest process that already ran TensorFlow cannot do.

Usage: python -P distribute_check.py OUT [TINY_TREE]. Writes OUT/losses.json: the per-epoch
training and validation losses of a small BatchNorm CNN fitted by data.runtime.training.fit_best
with the same global batch on one device and on two. With TINY_TREE (a class-folder tree), also
trains a one-member classifier there with distribute = "mirrored", replicas = 2, into OUT/bundle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def fit_small_cnn(out: Path, distribute: str) -> dict[str, list[float]]:
    import keras
    import tensorflow as tf

    from data.runtime.distribute import distribution_scope, start_distribution, synchronized_batchnorm
    from data.runtime.training import FitRecipe, fit_best

    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 16, 16, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 48), 3)
    train = tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(8)
    val = tf.data.Dataset.from_tensor_slices((x[32:], y[32:])).batch(8)
    recipe = FitRecipe(optimizer="adam", learning_rate=1e-2, lr_schedule="cosine", epochs=3, batch_size=8)
    (out / distribute).mkdir(parents=True, exist_ok=True)
    dist = start_distribution(distribute, replicas=2 if distribute != "none" else 0, global_batch=8)
    with distribution_scope(dist):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3),
                                  keras.layers.BatchNormalization(), keras.layers.ReLU(),
                                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])
        with synchronized_batchnorm(model, dist) as n_sync:
            fitted = fit_best(model, train, val, recipe=recipe, n_train=32, loss="categorical_crossentropy",
                              metrics=["accuracy"], out_dir=out / distribute, verbose=0)
    return {"loss": fitted.history["loss"], "val_loss": fitted.history["val_loss"], "synchronized": n_sync,
            "replicas": dist.replicas if dist else 1}


def main(out: str, tree: str | None = None) -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    out_dir = Path(out)
    results = {name: fit_small_cnn(out_dir, name) for name in ("none", "mirrored")}
    (out_dir / "losses.json").write_text(json.dumps(results, indent=2))
    if tree:
        from data.datasets import load_records
        from ensemble.train import ClassifierSettings, train_classifier

        records = load_records(tree)
        settings = ClassifierSettings(members=("efficientnetb0",), image_size=64, weights=None, epochs=1, batch_size=2,
                                      distribute="mirrored", replicas=2)
        train_classifier(settings, records[::2] + records[1::4], records[3::4], out_dir / "bundle", verbose=0)


if __name__ == "__main__":
    main(*sys.argv[1:])
