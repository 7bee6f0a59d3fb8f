"""In-graph input normalisation shared by the classifier members and the segmenters.

Models take the data.spec pixel contract (RGB float32 in [0, 255]) and normalise inside
their own graph, so callers pass one tensor and cannot mismatch.
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="cxr")
class ChannelAffine(layers.Layer):
    """``y = x[..., order] * scale + offset`` per channel: in-graph ImageNet normalisation.

    A plain elementwise layer (no variables), so it exports to ONNX as constants.
    """

    def __init__(self, scale, offset, reverse_channels: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = [float(s) for s in scale]
        self.offset = [float(o) for o in offset]
        self.reverse_channels = bool(reverse_channels)

    def call(self, inputs):
        x = ops.flip(inputs, axis=-1) if self.reverse_channels else inputs
        scale = ops.convert_to_tensor(self.scale, dtype=x.dtype)
        offset = ops.convert_to_tensor(self.offset, dtype=x.dtype)
        return x * scale + offset

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset,
                "reverse_channels": self.reverse_channels}


#: ImageNet's per-channel pixel mean and std (RGB, on a 0-1 scale), as keras.applications uses them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torch_normalization(name: str) -> layers.Layer:
    # keras.applications.densenet.preprocess_input(mode="torch"): x/255, minus mean, over std.
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    return ChannelAffine([1 / (255 * s) for s in std], [-m / s for m, s in zip(mean, std)], name=name)


def tf_normalization(name: str) -> layers.Layer:
    # keras.applications.mobilenet_v2.preprocess_input(mode="tf"): x/127.5 - 1, to [-1, 1].
    return ChannelAffine([1 / 127.5] * 3, [-1.0] * 3, name=name)


def xrv_normalization(name: str) -> layers.Layer:
    # torchxrayvision's range: x / 255 * 2048 - 1024. The three equal gray channels stay three; a
    # converted first convolution (ensemble.convert) takes a third of the gray kernel on each.
    return ChannelAffine([2048.0 / 255.0] * 3, [-1024.0] * 3, name=name)


def caffe_normalization(name: str) -> layers.Layer:
    # keras.applications.vgg19.preprocess_input(mode="caffe"): RGB→BGR, minus ImageNet BGR mean.
    return ChannelAffine([1.0, 1.0, 1.0], [-103.939, -116.779, -123.68], reverse_channels=True, name=name)
