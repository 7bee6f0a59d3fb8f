"""Training of the stage-1 ensemble: class weights, callbacks, temperature, saved bundle.

Graph mode (tf.function) by default; ``run_eagerly=True`` is for tests, where tracing
DenseNet121 costs ~70 s and eager ~6 s. XLA stays off: it was slower on CPU.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import keras
import numpy as np

from data import spec
from data.augment import AugmentParams
from data.datasets import FailureLog, Record, make_dataset
from data.runtime.distribute import (
    check_fit_sizes,
    distribution_scope,
    off_strategy,
    start_distribution,
    synchronized_batchnorm,
)
from data.runtime.tf_setup import trace_for_any_batch
from data.runtime.training import (
    FitRecipe,
    RecipeSettings,
    apply_preset,
    fit_best,
    prepare_for_training,
    reestimate_batchnorm,
    share_of_time_left,
    write_history_csv,
)
from ensemble.calibration import apply_temperature, fit_temperature, fit_vote_weights
from ensemble.classifier import Classifier, load_classifier, save_classifier
from ensemble.ensemble import build_ensemble, loss_outputs, parse_members
from ensemble.members import MEMBERS, resolve_weights
from ensemble.refer import DEFAULT_TARGET_ERROR, fit_confidence_threshold, input_check_from_vectors, layout_vector

#: A fitted temperature at or above this means validation predictions are nearly uninformative.
TEMPERATURE_WARNING = 10.0

#: The paper's Table II class weights (COVID-19 4283, pneumonia 1587, normal 701), as given.
PAPER_CLASS_WEIGHTS = {"normal": 701.0, "pneumonia": 1587.0, "covid": 4283.0}


#: Named recipes. A preset supplies the values of the keys a config or the command line leaves
#: unset. "paper": the dataclass defaults (Adam 1e-4, batch 30, 60 epochs, plateau LR, early
#: stopping, 30 % of each ImageNet backbone frozen). "scratch": what from-scratch training on a few
#: thousand X-rays needs (see data.runtime.training and the README's "Training from scratch"); the default
#: whenever weights = "none".
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "scratch": {
        "optimizer": "adamw", "weight_decay": 0.01, "learning_rate": 1e-3, "lr_schedule": "cosine",
        "warmup_epochs": 2, "label_smoothing": 0.1, "bn_momentum": 0.9, "bn_reestimate_batches": 32,
        "freeze_fraction": 0.0, "batch_size": 32, "epochs": 30, "early_stopping_patience": 0,
        # VGG19 has no BatchNorm: from scratch it trains at 3e-4 only with its convs He-drawn
        # (ensemble.members.he_initialised): alone on bench_quality's split (64 px, 5 epochs) held-out
        # 0.584 against 0.489 for Glorot at 1e-4 and 0.462 for Glorot at 3e-4; He at 1e-3 collapses to one class.
        # EfficientNetB0 underfits at 1e-3: on bench_quality's split (64 px, 16 epochs, alone) its
        # held-out accuracy went 0.536 / 0.628 / 0.684 / 0.580 at 3e-4 / 1e-3 / 3e-3 / 1e-2 (2026-11-27, README).
        # DenseNet121 stays at 1e-3: alone on the same split 0.775 there, 0.748 at 3e-3 (paired -0.027, 2026-11-28).
        "member_lr_scale": {"vgg19": 0.3, "efficientnetb0": 3.0},
        # Under a time budget DenseNet121, the member the fitted vote leans on, gets twice a member's
        # share of the time left (the others share what it leaves): with equal shares the 90-minute
        # bench_quality cut it to 8 of 16 epochs (0.721 held-out) while VGG19 took half the ensemble's
        # time and got a vote weight of 0; with this share it ran 16 of 16 (0.771; README, "The 90-minute budget").
        "member_time_share": {"densenet121": 2.0},
        "fit_member_weights": True,
    },
}


def with_preset(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` completed by its preset: ``values["preset"]``, else "scratch" when weights is
    "none" and "paper" otherwise. Keys given in ``values`` always win."""
    from data.runtime.weights import is_none

    presets = dict(PRESETS)
    if values.get("member_weights") is not None:  # weights given by the user are used as given
        presets = {k: {kk: vv for kk, vv in v.items() if kk != "fit_member_weights"} for k, v in presets.items()}
    weights = values.get("weights", "imagenet")
    scratch = all(is_none(w) for w in weights.values()) if isinstance(weights, Mapping) else is_none(weights)
    return apply_preset(values, presets, "scratch" if scratch else "paper")


