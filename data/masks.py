"""Binary masks: connected components and overlap scores, shared by Grad-CAM's draft masks and
the segmenter's lesions and metrics.

Convention for empty masks: when both the truth and the prediction are empty, Dice, IoU,
precision and recall are 1 (nothing to find, nothing found); when only one is empty the
undefined ratio is 0 (a miss or a false alarm). Never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Component:
    """One 8-connected component: its label in :func:`components`' label image, COCO-order box, area."""

    label: int
    box: tuple[int, int, int, int]  # x, y, width, height
    area: int


def components(mask: np.ndarray, *, min_area: int = 1) -> tuple[np.ndarray, list[Component]]:
    """(label image (H, W) int32, the components with at least ``min_area`` pixels, largest first)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, np.uint8), connectivity=8)
    found = [Component(i, (int(x), int(y), int(w), int(h)), int(area))
             for i, (x, y, w, h, area) in enumerate(stats) if i > 0 and area >= min_area]
    return labels, sorted(found, key=lambda c: (-c.area, c.box))


def remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """``mask`` (bool) without its components smaller than ``min_area`` pixels."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


def confusion(truth: np.ndarray, pred: np.ndarray) -> tuple[int, int, int]:
    """(TP, FP, FN) pixel counts of two binary masks."""
    t, p = np.asarray(truth, bool), np.asarray(pred, bool)
    if t.shape != p.shape:
        raise ValueError(f"mask shapes differ: {t.shape} vs {p.shape}")
    return int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())


def _ratio(num: int, den: int, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return num / den


#: The per-image scores of :func:`segmentation_scores`, in report order.
SEGMENTATION_SCORES = ("dice", "iou", "precision", "recall")


def segmentation_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision and recall of one image (see the module's empty-mask convention)."""
    return scores_from_counts(*confusion(truth, pred))


def scores_from_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    """:func:`segmentation_scores` from an image's (TP, FP, FN) pixel counts."""
    both_empty = tp + fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks (two empty masks score 1.0)."""
    return segmentation_scores(a, b)["iou"]
