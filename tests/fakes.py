"""Test data made on the fly: X-ray-like pictures and awkward files. No real data here."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def xray_like(h: int = 96, w: int = 80, seed: int = 0) -> np.ndarray:
    """A uint8 grayscale picture with structure (two dark lung fields on a bright body)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 200 - 40 * np.exp(-(((xx - w * 0.3) / (w * 0.15)) ** 2 + ((yy - h / 2) / (h * 0.3)) ** 2))
    img -= 40 * np.exp(-(((xx - w * 0.7) / (w * 0.15)) ** 2 + ((yy - h / 2) / (h * 0.3)) ** 2))
    # Seed-dependent large structures, so different seeds are not near-duplicates.
    for _ in range(4):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(h / 8, h / 3), rng.uniform(w / 8, w / 3)
        img += rng.uniform(-60, 60) * np.exp(-(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2))
    img += rng.normal(0, 5, size=(h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width×height but holds almost no data (a decompression bomb shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND",
                                                                                                             b"")


def write_monochrome1_dicom(path: Path, pixels: np.ndarray) -> None:
    """A minimal valid MONOCHROME1 DICOM file with a fake patient name (must never be echoed)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_ct_series(folder: Path, hu: np.ndarray, *, spacing=(0.7, 0.8), thickness: float = 2.5,
                    origin=(-100.0, -120.0, 40.0), modality: str = "CT", series_uid: str | None = None) -> list[Path]:
    """A DICOM CT series of ``hu`` (Z, rows, columns), axial slices stacked along +z (patient superior),
    stored as int16 with slope 1 and intercept -1024; files named in reverse order of position."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    paths = []
    for z, plane in enumerate(hu):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"im{len(hu) - z:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = modality, series_uid, z + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + z * thickness]
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = thickness
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = (np.asarray(plane) + 1024).astype(np.int16).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


#: name → (expected outcome: "ok" or a substring of the error reason)
BAD_CORPUS_EXPECT = {
    "zero.png": "empty file",
    "truncated.png": "truncated PNG",
    "truncated.jpg": "truncated JPEG",
    "text.png": "not an image",
    "one_pixel.png": "too small: 1x1",
    "huge.png": "too large: 30000x30000",
    "rgba.png": "ok",
    "cmyk.jpg": "ok",
    "gray16.png": "ok",
    "mono1.dcm": "ok",
    # decoder-level cases added with the reliability suite (tests/pipeline/test_reliability.py)
    "gif.png": "not an image",
    "html.jpg": "not an image",
    "soi_only.jpg": "damaged JPEG header",
    "bad_zlib.png": "PNG",
    "truncated.bmp": "truncated BMP",
    "truncated.tif": "truncated TIFF",
    "zero_size.png": "damaged PNG header",
    "sliver.png": "too small: 400x4",
    "nopix.dcm": "no pixel data",
    "truncated.dcm": "damaged DICOM pixel data",
    "j2k.dcm": "compressed DICOM",
    "multiframe.dcm": "multi-frame",
    "dark.png": "ok",
    "float.tif": "ok",
}



def make_bad_corpus(d: Path) -> Path:
    """Write every BAD_CORPUS_EXPECT file into ``d``."""
    base = xray_like(96, 80)
    good_png = png_bytes(base)
    (d / "zero.png").write_bytes(b"")
    (d / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    jpg = io.BytesIO()
    Image.fromarray(base).save(jpg, format="JPEG", quality=90)
    (d / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (d / "text.png").write_text("this is not a picture\n")
    (d / "one_pixel.png").write_bytes(png_bytes(np.zeros((1, 1), np.uint8)))
    (d / "huge.png").write_bytes(huge_png_header(30000, 30000))
    rgba = np.dstack([base, base, base, np.full_like(base, 255)])
    (d / "rgba.png").write_bytes(png_bytes(rgba))
    cmyk = Image.fromarray(np.dstack([base] * 3)).convert("CMYK")
    cmyk.save(d / "cmyk.jpg", format="JPEG", quality=95)
    gray16 = (base.astype(np.uint16) * 257)
    Image.fromarray(gray16).save(d / "gray16.png")
    mono1 = 4095 - (base.astype(np.uint16) * 16)  # MONOCHROME1: high stored value = dark
    write_monochrome1_dicom(d / "mono1.dcm", mono1)
    _more_bad_files(d, base, good_png, mono1)
    return d


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _more_bad_files(d: Path, base: np.ndarray, good_png: bytes, mono1: np.ndarray) -> None:
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    for name, fmt in (("gif.png", "GIF"), ("truncated.bmp", "BMP"), ("truncated.tif", "TIFF")):
        buf = io.BytesIO()
        Image.fromarray(base).save(buf, format=fmt)
        (d / name).write_bytes(buf.getvalue() if fmt == "GIF" else buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "html.jpg").write_text("<html><body>not an x-ray</body></html>\n")
    (d / "soi_only.jpg").write_bytes(b"\xff\xd8\xff")
    raw = bytearray(good_png)
    at = raw.index(b"IDAT") + 4
    raw[at : at + 2] = b"\x00\x00"  # an impossible zlib header inside a well-formed chunk
    length = struct.unpack(">I", raw[at - 8 : at - 4])[0]
    raw[at + length : at + length + 4] = struct.pack(">I", zlib.crc32(bytes(raw[at - 4 : at + length])) & 0xFFFFFFFF)
    (d / "bad_zlib.png").write_bytes(bytes(raw))
    (d / "zero_size.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0,
                                                                                         0))
                                      + _chunk(b"IEND", b""))
    (d / "sliver.png").write_bytes(png_bytes(np.full((4, 400), 100, np.uint8)))
    (d / "dark.png").write_bytes(png_bytes(np.zeros((96, 80), np.uint8)))  # readable; referred as blank
    Image.fromarray(np.random.default_rng(0).random((96, 80)).astype(np.float32)).save(d / "float.tif")
    for name, change in (("nopix.dcm", "drop"), ("truncated.dcm", "cut"), ("j2k.dcm", "j2k"), ("multiframe.dcm",
                                                                                               "two")):
        write_monochrome1_dicom(d / name, np.concatenate([mono1, mono1]) if change == "two" else mono1)
        ds = pydicom.dcmread(d / name)
        if change == "drop":
            del ds.PixelData
        elif change == "cut":
            ds.PixelData = ds.PixelData[:1000]  # uncompressed: no decoder plugin would help
        elif change == "j2k":
            ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
            ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 40])  # a JPEG 2000 stream cut short
            ds["PixelData"].VR = "OB"
        else:
            ds.Rows, ds.NumberOfFrames = mono1.shape[0], 2
        ds.save_as(d / name)


def progress_recorder():
    """(seen, progress): a jobs-style ``progress(items)`` wrapper that records ``len(items)`` as
    "total" and how many items were consumed as "ticks"."""
    seen: dict[str, int] = {}

    def progress(items):
        seen["total"] = len(items)
        for item in items:
            seen["ticks"] = item + 1
            yield item

    return seen, progress
