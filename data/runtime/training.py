"""Training scaffolding that both stages share: optimiser and schedule, callbacks, BatchNorm care.

Why the BatchNorm helpers exist (measured in the note of the "Models that learn" issue): Keras'
BatchNormalization keeps moving statistics with momentum 0.99, so after the few hundred steps
of a from-scratch run on a few thousand X-rays they still lean towards their initial values
(mean 0, variance 1). Training-mode outputs look fine, inference-mode outputs collapse to one
class, the checkpoint is chosen on a meaningless validation loss, and the temperature fit
then flattens every probability to about 1/3. A lower momentum for short runs and a
re-estimate of the statistics over training batches at the end ("precise BN", Wu & Johnson
2021) make inference match training.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import keras
import numpy as np

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("plateau", "cosine", "constant")


def apply_preset(values: Mapping[str, Any], presets: Mapping[str, Mapping[str, Any]], default: str) -> dict[str, Any]:
    """``values`` completed by the preset ``values["preset"]`` (else ``default``): the preset gives
    the keys that ``values`` leaves out; keys given always win. An unknown preset name is kept for
    the settings' own check to refuse with the valid names."""
    name = values.get("preset") or default
    return {**presets.get(name, {}), **values, "preset": name}


def check_recipe(*, optimizer: str, lr_schedule: str, warmup_epochs: int, epochs: int, label_smoothing: float = 0.0,
                 bn_momentum: float | None = None, weight_decay: float = 0.0, time_budget_s: float = 0.0) -> None:
    """ValueError naming the bad recipe value (used by both settings classes)."""
    if not (time_budget_s >= 0 and math.isfinite(time_budget_s)):
        raise ValueError(f"time_budget_s {time_budget_s} must be a number of seconds ≥ 0 (0: no budget)")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if lr_schedule not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {lr_schedule!r}; valid: {', '.join(SCHEDULES)}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs {warmup_epochs} must be ≥ 0")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing {label_smoothing} out of [0, 1)")
    if bn_momentum is not None and not 0.0 < bn_momentum < 1.0:
        raise ValueError(f"bn_momentum {bn_momentum} out of (0, 1)")
    if weight_decay < 0:
        raise ValueError(f"weight_decay {weight_decay} must be ≥ 0")


@dataclasses.dataclass(frozen=True)
class RecipeSettings:
    """The training-recipe fields both stages' settings share (ClassifierSettings and SegmenterSettings
    derive from this; :class:`FitRecipe` reads them). Defaults: the paper's Adam with plateau LR."""

    seed: int = 0
    run_eagerly: bool = False
    preset: str = "paper"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    lr_schedule: str = "plateau"
    warmup_epochs: int = 0
    early_stopping_patience: int = 10
    reduce_lr_patience: int = 4
    reduce_lr_factor: float = 0.5
    bn_momentum: float | None = None  # None keeps Keras' 0.99
    bn_reestimate_batches: int = 0
    select_best: bool = True  # keep the best-val-loss epoch (False: the last epoch, as a plain fit)
    time_budget_s: float = 0.0  # > 0: wall seconds for the fit; the epochs that fit (≤ epochs) run (WallTimeBudget)
    distribute: str = "none"  # "mirrored": several devices of one host (data.runtime.distribute)
    replicas: int = 0  # with "mirrored": how many devices (0: every GPU)

    def check_recipe_fields(self, *, presets: Mapping[str, Any], epochs: int, label_smoothing: float = 0.0) -> None:
        """ValueError naming the first bad recipe value (called by the subclasses' __post_init__)."""
        if self.preset not in presets:
            raise ValueError(f"unknown preset {self.preset!r}; valid: {', '.join(presets)}")
        check_recipe(optimizer=self.optimizer, lr_schedule=self.lr_schedule, warmup_epochs=self.warmup_epochs,
                     epochs=max(epochs, 1), label_smoothing=label_smoothing, bn_momentum=self.bn_momentum,
                     weight_decay=self.weight_decay, time_budget_s=self.time_budget_s)
        if self.bn_reestimate_batches < 0:
            raise ValueError("bn_reestimate_batches must be ≥ 0")
        from data.runtime.distribute import check_distribute

        check_distribute(self.distribute, self.replicas)


