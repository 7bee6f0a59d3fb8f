"""U-Net with a DenseNet121 encoder, written natively on Keras 3.

The layout of segmentation-models' ``Unet('densenet121')`` (whose DenseNet cannot be built
on Keras 3): encoder keras.applications.DenseNet121 without top, skips from ``pool4_conv``,
``pool3_conv``, ``pool2_conv``, ``conv1_relu``, decoder of five ×2 upsampling blocks
(upsample → concat skip → two conv3×3-BN-ReLU) with 256/128/64/32/16 filters, a conv3×3 head.
With one sigmoid class it has exactly that model's 12,144,977 parameters (a test checks).
"""

from __future__ import annotations

import keras
from keras import layers

from data import spec
from data.runtime.layers import torch_normalization
from data.runtime.weights import build_application, resolve_weights_file

#: Keras's no-top DenseNet121 file (what a local --weights folder must hold).
ENCODER_FILE = "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"

SKIPS = ("pool4_conv", "pool3_conv", "pool2_conv", "conv1_relu")
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
) -> keras.Model:
    """(B, S, S, 3) float32 in [0, 255] → (B, S, S, num_classes) probabilities.

    ``num_classes`` 1: lesion vs background (sigmoid); 3: background / lung / lesion (softmax).
    ``weights``: None, "imagenet", a DenseNet121 no-top weights file, or a folder holding it
    (data.runtime.weights.WeightsError with the fix when it cannot be had).
    """
    validate_size(input_size)
    if num_classes < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    if len(decoder_filters) != 5:
        raise ValueError(f"decoder_filters needs 5 values, got {decoder_filters}")
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = torch_normalization("encoder_preprocess")(inputs)
    encoder = build_application(
        keras.applications.DenseNet121, weights=resolve_weights_file(weights, imagenet_file=ENCODER_FILE,
                                                                     what="densenet121"),
        imagenet_file=ENCODER_FILE, what="the U-Net's DenseNet121 encoder", include_top=False,
        input_shape=(input_size, input_size, 3),
    )
    encoder.trainable = not freeze_encoder
    # One functional model that exposes the skip tensors, applied to the normalised input.
    taps = keras.Model(encoder.input, [encoder.output, *[encoder.get_layer(s).output for s in SKIPS]],
                       name="densenet121_encoder")
    x, *skips = taps(x)
    for i, filters in enumerate(decoder_filters):
        x = layers.UpSampling2D(2, name=f"decoder_stage{i}_upsample")(x)
        if i < len(skips):
            x = layers.Concatenate(name=f"decoder_stage{i}_concat")([x, skips[i]])
        x = conv_bn_relu(x, filters, f"decoder_stage{i}a")
        x = conv_bn_relu(x, filters, f"decoder_stage{i}b")
    x = layers.Conv2D(num_classes, 3, padding="same", kernel_initializer="glorot_uniform", name="final_conv")(x)
    outputs = layers.Activation(head_activation(num_classes), name="mask")(x)
    return keras.Model(inputs, outputs, name="unet_densenet121")
