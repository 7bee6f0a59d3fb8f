"""The lesion threshold chosen on validation images (``threshold = "fit"``, the scratch preset's)."""

from __future__ import annotations

import numpy as np
import pytest

from segmenter.settings import SegmenterSettings, with_preset
from segmenter.train import THRESHOLD_FIT_MIN_IMAGES, fit_lesion_threshold


def _batches(n: int, *, lesion_p: float, classes: int):
    """n 8x8 images whose truth is the top half; the model gives ``lesion_p`` there and 0.1 elsewhere.
    ``classes`` > 1: softmax-like maps and one-hot targets, both (background, lung, lesion)."""
    truth = np.zeros((n, 8, 8), bool)
    truth[:, :4] = True
    prob = np.where(truth, lesion_p, 0.1).astype(np.float32)
    if classes == 1:
        maps, masks = prob[..., None], truth[..., None].astype(np.float32)
    else:
        lung = np.full_like(prob, 0.2)
        maps = np.stack([1 - lung - prob, lung, prob], axis=-1)
        lesion = truth.astype(np.float32)
        masks = np.stack([np.zeros_like(lesion), 1 - lesion, lesion], axis=-1)  # lung wherever no lesion
    images = np.zeros((n, 8, 8, 3), np.float32)
    return (lambda x: maps[: len(x)]), [(images[i:i + 5], masks[i:i + 5]) for i in range(0, n, 5)]


@pytest.mark.parametrize("classes, settings", [
    (1, SegmenterSettings(kind="infection", threshold="fit")),
    (3, SegmenterSettings(kind="infection", classes="lung-lesion", loss="cce_dice", threshold="fit")),
])
def test_the_cut_that_separates_lesion_from_background_is_chosen(classes, settings):
    predict, batches = _batches(25, lesion_p=0.3, classes=classes)
    fit = fit_lesion_threshold(predict, batches, settings)
    # every cut in (0.1, 0.3] gives Dice 1; above 0.3 nothing is found (Dice 0): the tie goes to 0.3, nearest 0.5
    assert fit["threshold"] == 0.3 and fit["val_dice"] == 1.0
    assert fit["val_dice_at_0.5"] == 0.0 and fit["n_val"] == 25


def test_with_tta_the_cut_is_fitted_on_the_maps_the_bundle_will_predict():
    """tta = "zoom": every validation batch goes through the plain pass and each zoomed copy."""
    from segmenter.tta import TTA_SETS

    n = THRESHOLD_FIT_MIN_IMAGES
    images = np.full((n, 32, 32, 3), 40.0, np.float32)
    images[:, :16] = 230.0  # the lesion: the top half, bright
    masks = np.zeros((n, 32, 32, 1), np.float32)
    masks[:, :16] = 1.0
    batches = [(images[i:i + 5], masks[i:i + 5]) for i in range(0, n, 5)]
    calls = []

    def predict(x):  # lesion probability 0.3 where bright: found below a cut of 0.3 only
        calls.append(x.copy())
        return np.where(x.mean(axis=-1, keepdims=True) > 128, 0.3, 0.05).astype(np.float32)

    fit = fit_lesion_threshold(predict, batches, SegmenterSettings(kind="infection", threshold="fit", tta="zoom"))
    assert len(calls) == len(batches) * (1 + len(TTA_SETS["zoom"]))
    assert not np.array_equal(calls[1], calls[0])  # a zoomed copy, not the batch again
    # above 0.3 nothing is found; at or below it the averaged maps give the top half back
    assert fit["threshold"] <= 0.3 and fit["val_dice"] > 0.95 and fit["val_dice_at_0.5"] == 0.0


def test_lesion_free_validation_images_do_not_push_the_cut_to_finding_nothing():
    """Half the images have a lesion the model half finds (prob 0.7 on half of it); half are
    lesion-free with a 2x2 false alarm at 0.7. The mean of per-image Dice would prefer a cut above
    0.7 (0.5: every lesion-free image perfect, every lesion missed); pooled Dice keeps the lesions."""
    truth = np.zeros((20, 8, 8), bool)
    truth[:10, :4] = True
    prob = np.full((20, 8, 8), 0.1, np.float32)
    prob[:10, :2] = 0.7  # half of each lesion found
    prob[10:, 6:, 6:] = 0.7  # a small false alarm on each lesion-free image
    maps, masks = prob[..., None], truth[..., None].astype(np.float32)
    batches = [(np.zeros((5, 8, 8, 3), np.float32), masks[i:i + 5]) for i in range(0, 20, 5)]
    starts = iter(range(0, 20, 5))

    def predict(x):
        i = next(starts)
        return maps[i:i + len(x)]

    fit = fit_lesion_threshold(predict, batches, SegmenterSettings(threshold="fit"))
    # cuts in (0.1, 0.7]: TP 160, FN 160, FP 40 -> 320 / 520; the tie goes to 0.5
    # (the per-image mean is 0.33 there and 0.5 above 0.7)
    assert fit["threshold"] == 0.5 and fit["val_dice"] == round(320 / 520, 4)


def test_a_handful_of_validation_images_keeps_the_default_and_says_why():
    predict, batches = _batches(THRESHOLD_FIT_MIN_IMAGES - 1, lesion_p=0.3, classes=1)
    fit = fit_lesion_threshold(predict, batches, SegmenterSettings(threshold="fit"))
    assert fit["threshold"] == 0.5 and "fewer than" in fit["why"]


def test_threshold_setting_is_a_cut_or_fit():
    scratch = SegmenterSettings(**with_preset({"weights": "none"}))
    assert scratch.threshold == "fit" and scratch.lesion_free == 0.5  # together: see segmenter.settings.PRESETS
    assert SegmenterSettings(**with_preset({"weights": "none", "threshold": 0.4})).threshold == 0.4
    paper = SegmenterSettings(**with_preset({"weights": "imagenet"}))
    assert paper.preset == "paper" and paper.threshold == 0.5 and paper.lesion_free == 0.0  # unchanged
    assert SegmenterSettings().threshold == 0.5
    with pytest.raises(ValueError, match='"fit"'):
        SegmenterSettings(threshold="best")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        SegmenterSettings(threshold=1.5)
