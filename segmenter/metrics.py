"""Per-image segmentation metrics and lesion instances (numpy).

Convention for empty masks: when both the truth and the prediction are empty, Dice, IoU,
precision and recall are 1 (nothing to find, nothing found); when only one is empty the
undefined ratio is 0 (a miss or a false alarm). Never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from data import spec


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


def segmentation_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Dice, IoU, precision and recall of one image (see the module's empty-mask convention)."""
    tp, fp, fn = confusion(truth, pred)
    both_empty = tp + fp + fn == 0
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        "iou": _ratio(tp, tp + fp + fn, both_empty),
        "precision": _ratio(tp, tp + fp, both_empty),
        "recall": _ratio(tp, tp + fn, both_empty),
    }


def hausdorff95(truth: np.ndarray, pred: np.ndarray) -> float | None:
    """95th-percentile symmetric surface distance in pixels; None when either mask is empty."""
    t, p = np.asarray(truth, bool).astype(np.uint8), np.asarray(pred, bool).astype(np.uint8)
    if not t.any() or not p.any():
        return None

    def boundary(m: np.ndarray) -> np.ndarray:
        inner = cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0)
        return (m > 0) & (inner == 0)

    # Distance from each boundary pixel of one mask to the nearest boundary pixel of the other.
    bt, bp = boundary(t).astype(np.uint8), boundary(p).astype(np.uint8)
    dt = cv2.distanceTransform(1 - bt, cv2.DIST_L2, 5)
    dp = cv2.distanceTransform(1 - bp, cv2.DIST_L2, 5)
    d = np.concatenate([dp[bt > 0], dt[bp > 0]])
    return float(np.percentile(d, 95))


@dataclass(frozen=True)
class Lesion:
    """One connected lesion: COCO-order box, pixel area, share of the lung field, mean probability."""

    box: tuple[int, int, int, int]  # x, y, width, height
    area_px: int
    lung_pct: float | None
    score: float


def lesions(prob: np.ndarray, *, threshold: float = 0.5, min_area: int = spec.DEFAULT_MIN_LESION_AREA, lung: np.ndarray | None = None) -> list[Lesion]:
    """Threshold a probability map, drop components under ``min_area`` px, describe the rest (largest first)."""
    p = np.asarray(prob, np.float32)
    mask = (p >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    lung_area = int(np.asarray(lung, bool).sum()) if lung is not None else 0
    out = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area:
            continue
        out.append(Lesion((x, y, w, h), area, 100.0 * area / lung_area if lung_area else None,
                          float(p[labels == i].mean())))
    return sorted(out, key=lambda les: (-les.area_px, les.box))


def clean_mask(prob: np.ndarray, *, threshold: float = 0.5, min_area: int = spec.DEFAULT_MIN_LESION_AREA) -> np.ndarray:
    """``prob ≥ threshold`` without the 8-connected components smaller than ``min_area`` px."""
    mask = (np.asarray(prob) >= threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return keep[labels]


def lung_affected_pct(lesion_mask: np.ndarray, lung: np.ndarray) -> float | None:
    """Share (%) of the lung field covered by lesion; None without lung pixels."""
    lung = np.asarray(lung, bool)
    if not lung.any():
        return None
    return 100.0 * float((np.asarray(lesion_mask, bool) & lung).sum()) / float(lung.sum())
