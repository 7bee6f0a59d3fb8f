"""Training of the stage-2 segmenters (lesion or lung field): data, loss, the shared fit
scaffolding (data.runtime.training), and the saved bundle (segmenter.model).

Graph mode by default; ``run_eagerly`` for tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
from keras import ops

from data.augment import AugmentParams
from data.datasets import FailureLog, Record, make_dataset, mark_lesion_free
from data.runtime.bundle import save_bundle
from data.runtime.distribute import (
    check_fit_sizes,
    distribution_scope,
    off_strategy,
    start_distribution,
    synchronized_batchnorm,
)
from data.runtime.tf_setup import trace_for_any_batch
from data.runtime.training import FitRecipe, fit_best, prepare_for_training, reestimate_batchnorm
from segmenter.losses import get_loss
from segmenter.metrics import THRESHOLD_GRID, CutCounts
from segmenter.model import KIND, Segmenter, load_segmenter
from segmenter.schemes import lesion_channels
from segmenter.settings import DEFAULT_THRESHOLD, SegmenterSettings, build_segmenter
from segmenter.tta import averaged_maps, tta_scales


@keras.saving.register_keras_serializable(package="cxr")
def dice_coefficient(y_true, y_pred):
    """Soft Dice of the batch (a training metric; evaluation uses thresholded masks)."""
    y_true = ops.cast(y_true, y_pred.dtype)
    inter = ops.sum(y_true * y_pred)
    return (2.0 * inter + 1.0) / (ops.sum(y_true) + ops.sum(y_pred) + 1.0)


def softmax_targets(x, masks):
    """(x, (B, S, S, K) binary masks in channel order) → (x, (B, S, S, K + 1) one-hot targets,
    background first). Where masks overlap the later one wins (lesion over lung, consolidation
    over ground glass), so every pixel has exactly one class.

    Numpy batches (PyTorch/JAX streams) or tf.data's symbolic ones (keras.ops).
    """
    xp_cat = np.concatenate if isinstance(masks, np.ndarray) else ops.concatenate
    k = masks.shape[-1]
    channels, free = [], 1.0  # free: 1 where no later mask claimed the pixel
    for i in reversed(range(k)):
        m = masks[..., i:i + 1]
        channels.append(m * free)
        free = free * (1.0 - m)
    return x, xp_cat([free, *reversed(channels)], axis=-1)


@dataclass
class SegmenterTrainResult:
    out_dir: Path  # the saved bundle
    history: dict[str, list[float]]
    failures: list[tuple[str, str]]
    n_train: int = 0  # images trained on, and validated on (n_val); lesion-free ones included
    n_val: int = 0
    n_train_lesion_free: int = 0

    @functools.cached_property
    def segmenter(self) -> Segmenter:
        """The saved bundle, loaded (and checked) on first use; `cxr train-segmenter` does not need it."""
        return load_segmenter(self.out_dir)


#: Fewer validation images than this keep the default cut: a handful cannot choose one.
THRESHOLD_FIT_MIN_IMAGES = 20

def fit_lesion_threshold(predict, batches, settings: SegmenterSettings) -> dict:
    """The cut of the lesion probability with the best pooled Dice (2·TP / (2·TP + FP + FN), summed
    over every pixel of ``batches``: the validation stream of training, (images, targets) without
    augmentation, targets with the model's channels).

    Pooled, not the mean of per-image Dice: under data.masks' empty-mask convention a lesion-free
    image scores 1 only with no lesion pixel at all, so where half the validation images are
    lesion-free the per-image mean prefers a cut that finds nothing anywhere (measured: 0.8–0.9 on
    the demo's data, Dice 0 on every COVID image). ``predict`` maps an image batch to the model's
    (B, S, S, C) maps; the lesion probability is the sum of the lesion channels and the truth the
    union of their targets, as at prediction (segmenter.model). Ties go to the cut nearest
    DEFAULT_THRESHOLD. The maps are those the bundle will predict: ``predict`` averaged over
    ``settings.tta``'s passes (segmenter.tta). Returns the cut with the pooled Dice there and at
    DEFAULT_THRESHOLD; with fewer than THRESHOLD_FIT_MIN_IMAGES images, DEFAULT_THRESHOLD and why.
    """
    lesion = [settings.channels.index(c) for c in lesion_channels(settings.classes, settings.channels)]
    scales = tta_scales(settings.tta)
    counts = CutCounts(THRESHOLD_GRID)
    n = 0
    for x, y in batches:
        prob = averaged_maps(predict, np.asarray(x, np.float32), scales)[..., lesion].sum(axis=-1)
        counts.add(np.asarray(y)[..., lesion].max(axis=-1) > 0.5, prob)
        n += len(prob)
    if n < THRESHOLD_FIT_MIN_IMAGES:
        return {"threshold": DEFAULT_THRESHOLD, "n_val": n,
                "why": f"kept {DEFAULT_THRESHOLD}: {n} validation image(s), fewer than {THRESHOLD_FIT_MIN_IMAGES}"}
    dice = counts.pooled_dice()
    best = max(range(len(THRESHOLD_GRID)),
               key=lambda k: (round(dice[k], 9), -abs(THRESHOLD_GRID[k] - DEFAULT_THRESHOLD)))
    at_default = THRESHOLD_GRID.index(DEFAULT_THRESHOLD)
    return {"threshold": THRESHOLD_GRID[best], "n_val": n, "val_dice": round(float(dice[best]), 4),
            f"val_dice_at_{DEFAULT_THRESHOLD}": round(float(dice[at_default]), 4), "criterion": "pooled Dice"}


def trainable(records: Sequence[Record], settings: SegmenterSettings) -> list[Record]:
    """The records with every mask kind the model trains on, a lesion-free X-ray's known-empty lesion
    masks counted when ``settings.lesion_free`` asks for them (data.datasets.mark_lesion_free)."""
    if settings.lesion_free:
        records = mark_lesion_free(records, settings.lesion_kinds)
    return [r for r in records if all(r.has_mask(k) for k in settings.mask_kinds)]


def is_lesion_free(record: Record, settings: SegmenterSettings) -> bool:
    """A lesion model's training image with no lesion mask file (its lesion masks known empty)."""
    return bool(settings.lesion_kinds) and not any(k in record.masks for k in settings.lesion_kinds)


def with_lesion_free(records: Sequence[Record], settings: SegmenterSettings) -> list[Record]:
    """:func:`trainable` records, with lesion-free X-rays as ``settings.lesion_free`` asks: at most
    that many per lesion image, drawn with the seed, in ``records``' order."""
    usable = trainable(records, settings)
    free = [i for i, r in enumerate(usable) if is_lesion_free(r, settings)]
    if not free:
        return usable
    room = int(settings.lesion_free * (len(usable) - len(free)))
    drop = set(free)
    if room > 0:
        drop -= set(np.random.default_rng(settings.seed).choice(free, min(room, len(free)), replace=False).tolist())
    return [r for i, r in enumerate(usable) if i not in drop]


def train_segmenter(settings: SegmenterSettings, train: Sequence[Record], val: Sequence[Record], out_dir,
                    *, verbose: int | None = None) -> SegmenterTrainResult:
    """Train on records that carry every mask kind of ``settings`` (with lesion-free X-rays as
    ``settings.lesion_free`` asks: :func:`with_lesion_free`), keep the best val-loss epoch, save."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = (with_lesion_free(records, settings) for records in (train, val))
    if not train or not val:
        raise ValueError(f"need {' and '.join(settings.mask_kinds)} masks in both splits; "
                         f"found {len(train)} train, {len(val)} val")
    # several devices (data.runtime.distribute): only the fit runs under the strategy
    dist = start_distribution(settings.distribute, replicas=settings.replicas, global_batch=settings.batch_size)
    check_fit_sizes(dist, n_train=len(train), n_val=len(val))
    keras.utils.set_random_seed(settings.seed)
    with distribution_scope(dist):
        model = build_segmenter(settings)
    recipe = FitRecipe.from_settings(settings)
    prepare_for_training(model, recipe)
    failures = FailureLog()
    common = dict(size=settings.image_size, batch_size=settings.batch_size, mode=settings.resize_mode,
                  clahe=settings.clahe, failures=failures, seed=settings.seed,
                  mask_kind=settings.kind if settings.classes == "binary" else settings.mask_kinds)
    fit_common = {**common, "drop_remainder": dist is not None}
    # read every epoch: decoded images and masks are kept (data.datasets.DECODE_CACHE_BYTES)
    train_ds = make_dataset(train, shuffle=True, augment_params=AugmentParams() if settings.augment else None,
                            cache=True, **fit_common)
    val_ds = make_dataset(val, cache=True, **common)  # every validation image: the threshold fit below
    fit_val_ds = make_dataset(val, cache=True, **fit_common) if dist else val_ds
    if settings.classes != "binary":
        train_ds, val_ds = train_ds.map(softmax_targets), val_ds.map(softmax_targets)
        fit_val_ds = fit_val_ds.map(softmax_targets) if dist else val_ds
    with distribution_scope(dist), synchronized_batchnorm(model, dist):
        fitted = fit_best(model, train_ds, fit_val_ds, recipe=recipe, n_train=len(train), loss=get_loss(settings.loss),
                          metrics=[dice_coefficient], out_dir=out_dir, verbose=verbose)
    model = off_strategy(model, dist)
    plain = make_dataset(train, shuffle=True, **common)  # no augmentation
    reestimate_batchnorm(model, (np.asarray(x) for x, _ in plain), max_batches=settings.bn_reestimate_batches)
    threshold_fit = None
    if settings.threshold == "fit":
        trace_for_any_batch(model)  # the last validation batch is smaller
        threshold_fit = fit_lesion_threshold(model.predict_on_batch, val_ds, settings)  # decoded once, cached
    meta = {"arch": settings.arch, "kind": settings.kind, "classes": settings.classes,
            "channels": list(settings.channels),
            "threshold": threshold_fit["threshold"] if threshold_fit else settings.threshold,
            "threshold_fit": threshold_fit,
            "min_lesion_area": settings.min_lesion_area, "tta": settings.tta,
            "resize_mode": settings.resize_mode, "clahe": settings.clahe,
            "distribute": dist.record() if dist else None, "modality": settings.modality,
            "ct_window": [settings.ct_window_center, settings.ct_window_width] if settings.modality == "ct" else None}
    config = {**settings.to_dict(), "n_train": len(train), "n_val": len(val), "epochs_run": fitted.epochs_run,
              "n_train_lesion_free": sum(is_lesion_free(r, settings) for r in train),
              "n_val_lesion_free": sum(is_lesion_free(r, settings) for r in val)}
    save_bundle(model, out_dir, kind=KIND, image_size=settings.image_size, config=config, meta=meta)
    return SegmenterTrainResult(out_dir, fitted.history, list(failures.items), len(train), len(val),
                                config["n_train_lesion_free"])
