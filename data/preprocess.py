"""Bring decoded images to the model's pixel contract (data.spec).

Pure functions: inputs are never mutated. Geometry records how an image was fitted
into the square so that heatmaps and masks can be mapped back to the original size.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from data import spec


@dataclass(frozen=True)
class Geometry:
    """How an (orig_h, orig_w) image was placed into a (size, size) square.

    The content occupies rows ``top:top+content_h`` and columns ``left:left+content_w``.
    """

    orig_h: int
    orig_w: int
    size: int
    top: int
    left: int
    content_h: int
    content_w: int

    def to_original(self, square: np.ndarray, *, interpolation: str = "linear") -> np.ndarray:
        """Map a (size, size[, C]) array on the model grid back to (orig_h, orig_w[, C])."""
        if square.shape[:2] != (self.size, self.size):
            raise ValueError(f"expected a {self.size}x{self.size} map, got {square.shape[:2]}")
        crop = square[self.top : self.top + self.content_h, self.left : self.left + self.content_w]
        return _resize(crop, self.orig_h, self.orig_w, interpolation)

    def map_to_original(self, square: np.ndarray) -> np.ndarray:
        """A (size, size) map in [0, 1] (heatmap, probabilities) → float32 (orig_h, orig_w) in [0, 1],
        clipped in place (linear interpolation can overshoot; a second full-size array would cost
        orig_h·orig_w·4 bytes more)."""
        out = np.asarray(self.to_original(square), dtype=np.float32)
        return np.clip(out, 0.0, 1.0, out=out)


def to_rgb_float(image: np.ndarray) -> np.ndarray:
    """Any (H, W), (H, W, 1|3|4) bool/uint8/uint16/float image → float32 (H, W, 3) in [0, 255].

    uint16 is scaled by 255/65535; float input is taken as already on the 0–255 scale
    and clipped. Alpha is dropped. A new array is always returned.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"expected an (H, W) or (H, W, 1|3|4) image, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        out = arr.astype(np.float32) * np.float32(spec.PIXEL_MAX)
    elif arr.dtype == np.uint8:
        out = arr.astype(np.float32)
    elif arr.dtype == np.uint16:
        out = arr.astype(np.float32) * np.float32(spec.PIXEL_MAX / 65535.0)
    elif np.issubdtype(arr.dtype, np.floating):
        out = np.clip(np.nan_to_num(arr.astype(np.float32)), spec.PIXEL_MIN, spec.PIXEL_MAX)
    else:
        raise ValueError(f"unsupported pixel dtype {arr.dtype}; expected bool, uint8, uint16 or float")
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.float32)


def apply_clahe(rgb: np.ndarray, *, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of the luminance of a contract image.

    float32 (H, W, 3) in [0, 255] → same shape, dtype and range (gray output).
    """
    gray = np.clip(rgb.mean(axis=2), 0, 255).astype(np.uint8)
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid))
    eq = clahe.apply(gray).astype(np.float32)
    return np.repeat(eq[..., None], 3, axis=2)


def fit_geometry(height: int, width: int, size: int, mode: str) -> Geometry:
    """Placement of an (height, width) image in a size×size square for ``mode``."""
    if mode not in spec.RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; valid: {', '.join(spec.RESIZE_MODES)}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if mode == "stretch":
        return Geometry(height, width, size, 0, 0, size, size)
    scale = size / max(height, width)
    ch = max(1, min(size, round(height * scale)))
    cw = max(1, min(size, round(width * scale)))
    return Geometry(height, width, size, (size - ch) // 2, (size - cw) // 2, ch, cw)


def preprocess_image(
    image: np.ndarray,
    *,
    size: int = spec.DEFAULT_IMAGE_SIZE,
    mode: str = spec.DEFAULT_RESIZE_MODE,
    clahe: bool = False,
) -> tuple[np.ndarray, Geometry]:
    """Decoded image → (float32 (size, size, 3) in [0, 255], Geometry).

    An image already in the pixel contract (float32 (H, W, 3), e.g. the originals that `cxr run`
    keeps) is read as it is, not copied: stage 2 preprocesses full-size originals twice per image.
    """
    arr = np.asarray(image)
    rgb = arr if arr.dtype == np.float32 and arr.ndim == 3 and arr.shape[2] == 3 else to_rgb_float(arr)
    if clahe:
        rgb = apply_clahe(rgb)
    geo = fit_geometry(rgb.shape[0], rgb.shape[1], size, mode)
    out = place(rgb, geo, interpolation="area")
    # Interpolation can overshoot by float rounding; keep the contract exact.
    np.clip(out, spec.PIXEL_MIN, spec.PIXEL_MAX, out=out)
    return out, geo


def preprocess_mask(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A (H, W) mask (any dtype, non-zero = foreground) → float32 (size, size) in {0, 1}."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.shape != (geometry.orig_h, geometry.orig_w):
        raise ValueError(
            f"mask size {m.shape[1]}x{m.shape[0]} does not match image size "
            f"{geometry.orig_w}x{geometry.orig_h}"
        )
    return place((m > 0).astype(np.float32), geometry, interpolation="nearest")


def place(array: np.ndarray, geometry: Geometry, *, interpolation: str) -> np.ndarray:
    """Resize ``array`` into the geometry's content box and pad the rest with zeros."""
    g = geometry
    content = _resize(array, g.content_h, g.content_w, interpolation)
    if (g.content_h, g.content_w) == (g.size, g.size):
        return np.ascontiguousarray(content, dtype=np.float32)
    out = np.zeros((g.size, g.size) + array.shape[2:], dtype=np.float32)
    out[g.top : g.top + g.content_h, g.left : g.left + g.content_w] = content
    return out


# INTER_NEAREST_EXACT samples pixel centres; plain INTER_NEAREST shifts masks by up to a pixel.
_INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST_EXACT, "linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


def _resize(array: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    arr = np.asarray(array, dtype=np.float32)
    if arr.shape[:2] == (height, width):
        return arr.copy()
    flag = _INTERPOLATIONS[interpolation]
    # INTER_AREA is only meaningful when shrinking; enlarge linearly.
    if flag == cv2.INTER_AREA and (height > arr.shape[0] or width > arr.shape[1]):
        flag = cv2.INTER_LINEAR
    out = cv2.resize(arr, (width, height), interpolation=flag)
    if arr.ndim == 3 and out.ndim == 2:  # cv2 drops a trailing channel of 1
        out = out[..., None]
    return out
