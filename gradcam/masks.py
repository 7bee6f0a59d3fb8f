"""Heatmaps into pictures and draft masks, connected regions, and the shortcut audit."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from data.masks import components


def draft_mask(heatmap: np.ndarray, threshold: float, lung: np.ndarray | None = None) -> np.ndarray:
    """(H, W) map in [0, 1] → bool mask of heatmap ≥ threshold, inside ``lung`` when given."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    mask = np.asarray(heatmap) >= threshold
    if lung is not None:
        if lung.shape != mask.shape:
            raise ValueError(f"lung mask {lung.shape} and heatmap {mask.shape} differ in size")
        mask &= np.asarray(lung, dtype=bool)
    return mask


@dataclass(frozen=True)
class Region:
    """One 8-connected component of a binary mask."""

    label: int
    bbox: tuple[int, int, int, int]  # x, y, width, height (COCO order)
    area: int
    mask: np.ndarray  # (H, W) bool


def regions(mask: np.ndarray, min_area: int = 1) -> list[Region]:
    """Connected components of ``mask`` (8-connectivity) with at least ``min_area`` pixels, largest first."""
    labels, found = components(mask, min_area=min_area)
    return [Region(c.label, c.box, c.area, labels == c.label) for c in found]


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) map in [0, 1] → (H, W, 3) uint8 RGB with the JET colour map."""
    u8 = np.clip(np.round(np.asarray(heatmap) * 255.0), 0, 255).astype(np.uint8)
    return cv2.applyColorMap(u8, cv2.COLORMAP_JET)[..., ::-1].copy()


#: rows blended at a time: full-size float temporaries of an 80-Mpx X-ray would take gigabytes
_ROWS = 512


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a coloured heatmap onto an (H, W, 3) float [0, 255] image → uint8 RGB (in row blocks,
    so the temporaries stay small whatever the image size)."""
    out = np.empty(np.shape(image)[:2] + (3,), np.uint8)
    for r in range(0, out.shape[0], _ROWS):
        rows = slice(r, r + _ROWS)
        base = np.clip(np.asarray(image[rows], dtype=np.float32), 0, 255)
        heat = colorize(heatmap[rows]).astype(np.float32)
        weight = alpha * np.asarray(heatmap[rows], dtype=np.float32)[..., None]  # cold areas keep the X-ray
        out[rows] = np.clip(base * (1 - weight) + heat * weight, 0, 255).round().astype(np.uint8)
    return out


def mask_overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 0, 0), alpha: float = 0.45) -> np.ndarray:
    """Tint ``mask`` pixels of an (H, W, 3) float [0, 255] image and draw its outline → uint8 RGB."""
    m = np.asarray(mask, dtype=bool)
    out = np.empty(m.shape + (3,), np.uint8)
    tint = np.asarray(colour, np.float32) * alpha
    for r in range(0, out.shape[0], _ROWS):
        rows = slice(r, r + _ROWS)
        block = np.clip(np.asarray(image[rows], dtype=np.float32), 0, 255)
        block[m[rows]] = block[m[rows]] * (1 - alpha) + tint
        out[rows] = block.round().astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1)
    return out


def mass_inside(heatmap: np.ndarray, region: np.ndarray) -> float | None:
    """Share of the heatmap's total mass that lies inside ``region``; None for an all-zero map."""
    total = float(np.asarray(heatmap, np.float64).sum())
    if total <= 0:
        return None
    return float(np.asarray(heatmap, np.float64)[np.asarray(region, bool)].sum() / total)


def pointing_hit(heatmap: np.ndarray, target: np.ndarray) -> bool | None:
    """Pointing game: is the heatmap's peak inside ``target``? None for an all-zero map."""
    h = np.asarray(heatmap)
    if not (h > 0).any():
        return None
    y, x = np.unravel_index(int(np.argmax(h)), h.shape)
    return bool(np.asarray(target, bool)[y, x])
