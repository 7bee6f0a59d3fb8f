"""A trained segmenter as used after training: load, check, predict lesion probabilities, and
turn them into a mask, lesion instances and the share of lung affected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import spec
from data.errors import UsageError
from data.runtime.bundle import SIDECAR, BundleError, load_bundle, update_meta
from data.runtime.loaded import LoadedBundle
from segmenter import losses as _losses  # noqa: F401  (registers the loss functions for loading)
from segmenter.metrics import Lesion, area_by_type, lesion_instances, lung_affected_pct
from segmenter.schemes import channel_names, lesion_channels
from segmenter.tta import TTA_SETS, averaged_maps

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
    def tta(self) -> str:
        """Its test-time augmentation (a segmenter.tta.TTA_SETS name; "none" in bundles from before it)."""
        return self.meta.get("tta", "none")

    @property
    def classes(self) -> str:
        return self.meta.get("classes", "binary")

    @property
    def modality(self) -> str:
        """The images it was trained on: "xray" or "ct" (bundles from before CT are X-ray models)."""
        return self.meta.get("modality", "xray")

    @property
    def ct_window(self) -> tuple[float, float] | None:
        """(centre, width) HU in which a CT model saw its slices; None for an X-ray model."""
        window = self.meta.get("ct_window")
        return (float(window[0]), float(window[1])) if window else None

    @property
    def channels(self) -> tuple[str, ...]:
        """The output channels by name (segmenter.schemes.channel_names; bundles from before
        lesion types carry no list and get their scheme's)."""
        return tuple(self.meta.get("channels") or channel_names(self.classes, self.kind))

    @property
    def lesion_types(self) -> tuple[str, ...]:
        """The lesion channels: (kind,) for a one-class model (a lung-field model's too), ("ggo",
        "consolidation") for lesion types."""
        return lesion_channels(self.classes, self.channels)

    @property
    def has_lung(self) -> bool:
        """The model segments the lung field beside the lesions (a "lung-lesion*" scheme)."""
        return self.classes != "binary" and "lung" in self.channels

    @property
    def class_kinds(self) -> dict[str, str]:
        """Each scored class (lesion types, then "lung" when the model has it) → the mask kind it was
        trained on (evaluation reads the same kind)."""
        out = {t: t for t in self.lesion_types}
        if self.has_lung:
            out["lung"] = self.lung_kind
        return out

    @property
    def lung_kind(self) -> str:
        """The mask kind of the lung field it was trained with (a lung-field model's own kind)."""
        return self.sidecar.get("config", {}).get("lung_kind", "lung")

    def predict_maps(self, batch: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) float32 in [0, 255] → (N, S, S, C) float32, one probability map per
        :attr:`channels` entry (a softmax over them when C > 1), averaged over :attr:`tta`'s passes."""
        return averaged_maps(self._forward_maps, batch, TTA_SETS[self.tta])

    def _forward_maps(self, batch: np.ndarray) -> np.ndarray:
        out = self.forward(batch)
        if isinstance(out, dict):  # ONNX Runtime names its one output
            out = next(iter(out.values()))
        return np.asarray(out, np.float32)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) float32 in [0, 255] → (N, S, S) float32 lesion (foreground) probabilities:
        for a softmax model the sum of its lesion channels (any lesion type)."""
        return self.lesion_probability(self.predict_maps(batch))

    def lesion_probability(self, maps: np.ndarray) -> np.ndarray:
        """(..., C) maps of :meth:`predict_maps` → (...) probability of any lesion."""
        idx = [self.channels.index(t) for t in self.lesion_types]
        return maps[..., idx[0]] if len(idx) == 1 else maps[..., idx].sum(axis=-1)

    def maps_to_original(self, maps: np.ndarray, geometry) -> SegmenterMaps:
        """One image's (S, S, C) maps of :meth:`predict_maps` → :class:`SegmenterMaps` at its original size."""
        types = None
        if len(self.lesion_types) > 1:
            types = {t: self.to_original(maps[..., self.channels.index(t)], geometry) for t in self.lesion_types}
        lung = None
        if self.has_lung:  # the lung field is every pixel not background (lesions lie in the lung)
            lung = self.to_original(1.0 - maps[..., self.channels.index("background")], geometry)
        return SegmenterMaps(self.to_original(self.lesion_probability(maps), geometry), types, lung)


