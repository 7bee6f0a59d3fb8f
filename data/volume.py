"""CT input: NIfTI volumes, DICOM series and single CT slices → axial slices in one orientation.

Every volume is turned into Hounsfield units indexed (slice, row, column) in the radiological axial
view: slices run foot → head, rows front → back, columns the patient's right → left (the patient's
right on the image's left), whatever order the file stores its voxels in. The stored order and the
affine are kept, so a mask made on the slices goes back into a NIfTI volume that lines up with the
input voxel for voxel (:meth:`CTVolume.to_stored`). A slice given as an image (PNG/JPEG, already
windowed) is a one-slice volume without an affine.

Errors are :class:`data.io.ImageReadError` (file and reason, with the fix): a 4-D or too small
volume, several series or another modality in one DICOM folder, a missing or repeated slice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import spec
from data.io import ImageReadError, read_image, sniff_format

#: Lung window (centre, width) in HU: the default view of CT lesions (the slices of ../shared/data/ct).
LUNG_WINDOW = (-600.0, 1500.0)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: Axis codes of the canonical order, for an array indexed (column, row, slice) as NIfTI stores it.
CANONICAL_AXES = ("L", "P", "S")
MIN_INPLANE = 16  # px: smaller is not a CT slice (a single voxel, a line)
GAP_FACTOR = 1.5  # a gap this many times the usual slice spacing means a slice is missing


@dataclass
class CTVolume:
    """One CT input, as axial slices in the canonical order (module docstring)."""

    path: Path
    source: str  # "nifti", "dicom-series" or "image"
    hu: np.ndarray | None  # float32 (Z, H, W) Hounsfield units; None for a windowed slice image
    pixels: np.ndarray | None = None  # uint8 (1, H, W) for a slice image (already windowed)
    affine: np.ndarray | None = None  # (4, 4) stored voxel → RAS+ mm, as the input file says
    stored_shape: tuple[int, ...] | None = None  # the stored array's (i, j, k) shape
    ornt: np.ndarray | None = None  # nibabel orientation transform, stored → canonical (column, row, slice)

    @property
    def n_slices(self) -> int:
        return int((self.hu if self.hu is not None else self.pixels).shape[0])

    @property
    def spacing_mm(self) -> tuple[float, float, float] | None:
        """(slice, row, column) spacing in mm; None without an affine."""
        if self.affine is None:
            return None
        sizes = np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0))  # per stored axis
        canon = np.empty(3)
        for stored_axis, (axis, _) in enumerate(self.ornt):
            canon[int(axis)] = sizes[stored_axis]
        col, row, sl = canon
        return float(sl), float(row), float(col)

    def windowed(self, window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
        """uint8 (Z, H, W): the slices in ``window`` (centre, width HU); a slice image as it is."""
        if self.hu is None:
            return self.pixels
        return window_hu(self.hu, *window)

    def to_stored(self, canonical: np.ndarray) -> np.ndarray:
        """A (Z, H, W) array over the canonical slices → the input's stored voxel order and shape."""
        from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

        if self.affine is None:
            raise ValueError(f"{self.path}: a slice image has no stored volume order")
        back = ornt_transform(axcodes2ornt(CANONICAL_AXES), io_orientation(self.affine))
        return apply_orientation(np.asarray(canonical).transpose(2, 1, 0), back).reshape(self.stored_shape)


