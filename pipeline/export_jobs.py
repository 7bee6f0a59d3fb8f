"""`cxr export`: a classifier or segmenter bundle as ONNX (checked against Keras) or a SavedModel."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from data.bundle import BundleError


def export_model(directory: str | os.PathLike[str], fmt: str = "onnx") -> Path:
    """Write ``model.onnx`` (+ ``model.onnx.json``) or ``saved_model/`` into the bundle; returns the path."""
    import json

    directory = Path(directory)
    sidecar = directory / "model.json"
    if not sidecar.is_file():
        raise BundleError(f"{sidecar}: missing; {directory} is not a model directory saved by cxr")
    kind = json.loads(sidecar.read_text(encoding="utf-8")).get("kind")
    if kind == "classifier":
        from ensemble.classifier import load_classifier

        model = load_classifier(directory)
    elif kind == "segmenter":
        from segmenter.train import load_segmenter

        model = load_segmenter(directory)
    else:
        raise BundleError(f"{sidecar}: kind {kind!r} is neither a classifier nor a segmenter")
    if fmt == "onnx":
        model.use_engine("onnx")
        return model.onnx.path
    if fmt == "savedmodel":
        out = directory / "saved_model"
        tmp = directory / "saved_model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.model.export(str(tmp), format="tf_saved_model", verbose=False)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out
    raise ValueError(f"unknown format {fmt!r}; valid: onnx, savedmodel")
