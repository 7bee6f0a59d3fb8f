"""FC-DenseNet103, "The One Hundred Layers Tiramisu" (Jégou et al., CVPR-W 2017).

Dense blocks of 4, 5, 7, 10, 12 layers on the way down, 15 in the bottleneck, mirrored on
the way up; growth rate 16; a first 3×3 convolution of 48 filters. Each layer is
BN → ReLU → conv3×3 → dropout; transitions down are BN → ReLU → conv1×1 → dropout →
max-pool; transitions up are 3×3 stride-2 transposed convolutions of the previous block's
new feature maps only (so the up path does not explode). 103 convolutional layers, about
9.4 M parameters as published (tests check both).
"""

from __future__ import annotations

import keras
from keras import layers

from data import spec
from data.runtime.layers import torch_normalization
from segmenter.unet import head_activation, validate_size

DOWN_LAYERS = (4, 5, 7, 10, 12)
BOTTLENECK_LAYERS = 15
GROWTH = 16
FIRST_FILTERS = 48


def _layer(x, growth: int, dropout: float, name: str):
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    x = layers.Conv2D(growth, 3, padding="same", kernel_initializer="he_uniform", name=f"{name}_conv")(x)
    return layers.Dropout(dropout, name=f"{name}_drop")(x) if dropout else x


def _dense_block(x, n_layers: int, growth: int, dropout: float, name: str):
    """Returns (input concatenated with all new maps, the new maps alone)."""
    new = []
    for i in range(n_layers):
        y = _layer(x, growth, dropout, f"{name}_l{i}")
        new.append(y)
        x = layers.Concatenate(name=f"{name}_cat{i}")([x, y])
    only_new = layers.Concatenate(name=f"{name}_new")(new) if len(new) > 1 else new[0]
    return x, only_new


def _transition_down(x, filters: int, dropout: float, name: str):
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    x = layers.Conv2D(filters, 1, padding="same", kernel_initializer="he_uniform", name=f"{name}_conv")(x)
    if dropout:
        x = layers.Dropout(dropout, name=f"{name}_drop")(x)
    return layers.MaxPooling2D(2, name=f"{name}_pool")(x)


def build_fc_densenet103(
    *,
    input_size: int = spec.DEFAULT_SEGMENTER_SIZE,
    num_classes: int = 1,
    growth: int = GROWTH,
    down_layers: tuple[int, ...] = DOWN_LAYERS,
    bottleneck_layers: int = BOTTLENECK_LAYERS,
    first_filters: int = FIRST_FILTERS,
    dropout: float = 0.2,
) -> keras.Model:
    """(B, S, S, 3) float32 in [0, 255] → (B, S, S, num_classes) probabilities; S a multiple of 32."""
    validate_size(input_size, multiple=2 ** len(down_layers), minimum=2 ** len(down_layers))
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = torch_normalization("preprocess")(inputs)
    x = layers.Conv2D(first_filters, 3, padding="same", kernel_initializer="he_uniform", name="first_conv")(x)
    filters = first_filters
    skips = []
    for i, n in enumerate(down_layers):
        x, _ = _dense_block(x, n, growth, dropout, f"down{i}")
        filters += growth * n
        skips.append(x)
        x = _transition_down(x, filters, dropout, f"td{i}")
    _, to_upsample = _dense_block(x, bottleneck_layers, growth, dropout, "bottleneck")
    prev_layers = bottleneck_layers
    for i, n in enumerate(reversed(down_layers)):
        up = layers.Conv2DTranspose(growth * prev_layers, 3, strides=2, padding="same",
                                    kernel_initializer="he_uniform", name=f"tu{i}")(to_upsample)
        x = layers.Concatenate(name=f"tu{i}_cat")([up, skips[-(i + 1)]])
        x, to_upsample = _dense_block(x, n, growth, dropout, f"up{i}")
        prev_layers = n
    x = layers.Conv2D(num_classes, 1, padding="same", kernel_initializer="he_uniform", name="final_conv")(x)
    outputs = layers.Activation(head_activation(num_classes), name="mask")(x)
    return keras.Model(inputs, outputs, name="fc_densenet103")