@dataclass(frozen=True)
class ClassifierSettings(RecipeSettings):
    """Everything that decides a trained classifier. Defaults follow the paper where it says."""

    members: tuple[str, ...] = ("densenet121", "efficientnetb0", "vgg19")
    variant: str = "softvote"
    member_weights: tuple[float, ...] | None = None
    image_size: int = spec.DEFAULT_IMAGE_SIZE
    resize_mode: str = spec.DEFAULT_RESIZE_MODE
    clahe: bool = False
    weights: str | dict[str, str] | None = "imagenet"  # one source for all members, or member → source
    freeze_fraction: float = 0.3
    dropout: float = 0.3
    learning_rate: float = 1e-4
    batch_size: int = 30
    epochs: int = 60
    class_weights: str | dict[str, float] = "balanced"
    augment: bool = True
    label_smoothing: float = 0.0
    member_lr_scale: dict[str, float] | None = None  # soft vote: each member's LR = learning_rate × scale
    #: Soft vote under a time budget: each member's weight in the split of the time left (1 where not named)
    member_time_share: dict[str, float] | None = None
    refer_target_error: float = DEFAULT_TARGET_ERROR  # error allowed among validation images not referred
    fit_member_weights: bool = False  # soft vote: weights fitted on validation NLL instead of equal ones

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
                raise ValueError(f"class_weights needs exactly {list(spec.CLASS_NAMES)}; unknown {sorted(unknown)}, "
                                 f"missing {sorted(missing)}")
        self.check_recipe_fields(presets=PRESETS, epochs=self.epochs, label_smoothing=self.label_smoothing)
        for key in ("member_lr_scale", "member_time_share"):
            table = getattr(self, key) or {}
            unknown = sorted(set(table) - set(MEMBERS))
            if unknown:
                raise ValueError(f"{key} names unknown member(s) {unknown}; valid: {', '.join(MEMBERS)}")
            if any(not 0 < v <= 100 for v in table.values()):
                raise ValueError(f"{key} values must be in (0, 100], got {table}")
        if isinstance(self.weights, dict) and set(self.weights) != set(self.members):
            raise ValueError(f"the weights table must name each member ({', '.join(self.members)}); "
                             f"it names {', '.join(self.weights) or 'none'}")
        if self.fit_member_weights and self.member_weights is not None:
            raise ValueError("give member_weights or fit_member_weights = true, not both")
        if not 0.0 < self.refer_target_error < 1.0:
            raise ValueError(f"refer_target_error {self.refer_target_error} out of (0, 1)")

    def member_learning_rate(self, member: str) -> float:
        return self.learning_rate * (self.member_lr_scale or {}).get(member, 1.0)

    def unit_time_share(self, unit: str) -> float:
        """A training unit's (:func:`training_units`) weight in the split of a time budget."""
        return (self.member_time_share or {}).get(unit, 1.0)

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

    out_dir: Path  # the saved bundle
    history: dict[str, list[float]]
    class_weights: dict[str, float]
    temperature: float
    failures: list[tuple[str, str]]
    validation: dict[str, Any] = dataclasses.field(default_factory=dict)  # val accuracy, temperature, timings

    @functools.cached_property
    def classifier(self) -> Classifier:
        """The saved bundle, loaded (and checked) on first use: loading three members takes seconds
        (~16 s on 2 cores for the tests' 64-px ensemble), which `cxr train-classifier` does not need."""
        return load_classifier(self.out_dir)


def _with_targets(ds, outputs: list[str], weights: np.ndarray):
    """(x, onehot) batches → (x, onehot or {output: onehot}, per-example class weight).

    Works on both streams of data.datasets.make_dataset: numpy batches (PyTorch/JAX backends)
    and tf.data's symbolic ones (keras.ops there).
    """
    from keras import ops

    table = np.asarray(weights, np.float32)

    def fn(x, y):
        if isinstance(y, np.ndarray):
            w = table[y.argmax(axis=-1)]
        else:
            w = ops.take(ops.convert_to_tensor(table), ops.argmax(y, axis=-1))
        return x, (y if len(outputs) == 1 else {name: y for name in outputs}), w

    return ds.map(fn)


def training_units(settings: ClassifierSettings) -> list[tuple[str, list[str], float]]:
    """(name, outputs with a loss, learning rate) of each separately optimised part of the model.

    Soft vote: each member alone on its own loss and learning rate (the members share no weight,
    so this is the paper's "train each network, then average"). Concat: one joint unit.
    """
    if settings.variant == "softvote":
        return [(m, [f"{m}_probs"], settings.member_learning_rate(m)) for m in settings.members]
    return [("concat", loss_outputs(settings.members, settings.variant), settings.learning_rate)]