def window_hu(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Hounsfield units → uint8 in the window [centre − width/2, centre + width/2] (clipped)."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    low = center - width / 2.0
    scaled = (np.asarray(hu, np.float32) - np.float32(low)) * np.float32(255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def is_nifti(path: str | os.PathLike[str]) -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in NIFTI_SUFFIXES)


def volume_from_array(path: Path, data: np.ndarray, affine: np.ndarray, source: str) -> CTVolume:
    """A stored (i, j, k) HU array and its affine → :class:`CTVolume` (checks the shape)."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    data = np.asarray(data)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageReadError(path, f"a {data.ndim}-D volume of shape {data.shape}; cxr reads one 3-D CT volume "
                                   "per file: split the 4th dimension (time, echoes) into 3-D files first")
    affine = np.asarray(affine, np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageReadError(path, "its affine is singular or not finite; fix the header's voxel sizes and "
                                   "orientation (sform/qform)")
    to_canon = ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL_AXES))
    hu = np.ascontiguousarray(apply_orientation(data, to_canon).transpose(2, 1, 0), dtype=np.float32)
    if min(hu.shape[1:]) < MIN_INPLANE:
        raise ImageReadError(path, f"axial slices of {hu.shape[2]}×{hu.shape[1]} voxels (volume shape "
                                   f"{data.shape}); a CT volume needs slices of at least {MIN_INPLANE}×{MIN_INPLANE}")
    return CTVolume(path, source, hu, affine=affine, stored_shape=tuple(data.shape), ornt=to_canon)


def read_nifti(path: str | os.PathLike[str]) -> CTVolume:
    """A NIfTI volume (.nii, .nii.gz) in HU (its scaling applied)."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    try:
        img = nib.load(path)
        data = img.get_fdata(dtype=np.float32)
    except (ImageFileError, OSError, EOFError, ValueError) as err:
        raise ImageReadError(path, f"not a readable NIfTI file ({err}); re-export it as .nii or .nii.gz") from None
    return volume_from_array(path, data, img.affine, "nifti")


def read_dicom_series(folder: str | os.PathLike[str]) -> CTVolume:
    """The slices of one CT series in ``folder`` (every DICOM file there), ordered by position."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and _is_dicom(p))
    if not files:
        raise ImageReadError(folder, "holds no DICOM file")
    try:
        headers = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in files]
    except (InvalidDicomError, OSError, ValueError) as err:
        raise ImageReadError(folder, f"a DICOM header cannot be read ({err})") from None
    series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in headers})
    if len(series) > 1:
        raise ImageReadError(folder, f"holds {len(series)} series ({', '.join(s[-12:] for s in series[:4])}…); "
                                     "put each series in a folder of its own")
    modality = str(getattr(headers[0][1], "Modality", ""))
    if modality != "CT":
        raise ImageReadError(folder, f"Modality is {modality or 'missing'!r}, not CT; cxr reads CT series here "
                                     "(X-rays go through stage 1: run without --modality ct)")
    missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
               if not hasattr(headers[0][1], t)]
    if missing:
        raise ImageReadError(folder, f"slices lack {', '.join(missing)}; cannot place them in a volume")
    iop = np.asarray(headers[0][1].ImageOrientationPatient, np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    pos = np.array([float(np.dot(np.asarray(ds.ImagePositionPatient, np.float64), normal)) for _, ds in headers])
    order = np.argsort(pos)
    pos = pos[order]
    steps = np.diff(pos)
    if len(steps) and steps.min() < 1e-3:
        k = int(steps.argmin())
        raise ImageReadError(folder, f"two slices at the same position ({pos[k]:.2f} mm): "
                                     f"{headers[order[k]][0].name} and {headers[order[k + 1]][0].name}; "
                                     "remove the duplicate")
    if len(steps) > 1:
        usual = float(np.median(steps))
        gaps = np.nonzero(steps > GAP_FACTOR * usual)[0]
        if len(gaps):
            k = int(gaps[0])
            raise ImageReadError(folder, f"a slice is missing between {headers[order[k]][0].name} and "
                                         f"{headers[order[k + 1]][0].name} (gap {steps[k]:.2f} mm, spacing "
                                         f"{usual:.2f} mm); copy the whole series")
    slices = []
    for k in order:
        ds = pydicom.dcmread(files[k])
        arr = ds.pixel_array.astype(np.float32)
        slices.append(arr * float(getattr(ds, "RescaleSlope", 1.0)) + float(getattr(ds, "RescaleIntercept", 0.0)))
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise ImageReadError(folder, f"slices of different sizes {sorted(shapes)}; not one series")
    first = headers[order[0]][1]
    dr, dc = (float(v) for v in first.PixelSpacing)  # between rows, between columns
    dz = float(np.median(steps)) if len(steps) else float(getattr(first, "SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = row_dir * dc, col_dir * dr, normal * dz
    lps[:3, 3] = np.asarray(first.ImagePositionPatient, np.float64)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS → NIfTI's RAS
    data = np.stack(slices, axis=-1).transpose(1, 0, 2)  # (column, row, slice), as NIfTI stores voxels
    return volume_from_array(folder, data, affine, "dicom-series")


def read_slice_image(path: str | os.PathLike[str]) -> CTVolume:
    """A CT slice saved as an image (already windowed): a one-slice volume without an affine."""
    img = read_image(path)  # uint8 or uint16
    gray = (img if img.ndim == 2 else img[..., :3].mean(axis=-1)).astype(np.float32)
    if img.dtype == np.uint16:
        gray /= 257.0
    return CTVolume(Path(path), "image", None, pixels=np.clip(np.rint(gray), 0, 255).astype(np.uint8)[None])


def read_ct(path: str | os.PathLike[str]) -> CTVolume:
    """A NIfTI file, a DICOM-series folder, or one slice image."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path)
    if is_nifti(path):
        return read_nifti(path)
    return read_slice_image(path)


def find_ct_inputs(root: str | os.PathLike[str]) -> list[Path]:
    """Under ``root``: NIfTI files, folders of DICOM files (one series each) and slice images, sorted;
    one walk, which skips hidden entries and cxr output folders as data.datasets.walk_images does."""
    found: set[Path] = set()
    for p in _files(root):
        if is_nifti(p) or p.suffix.lower() in spec.RASTER_SUFFIXES:
            found.add(p)
        elif _is_dicom(p):
            found.add(p.parent)
    return sorted(found)


def _files(root: str | os.PathLike[str]):
    """Every file below ``root`` in sorted order, without hidden entries or folders holding a cxr job's
    outputs (their mask volumes must never be read back as inputs)."""
    from data.datasets import OUTPUT_MARKER

    for dirpath, dirnames, filenames in os.walk(root):
        if OUTPUT_MARKER in filenames:
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield from (Path(dirpath) / n for n in sorted(filenames) if not n.startswith("."))


def write_mask_volume(volume: CTVolume, canonical: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """A (Z, H, W) uint8 label array over the canonical slices → a NIfTI file with the input's stored
    shape and affine (so it overlays the input voxel for voxel in any viewer)."""
    import nibabel as nib

    from data.files import write_bytes_atomic

    img = nib.Nifti1Image(volume.to_stored(np.asarray(canonical, np.uint8)), volume.affine)
    img.set_qform(volume.affine, code=1)
    img.set_sform(volume.affine, code=1)
    return write_bytes_atomic(Path(path), _nifti_bytes(img, str(path).endswith(".gz")))


def _nifti_bytes(img, gz: bool) -> bytes:
    import gzip

    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def _is_dicom(path: Path) -> bool:
    """A DICOM file by its content (series often come without a suffix); PNG/JPEG/… are not read."""
    if path.suffix.lower() in spec.RASTER_SUFFIXES:
        return False
    try:
        with path.open("rb") as handle:
            return sniff_format(handle.read(132)) == "dicom"
    except OSError:
        return False


#: Air in a CT: lung parenchyma lies below this (HU); soft tissue, vessels and lesions above.
LUNG_AIR_HU = -320.0


def pixels_to_hu(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """uint8 windowed pixels → the HU they stand for (the inverse of :func:`window_hu` inside the window)."""
    return np.asarray(pixels, np.float32) * np.float32(width / 255.0) + np.float32(center - width / 2.0)


def lung_field_hu(hu: np.ndarray, *, min_share: float = 0.01) -> np.ndarray:
    """A rough lung field of one axial slice from Hounsfield units alone (no model): the air below
    :data:`LUNG_AIR_HU` that does not touch the slice's border (air outside the body), components
    of at least ``min_share`` of the slice, holes (vessels, dense lesions) filled. Where every air
    component touches the border (a slice cropped to the chest) they are kept. bool (H, W)."""
    import cv2

    air = (np.asarray(hu) < LUNG_AIR_HU).astype(np.uint8)
    air = cv2.morphologyEx(air, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(air, connectivity=8)
    h, w = air.shape
    big = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_share * h * w]
    inside = [i for i in big if stats[i, cv2.CC_STAT_LEFT] > 0 and stats[i, cv2.CC_STAT_TOP] > 0
              and stats[i, cv2.CC_STAT_LEFT] + stats[i, cv2.CC_STAT_WIDTH] < w
              and stats[i, cv2.CC_STAT_TOP] + stats[i, cv2.CC_STAT_HEIGHT] < h]
    keep = np.isin(labels, inside or big).astype(np.uint8)
    contours, _ = cv2.findContours(keep, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(keep)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)


def detect_modality(root: str | os.PathLike[str]) -> str:
    """"ct" when ``root`` holds a NIfTI file or its first DICOM file says Modality CT, else "xray"."""
    import pydicom

    for p in _files(root):
        if is_nifti(p):
            return "ct"
        if _is_dicom(p):
            try:
                return "ct" if str(pydicom.dcmread(p, stop_before_pixels=True).get("Modality", "")) == "CT" else "xray"
            except (OSError, ValueError):  # a broken header: the X-ray run records it as a failure
                return "xray"
    return "xray"
