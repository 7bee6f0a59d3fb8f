"""Grad-CAM golden values, negative evidence, and closed form vs autograd on the real members."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from gradcam.cam import cam_from_gradients, closed_form_cam, fuse_maps, member_heatmaps, normalise_maps
from gradcam.gradients import feature_gradients


def one_conv_model():
    """x (4×4×1) → 1×1 ReLU conv, filters [+1, −1] → GAP → dense [[1, −1], [0, 1]] (2 classes).

    For x ≥ 0: A_0 = x, A_1 = 0; logit_0 = mean(A_0), logit_1 = −mean(A_0) + mean(A_1).
    """
    inp = keras.Input((4, 4, 1))
    a = keras.layers.Conv2D(2, 1, use_bias=False, activation="relu", name="conv")(inp)
    p = keras.layers.GlobalAveragePooling2D()(a)
    out = keras.layers.Dense(2, activation="softmax", name="head")(p)
    model = keras.Model(inp, out)
    model.get_layer("conv").set_weights([np.array([1.0, -1.0], np.float32).reshape(1, 1, 1, 2)])
    model.get_layer("head").set_weights([np.array([[1.0, -1.0], [0.0, 1.0]], np.float32), np.zeros(2, np.float32)])
    return model


X = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)  # values 0..15, all ≥ 0


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_golden_one_conv_model(method):
    model = one_conv_model()
    # Class 0 sees A_0 = x: its map is x / max(x). Class 1 has only negative evidence: zeros, no NaN.
    expect = {0: X[0, ..., 0] / 15.0, 1: np.zeros((4, 4), np.float32)}
    for c, want in expect.items():
        feats, grads = feature_gradients(model, X, feature_layer="conv", score_layer="head", class_index=np.array([c]))
        np.testing.assert_allclose(grads[0, ..., 0], 1.0 / 16 if c == 0 else -1.0 / 16, atol=1e-7)
        cam = cam_from_gradients(feats, grads, method)
        assert not np.isnan(cam).any()
        np.testing.assert_allclose(cam[0], want, atol=1e-6)
        kernel = model.get_layer("head").get_weights()[0]
        np.testing.assert_allclose(closed_form_cam(feats, kernel, np.array([c]), method)[0], want, atol=1e-6)


def test_normalise_all_zero_and_negative():
    out = normalise_maps(np.stack([np.zeros((3, 3)), -np.ones((3, 3)), np.eye(3) * 4]))
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[0], 0)  # was joined to the next check by `and` after a None: it never ran
    np.testing.assert_array_equal(out[1], 0)
    np.testing.assert_allclose(out[2], np.eye(3))


def test_fuse_uses_weights():
    a = np.zeros((1, 2, 2), np.float32)
    b = np.zeros((1, 2, 2), np.float32)
    a[0, 0, 0] = 1.0
    b[0, 1, 1] = 1.0
    fused = fuse_maps([a, b], [3, 1])
    np.testing.assert_allclose(fused[0], [[1.0, 0.0], [0.0, 1 / 3]], atol=1e-6)
    with pytest.raises(ValueError):
        fuse_maps([a, b], [1])


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_closed_form_equals_autograd_on_every_member(trained_bundle, method):
    _, result = trained_bundle
    clf = result.classifier
    x = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    pred = clf.predict(x)
    cls = pred.probs.argmax(axis=1)
    heads = clf.head_weights()
    for m in clf.members:
        feats, grads = feature_gradients(clf.model, x, feature_layer=f"{m}_features", score_layer=f"{m}_head",
                                         class_index=cls)
        np.testing.assert_allclose(feats, pred.features[m], rtol=1e-4, atol=1e-4)
        auto = cam_from_gradients(feats, grads, method)
        closed = closed_form_cam(pred.features[m], heads[m][0], cls, method)
        np.testing.assert_allclose(auto, closed, atol=2e-4)
    maps, fused = member_heatmaps(pred.features, heads, cls, member_weights=clf.member_weights, size=64, method=method)
    assert set(maps) == set(clf.members) and fused.shape == (3, 64, 64)
    assert fused.min() >= 0.0 and fused.max() <= 1.0 and not np.isnan(fused).any()


def test_overlays_in_row_blocks_equal_the_whole_image_formula():
    """overlay/mask_overlay blend in blocks of rows (memory); the result is the plain formula's."""
    import cv2

    from gradcam import masks

    rng = np.random.default_rng(0)
    h, w = masks._ROWS * 2 + 37, 50  # more than two blocks, the last one short
    image = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)
    heat = rng.uniform(0, 1, (h, w)).astype(np.float32)
    weight = 0.4 * heat[..., None]
    expected = np.clip(image * (1 - weight) + masks.colorize(heat).astype(np.float32) * weight, 0, 255)
    np.testing.assert_array_equal(masks.overlay(image, heat), expected.round().astype(np.uint8))
    mask = heat > 0.7
    tinted = image.copy()
    tinted[mask] = tinted[mask] * (1 - 0.45) + np.float32(255 * 0.45) * np.array([1, 0, 0], np.float32)
    expected = tinted.round().astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(expected, contours, -1, (255, 0, 0), 1)
    np.testing.assert_array_equal(masks.mask_overlay(image, mask), expected)
