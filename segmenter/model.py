"""A trained segmenter as used after training: load, check, predict lesion probabilities, and
turn them into a mask, lesion instances and the share of lung affected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import spec
from data.runtime.bundle import SIDECAR, BundleError, load_bundle
from data.runtime.loaded import LoadedBundle
from segmenter import losses as _losses  # noqa: F401  (registers the loss functions for loading)
from segmenter.metrics import Lesion, lesion_instances, lung_affected_pct

KIND = "segmenter"


@dataclass
class Segmenter(LoadedBundle):
    """A loaded segmenter bundle."""

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def min_lesion_area(self) -> int:
        return int(self.meta.get("min_lesion_area", spec.DEFAULT_MIN_LESION_AREA))

    @property
    def classes(self) -> str:
        return self.meta.get("classes", "binary")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) float32 in [0, 255] → (N, S, S) float32 lesion (foreground) probabilities.

        For a "lung-lesion" model this is the lesion channel of its softmax.
        """
        out = self.forward(batch)
        if isinstance(out, dict):  # ONNX Runtime names its one output
            out = next(iter(out.values()))
        channel = 0 if self.classes == "binary" else 2
        return out[..., channel].astype(np.float32)


def load_segmenter(directory: str | os.PathLike[str]) -> Segmenter:
    """Load and check a segmenter bundle; BundleError naming the file on any problem."""
    model, side = load_bundle(directory, kind=KIND)
    for key in ("arch", "kind", "threshold"):
        if key not in side.get("meta", {}):
            raise BundleError(f"{Path(directory) / SIDECAR}: meta.{key} missing")
    return Segmenter(model, side, Path(directory))


@dataclass
class SegmentedImage:
    """Stage-2 output for one image, at its original size."""

    mask: np.ndarray  # bool (H, W)
    lung: np.ndarray | None  # bool (H, W), or None without a lung model
    lesions: list[Lesion]
    lung_affected_pct: float | None
    instances: np.ndarray | None = None  # uint16 (H, W): 0 background, k the k-th of ``lesions``


def segment_image(prob: np.ndarray, seg: Segmenter, lung_prob: np.ndarray | None = None,
                  lung_threshold: float = 0.5) -> SegmentedImage:
    """(H, W) lesion probabilities → mask (thresholded, small components dropped), lesion instances
    and the share of lung affected (inside the lung field when ``lung_prob`` is given)."""
    lung = lung_prob >= lung_threshold if lung_prob is not None else None
    instances, found = lesion_instances(prob, threshold=seg.threshold, min_area=seg.min_lesion_area, lung=lung)
    mask = instances > 0
    pct = lung_affected_pct(mask, lung) if lung is not None else None
    return SegmentedImage(mask, lung, found, pct, instances)
