"""Members and ensemble builders at 64×64 with weights=None."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from data import spec
from ensemble.ensemble import build_ensemble, head_weights, parse_members
from ensemble.members import MEMBERS, WeightsError, build_member, freeze_early_layers, resolve_weights


@pytest.mark.parametrize("name", list(MEMBERS))
def test_member_outputs_and_probabilities(name):
    keras.utils.set_random_seed(0)
    m = build_member(name, input_shape=(64, 64, 3))
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    out = m(x, training=False)  # eager: tracing predict_on_batch's graph costs seconds more per model
    probs = np.asarray(out[f"{name}_probs"])
    assert probs.shape == (2, spec.NUM_CLASSES)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    feats = np.asarray(out[f"{name}_features"])
    assert feats.ndim == 4 and feats.shape[0] == 2 and min(feats.shape[1:3]) >= 2


def test_preprocessing_matches_keras_applications():
    x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    torch_layer = MEMBERS["densenet121"].preprocessing("t")
    caffe_layer = MEMBERS["vgg19"].preprocessing("c")
    np.testing.assert_allclose(np.asarray(torch_layer(x)), keras.applications.densenet.preprocess_input(x.copy()),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(caffe_layer(x)), keras.applications.vgg19.preprocess_input(x.copy()),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"members": "resnet50"}, "valid members: densenet121, efficientnetb0, vgg19"),
        ({"members": "vgg19,vgg19"}, "duplicate"),
        ({"members": ""}, "no members"),
        ({"variant": "majority"}, "unknown variant"),
        ({"input_shape": (48, 48, 3)}, "multiple of 32"),
        ({"input_shape": (96, 64, 3)}, "square"),
        ({"input_shape": (64, 64, 1)}, "input_shape must be"),
        ({"member_weights": [1.0]}, "1 member weights for 3 members"),
        ({"variant": "concat", "member_weights": [1, 1, 1]}, "softvote variant only"),
    ],
)
def test_bad_ensemble_arguments(kwargs, message):
    args = {"members": "densenet121,efficientnetb0,vgg19", "input_shape": (64, 64, 3), **kwargs}
    with pytest.raises(ValueError, match=message):
        build_ensemble(**args)


def test_resolve_weights(tmp_path):
    assert resolve_weights("vgg19", None) is None and resolve_weights("vgg19", "none") is None
    assert resolve_weights("vgg19", "imagenet") == "imagenet"
    with pytest.raises(WeightsError, match="vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"):
        resolve_weights("vgg19", tmp_path)
    (tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"x")
    assert resolve_weights("vgg19", tmp_path).endswith("_notop.h5")


def test_local_weights_file_is_loaded(tmp_path):
    keras.utils.set_random_seed(0)
    src = keras.applications.VGG19(include_top=False, weights=None, input_shape=(64, 64, 3))
    # The legacy HDF5 layout of the files Keras downloads (keras-applications *_notop.h5).
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    with h5py.File(tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "w") as f:
        save_weights_to_hdf5_group(f, src)
    m = build_member("vgg19", input_shape=(64, 64, 3), weights=tmp_path)
    got = m.get_layer("vgg19_backbone").get_layer("block1_conv1").get_weights()[0]
    np.testing.assert_array_equal(got, src.get_layer("block1_conv1").get_weights()[0])


def test_vgg19_from_scratch_keeps_its_activations_scale():
    """He-drawn convs (with the caffe pixels' units taken out at the first) keep every layer's output
    at the first's scale; keras.applications' Glorot draw shrinks the last conv maps ~500x on X-rays."""
    keras.utils.set_random_seed(0)
    m = build_member("vgg19", input_shape=(64, 64, 3))
    backbone = m.get_layer("vgg19_backbone")
    convs = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Conv2D)]
    probe = keras.Model(backbone.input, [convs[0].output, convs[-1].output])
    rng = np.random.default_rng(0)
    # smooth images with an X-ray's grey-level spread (std ~60 of 255): noise would be averaged away
    x = np.repeat(rng.normal(128, 60, (4, 8, 8, 1)).clip(0, 255), 8, axis=1).repeat(8, axis=2)
    first, last = probe(m.get_layer("vgg19_preprocess")(np.repeat(x, 3, axis=3).astype(np.float32)))
    ratio = float(np.std(last)) / float(np.std(first))
    assert 0.2 < ratio < 5, ratio
    assert 0.1 < float(np.std(first)) < 10  # the pixels' 0-255 units are taken out
    keras.utils.set_random_seed(0)
    again = build_member("vgg19", input_shape=(64, 64, 3))
    np.testing.assert_array_equal(again.get_layer("vgg19_backbone").get_layer("block5_conv4").get_weights()[0],
                                  backbone.get_layer("block5_conv4").get_weights()[0])


def test_freeze_fraction():
    bb = keras.applications.VGG19(include_top=False, weights=None, input_shape=(64, 64, 3))
    n = freeze_early_layers(bb, 0.5)
    assert n == round(len(bb.layers) * 0.5)
    assert not any(layer.trainable for layer in bb.layers[:n]) and all(layer.trainable for layer in bb.layers[n:])
    with pytest.raises(ValueError):
        freeze_early_layers(bb, 1.5)


@pytest.mark.parametrize("variant", ["softvote", "concat"])
def test_ensemble_single_member_and_variants(variant):
    keras.utils.set_random_seed(0)
    model = build_ensemble("efficientnetb0", variant=variant, input_shape=(64, 64, 3))
    out = model(np.full((3, 64, 64, 3), 128.0, np.float32), training=False)
    assert np.asarray(out["probs"]).shape == (3, 3)
    np.testing.assert_allclose(np.asarray(out["probs"]).sum(1), 1.0, atol=1e-5)
    kernel, bias = head_weights(model, ["efficientnetb0"], variant)["efficientnetb0"]
    assert kernel.shape == (1280, 3) and bias.shape == (3,)


def test_softvote_is_weighted_mean_of_members():
    keras.utils.set_random_seed(0)
    model = build_ensemble("efficientnetb0,vgg19", member_weights=[3, 1], input_shape=(64, 64, 3))
    out = model(np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32), training=False)
    expect = 0.75 * np.asarray(out["efficientnetb0_probs"]) + 0.25 * np.asarray(out["vgg19_probs"])
    np.testing.assert_allclose(np.asarray(out["probs"]), expect, atol=1e-6)


def test_parse_members_keeps_order():
    assert parse_members("VGG19, densenet121") == ("vgg19", "densenet121")


def test_failed_imagenet_download_is_a_weights_error_with_the_fix(monkeypatch):
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(WeightsError, match=r"efficientnetb0.*~/.keras/models/.*weights='none'"):
        build_member("efficientnetb0", weights="imagenet", input_shape=(64, 64, 3))
