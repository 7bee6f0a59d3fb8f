"""Test-time augmentation (segmenter.tta): zoomed copies go back where they came from, and a bundle
that names a set predicts through it."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from segmenter.settings import SegmenterSettings
from segmenter.tta import TTA_SETS, averaged_maps, tta_scales

SIZE = 48


def _bright(batch: np.ndarray) -> np.ndarray:
    """A per-pixel "model": lesion probability rises with brightness (so it commutes with any warp)."""
    return (1.0 / (1.0 + np.exp(-(batch.mean(axis=-1, keepdims=True) - 128.0) / 8.0))).astype(np.float32)


def _image_with_square(top: int, left: int, side: int = 12) -> np.ndarray:
    x = np.full((1, SIZE, SIZE, 3), 40.0, np.float32)
    x[0, top:top + side, left:left + side] = 230.0
    return x


def test_zoomed_maps_are_zoomed_back_onto_the_lesion():
    x = _image_with_square(5, 28)  # off centre: a zoom undone the wrong way would move it
    plain = _bright(x)
    tta = averaged_maps(_bright, x, tta_scales("zoom"))
    assert tta.shape == plain.shape
    truth = plain[0, ..., 0] > 0.5
    found = tta[0, ..., 0] > 0.5
    assert (truth & found).sum() / ((truth | found).sum()) > 0.9  # IoU with the plain (exact) map
    cy, cx = np.argwhere(found).mean(axis=0)
    assert abs(cy - 10.5) < 0.5 and abs(cx - 33.5) < 0.5  # the square's centre


def test_a_copy_votes_only_where_it_sees_the_image():
    """A model that gives 0.7 everywhere gives 0.7 everywhere after averaging, the border included
    (a zoomed-in copy sees no border; counting its zeros there would pull the border down)."""
    x = np.zeros((2, SIZE, SIZE, 3), np.float32)
    const = np.full((2, SIZE, SIZE, 4), [0.1, 0.2, 0.3, 0.4], np.float32)  # softmax-like, 4 channels
    out = averaged_maps(lambda b: const[: len(b)], x, (0.85, 1.15))
    np.testing.assert_allclose(out, const, atol=1e-5)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-5)


def test_each_zoom_is_one_more_pass_and_none_is_the_plain_pass():
    calls = []

    def predict(b):
        calls.append(b.copy())
        return _bright(b)

    x = _image_with_square(20, 20)
    out = averaged_maps(predict, x, tta_scales("none"))
    assert len(calls) == 1 and np.array_equal(out, _bright(x))
    calls.clear()
    averaged_maps(predict, x, tta_scales("zoom"))
    assert len(calls) == 1 + len(TTA_SETS["zoom"])
    assert np.array_equal(calls[0], x) and not np.array_equal(calls[1], x)


def test_an_unknown_set_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="unknown tta 'mirror'; valid: none, zoom"):
        SegmenterSettings(tta="mirror")
    assert SegmenterSettings(tta="zoom").tta == "zoom" and SegmenterSettings().tta == "none"


def _bright_bundle(path, tta):
    """A hand-set one-conv segmenter bundle (lesion probability rises with brightness), meta.tta = ``tta``."""
    from data.runtime.bundle import save_bundle

    inputs = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid", name="bright")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.full((1, 1, 3, 1), 1 / 24, np.float32), np.array([-16.0], np.float32)])
    meta = {"arch": "hand-set", "kind": "infection", "classes": "binary", "channels": ["infection"],
            "threshold": 0.5, "min_lesion_area": 1, "resize_mode": "pad", "clahe": False}
    if tta is not None:
        meta["tta"] = tta
    save_bundle(model, path, kind="segmenter", image_size=SIZE, config={"image_size": SIZE}, meta=meta)
    return path


@pytest.mark.parametrize("tta", [None, "none", "zoom"])
def test_a_bundle_predicts_through_the_set_it_names(tmp_path, tta):
    """meta.tta decides every prediction of a loaded bundle; bundles from before it predict plainly."""
    from segmenter.model import load_segmenter

    seg = load_segmenter(_bright_bundle(tmp_path / "m", tta))
    assert seg.tta == (tta or "none")
    assert json.loads((tmp_path / "m" / "model.json").read_text())["meta"].get("tta") == tta
    x = _image_with_square(5, 28)
    plain = seg._forward_maps(x)
    expected = averaged_maps(seg._forward_maps, x, TTA_SETS[seg.tta])
    np.testing.assert_allclose(seg.predict_maps(x), expected, atol=1e-6)
    assert np.array_equal(seg.predict_maps(x), plain) == (seg.tta == "none")


def test_a_bundle_naming_an_unknown_set_is_refused_on_load(tmp_path):
    from data.runtime.bundle import BundleError
    from segmenter.model import load_segmenter

    with pytest.raises(BundleError, match=r"model.json: meta.tta 'mirror' is not one of none, zoom"):
        load_segmenter(_bright_bundle(tmp_path / "m", "mirror"))
