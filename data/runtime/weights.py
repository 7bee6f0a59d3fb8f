"""Initial weights for keras.applications backbones: ImageNet, a local file, or none.

One place for the rules both stages share (the classifier members and the U-Net's DenseNet121
encoder): "imagenet" is Keras's own download (cached in ~/.keras/models, where an offline
machine can be given the file), a folder is searched for the standard no-top file, a path is
used as is, and a failed download becomes a :class:`WeightsError` that names the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import keras

from data.errors import CxrError


class WeightsError(CxrError, RuntimeError):
    """Initial weights that cannot be found or loaded; the message says what to do."""


def is_none(weights: object) -> bool:
    """True for None or the string "none" (any case): train from random initialisation."""
    return weights is None or (isinstance(weights, str) and weights.lower() == "none")


def resolve_weights_file(weights: str | os.PathLike[str] | None, *, imagenet_file: str, what: str) -> str | None:
    """None, "imagenet", or the path of an existing weights file for ``what`` (e.g. "densenet121").

    A folder is searched for ``imagenet_file`` (Keras's no-top file name). WeightsError otherwise.
    """
    if is_none(weights):
        return None
    if isinstance(weights, str) and weights == "imagenet":
        return "imagenet"
    path = Path(weights)
    if path.is_dir():
        path = path / imagenet_file
    if not path.is_file():
        raise WeightsError(
            f"{path}: weights file for {what} not found; pass 'imagenet' (online), 'none', "
            f"a .h5 file, or a folder holding {imagenet_file}"
        )
    return str(path)


def build_application(constructor: Callable[..., keras.Model], *, weights: str | None, imagenet_file: str,
                      what: str, **kwargs) -> keras.Model:
    """``constructor(weights=weights, **kwargs)`` with download and load failures as WeightsError."""
    try:
        return constructor(weights=weights, **kwargs)
    except Exception as err:  # Keras reports a failed download as a bare Exception("URL fetch failure ...")
        if weights == "imagenet":
            raise WeightsError(
                f"could not get ImageNet weights for {what} ({err}); on an offline machine copy "
                f"{imagenet_file} into ~/.keras/models/, or pass weights='none' to train from scratch "
                "(the 'scratch' preset), or a local .h5 file"
            ) from err
        if weights is not None:
            raise WeightsError(f"{weights}: cannot load as {what} weights ({err})") from err
        raise
