"""Registry of the three ensemble members and the builder of one member.

A member is ``Input(0–255 RGB) → its own preprocessing → backbone → head``:
callers always pass the data.spec pixel contract. Every member model has two outputs,
``{name}_probs`` (B, 3) softmax and ``{name}_features`` (B, h, w, K), the backbone's last
conv maps, so Grad-CAM needs no second pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

import keras
from keras import layers

from data import spec
from data.runtime.layers import IMAGENET_STD, caffe_normalization, torch_normalization, xrv_normalization
from data.runtime.weights import WeightsError, build_application, resolve_weights_file  # noqa: F401  (WeightsError re-exported)

#: Weight sources accepted by :func:`build_member`.
WEIGHT_CHOICES = ("imagenet", None, "PATH to a .h5 file", "DIR holding Keras's *_notop.h5 files")


def _identity(name: str) -> layers.Layer:
    # EfficientNet rescales and normalises inside its own graph (include_preprocessing=True).
    return layers.Identity(name=name)


@dataclass(frozen=True)
class MemberSpec:
    """How to build one backbone and where its Grad-CAM layer is."""

    constructor: Callable[..., keras.Model]
    preprocessing: Callable[[str], layers.Layer]
    imagenet_file: str  # Keras's no-top weight file name, as cached in ~/.keras/models
    features_layer: str  # backbone layer whose output is the member's features (the Grad-CAM layer)
    min_size: int  # smallest input side that leaves a ≥2×2 final map
    #: From scratch only: the std of the pixels its preprocessing hands the first conv, when its convs
    #: are to be drawn by He's fan-in rule (:func:`he_initialised`) instead of keras.applications'
    #: Glorot. None: the constructor's own initialisation is kept.
    scratch_input_std: float | None = None


MEMBERS: dict[str, MemberSpec] = {
    "densenet121": MemberSpec(
        keras.applications.DenseNet121, torch_normalization,
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5", "relu", 64,
    ),
    "efficientnetb0": MemberSpec(
        keras.applications.EfficientNetB0, _identity, "efficientnetb0_notop.h5", "top_activation", 64,
    ),
    "vgg19": MemberSpec(
        keras.applications.VGG19, caffe_normalization,
        "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "block5_conv4", 64,
        # Caffe preprocessing only subtracts the mean: pixels keep 0-255 units (ImageNet's std x 255).
        scratch_input_std=255 * sum(IMAGENET_STD) / len(IMAGENET_STD),
    ),
}


def member_spec(name: str) -> MemberSpec:
    """The registry entry for ``name``; ValueError listing the valid names otherwise."""
    try:
        return MEMBERS[name]
    except KeyError:
        raise ValueError(f"unknown member {name!r}; valid members: {', '.join(MEMBERS)}") from None


#: A weights argument: one source for every member, or a table member → source.
Weights = str | os.PathLike[str] | Mapping[str, str] | None


def weights_of(name: str, weights: Weights) -> str | os.PathLike[str] | None:
    """Member ``name``'s own entry when ``weights`` is a per-member table, else ``weights`` itself."""
    if isinstance(weights, Mapping):
        if name not in weights:
            raise ValueError(f"the weights table names {', '.join(weights)} but not member {name!r}")
        return weights[name]
    return weights


def resolve_weights(name: str, weights: Weights) -> str | None:
    """Turn a weights argument into what keras.applications accepts, checking local files first.

    "imagenet" is passed through (Keras downloads it, verifies its hash and caches it in
    ~/.keras/models, where an offline machine can be given the file); a folder is searched
    for the member's standard no-top file; a file path is used as is. A per-member table
    gives each member its own source.
    """
    return resolve_weights_file(weights_of(name, weights), imagenet_file=member_spec(name).imagenet_file, what=name)


