"""Seeded augmentation repeats exactly and moves masks with their image."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.augment import AugmentParams, augment


def _image_and_mask(h=64, w=64):
    img = np.zeros((h, w, 3), np.float32)
    mask = np.zeros((h, w), np.uint8)
    img[20:40, 10:30] = 250.0  # a bright square and its mask in the same place
    mask[20:40, 10:30] = 1
    return img, mask


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_same_seed_same_output_and_mask_moves_with_image(seed):
    img, mask = _image_and_mask()
    params = AugmentParams(brightness=0.0, contrast=0.0)
    a, (ma,) = augment(img, [mask], seed=seed, params=params)
    b, (mb,) = augment(img, [mask], seed=seed, params=params)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    assert a.shape == img.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 255.0
    assert ma.dtype == mask.dtype and set(np.unique(ma)) <= {0, 1}
    inside = a[..., 0][ma == 1]
    assert inside.size > 0 and np.median(inside) > 200.0  # the mask still covers the bright square
    np.testing.assert_array_equal(img, _image_and_mask()[0])  # input untouched


def test_different_seeds_differ():
    img, mask = _image_and_mask()
    a, _ = augment(img, [mask], seed=1)
    b, _ = augment(img, [mask], seed=2)
    assert not np.array_equal(a, b)


def test_mask_shape_mismatch_refused():
    img, _ = _image_and_mask()
    with pytest.raises(ValueError, match="differs"):
        augment(img, [np.zeros((10, 10), np.uint8)], seed=0)


@pytest.mark.parametrize("field, value", [("rotation_deg", -1.0), ("zoom_range", 1.5), ("shift_fraction", 2.0)])
def test_bad_params(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentParams(**{field: value})
