"""Segmenter architectures: golden sizes, shapes, bad sizes, and a training step that lowers the loss."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from segmenter.losses import get_loss
from segmenter.tiramisu import build_fc_densenet103
from segmenter.unet import build_unet


@pytest.mark.parametrize("encoder, params", [
    ("densenet121", 12_144_977),  # segmentation-models Unet('densenet121', classes=1): encoder 7,037,504 + decoder
    ("mobilenetv2", 8_047_441),  # Unet('mobilenetv2', classes=1): encoder 2,257,984 + the same decoder layout
])
def test_unet_has_segmentation_models_parameter_count(encoder, params):
    model = build_unet(input_size=64, num_classes=1, encoder=encoder)
    assert model.count_params() == params
    assert model.output.shape[1:] == (64, 64, 1)


def test_unknown_encoder_lists_the_valid_ones():
    with pytest.raises(ValueError, match="densenet121, mobilenetv2"):
        build_unet(input_size=64, encoder="resnet50")


def test_fc_densenet103_matches_the_paper():
    model = build_fc_densenet103(input_size=64, num_classes=1)
    convs = [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
    assert len(convs) == 103  # the "one hundred layers" (Jégou et al. 2017, Table 2)
    assert 9.3e6 < model.count_params() < 9.5e6  # published: 9.4 M
    assert model.output.shape[1:] == (64, 64, 1)


@pytest.mark.parametrize("builder", [build_unet, build_fc_densenet103])
@pytest.mark.parametrize("size", [48, 100, 0])
def test_bad_sizes_are_refused(builder, size):
    with pytest.raises(ValueError, match="not supported"):
        builder(input_size=size)


def test_multiclass_head_is_softmax():
    model = build_unet(input_size=64, num_classes=3)
    out = np.asarray(model(np.full((1, 64, 64, 3), 100.0, np.float32), training=False))  # eager: no graph to trace
    assert out.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("builder", [build_unet, build_fc_densenet103])
def test_training_steps_reduce_loss_on_a_fixed_batch(builder):
    keras.utils.set_random_seed(0)
    model = builder(input_size=64, num_classes=1)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    y = np.zeros((2, 64, 64, 1), np.float32)
    y[:, 16:48, 16:48] = 1.0
    x[:, 16:48, 16:48] += 60.0  # the lesion is visible
    x = np.clip(x, 0, 255)
    model.compile(keras.optimizers.Adam(1e-3), loss=get_loss("bce_dice"), run_eagerly=True)
    first = float(model.train_on_batch(x, y))
    for _ in range(2):  # each eager step of FC-DenseNet103 takes seconds on 2 cores
        last = float(model.train_on_batch(x, y))
    assert np.isfinite(first) and last < first


def test_lung_lesion_targets_one_hot_with_lesion_winning():
    import numpy as np

    from segmenter.train import softmax_targets

    lung = np.array([[1, 1, 0, 0]], np.float32)
    lesion = np.array([[0, 1, 1, 0]], np.float32)  # one lesion pixel outside the lung
    _, y = softmax_targets(None, np.stack([lung, lesion], axis=-1)[None])
    y = np.asarray(y)[0]
    np.testing.assert_array_equal(y.sum(-1), 1.0)
    np.testing.assert_array_equal(y.argmax(-1), [[1, 2, 2, 0]])


def test_lesion_type_targets_consolidation_wins_and_match_on_tensorflow():
    import numpy as np
    import tensorflow as tf

    from segmenter.train import softmax_targets

    lung = np.array([[1, 1, 1, 1, 0]], np.float32)
    ggo = np.array([[0, 1, 1, 0, 0]], np.float32)
    cons = np.array([[0, 0, 1, 1, 1]], np.float32)  # overlaps ground glass once, leaves the lung once
    masks = np.stack([lung, ggo, cons], axis=-1)[None]
    _, y = softmax_targets(None, masks)
    np.testing.assert_array_equal(y[0].sum(-1), 1.0)
    np.testing.assert_array_equal(y[0].argmax(-1), [[1, 2, 3, 3, 3]])
    _, y_tf = softmax_targets(None, tf.constant(masks))  # tf.data's symbolic batches take the keras.ops path
    np.testing.assert_array_equal(np.asarray(y_tf), y)
