"""Training, saving and loading of the stage-2 segmenters (lesion or lung field).

Graph mode by default; ``run_eagerly`` for tests. The saved bundle is ``model.keras`` +
``model.json`` (kind "segmenter"), checked on load like the classifier's.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import keras
import numpy as np
from keras import ops

from data import spec
from data.augment import AugmentParams
from data.bundle import SIDECAR, BundleError, load_bundle, save_bundle
from data.datasets import FailureLog, Record, make_dataset
from data.export import EngineChoice
from data.stream import pad_to_bucket
from data.tf_setup import configure_graph_training
from data.training import (apply_preset, build_callbacks, build_optimizer, check_recipe, fit_streamed,
                           reestimate_batchnorm, set_bn_momentum, steps_per_epoch)
from segmenter import losses as _losses  # noqa: F401  (registers the loss functions for loading)
from segmenter.losses import get_loss
from segmenter.tiramisu import build_fc_densenet103
from segmenter.unet import build_unet

KIND = "segmenter"
ARCHS = ("unet-densenet121", "fc-densenet103")
#: "binary": lesion vs background, sigmoid. "lung-lesion": background / lung / lesion, softmax,
#: trained from a lung mask and a lesion mask (lesion wins where both are set).
CLASS_SCHEMES = ("binary", "lung-lesion")


@keras.saving.register_keras_serializable(package="cxr")
def dice_coefficient(y_true, y_pred):
    """Soft Dice of the batch (a training metric; evaluation uses thresholded masks)."""
    y_true = ops.cast(y_true, y_pred.dtype)
    inter = ops.sum(y_true * y_pred)
    return (2.0 * inter + 1.0) / (ops.sum(y_true) + ops.sum(y_pred) + 1.0)


#: Named recipes (as ensemble.train.PRESETS): "paper" is the dataclass defaults (Adam 1e-4, 40
#: epochs, plateau LR); "scratch", the default whenever weights = "none", is what from-scratch
#: training needs (data.training explains the BatchNorm part).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "scratch": {
        "optimizer": "adamw", "weight_decay": 0.01, "learning_rate": 1e-3, "lr_schedule": "cosine",
        "warmup_epochs": 1, "bn_momentum": 0.9, "bn_reestimate_batches": 16, "epochs": 30,
        "early_stopping_patience": 0,
    },
}


def with_preset(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` completed by its preset: ``values["preset"]``, else "scratch" when the encoder
    starts from random weights (weights "none", or FC-DenseNet103) and "paper" otherwise."""
    from data.weights import is_none

    scratch = is_none(values.get("weights", "imagenet")) or values.get("arch") == "fc-densenet103"
    return apply_preset(values, PRESETS, "scratch" if scratch else "paper")


