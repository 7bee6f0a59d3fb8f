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
from segmenter.schemes import ARCHS, CLASS_SCHEMES, MODALITIES, channel_names
from segmenter.tiramisu import build_fc_densenet103
from segmenter.tta import tta_scales
from segmenter.unet import build_unet

#: The lesion-probability cut of the "paper" preset, and what ``threshold = "fit"`` keeps when it cannot fit.
DEFAULT_THRESHOLD = 0.5

#: Named recipes (as ensemble.train.PRESETS): "paper" is the dataclass defaults (Adam 1e-4, 40
#: epochs, plateau LR, cut 0.5, lesion images only); "scratch", the default whenever weights = "none",
#: is what from-scratch training needs (data.runtime.training explains the BatchNorm part), with
#: lesion-free X-rays and the cut fitted on validation. Measured on the demo's split (lung-lesion
#: MobileNetV2 U-Net, 64 px, 304 lesion images, 71 COVID and 69 normal held-out X-rays): lesion images
#: only at 0.5 gave lesion Dice 0.575 with 21.9 % of normal lungs marked; with lesion_free 0.5 (152
#: normals) the fitted cut 0.25 gave 0.615 with 24.0 %, and lung Dice 0.870 -> 0.896. At equal
#: marking of normal lungs the lesion-free model is the better one along the whole cut range
#: (README "Segmenters"); the fit without lesion-free images marks 41 % (cut 0.35).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "scratch": {
        "optimizer": "adamw", "weight_decay": 0.01, "learning_rate": 1e-3, "lr_schedule": "cosine",
        "warmup_epochs": 1, "bn_momentum": 0.9, "bn_reestimate_batches": 16, "epochs": 30,
        "early_stopping_patience": 0, "lesion_free": 0.5, "threshold": "fit",
    },
}


def with_preset(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` completed by its preset: ``values["preset"]``, else "scratch" when the encoder
    starts from random weights (weights "none", or FC-DenseNet103) and "paper" otherwise. A
    "lung-lesion" model with no loss given gets "cce_dice"."""
    from data.runtime.weights import is_none

    scratch = is_none(values.get("weights", "imagenet")) or values.get("arch") == "fc-densenet103"
    values = dict(values)
    if values.get("classes", "binary") != "binary" and values.get("loss") is None:
        values["loss"] = "cce_dice"  # the only loss of the softmax heads (SegmenterSettings checks it)
    out = apply_preset(values, PRESETS, "scratch" if scratch else "paper")
    given = {**{f.name: f.default for f in dataclasses.fields(SegmenterSettings)}, **out}
    lung_field = given["classes"] == "binary" and given["kind"] == given["lung_kind"]
    if lung_field and "lesion_free" not in values:
        out["lesion_free"] = 0.0  # a preset's lesion-free images teach lesion models; every X-ray has lungs
    return out


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
    # lesion probability cut, or "fit": chosen on validation (segmenter.train; README "Segmenters" says when)
    threshold: float | str = DEFAULT_THRESHOLD
    # lesion-free X-rays (data.spec.LESION_FREE_CLASSES, no lesion mask file) trained and validated on
    # with empty lesion masks: at most this many per lesion image in each split (segmenter.train); 0: none
    lesion_free: float = 0.0
    min_lesion_area: int = spec.DEFAULT_MIN_LESION_AREA
    # test-time augmentation (segmenter.tta.TTA_SETS): the fitted cut and every prediction of the bundle use it
    tta: str = "none"
    modality: str = "xray"  # what the images are: "xray", or "ct" slices (shown in ct_window)
    ct_window_center: float = -600.0  # HU: the lung window of data.volume, how CT volumes are shown to the model
    ct_window_width: float = 1500.0

    def __post_init__(self) -> None:
        self.check_recipe_fields(presets=PRESETS, epochs=self.epochs)
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; valid: {', '.join(ARCHS)}")
        get_loss(self.loss)
        tta_scales(self.tta)
        if self.classes not in CLASS_SCHEMES:
            raise ValueError(f"unknown classes {self.classes!r}; valid: {', '.join(CLASS_SCHEMES)}")
        if self.classes != "binary" and self.loss != "cce_dice":
            raise ValueError(f'classes = "{self.classes}" trains with loss = "cce_dice"')
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be ≥ 1")
        if self.modality not in MODALITIES:
            raise ValueError(f"unknown modality {self.modality!r}; valid: {', '.join(MODALITIES)}")
        if self.ct_window_width <= 0:
            raise ValueError(f"ct_window_width must be > 0, got {self.ct_window_width}")
        if isinstance(self.threshold, str):
            if self.threshold != "fit":
                raise ValueError(f'threshold must be a number in (0, 1) or "fit", got {self.threshold!r}')
        elif not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.lesion_free < 0:
            raise ValueError(f"lesion_free must be >= 0 (lesion-free images per lesion image), got {self.lesion_free}")
        if self.lesion_free and not self.lesion_kinds:
            raise ValueError(f"lesion_free needs a lesion to learn; kind {self.kind!r} is the lung field "
                             f"(lung_kind), whose mask no X-ray lacks: set lesion_free = 0")
        if self.arch == "fc-densenet103" and self.weights not in (None, "none"):
            raise ValueError("fc-densenet103 has no pretrained weights; set weights = \"none\"")

    @property
    def encoder(self) -> str | None:
        """The U-Net's encoder (a key of segmenter.unet.ENCODERS); None for FC-DenseNet103."""
        return self.arch.removeprefix("unet-") if self.arch.startswith("unet-") else None

    @property
    def channels(self) -> tuple[str, ...]:
        """The model's output channels by name: (kind,) for "binary", else the softmax classes,
        "background" first. Saved in the bundle (segmenter.model reads it)."""
        return channel_names(self.classes, self.kind)

    @property
    def num_classes(self) -> int:
        return len(self.channels)

    @property
    def mask_kinds(self) -> tuple[str, ...]:
        """The mask kinds training reads, in channel order (the channels after "background")."""
        if self.classes == "binary":
            return (self.kind,)
        return tuple(self.lung_kind if c == "lung" else c for c in self.channels[1:])

    @property
    def lesion_kinds(self) -> tuple[str, ...]:
        """The mask kinds that are lesions (all but the lung field): empty on a lesion-free X-ray."""
        return tuple(k for k in self.mask_kinds if k != self.lung_kind)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weights"] = "none" if self.weights is None else self.weights  # None would read back as the default
        return d


def build_segmenter(settings: SegmenterSettings) -> keras.Model:
    """The architecture named by ``settings.arch``, with ``settings.num_classes`` outputs."""
    if settings.encoder is not None:
        weights = None if settings.weights in (None, "none") else settings.weights
        return build_unet(input_size=settings.image_size, num_classes=settings.num_classes, weights=weights,
                          freeze_encoder=settings.freeze_encoder, encoder=settings.encoder)
    return build_fc_densenet103(input_size=settings.image_size, num_classes=settings.num_classes)
