"""Writing output files: PNG, JSON, text and bytes, each through a temporary file and a rename.

A failed write (a full disk, say) raises OSError naming the file and leaves no partial file
behind, so a folder holds either the old file or the new one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) RGB or (H, W) grey uint8 → PNG bytes."""
    ok, buf = cv2.imencode(".png", image[..., ::-1] if image.ndim == 3 else image)
    if not ok:
        raise ValueError(f"could not encode a {image.shape} {image.dtype} array as PNG")
    return buf.tobytes()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` (parent folders created) through ``<name>.tmp`` and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name keeps a .png ending so that tools watching the folder never see a broken picture
    tmp = path.with_name(path.name + (".tmp.png" if path.suffix == ".png" else ".tmp"))
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename is None:
            err.filename = str(path)
        raise
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """UTF-8 text, written atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """An RGB or grey uint8 image as PNG, encoded in memory then written atomically."""
    return write_bytes_atomic(path, encode_png(image))


def write_json(path: str | os.PathLike[str], data: Any, *, sort_keys: bool = False) -> Path:
    """Indented JSON (NumPy scalars and arrays, and paths, converted), written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