@dataclass(frozen=True)
class SegmenterSettings:
    """Everything that decides a trained segmenter (paper: lr 1e-4, batch 30, 40 epochs)."""

    arch: str = "unet-densenet121"
    kind: str = "infection"
    image_size: int = 256
    resize_mode: str = spec.DEFAULT_RESIZE_MODE
    clahe: bool = False
    weights: str | None = "imagenet"  # encoder initialisation (U-Net only)
    freeze_encoder: bool = False
    classes: str = "binary"
    lung_kind: str = "lung"
    loss: str = "bce_dice"
    learning_rate: float = 1e-4
    batch_size: int = 8
    epochs: int = 40
    augment: bool = True
    early_stopping_patience: int = 10
    reduce_lr_patience: int = 4
    threshold: float = 0.5
    min_lesion_area: int = spec.DEFAULT_MIN_LESION_AREA
    seed: int = 0
    run_eagerly: bool = False
    preset: str = "paper"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "plateau"
    warmup_epochs: int = 0
    bn_momentum: float | None = None  # None keeps Keras' 0.99
    bn_reestimate_batches: int = 0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid: {', '.join(PRESETS)}")
        check_recipe(optimizer=self.optimizer, lr_schedule=self.lr_schedule, warmup_epochs=self.warmup_epochs,
                     epochs=max(self.epochs, 1), bn_momentum=self.bn_momentum, weight_decay=self.weight_decay)
        if self.bn_reestimate_batches < 0:
            raise ValueError("bn_reestimate_batches must be ≥ 0")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; valid: {', '.join(ARCHS)}")
        get_loss(self.loss)
        if self.classes not in CLASS_SCHEMES:
            raise ValueError(f"unknown classes {self.classes!r}; valid: {', '.join(CLASS_SCHEMES)}")
        if self.classes == "lung-lesion" and self.loss != "cce_dice":
            raise ValueError('classes = "lung-lesion" trains with loss = "cce_dice"')
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be ≥ 1")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.arch == "fc-densenet103" and self.weights not in (None, "none"):
            raise ValueError("fc-densenet103 has no pretrained weights; set weights = \"none\"")

    @property
    def num_classes(self) -> int:
        return 1 if self.classes == "binary" else 3

    @property
    def mask_kinds(self) -> tuple[str, ...]:
        return (self.kind,) if self.classes == "binary" else (self.lung_kind, self.kind)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weights"] = "none" if self.weights is None else self.weights  # None would read back as the default
        return d


def build_segmenter(settings: SegmenterSettings) -> keras.Model:
    """The architecture named by ``settings.arch`` with one sigmoid output."""
    if settings.arch == "unet-densenet121":
        weights = None if settings.weights in (None, "none") else settings.weights
        return build_unet(input_size=settings.image_size, num_classes=settings.num_classes, weights=weights,
                          freeze_encoder=settings.freeze_encoder)
    return build_fc_densenet103(input_size=settings.image_size, num_classes=settings.num_classes)


