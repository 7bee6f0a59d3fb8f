"""Seeded augmentation that moves masks with their image.

One random affine transform (rotation, shift, zoom) is drawn per call from the seed
and applied to the image (bilinear) and to every mask (nearest neighbour), so an
annotated lesion stays on the lesion. Brightness and contrast touch the image only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from data import spec


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random transform (the seed repositories' ImageDataGenerator settings)."""

    rotation_deg: float = 10.0
    shift_fraction: float = 0.1
    zoom_range: float = 0.1
    brightness: float = 0.1
    contrast: float = 0.1
    horizontal_flip: bool = False  # chest anatomy is not left-right symmetric

    def __post_init__(self) -> None:
        for name in ("rotation_deg", "shift_fraction", "zoom_range", "brightness", "contrast"):
            value = getattr(self, name)
            if not (0.0 <= value < (180.0 if name == "rotation_deg" else 1.0)):
                raise ValueError(f"AugmentParams.{name}={value} out of range")


def augment(
    image: np.ndarray,
    masks: Sequence[np.ndarray] = (),
    *,
    seed: int,
    params: AugmentParams = AugmentParams(),
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Apply one seeded random transform.

    ``image``: float32 (H, W, 3) in [0, 255]; ``masks``: (H, W) arrays of the same H, W.
    Returns a new image (same shape, float32, [0, 255]) and new masks (same dtype,
    values taken from the input mask). The same seed gives the same output.
    """
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape[:2]
    for m in masks:
        if m.shape[:2] != (h, w):
            raise ValueError(f"mask shape {m.shape[:2]} differs from image shape {(h, w)}")
    rng = np.random.default_rng(seed)
    p = params
    angle = rng.uniform(-p.rotation_deg, p.rotation_deg)
    zoom = rng.uniform(1.0 - p.zoom_range, 1.0 + p.zoom_range)
    tx = rng.uniform(-p.shift_fraction, p.shift_fraction) * w
    ty = rng.uniform(-p.shift_fraction, p.shift_fraction) * h
    flip = bool(p.horizontal_flip and rng.random() < 0.5)
    gain = rng.uniform(1.0 - p.contrast, 1.0 + p.contrast)
    offset = rng.uniform(-p.brightness, p.brightness) * spec.PIXEL_MAX

    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, zoom)
    matrix[:, 2] += (tx, ty)
    if flip:
        matrix = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0]]) @ np.vstack([matrix, [0, 0, 1]])

    out = cv2.warpAffine(
        img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    if out.ndim == 2:
        out = out[..., None]
    mean = out.mean()
    out = (out - mean) * gain + mean + offset
    np.clip(out, spec.PIXEL_MIN, spec.PIXEL_MAX, out=out)

    moved = []
    for m in masks:
        src = np.ascontiguousarray(m)
        work = src.astype(np.uint8) if src.dtype == np.bool_ else src
        warped = cv2.warpAffine(
            work, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        moved.append(warped.astype(src.dtype))
    return out.astype(np.float32), moved