def build_backbone(name: str, *, input_shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    """The member's keras.applications model without its top, named ``{name}_backbone``."""
    ms = member_spec(name)
    backbone = build_application(ms.constructor, weights=weights, imagenet_file=ms.imagenet_file,
                                 what=f"{name} backbone", include_top=False, input_shape=input_shape)
    last = backbone.get_layer(ms.features_layer)
    if last is not backbone.layers[-1]:
        # VGG19 ends in a max pool; stopping at block5_conv4 keeps a 2x finer Grad-CAM grid,
        # and the pooling + dense head keeps CAM = ReLU(sum_k w_kc A_k) exact.
        backbone = keras.Model(backbone.inputs, last.output)
    if weights is None and ms.scratch_input_std is not None:
        backbone = he_initialised(backbone, ms.scratch_input_std)
    backbone.name = f"{name}_backbone"
    return backbone


def he_initialised(backbone: keras.Model, input_std: float) -> keras.Model:
    """A fresh copy of ``backbone`` whose Conv2D kernels are drawn by He's rule (variance 2 / fan-in),
    the first one scaled by ``1 / input_std`` so that its output does not carry the pixels' units.

    For a deep stack of ReLU convs without BatchNorm (VGG19). keras.applications draws them by
    Glorot's rule, which halves the activations' variance at each layer: on X-rays at 64 px VGG19's
    last conv maps come out ~500x smaller than its first's. He's rule keeps every layer's output std
    near 1, and lets VGG19 train from scratch at 3e-4, where the Glorot-drawn one stays on one class
    (README, "Model quality").
    """
    convs = [layer.name for layer in backbone.layers if isinstance(layer, layers.Conv2D)]

    def clone(layer: layers.Layer) -> layers.Layer:
        if layer.name not in convs:
            return layer.__class__.from_config(layer.get_config())
        scale = 2.0 / (input_std ** 2 if layer.name == convs[0] else 1.0)
        init = keras.initializers.VarianceScaling(scale, mode="fan_in", distribution="truncated_normal")
        return layer.__class__.from_config({**layer.get_config(), "kernel_initializer": init})

    return keras.models.clone_model(backbone, clone_function=clone)


def freeze_early_layers(backbone: keras.Model, fraction: float) -> int:
    """Make the first ``fraction`` of the backbone's layers non-trainable; returns how many.

    Frozen BatchNormalization layers also run in inference mode (Keras 3 semantics).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"freeze_fraction must be in [0, 1], got {fraction}")
    n = int(round(len(backbone.layers) * fraction))
    for layer in backbone.layers[:n]:
        layer.trainable = False
    return n


def build_member(
    name: str,
    *,
    num_classes: int = spec.NUM_CLASSES,
    weights: Weights = None,
    input_shape: tuple[int, int, int] = (spec.DEFAULT_IMAGE_SIZE, spec.DEFAULT_IMAGE_SIZE, spec.CHANNELS),
    freeze_fraction: float = 0.0,
    dropout: float = 0.3,
) -> keras.Model:
    """One member: (B, H, W, 3) float32 in [0, 255] → {``{name}_probs``, ``{name}_features``}.

    Sizes below the member's minimum (64 px) or not square-channel-3 are refused at build time.
    """
    ms = member_spec(name)
    validate_input_shape(input_shape, ms.min_size)
    inputs = keras.Input(shape=input_shape, name="image")
    features = member_features(name, inputs, weights=weights, freeze_fraction=freeze_fraction)
    probs = member_head(name, features, num_classes=num_classes, dropout=dropout)
    return keras.Model(inputs, {f"{name}_probs": probs, f"{name}_features": features}, name=name)


def member_features(name: str, inputs, *, weights: Weights, freeze_fraction: float):
    """Preprocessing + backbone applied to ``inputs``; returns the last conv maps (B, h, w, K).

    A weights file converted from torchxrayvision (ensemble.convert) brings its own input scaling.
    """
    from ensemble.convert import XRV_SCALING, input_scaling

    ms = member_spec(name)
    resolved = resolve_weights(name, weights)
    backbone = build_backbone(name, input_shape=tuple(inputs.shape[1:]), weights=resolved)
    freeze_early_layers(backbone, freeze_fraction)
    preprocessing = xrv_normalization if input_scaling(resolved) == XRV_SCALING else ms.preprocessing
    x = preprocessing(f"{name}_preprocess")(inputs)
    return backbone(x)


def member_head(name: str, features, *, num_classes: int, dropout: float):
    """Global average pooling → dropout → Dense softmax; the Dense layer is ``{name}_head``."""
    x = layers.GlobalAveragePooling2D(name=f"{name}_gap")(features)
    x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    return layers.Dense(num_classes, activation="softmax", name=f"{name}_head")(x)


def validate_input_shape(input_shape: tuple[int, ...], min_size: int) -> None:
    """ValueError unless ``input_shape`` is (S, S, 3) with S ≥ ``min_size`` and a multiple of 32."""
    if len(input_shape) != 3 or input_shape[2] != spec.CHANNELS:
        raise ValueError(f"input_shape must be (H, W, {spec.CHANNELS}), got {input_shape}")
    h, w = input_shape[:2]
    if h != w or h < min_size or h % 32:
        raise ValueError(
            f"input size {h}x{w} not supported: use a square side ≥ {min_size} that is a multiple of 32 "
            "(the backbones downsample by 32)"
        )