def train_classifier(
    settings: ClassifierSettings,
    train: Sequence[Record],
    val: Sequence[Record],
    out_dir: str | Path,
    *,
    verbose: int | None = None,
) -> TrainResult:
    """Train, keep each unit's best epoch on validation loss, re-estimate BatchNorm statistics,
    fit the temperature, save the bundle.

    ``out_dir`` receives model.keras + model.json, training_log.csv (all units; per soft-vote
    member also ``{member}.training_log.csv``) and the best-epoch checkpoints. Unreadable images
    are skipped and returned in ``failures``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not train or not val:
        raise ValueError(f"need training and validation images, got {len(train)} and {len(val)}")
    # several devices (data.runtime.distribute): only the fit runs under the strategy
    dist = start_distribution(settings.distribute, replicas=settings.replicas, global_batch=settings.batch_size)
    check_fit_sizes(dist, n_train=len(train), n_val=len(val))
    keras.utils.set_random_seed(settings.seed)
    cw = class_weight_table([r.label for r in train], settings.class_weights)
    weight_files = _weight_file_hashes(settings)
    with distribution_scope(dist):
        model = build_ensemble(
            settings.members, variant=settings.variant, member_weights=settings.member_weights,
            weights=settings.weights, input_shape=(settings.image_size, settings.image_size, spec.CHANNELS),
            freeze_fraction=settings.freeze_fraction, dropout=settings.dropout,
        )
    recipe = FitRecipe.from_settings(settings)
    prepare_for_training(model, recipe)
    failures = FailureLog()
    common = dict(size=settings.image_size, batch_size=settings.batch_size, mode=settings.resize_mode,
                  clahe=settings.clahe, failures=failures, seed=settings.seed)
    fit_common = {**common, "drop_remainder": dist is not None}
    # read every epoch: decoded images are kept (data.datasets.DECODE_CACHE_BYTES), augmentation runs anew
    train_ds = make_dataset(train, shuffle=True, augment_params=AugmentParams() if settings.augment else None,
                            cache=True, **fit_common)
    val_ds = make_dataset(val, cache=True, **common)  # every validation image: calibration below
    fit_val_ds = make_dataset(val, cache=True, **fit_common) if dist else val_ds
    with distribution_scope(dist), synchronized_batchnorm(model, dist):
        history, seconds, epochs_run = _fit_units(model, settings, recipe, train_ds, fit_val_ds, cw,
                                                  n_train=len(train), out_dir=out_dir, verbose=verbose)
    model = off_strategy(model, dist)
    # One pass over the training images without augmentation (what inference will see): the first
    # batches re-estimate BatchNorm, and every image gives its layout vector for the input check.
    layouts: list[np.ndarray] = []

    def plain_batches():
        for x, _ in make_dataset(train, shuffle=True, **common):
            x = np.asarray(x)
            layouts.extend(layout_vector(row) for row in x)
            yield x

    batches = plain_batches()
    bn_batches = reestimate_batchnorm(model, batches, max_batches=settings.bn_reestimate_batches)
    collections.deque(batches, maxlen=0)  # the rest of the pass, for the input check
    cal = _calibrate(model, settings, val_ds)
    refer = {
        "input_check": input_check_from_vectors(layouts),
        "confidence": fit_confidence_threshold(apply_temperature(cal.raw, cal.temperature), cal.labels,
                                               target_error=settings.refer_target_error),
    }
    validation = {
        "n": int(len(cal.labels)),
        "accuracy": float((cal.raw.argmax(1) == cal.labels).mean()),
        "member_accuracy": {m: float((v.argmax(1) == cal.labels).mean()) for m, v in cal.member_raw.items()},
        "member_weights": list(cal.member_weights) if cal.member_weights else None,
        "temperature": cal.temperature,
        "bn_reestimate_batches": bn_batches,
        "train_seconds": seconds,
        "epochs_run": epochs_run,  # per unit; fewer than settings.epochs where time_budget_s ended a fit
    }
    if cal.temperature >= TEMPERATURE_WARNING:
        # A temperature this high flattens every probability towards 1/3: the model's validation
        # predictions carry almost no information. Say so rather than hide it.
        print(f"warning: temperature {cal.temperature:.1f} on validation (accuracy {validation['accuracy']:.3f}): "
              "the classifier has not learned; see the README's 'Presets' section", file=sys.stderr)
    config = {**settings.to_dict(), "class_weight_table": cw, "n_train": len(train), "n_val": len(val)}
    save_classifier(
        model, out_dir, members=settings.members, variant=settings.variant, image_size=settings.image_size,
        config=config, temperature=cal.temperature, member_weights=cal.member_weights,
        resize_mode=settings.resize_mode, clahe=settings.clahe, weight_files=weight_files,
        extra_meta={"validation": validation, "refer": refer, "distribute": dist.record() if dist else None},
    )
    return TrainResult(out_dir, history, cw, cal.temperature, list(failures.items), validation)


def _weight_file_hashes(settings: ClassifierSettings) -> dict[str, str]:
    """sha256 of each member's local initial weight file (checked before any image is read)."""
    from data.runtime.bundle import sha256_file

    resolved = {m: resolve_weights(m, settings.weights) for m in settings.members}
    return {m: sha256_file(r) for m, r in resolved.items() if r not in (None, "imagenet")}