def build_optimizer(name: str, learning_rate: float, *, schedule: str, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, weight_decay: float = 0.0) -> keras.optimizers.Optimizer:
    """Adam or AdamW; "cosine" decays to 0 over the run after a linear warm-up from 0 (the warm-up
    takes at most half the run, so a preset's warm-up also fits a 1-epoch test run).

    AdamW's decay skips biases and BatchNorm's gamma/beta (decaying them only fights the
    normalisation).
    """
    lr = build_lr_schedule(learning_rate, schedule=schedule, epochs=epochs, steps_per_epoch=steps_per_epoch,
                           warmup_epochs=warmup_epochs)
    if name == "adamw":
        opt = keras.optimizers.AdamW(lr, weight_decay=weight_decay)
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        return opt
    return keras.optimizers.Adam(lr)


def build_lr_schedule(learning_rate: float, *, schedule: str, epochs: int, steps_per_epoch: int,
                      warmup_epochs: int = 0) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The constant ``learning_rate`` ("plateau": callbacks lower it; "constant": nothing does) or
    warm-up + cosine decay to 0."""
    if schedule != "cosine":
        return learning_rate
    return _warmup_cosine(learning_rate, total_steps=max(1, epochs * steps_per_epoch),
                          warmup_steps=min(warmup_epochs, epochs // 2) * steps_per_epoch)


def _warmup_cosine(learning_rate: float, *, total_steps: int, warmup_steps: int):
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    warmup = min(warmup_steps, total_steps - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else learning_rate, decay_steps=total_steps - warmup,
        warmup_target=learning_rate if warmup else None, warmup_steps=warmup,
    )


class WallTimeBudget(keras.callbacks.Callback):
    """Fits a run into ``seconds`` of wall time: after each epoch it plans how many of the
    ``max_epochs`` fit in the time left, at the pace of the last epoch, and stops the fit when no
    further epoch fits. The plan is made from the second epoch on (the first carries the tracing of
    the train and validation steps) and only ever shrinks. At least one epoch always runs.

    With ``learning_rate`` given (the "cosine" schedule) it owns the learning rate: each batch it
    sets the optimizer's rate to the warm-up + cosine of :func:`build_lr_schedule`, with the full run's
    warm-up and the decay ending at 0 with the *planned* epochs, so a shortened run still ends at a low rate. (The JAX
    trainer reads optimizer variables once per epoch, so there the rate steps once per epoch.)
    Each epoch's wall seconds and the plan go into the logs (``epoch_seconds``, ``planned_epochs``).
    """

    def __init__(self, seconds: float, *, max_epochs: int, steps_per_epoch: int, learning_rate: float | None = None,
                 warmup_epochs: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if seconds <= 0:
            raise ValueError(f"a time budget needs seconds > 0, got {seconds}")
        self.seconds, self.max_epochs, self.steps_per_epoch = float(seconds), max_epochs, steps_per_epoch
        self.learning_rate, self.warmup_epochs, self._clock = learning_rate, warmup_epochs, clock
        self.planned = max_epochs
        self._schedule = self._build_schedule()
        self._t0 = self._epoch_t0 = 0.0
        self._epoch = 0

    @property
    def cut_short(self) -> bool:
        """Whether the budget ended the fit before ``max_epochs``."""
        return self.planned < self.max_epochs

    def _build_schedule(self):
        if self.learning_rate is None:
            return None
        # the warm-up is the one the full run would have (it is over before the plan is made)
        return _warmup_cosine(self.learning_rate, total_steps=max(1, self.planned * self.steps_per_epoch),
                              warmup_steps=min(self.warmup_epochs, self.max_epochs // 2) * self.steps_per_epoch)

    def on_train_begin(self, logs=None) -> None:
        self._t0 = self._clock()

    def on_epoch_begin(self, epoch, logs=None) -> None:
        self._epoch, self._epoch_t0 = epoch, self._clock()

    def on_train_batch_begin(self, batch, logs=None) -> None:
        if self._schedule is not None:
            self.model.optimizer.learning_rate = float(self._schedule(self._epoch * self.steps_per_epoch + batch))

    def on_epoch_end(self, epoch, logs=None) -> None:
        now = self._clock()
        took = now - self._epoch_t0
        left = self.seconds - (now - self._t0)
        if epoch >= 1 or left <= 0:
            fits = int(left // took) if left > 0 and took > 0 else 0
            plan = max(epoch + 1, min(self.planned, epoch + 1 + fits))
            if plan != self.planned:
                self.planned = plan
                self._schedule = self._build_schedule()
        if epoch + 1 >= self.planned:
            self.model.stop_training = True
        if logs is not None:
            logs.update(epoch_seconds=took, planned_epochs=float(self.planned))


def share_of_time_left(seconds_left: float, costs: Mapping[str, float], name: str) -> float:
    """The seconds of a time budget (:class:`WallTimeBudget`) for the fit ``name``, when ``seconds_left``
    remain for it and the fits still to come: ``costs`` holds each of them, this one included, by its
    expected cost (any unit), and ``name`` gets its cost's share. Made again as each fit starts, so what
    one fit overran or left unused passes on to the next. At least 1 ms: a spent budget still runs one
    epoch."""
    if costs.get(name, 0) <= 0 or any(c < 0 for c in costs.values()):
        raise ValueError(f"the fit {name!r} needs a cost > 0 among costs ≥ 0, got {dict(costs)}")
    return max(max(seconds_left, 0.0) * costs[name] / sum(costs.values()), 1e-3)


def build_callbacks(out_dir: Path, *, schedule: str, early_stopping_patience: int, reduce_lr_patience: int,
                    reduce_lr_factor: float, prefix: str = "") -> tuple[list[keras.callbacks.Callback], Path]:
    """Best-val-loss checkpoint, CSV log (``{prefix}training_log.csv``, written as epochs end), and for
    "plateau" LR reduction.

    A cosine run keeps no ReduceLROnPlateau (the schedule owns the LR); early stopping only when
    ``early_stopping_patience`` > 0. Returns (callbacks, checkpoint path).
    """
    ckpt = Path(out_dir) / f"{prefix}best.weights.h5"
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.ModelCheckpoint(ckpt, monitor="val_loss", save_best_only=True, save_weights_only=True),
        keras.callbacks.CSVLogger(Path(out_dir) / f"{prefix}training_log.csv"),
    ]
    if early_stopping_patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=early_stopping_patience))
    if schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=reduce_lr_factor,
                                                           patience=reduce_lr_patience, min_lr=1e-7))
    return callbacks, ckpt


def write_history_csv(path: Path, history: dict[str, list[float]]) -> None:
    """One row per epoch, one column per history key (empty where a run stopped earlier)."""
    import csv

    keys = sorted(history)
    n = max((len(v) for v in history.values()), default=0)
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        w = csv.writer(handle)
        w.writerow(["epoch", *keys])
        for e in range(n):
            w.writerow([e, *[history[k][e] if e < len(history[k]) else "" for k in keys]])


def steps_per_epoch(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


def batchnorm_layers(model: keras.layers.Layer) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer in ``model``, nested models included, in graph order."""
    out: list[keras.layers.BatchNormalization] = []
    seen: set[int] = set()

    def walk(layer) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, keras.layers.BatchNormalization):
            out.append(layer)
        for child in getattr(layer, "layers", ()):
            walk(child)

    walk(model)
    return out


