"""Preprocessing keeps the pixel contract for any input, never mutates it, and inverts its geometry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from data import spec
from data.preprocess import fit_geometry, preprocess_image, preprocess_mask, to_rgb_float

shapes = st.tuples(st.integers(1, 70), st.integers(1, 70), st.sampled_from([None, 1, 3, 4]))


@st.composite
def images(draw):
    h, w, c = draw(shapes)
    dtype = draw(st.sampled_from([np.uint8, np.uint16]))
    shape = (h, w) if c is None else (h, w, c)
    return draw(arrays(dtype, shape))


@settings(max_examples=60, deadline=None)
@given(image=images(), size=st.sampled_from([16, 33, 64]), mode=st.sampled_from(spec.RESIZE_MODES), clahe=st.booleans())
def test_any_image_meets_the_contract(image, size, mode, clahe):
    before = image.copy()
    out, geo = preprocess_image(image, size=size, mode=mode, clahe=clahe)
    assert out.shape == (size, size, spec.CHANNELS)
    assert out.dtype == np.float32
    assert out.min() >= spec.PIXEL_MIN and out.max() <= spec.PIXEL_MAX
    np.testing.assert_array_equal(image, before)  # never mutated
    assert (geo.orig_h, geo.orig_w) == image.shape[:2]


@settings(max_examples=40, deadline=None)
@given(h=st.integers(2, 300), w=st.integers(2, 300), size=st.sampled_from([32, 64, 224]))
def test_pad_geometry_keeps_aspect_and_centres(h, w, size):
    g = fit_geometry(h, w, size, "pad")
    scale = size / max(h, w)
    assert max(g.content_h, g.content_w) == size
    assert abs(g.content_h - h * scale) <= 0.5 + 1e-9 or g.content_h == 1
    assert abs(g.content_w - w * scale) <= 0.5 + 1e-9 or g.content_w == 1
    assert 0 <= g.top <= size - g.content_h and 0 <= g.left <= size - g.content_w
    assert abs((size - g.content_h) - 2 * g.top) <= 1 and abs((size - g.content_w) - 2 * g.left) <= 1


def test_uint16_scales_to_255():
    img = np.array([[0, 65535]], dtype=np.uint16)
    np.testing.assert_allclose(to_rgb_float(img)[0, :, 0], [0.0, 255.0])


def test_to_original_inverts_padding():
    img = np.zeros((100, 50), np.uint8)
    img[:, :] = 200
    out, geo = preprocess_image(img, size=64, mode="pad")
    assert out[:, :10].max() == 0  # padded columns
    back = geo.to_original(out[..., 0])
    assert back.shape == (100, 50)
    np.testing.assert_allclose(back, 200.0, atol=1e-3)


def test_mask_follows_image_geometry():
    mask = np.zeros((100, 50), bool)
    mask[10:30, 5:20] = True
    _, geo = preprocess_image(np.zeros((100, 50), np.uint8), size=64, mode="pad")
    m = preprocess_mask(mask, geo)
    assert set(np.unique(m)) <= {0.0, 1.0}
    back = geo.to_original(m, interpolation="nearest") > 0.5
    # A 100→64 px round trip moves edges by at most a pixel: IoU stays high.
    assert (back & mask).sum() / (back | mask).sum() > 0.8


def test_mask_size_mismatch_is_an_error():
    _, geo = preprocess_image(np.zeros((100, 50), np.uint8), size=64)
    with pytest.raises(ValueError, match="does not match image size 50x100"):
        preprocess_mask(np.zeros((10, 10), bool), geo)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4, 2), np.uint8), "expected an"),
        (np.zeros((4, 4, 3, 1), np.uint8), "expected an"),
        (np.zeros((4, 4), np.int64), "unsupported pixel dtype"),
    ],
)
def test_bad_arrays_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_float(bad)


@pytest.mark.parametrize("mode, size", [("squash", 64), ("pad", 0)])
def test_bad_geometry_arguments(mode, size):
    with pytest.raises(ValueError):
        fit_geometry(10, 10, size, mode)