def _fit_units(model: keras.Model, settings: ClassifierSettings, recipe: FitRecipe, train_ds, val_ds,
               class_weights: dict[str, float], *, n_train: int, out_dir: Path,
               verbose: int | None) -> tuple[dict[str, list[float]], dict[str, float], dict[str, int]]:
    """Fit each training unit (:func:`training_units`) in turn; (merged history, seconds per unit,
    epochs run per unit)."""
    cw_vec = np.array([class_weights[c] for c in spec.CLASS_NAMES], dtype=np.float32)
    # Keep the loss scale comparable whatever the table's units (the paper's are in the thousands).
    cw_vec = cw_vec / max(float(np.average(cw_vec[cw_vec > 0])), 1e-12)
    units = training_units(settings)
    history: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    epochs_run: dict[str, int] = {}
    # a time budget covers every unit: each gets its share (settings.member_time_share) of what the
    # units before it left
    deadline = time.monotonic() + recipe.time_budget_s
    for i, (name, outputs, lr) in enumerate(units):
        if recipe.time_budget_s > 0:
            shares = {u[0]: settings.unit_time_share(u[0]) for u in units[i:]}
            share = share_of_time_left(deadline - time.monotonic(), shares, name)
            recipe = dataclasses.replace(recipe, time_budget_s=share)
        # A training view over the ensemble's own layers with only this unit's outputs: fitting it
        # updates this unit's weights in `model`; the saved model keeps every output.
        out_spec = model.output[outputs[0]] if len(outputs) == 1 else {o: model.output[o] for o in outputs}
        trainer = keras.Model(model.input, out_spec, name=f"trainer_{name}")
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=settings.label_smoothing)
        fitted = fit_best(
            trainer, _with_targets(train_ds, outputs, cw_vec),
            _with_targets(val_ds, outputs, np.ones_like(cw_vec)),
            recipe=recipe, n_train=n_train, learning_rate=lr,
            loss=loss if len(outputs) == 1 else {o: loss for o in outputs},
            metrics=["accuracy"] if len(outputs) == 1 else {o: ["accuracy"] for o in outputs},
            out_dir=out_dir, prefix=f"{name}." if len(units) > 1 else "", verbose=verbose,
        )
        seconds[name] = fitted.seconds
        epochs_run[name] = fitted.epochs_run
        for key, values in fitted.history.items():
            if len(outputs) == 1:  # name the output, as a multi-output fit does
                key = f"val_{outputs[0]}_{key[4:]}" if key.startswith("val_") else f"{outputs[0]}_{key}"
            history[key] = values
    if len(units) > 1:
        write_history_csv(out_dir / "training_log.csv", history)
    return history, seconds, epochs_run


@dataclass
class _Calibration:
    labels: np.ndarray  # (V,) validation class indices
    raw: np.ndarray  # (V, C) ensemble probabilities before temperature (with the fitted vote weights)
    member_raw: dict[str, np.ndarray]  # soft vote: each member's (V, C)
    member_weights: tuple[float, ...] | None
    temperature: float


def _calibrate(model: keras.Model, settings: ClassifierSettings, val_ds) -> _Calibration:
    """Soft-vote weights (when fitted) and the temperature, on the validation split, from the final model."""
    labels, raw, members_raw = [], [], {}
    trace_for_any_batch(model)  # the last validation batch is smaller (nothing to trace when run eagerly)
    for x, y in val_ds:
        out = model.predict_on_batch(np.asarray(x))
        raw.append(np.asarray(out["probs"]))
        for m in settings.members:
            if f"{m}_probs" in out:
                members_raw.setdefault(m, []).append(np.asarray(out[f"{m}_probs"]))
        labels.append(np.asarray(y).argmax(axis=1))
    labels_v, raw_v = np.concatenate(labels), np.concatenate(raw)
    member_raw = {m: np.concatenate(v) for m, v in members_raw.items()}
    member_weights = settings.member_weights
    if settings.fit_member_weights and settings.variant == "softvote" and len(settings.members) > 1:
        member_weights = tuple(fit_vote_weights([member_raw[m] for m in settings.members], labels_v))
        model.get_layer("probs").member_weights = list(member_weights)  # saved with the model's config
        raw_v = sum(w * member_raw[m] for w, m in zip(member_weights, settings.members))
    temperature = fit_temperature(raw_v, labels_v)
    if not math.isfinite(temperature):
        raise RuntimeError(f"temperature fit gave {temperature}; validation probabilities are degenerate")
    return _Calibration(labels_v, raw_v, member_raw, member_weights, temperature)
