"""Per-image segmentation metrics and lesion instances (numpy). The overlap scores and their
empty-mask convention live in data.masks (Grad-CAM's draft masks use them too).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from data import spec
from data.masks import components, remove_small


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


def lesions(prob: np.ndarray, *, threshold: float = 0.5, min_area: int = spec.DEFAULT_MIN_LESION_AREA,
            lung: np.ndarray | None = None) -> list[Lesion]:
    """Threshold a probability map, drop components under ``min_area`` px, describe the rest (largest first)."""
    p = np.asarray(prob, np.float32)
    labels, found = components(p >= threshold, min_area=min_area)
    lung_area = int(np.asarray(lung, bool).sum()) if lung is not None else 0
    return [Lesion(c.box, c.area, 100.0 * c.area / lung_area if lung_area else None, float(p[labels == c.label].mean()))
            for c in found]


def clean_mask(prob: np.ndarray, *, threshold: float = 0.5, min_area: int = spec.DEFAULT_MIN_LESION_AREA) -> np.ndarray:
    """``prob ≥ threshold`` without the 8-connected components smaller than ``min_area`` px."""
    return remove_small(np.asarray(prob) >= threshold, min_area)


def lung_affected_pct(lesion_mask: np.ndarray, lung: np.ndarray) -> float | None:
    """Share (%) of the lung field covered by lesion; None without lung pixels."""
    lung = np.asarray(lung, bool)
    if not lung.any():
        return None
    return 100.0 * float((np.asarray(lesion_mask, bool) & lung).sum()) / float(lung.sum())
