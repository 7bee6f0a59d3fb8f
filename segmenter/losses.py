"""Segmentation losses on the Keras 3 ops API (any backend): Dice, BCE + Dice, focal Tversky.

``y_true`` and ``y_pred`` are (B, H, W, C) with probabilities in [0, 1]; sums run per image
over H, W and C, and the loss is the batch mean. ``smooth`` keeps empty masks finite.
"""

from __future__ import annotations

import keras
from keras import ops


def _sums(y_true, y_pred):
    y_true = ops.cast(y_true, y_pred.dtype)
    axes = tuple(range(1, len(y_pred.shape)))
    tp = ops.sum(y_true * y_pred, axis=axes)
    fp = ops.sum((1.0 - y_true) * y_pred, axis=axes)
    fn = ops.sum(y_true * (1.0 - y_pred), axis=axes)
    return tp, fp, fn


@keras.saving.register_keras_serializable(package="cxr")
def dice_loss(y_true, y_pred, smooth: float = 1.0):
    """1 − (2·TP + s) / (2·TP + FP + FN + s), soft, per image; 0 for a perfect prediction."""
    tp, fp, fn = _sums(y_true, y_pred)
    return ops.mean(1.0 - (2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth))


@keras.saving.register_keras_serializable(package="cxr")
def bce_dice_loss(y_true, y_pred):
    """Binary cross-entropy plus Dice loss."""
    bce = ops.mean(keras.losses.binary_crossentropy(ops.cast(y_true, y_pred.dtype), y_pred))
    return bce + dice_loss(y_true, y_pred)


#: Pixels within this many model pixels of a drawn lesion's edge (either side) count as its boundary.
BOUNDARY_RADIUS = 2
#: Extra weight of a boundary pixel's cross-entropy in ``boundary_bce_dice`` (other pixels weigh 1).
BOUNDARY_WEIGHT = 4.0


def boundary_band(y_true, radius: int = BOUNDARY_RADIUS):
    """1 where a pixel lies within ``radius`` pixels of a mask edge (inside or out), else 0: the
    mask dilated minus the mask eroded, by max pooling over a (2·radius + 1)² window."""
    k = 2 * radius + 1
    dilated = ops.max_pool(y_true, k, strides=1, padding="same")
    eroded = 1.0 - ops.max_pool(1.0 - y_true, k, strides=1, padding="same")
    return dilated - eroded


@keras.saving.register_keras_serializable(package="cxr")
def boundary_bce_dice_loss(y_true, y_pred):
    """Binary cross-entropy weighted ``1 + BOUNDARY_WEIGHT`` near the drawn lesion's edges, plus Dice loss.

    Aimed at small lesions, whose pixels are mostly edge and which the plain loss over-marks around."""
    y_true = ops.cast(y_true, y_pred.dtype)
    weight = 1.0 + BOUNDARY_WEIGHT * ops.max(boundary_band(y_true), axis=-1)  # per pixel, as the BCE below
    bce = keras.losses.binary_crossentropy(y_true, y_pred)  # (B, H, W): the mean over channels
    return ops.sum(weight * bce) / ops.sum(weight) + dice_loss(y_true, y_pred)


@keras.saving.register_keras_serializable(package="cxr")
def focal_tversky_loss(y_true, y_pred, alpha: float = 0.7, gamma: float = 0.75, smooth: float = 1.0):
    """(1 − TI)^γ with Tversky index TI = (TP + s) / (TP + α·FN + (1 − α)·FP + s) (Abraham & Khan 2019)."""
    tp, fp, fn = _sums(y_true, y_pred)
    ti = (tp + smooth) / (tp + alpha * fn + (1.0 - alpha) * fp + smooth)
    return ops.mean(ops.power(1.0 - ti, gamma))


@keras.saving.register_keras_serializable(package="cxr")
def cce_dice_loss(y_true, y_pred):
    """Categorical cross-entropy plus soft Dice over all classes (for the softmax heads)."""
    cce = ops.mean(keras.losses.categorical_crossentropy(ops.cast(y_true, y_pred.dtype), y_pred))
    return cce + dice_loss(y_true, y_pred)


LOSSES = {"dice": dice_loss, "bce_dice": bce_dice_loss, "boundary_bce_dice": boundary_bce_dice_loss,
          "focal_tversky": focal_tversky_loss, "cce_dice": cce_dice_loss}


def get_loss(name: str):
    """Loss function by name; ValueError listing the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}") from None
