"""Training of the stage-1 ensemble: class weights, callbacks, temperature, saved bundle.

Graph mode (tf.function) by default; ``run_eagerly=True`` is for tests, where tracing
DenseNet121 costs ~70 s and eager ~6 s. XLA stays off: it was slower on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np

from data import spec
from data.augment import AugmentParams
from data.datasets import FailureLog, Record, make_dataset
from data.tf_setup import configure_graph_training
from ensemble.calibration import fit_temperature
from ensemble.classifier import Classifier, load_classifier, save_classifier
from ensemble.ensemble import build_ensemble, loss_outputs, parse_members
from ensemble.members import resolve_weights

#: The paper's Table II class weights (COVID-19 4283, pneumonia 1587, normal 701), as given.
PAPER_CLASS_WEIGHTS = {"normal": 701.0, "pneumonia": 1587.0, "covid": 4283.0}


@dataclass(frozen=True)
class ClassifierSettings:
    """Everything that decides a trained classifier. Defaults follow the paper where it says."""

    members: tuple[str, ...] = ("densenet121", "efficientnetb0", "vgg19")
    variant: str = "softvote"
    member_weights: tuple[float, ...] | None = None
    image_size: int = spec.DEFAULT_IMAGE_SIZE
    resize_mode: str = "stretch"
    clahe: bool = False
    weights: str | None = "imagenet"
    freeze_fraction: float = 0.3
    dropout: float = 0.3
    learning_rate: float = 1e-4
    batch_size: int = 30
    epochs: int = 60
    class_weights: str | dict[str, float] = "balanced"
    augment: bool = True
    early_stopping_patience: int = 10
    reduce_lr_patience: int = 4
    reduce_lr_factor: float = 0.5
    seed: int = 0
    run_eagerly: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", parse_members(self.members))
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be ≥ 1")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate {self.learning_rate} out of (0, 1)")
        if isinstance(self.class_weights, str) and self.class_weights not in ("balanced", "none"):
            raise ValueError("class_weights must be 'balanced', 'none' or a {class: weight} table")
        if isinstance(self.class_weights, dict):
            unknown = set(self.class_weights) - set(spec.CLASS_NAMES)
            missing = set(spec.CLASS_NAMES) - set(self.class_weights)
            if unknown or missing:
                raise ValueError(f"class_weights needs exactly {list(spec.CLASS_NAMES)}; unknown {sorted(unknown)}, missing {sorted(missing)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["members"] = list(self.members)
        d["member_weights"] = list(self.member_weights) if self.member_weights else None
        d["weights"] = "none" if self.weights is None else self.weights  # None would read back as the default
        return d


def class_weight_table(labels: Sequence[str], setting: str | dict[str, float]) -> dict[str, float]:
    """Per-class weights: 'balanced' gives n / (k · n_c); a table is used as given; 'none' gives 1."""
    if isinstance(setting, dict):
        return {c: float(setting[c]) for c in spec.CLASS_NAMES}
    if setting == "none":
        return {c: 1.0 for c in spec.CLASS_NAMES}
    counts = {c: sum(1 for label in labels if label == c) for c in spec.CLASS_NAMES}
    present = [c for c in spec.CLASS_NAMES if counts[c]]
    n, k = sum(counts.values()), len(present)
    return {c: (n / (k * counts[c]) if counts[c] else 0.0) for c in spec.CLASS_NAMES}


@dataclass
class TrainResult:
    """Outcome of :func:`train_classifier`."""

    classifier: Classifier
    history: dict[str, list[float]]
    class_weights: dict[str, float]
    temperature: float
    failures: list[tuple[str, str]]


def _with_targets(ds, outputs: list[str], weights: np.ndarray):
    """(x, onehot) → (x, {output: onehot}, sample_weight) for the multi-output model."""
    import tensorflow as tf

    table = tf.constant(weights, dtype=tf.float32)

    def fn(x, y):
        w = tf.gather(table, tf.argmax(y, axis=-1))
        return x, {name: y for name in outputs}, w

    return ds.map(fn)


def train_classifier(
    settings: ClassifierSettings,
    train: Sequence[Record],
    val: Sequence[Record],
    out_dir: str | Path,
    *,
    verbose: int | None = None,
) -> TrainResult:
    """Train, pick the best epoch on validation loss, fit the temperature, save the bundle.

    ``out_dir`` receives model.keras + model.json, training_log.csv and the best-epoch
    checkpoint. Unreadable images are skipped and returned in ``failures``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not train or not val:
        raise ValueError(f"need training and validation images, got {len(train)} and {len(val)}")
    keras.utils.set_random_seed(settings.seed)
    cw = class_weight_table([r.label for r in train], settings.class_weights)
    cw_vec = np.array([cw[c] for c in spec.CLASS_NAMES], dtype=np.float32)
    # Keep the loss scale comparable whatever the table's units (the paper's are in the thousands).
    cw_vec = cw_vec / max(float(np.average(cw_vec[cw_vec > 0])), 1e-12)
    weight_files = {}
    for m in settings.members:
        resolved = resolve_weights(m, settings.weights)
        if resolved not in (None, "imagenet"):
            from data.bundle import sha256_file

            weight_files[m] = sha256_file(resolved)
    shape = (settings.image_size, settings.image_size, spec.CHANNELS)
    model = build_ensemble(
        settings.members, variant=settings.variant, member_weights=settings.member_weights,
        weights=settings.weights, input_shape=shape, freeze_fraction=settings.freeze_fraction,
        dropout=settings.dropout,
    )
    outputs = loss_outputs(settings.members, settings.variant)
    # A training view over the same layers exposing only the outputs that carry a loss;
    # the saved model keeps all outputs (features for Grad-CAM, member probabilities).
    trainer = keras.Model(model.input, {name: model.output[name] for name in outputs}, name="trainer")
    if not settings.run_eagerly:
        configure_graph_training()
    trainer.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss={name: "categorical_crossentropy" for name in outputs},
        metrics={name: ["accuracy"] for name in outputs},
        run_eagerly=settings.run_eagerly,
        jit_compile=False,
    )
    failures = FailureLog()
    common = dict(size=settings.image_size, batch_size=settings.batch_size, mode=settings.resize_mode,
                  clahe=settings.clahe, failures=failures, seed=settings.seed)
    train_ds = make_dataset(train, shuffle=True, augment_params=AugmentParams() if settings.augment else None, **common)
    val_ds = make_dataset(val, **common)
    ckpt = out_dir / "best.weights.h5"
    callbacks = [
        keras.callbacks.ModelCheckpoint(ckpt, monitor="val_loss", save_best_only=True, save_weights_only=True),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.early_stopping_patience),
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=settings.reduce_lr_factor,
                                          patience=settings.reduce_lr_patience, min_lr=1e-7),
        keras.callbacks.CSVLogger(out_dir / "training_log.csv"),
    ]
    if verbose is None:
        verbose = 1 if sys.stderr.isatty() else 2
    hist = trainer.fit(
        _with_targets(train_ds, outputs, cw_vec),
        validation_data=_with_targets(val_ds, outputs, np.ones_like(cw_vec)),
        epochs=settings.epochs,
        callbacks=callbacks,
        shuffle=False,  # make_dataset shuffles, seeded per epoch
        verbose=verbose,
    )
    if ckpt.is_file():
        trainer.load_weights(ckpt)
    # Temperature on the validation split, from the best epoch's probabilities.
    labels, raw = [], []
    for x, y in val_ds:
        raw.append(np.asarray(model.predict_on_batch(np.asarray(x))["probs"]))
        labels.append(np.asarray(y).argmax(axis=1))
    labels_v, raw_v = np.concatenate(labels), np.concatenate(raw)
    temperature = fit_temperature(raw_v, labels_v)
    if not math.isfinite(temperature):
        raise RuntimeError(f"temperature fit gave {temperature}; validation probabilities are degenerate")
    config = {**settings.to_dict(), "class_weight_table": cw, "n_train": len(train), "n_val": len(val)}
    save_classifier(
        model, out_dir, members=settings.members, variant=settings.variant, image_size=settings.image_size,
        config=config, temperature=temperature, member_weights=settings.member_weights,
        resize_mode=settings.resize_mode, clahe=settings.clahe, weight_files=weight_files,
    )
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    return TrainResult(load_classifier(out_dir), history, cw, temperature, list(failures.items))
