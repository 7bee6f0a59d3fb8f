"""Decoding: every awkward input is either read correctly or refused with a reason naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.io import ImageReadError, decode_image, read_image, read_mask, sniff_format
from data.preprocess import to_rgb_float
from fakes import BAD_CORPUS_EXPECT, huge_png_header, png_bytes, xray_like


@pytest.mark.parametrize("name", sorted(BAD_CORPUS_EXPECT))
def test_bad_corpus_read_or_clear_reason(bad_corpus: Path, name: str) -> None:
    expect = BAD_CORPUS_EXPECT[name]
    path = bad_corpus / name
    if expect == "ok":
        img = read_image(path)
        assert img.dtype in (np.uint8, np.uint16)
        assert img.shape[:2] == (96, 80)
    else:
        with pytest.raises(ImageReadError) as info:
            read_image(path)
        assert info.value.path == str(path)
        assert expect in info.value.reason
        assert str(info.value).startswith(str(path))


def test_sixteen_bit_png_keeps_depth(bad_corpus: Path) -> None:
    img = read_image(bad_corpus / "gray16.png")
    assert img.dtype == np.uint16
    np.testing.assert_array_equal(img, xray_like(96, 80).astype(np.uint16) * 257)


def test_rgba_and_cmyk_decode_to_the_same_gray_picture(bad_corpus: Path) -> None:
    base = xray_like(96, 80).astype(np.float32)
    rgba = to_rgb_float(read_image(bad_corpus / "rgba.png"))
    np.testing.assert_allclose(rgba[..., 0], base)
    cmyk = to_rgb_float(read_image(bad_corpus / "cmyk.jpg"))
    assert np.abs(cmyk.mean(axis=2) - base).mean() < 4.0  # JPEG loss only


def test_monochrome1_dicom_is_inverted(bad_corpus: Path) -> None:
    img = read_image(bad_corpus / "mono1.dcm").astype(np.float64)
    base = xray_like(96, 80).astype(np.float64)
    # After inversion, bright stays bright: strong positive correlation with the source picture.
    assert np.corrcoef(img.ravel(), base.ravel())[0, 1] > 0.99


def test_dicom_patient_tags_never_in_errors_or_output(tmp_path: Path) -> None:
    from fakes import write_monochrome1_dicom

    path = tmp_path / "p.dcm"
    write_monochrome1_dicom(path, np.zeros((8, 8), np.uint16))  # too small → error path
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert "Doe" not in str(info.value) and "SECRET" not in str(info.value)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    from PIL import Image

    img = np.zeros((40, 60), np.uint8)
    img[:, :10] = 255  # bright band on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = read_image(tmp_path / "rot.jpg")
    assert out.shape == (60, 40)
    assert out[:10].mean() > 200  # the band is now on top


def test_max_pixels_is_configurable(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    p.write_bytes(png_bytes(xray_like(64, 64)))
    assert read_image(p).shape == (64, 64)
    with pytest.raises(ImageReadError, match="too large: 64x64"):
        read_image(p, max_pixels=1000)


def test_huge_header_refused_before_decoding() -> None:
    with pytest.raises(ImageReadError, match="too large"):
        decode_image(huge_png_header(100_000, 100_000), name="bomb.png")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="is a folder"):
        read_image(tmp_path)


@pytest.mark.parametrize(
    "head, kind",
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "png"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 20, "jpeg"),
        (b"II*\x00" + b"\0" * 20, "tiff"),
        (b"\0" * 128 + b"DICM", "dicom"),
        (b"GIF89a" + b"\0" * 20, None),
        (b"", None),
    ],
)
def test_sniff_format(head: bytes, kind: str | None) -> None:
    assert sniff_format(head) == kind


def test_read_mask_binarises(tmp_path: Path) -> None:
    m = np.zeros((40, 40), np.uint8)
    m[10:20, 5:15] = 255
    p = tmp_path / "m.png"
    p.write_bytes(png_bytes(m))
    out = read_mask(p)
    assert out.dtype == bool and out.sum() == 100


def test_peek_pixels_reads_headers_only(tmp_path, bad_corpus):
    from data.io import peek_pixels

    (tmp_path / "a.png").write_bytes(png_bytes(xray_like(90, 80)))
    assert peek_pixels(tmp_path / "a.png") == 90 * 80
    assert peek_pixels(bad_corpus / "huge.png") == 30000 * 30000  # a bomb is sized, never decoded
    assert peek_pixels(bad_corpus / "mono1.dcm") == 96 * 80
    assert peek_pixels(bad_corpus / "text.png") is None and peek_pixels(tmp_path / "missing.png") is None


def test_stream_keeps_decoded_images_within_the_memory_budget(tmp_path, monkeypatch):
    from data import stream

    sizes = [(200, 200), (40, 40), (40, 40), (200, 200), (40, 40), (40, 40), (40, 40), (40, 40)]
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png_bytes(xray_like(h, w, seed=i)))
    budget = 200 * 200 * stream.BYTES_PER_PIXEL_ORIGINAL  # one large image, or many small ones
    held, peak = [0], [0]
    real_load = stream._load

    def counting_load(path, *args):
        item = real_load(path, *args)
        held[0] += item.original.nbytes
        peak[0] = max(peak[0], held[0])
        return item

    monkeypatch.setattr(stream, "_load", counting_load)
    seen = []
    for batch in stream.stream_images(paths, size=32, batch_size=4, keep_original=True, memory_budget=budget):
        seen += [int(p.stem) for p in batch.paths]
        assert sum(o.nbytes for o in batch.originals) <= budget or len(batch.paths) == 1
        held[0] -= sum(o.nbytes for o in batch.originals)
    assert seen == list(range(len(sizes)))  # every image, in order, however the batches were cut
    assert peak[0] < 2 * 200 * 200 * 12  # never two large originals decoded at once