def load_segmenter(directory: str | os.PathLike[str]) -> Segmenter:
    """Load and check a segmenter bundle; BundleError naming the file on any problem."""
    model, side = load_bundle(directory, kind=KIND)
    for key in ("arch", "kind", "threshold"):
        if key not in side.get("meta", {}):
            raise BundleError(f"{Path(directory) / SIDECAR}: meta.{key} missing")
    seg = Segmenter(model, side, Path(directory))
    if seg.tta not in TTA_SETS:  # the property holds the rule for bundles from before meta.tta
        raise BundleError(f"{Path(directory) / SIDECAR}: meta.tta {seg.tta!r} is not one of "
                          f"{', '.join(TTA_SETS)} (a newer version's bundle, or an edited file)")
    return seg


def set_threshold(directory: str | os.PathLike[str], cut: float, *, why: str) -> tuple[float, float]:
    """Make ``cut`` the saved segmenter's probability cut (``meta.threshold``), e.g. an operating point
    read off ``cxr evaluate-segmenter``'s cut_sweep.csv; every command that loads the bundle uses it
    from then on. The change and ``why`` are recorded in ``meta.edits``; the fitted cut stays in
    ``meta.threshold_fit``. Returns (old cut, new cut)."""
    if not 0.0 < cut < 1.0:
        raise UsageError(f"a cut must lie in (0, 1), got {cut}")
    edit = update_meta(directory, kind=KIND, changes={"threshold": float(cut)}, why=why)
    return float(edit["changed"]["threshold"][0]), float(cut)


@dataclass
class SegmenterMaps:
    """A segmenter's probabilities for one image at its original size, float32 (H, W) in [0, 1]."""

    lesion: np.ndarray  # any lesion
    types: dict[str, np.ndarray] | None = None  # per lesion type, for a model with several
    lung: np.ndarray | None = None  # the lung field, for a model with a lung class


@dataclass
class SegmentedImage:
    """Stage-2 output for one image, at its original size."""

    mask: np.ndarray  # bool (H, W)
    lung: np.ndarray | None  # bool (H, W), or None without a lung field
    lesions: list[Lesion]
    lung_affected_pct: float | None
    instances: np.ndarray | None = None  # uint16 (H, W): 0 background, k the k-th of ``lesions``
    types: tuple[str, ...] = ("lesion",)  # the segmenter's lesion types

    @property
    def area_by_type(self) -> dict[str, int]:
        """Lesion pixels per lesion type (every type of the model, 0 where none)."""
        return area_by_type(self.lesions, self.types)


def class_masks(maps: SegmenterMaps, seg: Segmenter, lung_threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Each class's predicted mask (bool (H, W); thresholded, small components kept, as evaluation
    scores them): every lesion type, the lesion pixels whose most probable type it is, and "lung"
    for a model with a lung class. Keys as :attr:`Segmenter.class_kinds`."""
    lesion = maps.lesion >= seg.threshold
    if maps.types:
        names = list(maps.types)
        best = np.argmax(np.stack([maps.types[n] for n in names]), axis=0)
        out = {n: lesion & (best == i) for i, n in enumerate(names)}
    else:
        out = {seg.lesion_types[0]: lesion}
    if maps.lung is not None:
        out["lung"] = maps.lung >= lung_threshold
    return out


def segment_image(maps: SegmenterMaps | np.ndarray, seg: Segmenter, lung_prob: np.ndarray | None = None,
                  lung_threshold: float = 0.5, threshold: float | None = None) -> SegmentedImage:
    """Probabilities (a :class:`SegmenterMaps`, or the (H, W) lesion map alone) → mask (thresholded at
    ``threshold``, else the bundle's cut; small components dropped), typed lesion instances and the
    share of lung affected.

    The lung field is ``lung_prob`` (a separate lung model) when given, else the segmenter's own
    lung class when it has one; without either there is no share of lung.
    """
    if not isinstance(maps, SegmenterMaps):
        maps = SegmenterMaps(np.asarray(maps, np.float32))
    lung_map = lung_prob if lung_prob is not None else maps.lung
    lung = lung_map >= lung_threshold if lung_map is not None else None
    cut = seg.threshold if threshold is None else threshold
    instances, found = lesion_instances(maps.lesion, threshold=cut, min_area=seg.min_lesion_area,
                                        lung=lung, kind=seg.kind, types=maps.types)
    mask = instances > 0
    pct = lung_affected_pct(mask, lung) if lung is not None else None
    return SegmentedImage(mask, lung, found, pct, instances, seg.lesion_types)
