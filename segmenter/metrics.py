"""Per-image segmentation metrics and lesion instances (numpy). The overlap scores and their
empty-mask convention live in data.masks (Grad-CAM's draft masks use them too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import cv2
import numpy as np

from data import spec
from data.masks import components, confusion, remove_small

#: Lesion-probability cuts tried by ``threshold = "fit"`` (segmenter.train) and scored by evaluation's
#: cut_sweep.csv (pipeline.segmenter_jobs).
THRESHOLD_GRID = tuple(round(0.1 + 0.05 * i, 2) for i in range(17))  # 0.10, 0.15, …, 0.90


#: Upper edges (% of the image) of the bands of drawn-lesion size that evaluation scores apart. Per-image
#: Dice falls steeply with lesion size (README "Model quality"), so a test set's mean Dice depends on its
#: mix of small and large lesions; these bands show that mix and the Dice within each band.
LESION_SIZE_EDGES_PCT = (5.0, 10.0, 20.0)


def lesion_size_bands(edges: Sequence[float] = LESION_SIZE_EDGES_PCT) -> tuple[str, ...]:
    """Band names in size order: "<5 %", "5-10 %", "10-20 %", ">=20 %" for the default edges."""
    inner = [f"{lo:g}-{hi:g} %" for lo, hi in zip(edges, edges[1:])]
    return (f"<{edges[0]:g} %", *inner, f">={edges[-1]:g} %")


def lesion_size_band(pct: float, edges: Sequence[float] = LESION_SIZE_EDGES_PCT) -> str:
    """The band of ``lesion_size_bands(edges)`` that a lesion covering ``pct`` % of its image falls in
    (each band holds its lower edge)."""
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"lesion share {pct} % out of [0, 100]")
    return lesion_size_bands(edges)[int(np.searchsorted(np.asarray(edges), pct, side="right"))]


class CutCounts:
    """(TP, FP, FN) pixel counts at every cut of ``cuts``, summed over the images added: the pooled
    Dice per cut that the threshold fit chooses from and evaluation's cut sweep reports."""

    def __init__(self, cuts: Sequence[float] = THRESHOLD_GRID) -> None:
        self.cuts = tuple(cuts)
        self.counts = np.zeros((len(self.cuts), 3), np.int64)

    def add(self, truth: np.ndarray, prob: np.ndarray) -> list[tuple[int, int, int]]:
        """Count bool ``truth`` against ``prob`` (same shape) ≥ each cut; returns this image's counts."""
        found = [confusion(truth, prob >= cut) for cut in self.cuts]
        self.counts += np.asarray(found, np.int64).reshape(len(self.cuts), 3)
        return found

    def pooled_dice(self) -> np.ndarray:
        """2·TP / (2·TP + FP + FN) per cut, 1.0 where nothing was to find and nothing was found."""
        tp, fp, fn = self.counts.T
        return np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 1.0)


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
    """One connected lesion of one type: COCO-order box, pixel area, share of the lung field, mean
    probability of its type."""

    box: tuple[int, int, int, int]  # x, y, width, height
    area_px: int
    lung_pct: float | None  # its pixels inside the lung field, as % of the lung field
    score: float
    type: str = "lesion"  # the lesion kind ("infection", ...) or type ("ggo", "consolidation")


def lesion_instances(prob: np.ndarray, *, threshold: float = 0.5, min_area: int = spec.DEFAULT_MIN_LESION_AREA,
                     lung: np.ndarray | None = None, kind: str = "lesion",
                     types: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, list[Lesion]]:
    """Threshold a probability map and drop components under ``min_area`` px: (instance map (H, W)
    uint16, 0 background and k for the k-th lesion, the lesions largest first).

    ``types`` (type name → (H, W) probability, for a model with several lesion types): each pixel of
    the thresholded mask goes to its most probable type, and a lesion is a connected component of one
    type's pixels, scored by that type's mean probability. Without it every lesion is of ``kind``.
    A lesion's ``lung_pct`` counts its pixels inside the lung field, so the lesions' shares add up
    to :func:`lung_affected_pct` of the same mask.
    """
    p = np.asarray(prob, np.float32)
    mask = p >= threshold
    if types is None or len(types) < 2:
        parts = [(kind, mask, p)]
    else:
        names = list(types)
        best = np.argmax(np.stack([np.asarray(types[n], np.float32) for n in names]), axis=0)
        parts = [(n, mask & (best == i), np.asarray(types[n], np.float32)) for i, n in enumerate(names)]
    lung_mask = np.asarray(lung, bool) if lung is not None else None
    lung_area = int(lung_mask.sum()) if lung_mask is not None else 0
    found = []  # (area, order, lesion, box slices, pixels)
    for name, part, score_map in parts:
        labels, comps = components(part, min_area=min_area)
        for c in comps:
            x, y, w, h = c.box
            box = (slice(y, y + h), slice(x, x + w))  # each lesion's work stays inside its box
            pixels = labels[box] == c.label
            pct = 100.0 * float((pixels & lung_mask[box]).sum()) / lung_area if lung_area else None
            found.append((Lesion(c.box, c.area, pct, float(score_map[box][pixels].mean()), name), box, pixels))
    found.sort(key=lambda f: -f[0].area_px)  # stable: ties keep type order, then component order
    instances = np.zeros(p.shape, np.uint16)
    for k, (_, box, pixels) in enumerate(found, start=1):
        instances[box][pixels] = k
    return instances, [f[0] for f in found]


def area_by_type(lesions: Sequence[Lesion], types: Sequence[str]) -> dict[str, int]:
    """Lesion pixels per type, every type of ``types`` listed (0 where none was found)."""
    out = {t: 0 for t in types}
    for les in lesions:
        out[les.type] = out.get(les.type, 0) + les.area_px
    return out


def lesions(prob: np.ndarray, *, threshold: float = 0.5, min_area: int = spec.DEFAULT_MIN_LESION_AREA,
            lung: np.ndarray | None = None) -> list[Lesion]:
    """The lesions of :func:`lesion_instances` (largest first)."""
    return lesion_instances(prob, threshold=threshold, min_area=min_area, lung=lung)[1]


def clean_mask(prob: np.ndarray, *, threshold: float = 0.5, min_area: int = spec.DEFAULT_MIN_LESION_AREA) -> np.ndarray:
    """``prob ≥ threshold`` without the 8-connected components smaller than ``min_area`` px."""
    return remove_small(np.asarray(prob) >= threshold, min_area)


def lung_affected_pct(lesion_mask: np.ndarray, lung: np.ndarray) -> float | None:
    """Share (%) of the lung field covered by lesion; None without lung pixels."""
    lung = np.asarray(lung, bool)
    if not lung.any():
        return None
    return 100.0 * float((np.asarray(lesion_mask, bool) & lung).sum()) / float(lung.sum())