def set_bn_momentum(model: keras.layers.Layer, momentum: float | None) -> int:
    """Set every BatchNorm layer's momentum (None leaves Keras' 0.99); returns how many were set."""
    if momentum is None:
        return 0
    layers = batchnorm_layers(model)
    for layer in layers:
        layer.momentum = float(momentum)
    return len(layers)


def reestimate_batchnorm(model: keras.Model, batches: Iterable[np.ndarray], *, max_batches: int) -> int:
    """Replace the moving statistics of every trainable BatchNorm layer by their mean over batches.

    ``batches``: (B, H, W, 3) float32 model inputs (training images, no augmentation). Runs the
    model forward in training mode with momentum k/(k+1) at batch k, so after n batches the moving
    mean and variance are the plain average of the n batch statistics; weights are untouched.
    Returns the number of batches used (0 leaves the model as it was).
    """
    layers = [layer for layer in batchnorm_layers(model) if layer.trainable]
    if not layers or max_batches <= 0:
        return 0
    saved = [layer.momentum for layer in layers]
    used = 0
    try:
        for x in _take(batches, max_batches):
            for layer in layers:
                layer.momentum = used / (used + 1.0)
            model(np.asarray(x, np.float32), training=True)
            used += 1
    finally:
        for layer, m in zip(layers, saved):
            layer.momentum = m
    return used


