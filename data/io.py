"""Decode X-ray files (PNG, JPEG, BMP, TIFF, DICOM) into numpy arrays.

Every failure raises :class:`ImageReadError`, which names the file and the reason.
The result keeps the file's bit depth: ``uint8`` or ``uint16``, shape (H, W) for
grayscale or (H, W, 3|4) for colour. :mod:`data.preprocess` turns it into the
model's pixel contract. DICOM patient tags are never returned, logged or written.
"""

from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data import spec
from data.errors import CxrError

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_BMP_MAGIC = b"BM"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*")


class ImageReadError(CxrError):
    """A file that cannot be used as an image; ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def sniff_format(head: bytes) -> str | None:
    """Format from the first 132 bytes of a file: png, jpeg, bmp, tiff, dicom or None.

    Decisions about a file never trust its name or a client's content type.
    """
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head.startswith(_TIFF_MAGICS):
        return "tiff"
    if head.startswith(_BMP_MAGIC) and len(head) >= 26:
        return "bmp"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


def read_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = spec.DEFAULT_MAX_PIXELS,
    min_side: int = spec.DEFAULT_MIN_SIDE,
) -> np.ndarray:
    """Read one image file.

    Returns uint8 or uint16, shape (H, W) or (H, W, 3|4). Raises ImageReadError
    naming ``path`` for a missing, empty, truncated, unknown, too large or too small file.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a folder, not an image") from None
    except OSError as err:
        raise ImageReadError(path, f"cannot read file: {err.strerror or err}") from None
    return decode_image(data, name=str(path), max_pixels=max_pixels, min_side=min_side)


def decode_image(
    data: bytes,
    *,
    name: str = "<bytes>",
    max_pixels: int = spec.DEFAULT_MAX_PIXELS,
    min_side: int = spec.DEFAULT_MIN_SIDE,
) -> np.ndarray:
    """Decode an in-memory file; ``name`` is used in error messages only. See :func:`read_image`."""
    if not data:
        raise ImageReadError(name, "not an image: empty file (0 bytes)")
    kind = sniff_format(data[:132])
    if kind is None:
        raise ImageReadError(
            name, "not an image: content is not PNG, JPEG, BMP, TIFF or DICOM"
        )
    if kind == "dicom":
        array = _decode_dicom(data, name, max_pixels)
    else:
        array = _decode_raster(data, name, kind, max_pixels)
    h, w = array.shape[:2]
    if min(h, w) < min_side:
        raise ImageReadError(name, f"too small: {w}x{h} (shortest side must be ≥ {min_side} px)")
    return array


def peek_pixels(path: str | os.PathLike[str]) -> int | None:
    """Pixel count from a file's header, without decoding the pixels; None when the header does
    not tell (the decode will then say why). Lets a caller budget memory before decoding."""
    try:
        with open(path, "rb") as handle:
            kind = sniff_format(handle.read(132))
            handle.seek(0)
            if kind == "dicom":
                import pydicom

                ds = pydicom.dcmread(handle, stop_before_pixels=True)
                return int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("NumberOfFrames", 1) or 1)
            if kind is None:
                return None
            Image.init()
            img = Image.OPEN[_PIL_FORMATS[kind]][0](handle)
            return int(img.width) * int(img.height)
    except Exception:  # noqa: BLE001 - a header we cannot read is the decoder's to report, with its reason
        return None


def _check_size(name: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageReadError(name, f"unreadable: declared size {width}x{height}")
    if width * height > max_pixels:
        raise ImageReadError(
            name,
            f"too large: {width}x{height} ({width * height:,} pixels > limit {max_pixels:,}; "
            "raise --max-pixels if the file is trusted)",
        )


_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF"}


def _decode_raster(data: bytes, name: str, kind: str, max_pixels: int) -> np.ndarray:
    # The format is known from the magic bytes, so open with its plugin directly:
    # Image.open would apply Pillow's own process-wide bomb limit, and ``max_pixels``
    # is meant to be the one configurable guard (checked below, before decoding).
    Image.init()
    factory = Image.OPEN[_PIL_FORMATS[kind]][0]
    try:
        img = factory(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        raise ImageReadError(name, f"unreadable: damaged {kind.upper()} header ({_one_line(err)})") from None
    # Size comes from the header; the pixels are not decoded yet.
    _check_size(name, img.width, img.height, max_pixels)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _pil_to_array(img)
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = _one_line(err)
        if "truncated" in reason or isinstance(err, EOFError):
            raise ImageReadError(name, f"unreadable: truncated {kind.upper()} ({reason})") from None
        raise ImageReadError(name, f"unreadable: {kind.upper()} decode failed ({reason})") from None


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("L", "RGB", "RGBA"):
        return np.asarray(img).copy()
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if mode == "I":
        return np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
    if mode == "F":
        return _rescale_to_uint16(np.asarray(img, dtype=np.float64))
    if mode in ("1", "LA", "La"):
        target = "L"
    elif mode == "PA" or (mode == "P" and "transparency" in img.info):
        target = "RGBA"
    else:  # P, CMYK, YCbCr, LAB, HSV, RGBX, RGBa
        target = "RGB"
    return np.asarray(img.convert(target)).copy()


def _rescale_to_uint16(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not np.isfinite(lo) or not np.isfinite(hi):
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint16)
    return np.round((arr - lo) / (hi - lo) * 65535.0).astype(np.uint16)


def _decode_dicom(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    # Imported here: pydicom is only needed for DICOM input.
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as err:
        raise ImageReadError(name, f"unreadable: damaged DICOM ({_one_line(err)})") from None
    if "PixelData" not in ds:
        raise ImageReadError(name, "not an image: DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    _check_size(name, cols, rows, max_pixels)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(name, f"unsupported: multi-frame DICOM ({frames} frames); export one frame")
    try:
        pixels = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError) as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise ImageReadError(
                name,
                f"unreadable: cannot decode compressed DICOM pixel data (transfer syntax {syntax.name}: "
                f"{_one_line(err)}); install pylibjpeg[all] or python-gdcm, or the data is damaged",
            ) from None
        raise ImageReadError(name, f"unreadable: damaged DICOM pixel data ({_one_line(err)})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_modality_lut(pixels, ds)
        values = apply_voi_lut(values, ds)
        out = _rescale_to_uint16(np.asarray(values, dtype=np.float64))
        if photometric == "MONOCHROME1":
            out = np.uint16(65535) - out
        return out
    if photometric == "RGB" and pixels.ndim == 3:
        return np.asarray(pixels, dtype=np.uint8 if pixels.dtype.itemsize == 1 else np.uint16)
    raise ImageReadError(name, f"unsupported: DICOM photometric interpretation {photometric}")


def _one_line(err: BaseException, limit: int = 200) -> str:
    """An exception as one short line for a failure row: no object reprs, no line breaks."""
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", str(err) or type(err).__name__)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_mask(path: str | os.PathLike[str], *, max_pixels: int = spec.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a binary mask file: any non-zero pixel is foreground. Returns bool (H, W)."""
    arr = read_image(path, max_pixels=max_pixels, min_side=1)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1)
    return arr > 0

