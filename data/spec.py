"""The input contract: class names, image size and pixel layout.

This module is the one place these facts live. Every model
sidecar records them and is checked against them on load.
"""

from __future__ import annotations

from typing import Final

#: Output classes, in the order of every probability vector the project emits.
CLASS_NAMES: Final[tuple[str, ...]] = ("normal", "pneumonia", "covid")
NUM_CLASSES: Final[int] = len(CLASS_NAMES)

#: Classes that send an image on to the segmenter (stage 2).
SEGMENT_CLASSES: Final[tuple[str, ...]] = ("pneumonia", "covid")

#: Classes whose X-rays show no lesion of any kind: their lesion masks are known to be empty
#: (data.datasets.mark_lesion_free), so lesion segmenters can learn and be scored on lesion-free lungs.
LESION_FREE_CLASSES: Final[tuple[str, ...]] = ("normal",)

#: Default square side, in pixels, that images are brought to for stage 1.
DEFAULT_IMAGE_SIZE: Final[int] = 224
#: The paper's stage-2 (segmenter) input side.
DEFAULT_SEGMENTER_SIZE: Final[int] = 256

#: Pixel contract of every model input: RGB float32, shape (N, H, W, 3), values in [0, 255].
CHANNELS: Final[int] = 3
PIXEL_DTYPE: Final[str] = "float32"
PIXEL_MIN: Final[float] = 0.0
PIXEL_MAX: Final[float] = 255.0

#: Resize modes: "stretch" resizes to the square, "pad" keeps the aspect ratio
#: and pads with black (letterbox).
RESIZE_MODES: Final[tuple[str, ...]] = ("stretch", "pad")
DEFAULT_RESIZE_MODE: Final[str] = RESIZE_MODES[0]
#: connected components smaller than this (pixels at the segmenter's input size) are not lesions
DEFAULT_MIN_LESION_AREA: Final[int] = 16

#: Raster formats decoded by Pillow, by lower-case file suffix.
RASTER_SUFFIXES: Final[frozenset[str]] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
)
DICOM_SUFFIXES: Final[frozenset[str]] = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES: Final[frozenset[str]] = RASTER_SUFFIXES | DICOM_SUFFIXES

#: Decompression-bomb guard: images with more pixels are refused unless the caller
#: raises the limit (the largest real input here is 3342x4095 = 13.7 Mpx).
DEFAULT_MAX_PIXELS: Final[int] = 80_000_000
#: Images with a side shorter than this carry no usable content.
DEFAULT_MIN_SIDE: Final[int] = 32


def class_index(name: str) -> int:
    """Index of ``name`` in :data:`CLASS_NAMES`; ValueError listing the valid names otherwise."""
    try:
        return CLASS_NAMES.index(name)
    except ValueError:
        raise ValueError(
            f"unknown class {name!r}; valid classes: {', '.join(CLASS_NAMES)}"
        ) from None


def spec_dict() -> dict[str, object]:
    """The contract as plain JSON data, for model sidecars."""
    return {
        "class_names": list(CLASS_NAMES),
        "channels": CHANNELS,
        "pixel_dtype": PIXEL_DTYPE,
        "pixel_range": [PIXEL_MIN, PIXEL_MAX],
    }