def _take(items: Iterable[np.ndarray], n: int) -> Iterator[np.ndarray]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def fit_streamed(model, train, **kwargs):
    """``model.fit(train, **kwargs)`` on a stream of unknown length (data.datasets.make_dataset: files
    that fail to decode are dropped while streaming, so tf.data cannot know the number of batches).

    Keras then ends the first epoch by running out of data and warns "Your input ran out of data;
    interrupting training" although every epoch runs in full (the training logs show them); that
    one warning is silenced here, for this call only. Returns the History.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data", category=UserWarning)
        return model.fit(train, **kwargs)


@dataclasses.dataclass(frozen=True)
class FitRecipe:
    """How one model (or one separately optimised unit of it) is fitted: the settings fields both
    trainers share. :meth:`from_settings` reads them off a ClassifierSettings or SegmenterSettings."""

    optimizer: str
    learning_rate: float
    lr_schedule: str
    epochs: int
    batch_size: int
    warmup_epochs: int = 0
    weight_decay: float = 0.0
    early_stopping_patience: int = 0
    reduce_lr_patience: int = 4
    reduce_lr_factor: float = 0.5
    bn_momentum: float | None = None
    bn_reestimate_batches: int = 0
    select_best: bool = True
    run_eagerly: bool = False
    time_budget_s: float = 0.0

    @classmethod
    def from_settings(cls, settings: Any) -> FitRecipe:
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class FitOutcome:
    """What :func:`fit_best` leaves: the Keras history (floats), wall seconds, the checkpoint, the
    epochs run and whether a time budget (``FitRecipe.time_budget_s``) ended the fit early."""

    history: dict[str, list[float]]
    seconds: float
    checkpoint: Path
    epochs_run: int = 0
    cut_short: bool = False


def prepare_for_training(model: keras.Model, recipe: FitRecipe) -> None:
    """BatchNorm momentum from the recipe; TensorFlow's graph-mode settings unless eager. The model's own
    steps follow ``recipe.run_eagerly`` from here on, so the passes after the fit (calibration, the cut
    fit) run as the fit did: eager where it was, traced once for any batch size where it was not."""
    set_bn_momentum(model, recipe.bn_momentum)
    model.run_eagerly = recipe.run_eagerly
    if not recipe.run_eagerly:
        from data.runtime.tf_setup import configure_graph_training

        configure_graph_training()


def console_verbosity(verbose: int | None) -> int:
    """Keras' fit verbosity: as given, else a progress bar on a terminal and one line per epoch elsewhere."""
    return verbose if verbose is not None else (1 if sys.stderr.isatty() else 2)


def fit_best(model: keras.Model, train, validation, *, recipe: FitRecipe, n_train: int, loss: Any, metrics: Any,
             out_dir: Path, prefix: str = "", learning_rate: float | None = None,
             verbose: int | None = None) -> FitOutcome:
    """Compile ``model`` with the recipe's optimiser and schedule, fit it on the streams with the
    best-val-loss checkpoint and CSV log (:func:`build_callbacks`, files named with ``prefix``),
    then load the best epoch's weights back (unless ``recipe.select_best`` is off: the last epoch's
    weights stay). ``learning_rate`` overrides the recipe's (per unit). With ``recipe.time_budget_s``
    a :class:`WallTimeBudget` runs the epochs that fit (and owns a cosine schedule's rate)."""
    lr = learning_rate or recipe.learning_rate
    steps = steps_per_epoch(n_train, recipe.batch_size)
    budget = None
    if recipe.time_budget_s > 0:
        budget = WallTimeBudget(recipe.time_budget_s, max_epochs=recipe.epochs, steps_per_epoch=steps,
                                learning_rate=lr if recipe.lr_schedule == "cosine" else None,
                                warmup_epochs=recipe.warmup_epochs)
    model.compile(
        # under a budget the callback sets a cosine run's rate each batch, so the optimizer holds a plain rate
        optimizer=build_optimizer(recipe.optimizer, lr, schedule="constant" if budget and budget.learning_rate
                                  else recipe.lr_schedule, epochs=recipe.epochs, steps_per_epoch=steps,
                                  warmup_epochs=recipe.warmup_epochs, weight_decay=recipe.weight_decay),
        loss=loss, metrics=metrics, run_eagerly=recipe.run_eagerly, jit_compile=False,
    )
    callbacks, ckpt = build_callbacks(out_dir, schedule=recipe.lr_schedule, prefix=prefix,
                                      early_stopping_patience=recipe.early_stopping_patience,
                                      reduce_lr_patience=recipe.reduce_lr_patience,
                                      reduce_lr_factor=recipe.reduce_lr_factor)
    if budget is not None:
        callbacks.insert(0, budget)  # first: the CSV log and the history see its epoch_seconds
    t0 = time.perf_counter()
    hist = fit_streamed(model, train, validation_data=validation, epochs=recipe.epochs, callbacks=callbacks,
                        shuffle=False,  # data.datasets.make_dataset shuffles, seeded per epoch
                        verbose=console_verbosity(verbose))
    seconds = round(time.perf_counter() - t0, 1)
    if recipe.select_best and ckpt.is_file():
        model.load_weights(ckpt)
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    return FitOutcome(history, seconds, ckpt, epochs_run=len(history.get("loss", [])),
                      cut_short=bool(budget and budget.cut_short))
