"""CT input (data.volume): NIfTI and DICOM series into one orientation and back, windowing, and
the errors for bad volumes. Volumes are built here (known affine, known HU) and from real CT slices."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data.io import ImageReadError
from data.volume import (
    LUNG_WINDOW,
    pixels_to_hu,
    read_ct,
    read_dicom_series,
    read_nifti,
    window_hu,
    write_mask_volume,
)
from fakes import write_ct_series

REAL_CT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct"

#: stored axes (i, j, k) point to posterior, the patient's right (RAS+ x), superior: not the canonical
#: (L, P, S) order of (column, row, slice), and the column direction flipped
ODD_AFFINE = np.array([[0, 0.7, 0, 10], [-0.8, 0, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]], float)


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray = ODD_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return path


def test_window_maps_the_lung_window_onto_0_255():
    hu = np.array([-2000, -1350, -600, 150, 3000], np.float32)
    np.testing.assert_array_equal(window_hu(hu, *LUNG_WINDOW), [0, 0, 128, 255, 255])
    np.testing.assert_allclose(pixels_to_hu(window_hu(hu, *LUNG_WINDOW), *LUNG_WINDOW)[1:4], hu[1:4], atol=3)


def test_nifti_is_read_in_the_radiological_view_and_a_mask_goes_back_voxel_for_voxel(tmp_path):
    data = np.full((20, 24, 5), -900.0, np.float32)
    data[3:6, 10:13, 2] = 40.0  # i 3..5 (toward posterior), j 10..12 (toward the patient's right), slice k = 2
    vol = read_nifti(_nifti(tmp_path / "v.nii.gz", data))
    assert vol.hu.shape == (5, 20, 24) and vol.stored_shape == (20, 24, 5)
    # canonical: slice k, rows run anterior → posterior (stored i), columns patient right → left (j reversed)
    assert np.argwhere(vol.hu > 0).min(axis=0).tolist() == [2, 3, 23 - 12]
    assert np.argwhere(vol.hu > 0).max(axis=0).tolist() == [2, 5, 23 - 10]
    assert vol.spacing_mm == pytest.approx((2.5, 0.8, 0.7))
    write_mask_volume(vol, (vol.hu > 0).astype(np.uint8) * 3, tmp_path / "m.nii.gz")
    back = nib.load(tmp_path / "m.nii.gz")
    np.testing.assert_array_equal(np.asarray(back.dataobj), (data > 0).astype(np.uint8) * 3)
    np.testing.assert_allclose(back.affine, ODD_AFFINE)


def test_dicom_series_is_ordered_by_position_with_its_hu_and_affine(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 400, (4, 32, 40)).astype(np.float32)
    write_ct_series(tmp_path / "s", hu)  # files named in reverse order of position
    vol = read_ct(tmp_path / "s")
    assert vol.source == "dicom-series"
    # DICOM rows run anterior → posterior and columns patient right → left already: the view is unchanged
    np.testing.assert_array_equal(vol.hu, hu)
    assert vol.spacing_mm == pytest.approx((2.5, 0.7, 0.8))
    # voxel (column 0, row 0, slice 0) sits at the first slice's position, in RAS (DICOM is LPS)
    np.testing.assert_allclose(vol.affine[:3, 3], [100.0, 120.0, 40.0])
    write_mask_volume(vol, (vol.hu > 0).astype(np.uint8), tmp_path / "m.nii")
    stored = np.asarray(nib.load(tmp_path / "m.nii").dataobj)
    np.testing.assert_array_equal(stored.transpose(2, 1, 0), (hu > 0).astype(np.uint8))


@pytest.mark.parametrize("case, message", [
    ("missing", "a slice is missing between"),
    ("mixed", "holds 2 series"),
    ("mr", "Modality is 'MR', not CT"),
    ("duplicate", "two slices at the same position"),
])
def test_bad_dicom_series_name_the_problem_and_the_fix(tmp_path, case, message):
    hu = np.zeros((5, 20, 20), np.float32)
    paths = write_ct_series(tmp_path / "s", hu, modality="MR" if case == "mr" else "CT")
    if case == "missing":
        paths[2].unlink()
    elif case == "mixed":
        write_ct_series(tmp_path / "other", hu[:1], origin=(0, 0, 99))[0].rename(tmp_path / "s" / "zz.dcm")
    elif case == "duplicate":
        write_ct_series(tmp_path / "dup", hu[:1], series_uid=str(_uid(paths[0])))[0].rename(tmp_path / "s" / "zz.dcm")
    with pytest.raises(ImageReadError, match=message) as info:
        read_dicom_series(tmp_path / "s")
    assert str(tmp_path / "s") in str(info.value)


def _uid(path: Path):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID


@pytest.mark.parametrize("shape, message", [
    ((16, 16, 4, 2), "a 4-D volume"),
    ((1, 1, 1), "a CT volume needs slices of at least"),
])
def test_bad_nifti_shapes_are_refused(tmp_path, shape, message):
    path = _nifti(tmp_path / "bad.nii", np.zeros(shape), np.eye(4))
    with pytest.raises(ImageReadError, match=message):
        read_nifti(path)


def test_not_a_nifti_file(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match="not a readable NIfTI"):
        read_nifti(tmp_path / "x.nii.gz")


@pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"{REAL_CT} absent (real CT slices from ../shared/data/ct)")
def test_real_ct_slices_as_nifti_and_dicom_come_back_as_they_were_shown(tmp_path):
    """Real lung-window slices → HU volumes (NIfTI with an odd affine, a DICOM series) → the same pixels."""
    import cv2

    names = sorted((REAL_CT / "images").iterdir())[:3]
    pixels = np.stack([cv2.resize(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE), (96, 80)) for p in names])
    hu = np.rint(pixels_to_hu(pixels, *LUNG_WINDOW))
    # canonical (slice, row, column) → stored (i, j, k) of ODD_AFFINE: i = row, j = column reversed, k = slice
    vol = read_nifti(_nifti(tmp_path / "real.nii.gz", hu.transpose(1, 2, 0)[:, ::-1]))
    assert np.abs(vol.windowed().astype(int) - pixels).max() <= 1
    write_ct_series(tmp_path / "real", hu)
    assert np.abs(read_dicom_series(tmp_path / "real").windowed().astype(int) - pixels).max() <= 1