@dataclass
class Segmenter(EngineChoice):
    """A loaded segmenter bundle."""

    model: Any
    sidecar: dict[str, Any]
    path: Path
    onnx: Any = None  # data.export.OnnxForward once use_engine("onnx") was called

    @property
    def meta(self) -> dict[str, Any]:
        return self.sidecar["meta"]

    @property
    def image_size(self) -> int:
        return int(self.sidecar["image_size"])

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
    def resize_mode(self) -> str:
        return self.meta.get("resize_mode", spec.DEFAULT_RESIZE_MODE)

    @property
    def clahe(self) -> bool:
        return bool(self.meta.get("clahe", False))

    @property
    def checkpoint_sha256(self) -> str:
        return self.sidecar["files"]["model.keras"]

    @property
    def classes(self) -> str:
        return self.meta.get("classes", "binary")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) float32 in [0, 255] → (N, S, S) float32 lesion (foreground) probabilities.

        For a "lung-lesion" model this is the lesion channel of its softmax.
        """
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, spec.CHANNELS):
            raise ValueError(f"expected (N, {self.image_size}, {self.image_size}, 3) float32 in [0, 255], got {x.shape}")
        channel = 0 if self.classes == "binary" else 2
        if self.onnx is not None:
            return next(iter(self.onnx(x).values()))[..., channel].astype(np.float32)
        padded, n = pad_to_bucket(x)  # few traced shapes (see data.stream.pad_to_bucket)
        return np.asarray(self.model.predict_on_batch(padded))[:n, ..., channel].astype(np.float32)


def load_segmenter(directory) -> Segmenter:
    """Load and check a segmenter bundle; BundleError naming the file on any problem."""
    model, side = load_bundle(directory, kind=KIND)
    for key in ("arch", "kind", "threshold"):
        if key not in side.get("meta", {}):
            raise BundleError(f"{Path(directory) / SIDECAR}: meta.{key} missing")
    return Segmenter(model, side, Path(directory))


def lung_lesion_targets(x, masks):
    """(x, (B, S, S, 2) lung and lesion masks) → (x, (B, S, S, 3) one-hot background / lung / lesion).

    Numpy batches (PyTorch/JAX streams) or tf.data's symbolic ones (keras.ops).
    """
    xp_cat, xp_max = (np.concatenate, np.maximum) if isinstance(masks, np.ndarray) else (ops.concatenate, ops.maximum)
    lung, lesion = masks[..., 0:1], masks[..., 1:2]
    lung_only = lung * (1.0 - lesion)
    return x, xp_cat([1.0 - xp_max(lung, lesion), lung_only, lesion], axis=-1)


@dataclass
class SegmenterTrainResult:
    segmenter: Segmenter
    history: dict[str, list[float]]
    failures: list[tuple[str, str]]


def train_segmenter(settings: SegmenterSettings, train: Sequence[Record], val: Sequence[Record], out_dir,
                    *, verbose: int | None = None) -> SegmenterTrainResult:
    """Train on records that carry a ``settings.kind`` mask, keep the best val-loss epoch, save."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in train if all(k in r.masks for k in settings.mask_kinds)]
    val = [r for r in val if all(k in r.masks for k in settings.mask_kinds)]
    if not train or not val:
        raise ValueError(f"need {' and '.join(settings.mask_kinds)} masks in both splits; "
                         f"found {len(train)} train, {len(val)} val")
    keras.utils.set_random_seed(settings.seed)
    model = build_segmenter(settings)
    set_bn_momentum(model, settings.bn_momentum)
    if not settings.run_eagerly:
        configure_graph_training()
    optimizer = build_optimizer(settings.optimizer, settings.learning_rate, schedule=settings.lr_schedule,
                                epochs=settings.epochs, steps_per_epoch=steps_per_epoch(len(train), settings.batch_size),
                                warmup_epochs=settings.warmup_epochs, weight_decay=settings.weight_decay)
    model.compile(optimizer=optimizer, loss=get_loss(settings.loss), metrics=[dice_coefficient],
                  run_eagerly=settings.run_eagerly, jit_compile=False)
    failures = FailureLog()
    common = dict(size=settings.image_size, batch_size=settings.batch_size, mode=settings.resize_mode,
                  clahe=settings.clahe, failures=failures, seed=settings.seed,
                  mask_kind=settings.kind if settings.classes == "binary" else settings.mask_kinds)
    train_ds = make_dataset(train, shuffle=True, augment_params=AugmentParams() if settings.augment else None, **common)
    val_ds = make_dataset(val, **common)
    if settings.classes == "lung-lesion":
        train_ds, val_ds = train_ds.map(lung_lesion_targets), val_ds.map(lung_lesion_targets)
    callbacks, ckpt = build_callbacks(out_dir, schedule=settings.lr_schedule,
                                      early_stopping_patience=settings.early_stopping_patience,
                                      reduce_lr_patience=settings.reduce_lr_patience, reduce_lr_factor=0.5)
    hist = fit_streamed(model, train_ds, validation_data=val_ds, epochs=settings.epochs, callbacks=callbacks,
                        shuffle=False, verbose=verbose if verbose is not None else (1 if sys.stderr.isatty() else 2))
    if ckpt.is_file():
        model.load_weights(ckpt)
    plain = make_dataset(train, shuffle=True, **common)  # no augmentation
    reestimate_batchnorm(model, (np.asarray(x) for x, _ in plain), max_batches=settings.bn_reestimate_batches)
    meta = {"arch": settings.arch, "kind": settings.kind, "classes": settings.classes, "threshold": settings.threshold,
            "min_lesion_area": settings.min_lesion_area, "resize_mode": settings.resize_mode, "clahe": settings.clahe}
    config = {**settings.to_dict(), "n_train": len(train), "n_val": len(val)}
    save_bundle(model, out_dir, kind=KIND, image_size=settings.image_size, config=config, meta=meta)
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    return SegmenterTrainResult(load_segmenter(out_dir), history, list(failures.items))
