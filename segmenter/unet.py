"""U-Nets with a keras.applications encoder (DenseNet121 or MobileNetV2), written natively on Keras 3.

The layout of segmentation-models' ``Unet('densenet121')`` / ``Unet('mobilenetv2')`` (which cannot
be built on Keras 3): the encoder without top, four skips (below), a decoder of five ×2
upsampling blocks (upsample → concat skip → two conv3×3-BN-ReLU) with 256/128/64/32/16 filters,
a conv3×3 head. With one sigmoid class the DenseNet121 U-Net has exactly that model's 12,144,977
parameters and the MobileNetV2 one its 8,047,441 (tests check both). MobileNetV2 is the encoder of
the CT lung/infection system the project grew from: about a third of DenseNet121's compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras
from keras import layers

from data import spec
from data.runtime.layers import tf_normalization, torch_normalization
from data.runtime.weights import build_application, resolve_weights_file


@dataclass(frozen=True)
class Encoder:
    """One U-Net encoder: its keras.applications constructor, Keras's no-top weights file (what a
    local --weights folder must hold), its in-graph input scaling, and the skip layers (deepest first)."""

    constructor: Callable[..., keras.Model]
    weights_file: str
    normalization: Callable[[str], layers.Layer]
    skips: tuple[str, ...]


#: encoder name → Encoder (the arch "unet-<name>" of segmenter.settings).
ENCODERS: dict[str, Encoder] = {
    "densenet121": Encoder(keras.applications.DenseNet121, "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
                           torch_normalization, ("pool4_conv", "pool3_conv", "pool2_conv", "conv1_relu")),
    "mobilenetv2": Encoder(keras.applications.MobileNetV2,
                           "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", tf_normalization,
                           ("block_13_expand_relu", "block_6_expand_relu", "block_3_expand_relu",
                            "block_1_expand_relu")),
}

#: Keras's no-top DenseNet121 file (the default encoder's).
ENCODER_FILE = ENCODERS["densenet121"].weights_file
DECODER_FILTERS = (256, 128, 64, 32, 16)


def validate_size(size: int, multiple: int = 32, minimum: int = 64) -> None:
    """ValueError unless ``size`` is a multiple of ``multiple`` and at least ``minimum``."""
    if size < minimum or size % multiple:
        raise ValueError(f"input size {size} not supported: use a multiple of {multiple}, at least {minimum}")


def conv_bn_relu(x, filters: int, name: str):
    """Conv3×3 (no bias) → BatchNorm → ReLU, as segmentation-models' Conv3x3BnReLU."""
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_uniform",
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def head_activation(num_classes: int) -> str:
    """sigmoid for one foreground class, softmax over classes otherwise."""
    return "sigmoid" if num_classes == 1 else "softmax"


def build_unet(
    *,
    input_size: int = spec.DEFAULT_SEGMENTER_SIZE,
    num_classes: int = 1,
    weights: str | None = None,
    decoder_filters: tuple[int, ...] = DECODER_FILTERS,
    freeze_encoder: bool = False,
    encoder: str = "densenet121",
) -> keras.Model:
    """(B, S, S, 3) float32 in [0, 255] → (B, S, S, num_classes) probabilities.

    ``num_classes`` 1: lesion vs background (sigmoid); more: softmax over the classes (e.g.
    background / lung / lesion). ``encoder``: a key of :data:`ENCODERS`. ``weights``: None,
    "imagenet", the encoder's no-top weights file, or a folder holding it
    (data.runtime.weights.WeightsError with the fix when it cannot be had).
    """
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; valid: {', '.join(ENCODERS)}")
    enc = ENCODERS[encoder]
    validate_size(input_size)
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    if len(decoder_filters) != 5:
        raise ValueError(f"decoder_filters needs 5 values, got {decoder_filters}")
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = enc.normalization("encoder_preprocess")(inputs)
    backbone = build_application(
        enc.constructor, weights=resolve_weights_file(weights, imagenet_file=enc.weights_file, what=encoder),
        imagenet_file=enc.weights_file, what=f"the U-Net's {encoder} encoder", include_top=False,
        input_shape=(input_size, input_size, 3),
    )
    backbone.trainable = not freeze_encoder
    # One functional model that exposes the skip tensors, applied to the normalised input.
    taps = keras.Model(backbone.input, [backbone.output, *[backbone.get_layer(s).output for s in enc.skips]],
                       name=f"{encoder}_encoder")
    x, *skips = taps(x)
    for i, filters in enumerate(decoder_filters):
        x = layers.UpSampling2D(2, name=f"decoder_stage{i}_upsample")(x)
        if i < len(skips):
            x = layers.Concatenate(name=f"decoder_stage{i}_concat")([x, skips[i]])
        x = conv_bn_relu(x, filters, f"decoder_stage{i}a")
        x = conv_bn_relu(x, filters, f"decoder_stage{i}b")
    x = layers.Conv2D(num_classes, 3, padding="same", kernel_initializer="glorot_uniform", name="final_conv")(x)
    outputs = layers.Activation(head_activation(num_classes), name="mask")(x)
    return keras.Model(inputs, outputs, name=f"unet_{encoder}")


def encoder_application(unet: keras.Model, encoder: str, input_size: int) -> keras.Model:
    """The trained encoder of a U-Net from :func:`build_unet` as the keras.applications no-top model it
    was built from (same layer names, its weights copied), so that ``save_weights`` gives a file any
    ``keras.applications`` constructor takes as ``weights``: an in-domain initialisation for a
    classifier member where ImageNet weights cannot be had."""
    enc = ENCODERS[encoder]
    trained = unet.get_layer(f"{encoder}_encoder")
    fresh = enc.constructor(include_top=False, weights=None, input_shape=(input_size, input_size, 3))
    for layer in fresh.layers:
        if layer.weights:
            layer.set_weights(trained.get_layer(layer.name).get_weights())
    return fresh
