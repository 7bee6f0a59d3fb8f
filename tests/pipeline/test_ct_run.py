"""`cxr run --modality ct`: volumes through a segmenter slice by slice; the mask volume lines up with the input.

The segmenter here is a hand-set one-convolution model (probability rises with brightness), so what it
must find is known voxel by voxel."""

from __future__ import annotations

import csv
import json

import keras
import nibabel as nib
import numpy as np
import pytest

from fakes import png_bytes, write_ct_series
from pipeline.cli import main

SIZE = 48


@pytest.fixture(scope="module")
def bright_segmenter(tmp_path_factory):
    """A CT "segmenter": probability > 0.5 exactly where a pixel is brighter than 200 of 255 in the lung window
    (HU above about -170: soft tissue in the lung)."""
    from data.runtime.bundle import save_bundle

    inputs = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(1, 1, activation="sigmoid", name="bright")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([np.full((1, 1, 3, 1), 1 / 3, np.float32), np.array([-200.0], np.float32)])
    out = tmp_path_factory.mktemp("ctseg") / "m"
    meta = {"arch": "hand-set", "kind": "infection", "classes": "binary", "channels": ["infection"],
            "threshold": 0.5, "min_lesion_area": 1, "resize_mode": "pad", "clahe": False, "modality": "ct",
            "ct_window": [-600.0, 1500.0]}
    save_bundle(model, out, kind="segmenter", image_size=SIZE, config={"image_size": SIZE}, meta=meta)
    return out


def _volume():
    """(Z, rows, columns) HU: lung air, a body wall, and a lesion of soft tissue on slices 1-2."""
    hu = np.full((4, SIZE, SIZE), -850.0, np.float32)
    hu[:, :, :3] = -1000.0  # air outside, at the border
    hu[1:3, 10:20, 25:31] = 40.0
    return hu


def test_ct_run_writes_aligned_mask_volumes_and_per_volume_figures(bright_segmenter, tmp_path, capsys):
    hu = _volume()
    data = tmp_path / "in"
    data.mkdir()
    # NIfTI stored (row, column reversed, slice) with a rotated affine; the same volume as a DICOM series
    affine = np.array([[0, 0.7, 0, 10], [-0.8, 0, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]], float)
    stored = hu.transpose(1, 2, 0)[:, ::-1]
    nib.save(nib.Nifti1Image(stored, affine), data / "vol.nii.gz")
    write_ct_series(data / "series", hu)
    slice_png = np.where(np.arange(SIZE)[None, :] > 30, 230, 60).astype(np.uint8).repeat(SIZE, 0)
    (data / "slice.png").write_bytes(png_bytes(slice_png))
    (data / "broken.nii").write_bytes(b"not nifti")
    out = tmp_path / "out"
    assert main(["run", str(data), "--segmenter", str(bright_segmenter), "--out", str(out)]) == 1  # auto: CT
    said = capsys.readouterr()
    assert "3 CT input(s) processed" in said.out and "1 failed" in said.out

    rows = {r["file"]: r for r in csv.DictReader((out / "ct_results.csv").open())}
    assert set(rows) == {"vol.nii.gz", "series", "slice.png"}
    records = {json.loads(line)["file"]: json.loads(line) for line in (out / "ct_results.jsonl").open()}
    lesion = hu > 0
    mask = nib.load(out / records["vol.nii.gz"]["mask_volume"])
    np.testing.assert_allclose(mask.affine, affine)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), stored > 0)  # voxel for voxel, in stored order
    series_mask = np.asarray(nib.load(out / records["series"]["mask_volume"]).dataobj)
    np.testing.assert_array_equal(series_mask.transpose(2, 1, 0), lesion)
    voxel_ml = 0.7 * 0.8 * 2.5 / 1000  # both volumes have 0.7 × 0.8 mm pixels and 2.5 mm slices
    for name in ("vol.nii.gz", "series"):
        r = records[name]
        assert r["lesion_px"] == int(lesion.sum())
        assert r["lesion_ml"] == pytest.approx(lesion.sum() * voxel_ml, rel=1e-3)
        assert r["lung_source"] == "hu-threshold" and 0 < r["lung_affected_pct"] < 100
        assert r["slices"] == 4
        per_slice = list(csv.DictReader((out / r["slices_csv"]).open()))
        assert [int(s["lesion_px"]) for s in per_slice] == [int(v) for v in lesion.sum(axis=(1, 2))]
        assert (out / r["strip"]).stat().st_size > 0
    assert records["slice.png"]["lesion_ml"] is None and records["slice.png"]["lesion_px"] == SIZE * (SIZE - 31)
    assert "not a readable NIfTI" in (out / "failures.csv").read_text()

    assert main(["run", str(data), "--segmenter", str(bright_segmenter), "--out", str(out)]) == 1
    assert "0 CT input(s) processed, 3 already done earlier" in capsys.readouterr().out


def test_ct_run_refuses_an_x_ray_segmenter_and_x_rays_need_a_classifier(seg_model, tmp_path, capsys):
    data = tmp_path / "in"
    data.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 2), np.float32), np.eye(4)), data / "v.nii")
    assert main(["run", str(data), "--segmenter", str(seg_model), "--out", str(tmp_path / "o")]) == 2
    assert "trained on xray images; --modality ct needs one trained on CT slices" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["run", str(data), "--modality", "xray", "--segmenter", str(seg_model),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--classifier is needed for X-rays" in capsys.readouterr().err
