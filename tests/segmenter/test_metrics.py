"""Segmentation metrics by hand, the empty-mask convention, lesion instances and losses."""

from __future__ import annotations

import numpy as np
import pytest

from data.masks import segmentation_scores
from segmenter.losses import (
    bce_dice_loss,
    boundary_band,
    boundary_bce_dice_loss,
    dice_loss,
    focal_tversky_loss,
    get_loss,
)
from segmenter.metrics import hausdorff95, lesion_size_band, lesion_size_bands, lesions, lung_affected_pct


def test_scores_by_hand():
    truth = np.zeros((10, 10), bool)
    pred = np.zeros((10, 10), bool)
    truth[0:4, 0:5] = True  # 20 px
    pred[2:6, 0:5] = True  # 20 px, overlap rows 2-3 → 10 px
    s = segmentation_scores(truth, pred)
    assert s["dice"] == pytest.approx(2 * 10 / 40)
    assert s["iou"] == pytest.approx(10 / 30)
    assert s["precision"] == pytest.approx(10 / 20)
    assert s["recall"] == pytest.approx(10 / 20)


@pytest.mark.parametrize(
    "truth_on, pred_on, expect",
    [
        (False, False, {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}),  # nothing to find, nothing found
        (True, False, {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}),  # missed lesion
        (False, True, {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0}),  # false alarm
    ],
)
def test_empty_mask_convention(truth_on, pred_on, expect):
    t = np.zeros((5, 5), bool)
    p = np.zeros((5, 5), bool)
    t[1:3, 1:3] = truth_on
    p[1:3, 1:3] = pred_on
    assert segmentation_scores(t, p) == expect


def test_lesion_instances_on_a_drawn_mask():
    prob = np.zeros((50, 60), np.float32)
    prob[5:15, 10:30] = 0.9  # 10 × 20 = 200 px
    prob[30:40, 40:45] = 0.7  # 10 × 5 = 50 px
    prob[45:47, 0:2] = 0.99  # 4 px: removed as too small
    lung = np.zeros((50, 60), bool)
    lung[:, :] = True  # 3000 px
    found = lesions(prob, threshold=0.5, min_area=16, lung=lung)
    assert [(les.box, les.area_px) for les in found] == [((10, 5, 20, 10), 200), ((40, 30, 5, 10), 50)]
    assert found[0].score == pytest.approx(0.9) and found[1].score == pytest.approx(0.7)
    assert found[0].lung_pct == pytest.approx(100 * 200 / 3000)
    assert lung_affected_pct(prob >= 0.5, lung) == pytest.approx(100 * 254 / 3000)
    assert lung_affected_pct(prob >= 0.5, np.zeros_like(lung)) is None


def test_hausdorff95():
    a = np.zeros((40, 40), bool)
    b = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b[10:20, 13:23] = True  # shifted 3 px
    assert hausdorff95(a, a) == 0.0
    assert 2.0 <= hausdorff95(a, b) <= 3.5
    assert hausdorff95(a, np.zeros_like(a)) is None


@pytest.mark.parametrize("pct, band", [(0.0, "<5 %"), (4.99, "<5 %"), (5.0, "5-10 %"), (9.99, "5-10 %"),
                                       (10.0, "10-20 %"), (20.0, ">=20 %"), (100.0, ">=20 %")])
def test_lesion_size_bands_hold_their_lower_edge(pct, band):
    assert lesion_size_band(pct) == band
    assert lesion_size_bands() == ("<5 %", "5-10 %", "10-20 %", ">=20 %")
    assert lesion_size_band(pct, edges=(50.0,)) == ("<50 %" if pct < 50 else ">=50 %")


def test_lesion_size_band_refuses_a_share_outside_0_to_100():
    with pytest.raises(ValueError, match="out of"):
        lesion_size_band(120.0)


