"""`cxr export`: a classifier or segmenter bundle as ONNX (checked against Keras), int8 ONNX
(calibrated on training images) or a SavedModel; a U-Net segmenter's encoder as keras.applications
weights (``encoder``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from data.runtime.bundle import SIDECAR, BundleError

FORMATS = ("onnx", "onnx-int8", "savedmodel", "encoder")
#: ``--format encoder``: the file written into the bundle, and its record (what the encoder learnt from).
ENCODER_FILE = "encoder.weights.h5"
#: Calibration images for int8 when not told otherwise (ONNX Runtime's examples use a few dozen).
DEFAULT_CALIBRATION_COUNT = 32


def export_model(directory: str | os.PathLike[str], fmt: str = "onnx", *,
                 calibration: str | os.PathLike[str] | None = None,
                 calibration_count: int = DEFAULT_CALIBRATION_COUNT) -> Path:
    """Write ``model.onnx`` (+ record), ``model.int8.onnx`` (+ record) or ``saved_model/`` into the
    bundle; returns the path. ``onnx-int8`` needs ``calibration``, a folder of images (see
    :func:`calibration_files`)."""
    import json

    directory = Path(directory)
    sidecar = directory / SIDECAR
    if not sidecar.is_file():
        raise BundleError(f"{sidecar}: missing; {directory} is not a model directory saved by cxr")
    kind = json.loads(sidecar.read_text(encoding="utf-8")).get("kind")
    if kind == "classifier":
        from ensemble.classifier import load_classifier

        model = load_classifier(directory)
    elif kind == "segmenter":
        from segmenter.model import load_segmenter

        model = load_segmenter(directory)
    else:
        raise BundleError(f"{sidecar}: kind {kind!r} is neither a classifier nor a segmenter")
    if fmt == "onnx":
        model.use_engine("onnx")
        return model.onnx.path
    if fmt == "onnx-int8":
        from data.runtime.engines import INT8_FILE, ensure_int8

        if calibration is None:
            raise BundleError("--format onnx-int8 needs --calibration DIR: a folder of training images "
                              "(the bundle's own training split is taken from it where its splits.csv matches)")
        files = calibration_files(directory, calibration, calibration_count)
        ensure_int8(directory, model.model, image_size=model.image_size, source_sha256=model.checkpoint_sha256,
                    calibration=_load_inputs(model, files), calibration_files=[f.as_posix() for f in files])
        return directory / INT8_FILE
    if fmt == "encoder":
        return _export_encoder(directory, model)
    if fmt == "savedmodel":
        out = directory / "saved_model"
        tmp = directory / "saved_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.model.export(str(tmp), format="tf_saved_model", verbose=False)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out
    raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


def _export_encoder(directory: Path, seg) -> Path:
    """``encoder.weights.h5`` (keras.applications no-top weights of the U-Net's encoder) and its record
    ``encoder.weights.h5.json``: the encoder, the source bundle's checkpoint hash, mask kind, input size,
    and the files and patients it trained and validated on (from its splits.csv), which
    `cxr train-classifier` checks against its own test split."""
    from data.files import write_json
    from data.splits import read_splits
    from ensemble.convert import KERAS_SCALING, SCALINGS, sidecar_path
    from pipeline.common import trained_patients
    from segmenter.unet import encoder_application

    arch = seg.meta["arch"]
    if not arch.startswith("unet-"):
        raise BundleError(f"{directory}: a {arch} model has no keras.applications encoder to export; "
                          "export the encoder of a U-Net (arch unet-densenet121 or unet-mobilenetv2)")
    encoder = arch.removeprefix("unet-")
    splits_file = directory / "splits.csv"
    if not splits_file.is_file():
        raise BundleError(f"{splits_file}: missing; without it the images the encoder learnt from are unknown, and "
                          "a classifier initialised from it could not be checked for test images it saw")
    seen = sorted(f for f, split in read_splits(splits_file).items() if split in ("train", "val"))
    out = directory / ENCODER_FILE
    tmp = directory / ("tmp." + ENCODER_FILE)  # Keras wants the .weights.h5 ending
    encoder_application(seg.model, encoder, seg.image_size).save_weights(tmp)
    os.replace(tmp, out)
    write_json(sidecar_path(out), {
        "encoder": encoder, "source": str(directory), "source_sha256": seg.checkpoint_sha256, "kind": seg.kind,
        "image_size": seg.image_size,
        # the scaling the member builder reads from this sidecar (ensemble.convert.input_scaling): the
        # U-Net's encoder normalises its input as the keras.applications model does
        "input_scaling": KERAS_SCALING, "input_scaling_formula": SCALINGS[KERAS_SCALING],
        "trained_on": {"files": seen, "patients": sorted(trained_patients(splits_file))}})
    return out


def encoder_record(weights_file: str | os.PathLike[str]) -> dict | None:
    """The record `cxr export --format encoder` wrote beside ``weights_file``; None for other files
    (among them the weights `cxr convert` writes, whose sidecar records no training images)."""
    import json

    from ensemble.convert import sidecar_path

    record = sidecar_path(weights_file)
    if not record.is_file():
        return None
    try:
        content = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise BundleError(f"{record}: unreadable ({err}); export the encoder again") from None
    return content if isinstance(content, dict) and "trained_on" in content else None


def calibration_files(directory: Path, folder: str | os.PathLike[str], count: int) -> list[Path]:
    """Up to ``count`` images of ``folder``, evenly spread in sorted order, for int8 calibration.

    Where the bundle has a ``splits.csv`` naming files of ``folder`` (paths relative to it), only
    its training split is used, so no validation or test image shapes the quantisation.
    """
    from data.datasets import DatasetError, walk_images
    from data.splits import read_splits

    folder = Path(folder)
    if count < 1:
        raise ValueError(f"calibration count must be ≥ 1, got {count}")
    paths = sorted(walk_images(folder)) if folder.is_dir() else []
    if not paths:
        raise DatasetError(f"{folder}: no images to calibrate int8 on; pass a folder of training images")
    splits_file = directory / "splits.csv"
    if splits_file.is_file():
        splits = read_splits(splits_file)
        listed = [p for p in paths if p.relative_to(folder).as_posix() in splits]
        if listed:
            paths = [p for p in listed if splits[p.relative_to(folder).as_posix()] == "train"]
            if not paths:
                raise DatasetError(f"{folder}: none of its images is in the training split of {splits_file}")
    step = max(1, len(paths) // count)
    return paths[::step][:count]


def _load_inputs(model, files: list[Path]):
    """The model's inputs for ``files`` (decoded and resized as at inference); unreadable ones are an error."""
    import numpy as np

    from data.datasets import DatasetError, FailureLog

    failures = FailureLog()
    xs = [b.x for b in model.stream(files, failures=failures)]
    if failures.items:
        path, reason = failures.items[0]
        raise DatasetError(f"{path}: {reason}; remove it from the calibration folder")
    return np.concatenate(xs)
