"""Settings of a stage-2 segmenter (lesion or lung field), its named recipes, and the builder
of the architecture they name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import keras

from data import spec
from data.runtime.training import RecipeSettings, apply_preset
from segmenter.losses import get_loss
from segmenter.tiramisu import build_fc_densenet103
from segmenter.unet import build_unet

ARCHS = ("unet-densenet121", "fc-densenet103")
#: "binary": lesion vs background, sigmoid. "lung-lesion": background / lung / lesion, softmax,
#: trained from a lung mask and a lesion mask (lesion wins where both are set).
CLASS_SCHEMES = ("binary", "lung-lesion")


#: Named recipes (as ensemble.train.PRESETS): "paper" is the dataclass defaults (Adam 1e-4, 40
#: epochs, plateau LR); "scratch", the default whenever weights = "none", is what from-scratch
#: training needs (data.runtime.training explains the BatchNorm part).
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
    starts from random weights (weights "none", or FC-DenseNet103) and "paper" otherwise. A
    "lung-lesion" model with no loss given gets "cce_dice"."""
    from data.runtime.weights import is_none

    scratch = is_none(values.get("weights", "imagenet")) or values.get("arch") == "fc-densenet103"
    values = dict(values)
    if values.get("classes") == "lung-lesion" and values.get("loss") is None:
        values["loss"] = "cce_dice"  # the only loss of the softmax head (SegmenterSettings checks it)
    return apply_preset(values, PRESETS, "scratch" if scratch else "paper")


@dataclass(frozen=True)
class SegmenterSettings(RecipeSettings):
    """Everything that decides a trained segmenter (paper: lr 1e-4, batch 30, 40 epochs)."""

    arch: str = "unet-densenet121"
    kind: str = "infection"
    image_size: int = spec.DEFAULT_SEGMENTER_SIZE
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
    threshold: float = 0.5
    min_lesion_area: int = spec.DEFAULT_MIN_LESION_AREA

    def __post_init__(self) -> None:
        self.check_recipe_fields(presets=PRESETS, epochs=self.epochs)
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