def test_losses():
    y = np.zeros((2, 8, 8, 1), np.float32)
    y[:, 2:6, 2:6] = 1.0
    assert float(dice_loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    assert float(dice_loss(np.zeros_like(y), np.zeros_like(y))) == pytest.approx(0.0,
                                                                                 abs=1e-6)  # smooth: empty = perfect
    assert float(dice_loss(y, 1.0 - y)) > 0.9
    assert float(focal_tversky_loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    assert float(bce_dice_loss(y, np.clip(y, 0.01, 0.99))) < float(bce_dice_loss(y, np.full_like(y, 0.5)))
    with pytest.raises(ValueError, match="valid: dice, bce_dice, boundary_bce_dice, focal_tversky"):
        get_loss("jaccard")



def test_boundary_band_is_the_ring_on_both_sides_of_a_masks_edge():
    y = np.zeros((1, 16, 16, 1), np.float32)
    y[0, 6:10, 6:10] = 1.0
    band = np.asarray(boundary_band(y, radius=1))[0, :, :, 0]
    expected = np.zeros((16, 16), np.float32)
    expected[5:11, 5:11] = 1.0  # dilated by one pixel ...
    expected[7:9, 7:9] = 0.0  # ... minus eroded by one
    np.testing.assert_array_equal(band, expected)
    assert not np.asarray(boundary_band(np.zeros_like(y))).any()  # no lesion, no edge


def test_boundary_loss_costs_a_false_positive_at_a_lesions_edge_more_than_one_far_from_it():
    y = np.zeros((1, 16, 16, 1), np.float32)
    y[0, 6:10, 6:10] = 1.0
    base = np.where(y > 0, 0.9, 0.1).astype(np.float32)
    near, far = base.copy(), base.copy()
    near[0, 5, 7] = 0.9  # one pixel outside the edge
    far[0, 14, 1] = 0.9  # the same error far away
    assert float(boundary_bce_dice_loss(y, near)) > float(boundary_bce_dice_loss(y, far)) + 1e-3
    assert float(bce_dice_loss(y, near)) == pytest.approx(float(bce_dice_loss(y, far)))  # the plain loss cannot tell
    assert float(boundary_bce_dice_loss(y, np.clip(y, 1e-4, 1 - 1e-4))) < 0.01


def test_lesion_shares_of_lung_add_up_to_the_lung_affected():
    """A lesion reaching outside the lung field counts only its part inside (as lung_affected_pct does)."""
    from segmenter.metrics import lesion_instances

    prob = np.zeros((40, 40), np.float32)
    prob[5:15, 0:20] = 0.9  # 200 px, half of it left of the lung field
    prob[25:35, 25:35] = 0.8  # 100 px, inside
    lung = np.zeros((40, 40), bool)
    lung[:, 10:] = True  # 1200 px
    instances, found = lesion_instances(prob, threshold=0.5, min_area=16, lung=lung)
    assert [les.lung_pct for les in found] == pytest.approx([100 * 100 / 1200, 100 * 100 / 1200])
    assert sum(les.lung_pct for les in found) == pytest.approx(lung_affected_pct(instances > 0, lung))
    assert instances.dtype == np.uint16 and set(np.unique(instances)) == {0, 1, 2}
    assert [int((instances == k).sum()) for k in (1, 2)] == [les.area_px for les in found]


def test_typed_lesions_split_by_most_probable_type():
    from types import SimpleNamespace

    from segmenter.model import SegmenterMaps, class_masks, segment_image

    ggo, cons = np.zeros((20, 30), np.float32), np.zeros((20, 30), np.float32)
    ggo[2:8, 2:12] = 0.7  # a ground-glass patch (60 px) ...
    cons[2:8, 12:16] = 0.8  # ... touching a consolidation (24 px): two lesions, one of each type
    ggo[12:18, 20:28], cons[12:18, 20:28] = 0.3, 0.4  # a consolidation alone (48 px)
    ggo[0, 29] = 0.9  # one ground-glass pixel, under min_area
    lung = np.zeros((20, 30), np.float32)
    lung[:, :] = 0.9
    lung[:, 25:] = 0.1  # the lung field ends at column 25
    maps = SegmenterMaps(ggo + cons, {"ggo": ggo, "consolidation": cons}, lung)
    seg = SimpleNamespace(threshold=0.5, min_lesion_area=4, kind="infection", lesion_types=("ggo", "consolidation"))
    res = segment_image(maps, seg)
    assert [(les.type, les.area_px, les.box) for les in res.lesions] == [
        ("ggo", 60, (2, 2, 10, 6)), ("consolidation", 48, (20, 12, 8, 6)), ("consolidation", 24, (12, 2, 4, 6))]
    assert res.lesions[0].score == pytest.approx(0.7) and res.lesions[2].score == pytest.approx(0.8)
    assert res.area_by_type == {"ggo": 60, "consolidation": 72}
    assert [int((res.instances == k).sum()) for k in (1, 2, 3)] == [60, 48, 24]
    lung_px = 20 * 25
    assert res.lesions[1].lung_pct == pytest.approx(100 * 30 / lung_px)  # 18 of its 48 px lie outside the lung
    assert res.lung_affected_pct == pytest.approx(sum(les.lung_pct for les in res.lesions))
    masks = class_masks(maps, seg)
    assert set(masks) == {"ggo", "consolidation", "lung"} and int(masks["ggo"].sum()) == 61  # small ones kept
    assert not (masks["ggo"] & masks["consolidation"]).any() and int(masks["lung"].sum()) == lung_px


def test_one_lesion_kind_keeps_its_name_and_a_given_lung_model_wins():
    from types import SimpleNamespace

    from segmenter.model import SegmenterMaps, segment_image

    prob = np.zeros((10, 10), np.float32)
    prob[2:6, 2:6] = 0.9
    own_lung, lung_model = np.ones((10, 10), np.float32), np.zeros((10, 10), np.float32)
    lung_model[:, :5] = 1.0
    seg = SimpleNamespace(threshold=0.5, min_lesion_area=1, kind="infection", lesion_types=("infection",))
    res = segment_image(SegmenterMaps(prob, None, own_lung), seg, lung_prob=lung_model)
    assert [les.type for les in res.lesions] == ["infection"] and res.area_by_type == {"infection": 16}
    assert res.lung_affected_pct == pytest.approx(100 * 12 / 50)


@pytest.mark.parametrize("classes, kind, lesions", [
    ("binary", "infection", ("infection",)),
    ("binary", "lung", ("lung",)),  # a lung-field model's one channel is what it predicts (bench_quality caught this)
    ("lung-lesion", "infection", ("infection",)),
    ("lesion-types", "infection", ("ggo", "consolidation")),
    ("lung-lesion-types", "opacity", ("ggo", "consolidation")),
])
def test_the_predicted_channels_of_each_scheme(classes, kind, lesions):
    from segmenter.schemes import channel_names, lesion_channels

    assert lesion_channels(classes, channel_names(classes, kind)) == lesions
