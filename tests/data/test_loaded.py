"""The forward pass of a loaded bundle (data.runtime.loaded): any batch size, one trace on TensorFlow."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from data.runtime.loaded import LoadedBundle


def _tiny_model(*, run_eagerly: bool = False) -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    model.run_eagerly = run_eagerly
    return model


def _bundle(model) -> LoadedBundle:
    return LoadedBundle(model=model, sidecar={"image_size": 16, "files": {}}, path=Path("unused"))


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_every_batch_size_gives_the_models_own_outputs(run_eagerly):
    model = _tiny_model(run_eagerly=run_eagerly)
    bundle = _bundle(model)
    x = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    for n in (3, 8, 5, 1):  # a remainder batch, a full one, stage 2's flagged few
        got = bundle.forward(x[:n])
        assert got.shape == (n, 2)
        np.testing.assert_allclose(got, np.asarray(model(x[:n])), rtol=1e-5, atol=1e-6)


def test_the_predict_step_is_traced_once_for_every_batch_size():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the open-batch trace is TensorFlow's; other backends pad batches to power-of-two sizes")
    model = _tiny_model()
    bundle = _bundle(model)
    x = np.zeros((8, 16, 16, 3), np.float32)
    for n in (8, 3, 5, 1):
        bundle.forward(x[:n])
    # Keras traces per shape (twice for these four sizes) unless traced open first; a Keras that
    # changes how predict_on_batch calls its step would trace again here
    assert model.predict_function.experimental_get_tracing_count() == 1
