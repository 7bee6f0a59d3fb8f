"""Model directories: ``model.keras`` plus a JSON sidecar checked on load.

The sidecar carries the input contract (class names, size, resize mode), the training
configuration and its hash, package versions and the sha256 of every file, so a model is
never used with the wrong labels or a file that changed after saving.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from data import spec
from data.errors import CxrError
from data.files import write_json

SIDECAR = "model.json"
MODEL_FILE = "model.keras"
FORMAT = "cxr-model"
FORMAT_VERSION = 2  # 2: sidecar_hash covers every field; 1 (config_hash only) is still read


class BundleError(CxrError):
    """A model directory that cannot be used; the message names the file and the fix."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a config (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a model's numbers."""
    out = {"python": platform.python_version()}
    for name in ("cxr-triage", "keras", "tensorflow-cpu", "tensorflow", "numpy", "opencv-python-headless", "pillow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision(start: str | os.PathLike[str] | None = None) -> str:
    """The checkout's commit (with '-dirty' when modified), or 'unknown' outside a git checkout."""
    cwd = Path(start) if start else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def save_bundle(model, directory: str | os.PathLike[str], *, kind: str, image_size: int,
                config: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Save ``model`` and its sidecar into ``directory`` (created); returns the sidecar path.

    The sidecar is written last, atomically, so a directory with a sidecar is complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / MODEL_FILE
    tmp = directory / (MODEL_FILE + ".tmp.keras")
    model.save(tmp)
    os.replace(tmp, model_path)
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        **spec.spec_dict(),
        "image_size": int(image_size),
        "config": config,
        "config_hash": config_hash(config),
        "meta": meta,
        "files": {MODEL_FILE: sha256_file(model_path)},
        "package_versions": package_versions(),
        "git_revision": git_revision(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    sidecar["sidecar_hash"] = sidecar_hash(sidecar)
    write_json(directory / SIDECAR, sidecar, sort_keys=True)
    return directory / SIDECAR


def update_meta(directory: str | os.PathLike[str], *, kind: str, changes: dict[str, Any], why: str) -> dict[str, Any]:
    """Change keys of a saved bundle's ``meta`` (the checked sidecar rewritten atomically, its hash
    renewed) and record the change under ``meta.edits``: when, each key's old and new value, and
    ``why``. The model file and config are untouched. Returns that record."""
    directory = Path(directory)
    side = read_sidecar(directory, kind=kind)
    meta = dict(side.get("meta", {}))
    edit = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "why": why,
            "changed": {k: [meta.get(k), v] for k, v in changes.items()}}
    meta.update(changes)
    meta["edits"] = [*meta.get("edits", []), edit]
    side = {**side, "meta": meta, "format_version": FORMAT_VERSION}
    side["sidecar_hash"] = sidecar_hash(side)
    write_json(directory / SIDECAR, side, sort_keys=True)
    return edit


def sidecar_hash(sidecar: dict[str, Any]) -> str:
    """sha256 of every sidecar field but itself: an edit to any field (image_size, meta, ...) is caught."""
    return config_hash({k: v for k, v in sidecar.items() if k != "sidecar_hash"})


def read_sidecar(directory: str | os.PathLike[str], *, kind: str) -> dict[str, Any]:
    """The checked sidecar of a model directory; BundleError on any mismatch."""
    directory = Path(directory)
    path = directory / SIDECAR
    if not directory.is_dir():
        raise BundleError(f"{directory}: no such model directory")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {directory} is not a model directory saved by cxr (train one first)")
    try:
        side = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err}); restore it from the training run") from None
    if side.get("format") != FORMAT or side.get("format_version") not in (1, FORMAT_VERSION):
        raise BundleError(f"{path}: not a {FORMAT} v1 or v{FORMAT_VERSION} sidecar")
    if side.get("kind") != kind:
        raise BundleError(f"{directory}: holds a {side.get('kind')!r} model, expected a {kind!r} model")
    if side.get("class_names") != list(spec.CLASS_NAMES):
        raise BundleError(
            f"{path}: class names {side.get('class_names')} differ from this version's "
            f"{list(spec.CLASS_NAMES)}; retrain the model with this version"
        )
    if side.get("config_hash") != config_hash(side.get("config", {})):
        raise BundleError(f"{path}: config_hash does not match its config; the sidecar was edited")
    if side.get("format_version", 1) >= 2 and side.get("sidecar_hash") != sidecar_hash(side):
        raise BundleError(f"{path}: sidecar_hash does not match its fields; the sidecar was edited after saving "
                          "(restore it from the training run, or retrain)")
    for name, digest in side.get("files", {}).items():
        f = directory / name
        if not f.is_file():
            raise BundleError(f"{f}: listed in the sidecar but missing")
        if sha256_file(f) != digest:
            raise BundleError(f"{f}: sha256 differs from the sidecar; the file changed after saving "
                              "(restore it or retrain)")
    return side


def load_bundle(directory: str | os.PathLike[str], *, kind: str):
    """(keras model, sidecar) from a directory written by :func:`save_bundle`."""
    import keras

    from data.runtime import layers  # noqa: F401  (registers the in-graph normalisation layers the models use)

    side = read_sidecar(directory, kind=kind)
    model = keras.saving.load_model(Path(directory) / MODEL_FILE, compile=False)
    return model, side
