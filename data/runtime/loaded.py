"""The base of every loaded model bundle (classifier, segmenter): the input it expects, read once
from the sidecar, the way images are prepared for it and mapped back, and the forward pass on
the chosen engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from data import spec
from data.preprocess import Geometry, preprocess_image
from data.runtime.bundle import MODEL_FILE
from data.runtime.engines import EngineChoice, OnnxForward
from data.runtime.tf_setup import trace_for_any_batch
from data.stream import Batch, Prepared, pad_to_bucket, prepare_image, stream_images


@dataclass(frozen=True)
class InputConfig:
    """How images become a model's input: side length, resize mode and CLAHE.

    Parsed once from the sidecar; bundles saved before a key existed get data.spec's defaults.
    """

    image_size: int
    resize_mode: str = spec.DEFAULT_RESIZE_MODE
    clahe: bool = False

    @classmethod
    def from_sidecar(cls, sidecar: dict[str, Any]) -> InputConfig:
        meta = sidecar.get("meta", {})
        return cls(image_size=int(sidecar["image_size"]),
                   resize_mode=str(meta.get("resize_mode", spec.DEFAULT_RESIZE_MODE)),
                   clahe=bool(meta.get("clahe", False)))

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """A decoded image → (the model's (S, S, 3) float32 input, its Geometry)."""
        return preprocess_image(image, size=self.image_size, mode=self.resize_mode, clahe=self.clahe)

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` as float32, or ValueError when it is not (N, S, S, 3)."""
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, spec.CHANNELS):
            raise ValueError(f"expected (N, {self.image_size}, {self.image_size}, {spec.CHANNELS}) float32 in "
                             f"[0, 255], got {x.shape}")
        return x


@dataclass
class LoadedBundle(EngineChoice):
    """A model directory loaded and checked (data.runtime.bundle.load_bundle), on an engine."""

    model: Any
    sidecar: dict[str, Any]
    path: Path
    onnx: OnnxForward | None = None  # set by use_engine("onnx" | "onnx-int8")
    input: InputConfig = field(init=False, repr=False)
    # whether the Keras predict step takes any batch size without retracing (set at the first forward)
    _any_batch: bool | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.input = InputConfig.from_sidecar(self.sidecar)

    @property
    def meta(self) -> dict[str, Any]:
        return self.sidecar.get("meta", {})

    @property
    def image_size(self) -> int:
        return self.input.image_size

    @property
    def resize_mode(self) -> str:
        return self.input.resize_mode

    @property
    def clahe(self) -> bool:
        return self.input.clahe

    @property
    def checkpoint_sha256(self) -> str:
        return self.sidecar["files"][MODEL_FILE]

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
        """A decoded image → (this model's (S, S, 3) float32 input, its Geometry)."""
        return self.input.preprocess(image)

    def prepare(self, image: np.ndarray, *, keep_original: bool = True) -> Prepared:
        """A decoded image → data.stream.Prepared for this model."""
        return prepare_image(image, size=self.input.image_size, mode=self.input.resize_mode,
                             clahe=self.input.clahe, keep_original=keep_original)

    def stream(self, paths: Sequence[str | os.PathLike[str]], **kwargs: Any) -> Iterator[Batch]:
        """data.stream.stream_images with this model's input settings (``kwargs``: batch_size,
        failures, keep_original, max_pixels, memory_budget, ...)."""
        return stream_images(paths, size=self.input.image_size, mode=self.input.resize_mode,
                             clahe=self.input.clahe, **kwargs)

    @staticmethod
    def to_original(model_map: np.ndarray, geometry: Geometry) -> np.ndarray:
        """A map over this model's input → the original image's (H, W), float32 in [0, 1]."""
        return geometry.map_to_original(model_map)

    def forward(self, batch: np.ndarray) -> Any:
        """The model's raw outputs for a checked (N, S, S, 3) batch: a dict for named outputs on
        Keras, always a dict on ONNX Runtime (output name → array)."""
        x = self.input.check_batch(batch)
        if self.onnx is not None:
            return self.onnx(x)  # ONNX Runtime takes any batch size without retracing
        # predict_on_batch runs the compiled predict step. On TensorFlow it is traced once, for any
        # batch size; where it is traced per shape, padding to power-of-two buckets keeps the traces few.
        if self._any_batch is None:
            self._any_batch = trace_for_any_batch(self.model)
        padded, n = (x, len(x)) if self._any_batch else pad_to_bucket(x)
        out = self.model.predict_on_batch(padded)
        if isinstance(out, dict):
            return {k: np.asarray(v)[:n] for k, v in out.items()}
        return np.asarray(out)[:n]
