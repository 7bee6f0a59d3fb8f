"""A trained classifier as used after training: load, check, predict in batches.

``Classifier.predict`` returns, from one forward pass, the calibrated ensemble
probabilities, each member's probabilities and each member's last conv maps, so
Grad-CAM needs no second pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data import spec
from data.runtime.bundle import SIDECAR, BundleError, load_bundle, save_bundle
from data.runtime.loaded import LoadedBundle
from ensemble import ensemble as _ensemble  # noqa: F401  (registers the custom layers for loading)
from ensemble import members as _members  # noqa: F401
from ensemble.calibration import apply_temperature
from ensemble.ensemble import head_weights

KIND = "classifier"


@dataclass
class Prediction:
    """Outputs for a batch of N images (class order: data.spec.CLASS_NAMES)."""

    probs: np.ndarray  # (N, C) float32, temperature-scaled ensemble probabilities
    raw_probs: np.ndarray  # (N, C) float32, before temperature scaling
    member_probs: dict[str, np.ndarray] = field(default_factory=dict)  # (N, C) each, soft vote only
    features: dict[str, np.ndarray] = field(default_factory=dict)  # (N, h, w, K) each

    @property
    def labels(self) -> list[str]:
        return [spec.CLASS_NAMES[i] for i in self.probs.argmax(axis=1)]


@dataclass
class Classifier(LoadedBundle):
    """A loaded classifier bundle."""

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(self.meta["members"])

    @property
    def variant(self) -> str:
        return self.meta["variant"]

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))

    @property
    def refer_rule(self) -> dict[str, Any] | None:
        """The input check and confidence threshold fitted at training (ensemble.refer); None in older bundles."""
        return self.meta.get("refer")

    @property
    def member_weights(self) -> list[float]:
        w = self.meta.get("member_weights")
        return list(w) if w else [1.0 / len(self.members)] * len(self.members)

    def head_weights(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per member (kernel (K, C), bias (C,)) mapping pooled features to logits."""
        return head_weights(self.model, self.members, self.variant)

    def predict(self, batch: np.ndarray) -> Prediction:
        """(N, S, S, 3) float32 in [0, 255] → :class:`Prediction`, one forward pass."""
        out = self.forward(batch)
        raw = out["probs"].astype(np.float32)
        return Prediction(
            probs=apply_temperature(raw, self.temperature),
            raw_probs=raw,
            member_probs={m: out[f"{m}_probs"] for m in self.members if f"{m}_probs" in out},
            features={m: out[f"{m}_features"] for m in self.members},
        )


def save_classifier(model, directory: str | os.PathLike[str], *, members, variant: str, image_size: int,
                    config: dict[str, Any], temperature: float = 1.0, member_weights=None,
                    resize_mode: str = spec.DEFAULT_RESIZE_MODE, clahe: bool = False,
                    weight_files: dict[str, str] | None = None,
                    extra_meta: dict[str, Any] | None = None) -> Path:
    """Save a trained ensemble as a classifier bundle; returns the sidecar path.

    ``extra_meta`` adds keys to the sidecar's meta (the trainer's validation summary, the refer rule).
    """
    meta = {
        "members": list(members),
        "variant": variant,
        "member_weights": list(member_weights) if member_weights else None,
        "temperature": float(temperature),
        "resize_mode": resize_mode,
        "clahe": bool(clahe),
        "initial_weight_files": weight_files or {},
        "outputs": ["probs", *[f"{m}_features" for m in members],
                    *([f"{m}_probs" for m in members] if variant == "softvote" else [])],
        **(extra_meta or {}),
    }
    return save_bundle(model, directory, kind=KIND, image_size=image_size, config=config, meta=meta)


def load_classifier(directory: str | os.PathLike[str]) -> Classifier:
    """Load and check a classifier bundle; BundleError naming the file on any problem."""
    model, side = load_bundle(directory, kind=KIND)
    meta = side.get("meta", {})
    for key in ("members", "variant"):
        if key not in meta:
            raise BundleError(f"{Path(directory) / SIDECAR}: meta.{key} missing")
    names = set(model.output.keys()) if isinstance(model.output, dict) else set()
    expected = {"probs", *[f"{m}_features" for m in meta["members"]]}
    if not expected <= names:
        raise BundleError(f"{directory}: model outputs {sorted(names)} lack {sorted(expected - names)}")
    return Classifier(model=model, sidecar=side, path=Path(directory))
