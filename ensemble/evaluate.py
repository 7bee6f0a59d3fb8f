"""Classification metrics with bootstrap confidence intervals, overall and per source.

Every metric is reported as ``{"value": x}`` or, where a CI applies, ``{"value": x,
"ci95": [lo, hi]}`` (percentile bootstrap over images, seeded). Undefined ratios (a
class absent from the sample) are ``None`` rather than NaN so the JSON stays valid.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from data import spec
from ensemble.calibration import expected_calibration_error, reliability_bins


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int = spec.NUM_CLASSES) -> np.ndarray:
    """(C, C) counts; rows are true classes, columns predicted."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
    return cm


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def per_class_rates(cm: np.ndarray) -> dict[str, dict[str, float | None]]:
    """Sensitivity, specificity, PPV, NPV, F1, FPR, FNR, FDR per class from a confusion matrix."""
    total = cm.sum()
    out = {}
    for c, name in enumerate(spec.CLASS_NAMES[: cm.shape[0]]):
        tp = cm[c, c]
        fn = cm[c].sum() - tp
        fp = cm[:, c].sum() - tp
        tn = total - tp - fn - fp
        sens, ppv = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
        out[name] = {
            "sensitivity": sens,
            "specificity": _ratio(tn, tn + fp),
            "ppv": ppv,
            "npv": _ratio(tn, tn + fn),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "fpr": _ratio(fp, fp + tn),
            "fnr": _ratio(fn, fn + tp),
            "fdr": _ratio(fp, fp + tp),
            "support": int(tp + fn),
        }
    return out


def _auc(labels: np.ndarray, scores: np.ndarray, c: int) -> float | None:
    y = labels == c
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, scores[:, c]))


def _point_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """The scalar metrics that get bootstrap CIs."""
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, probs.shape[1])
    rates = per_class_rates(cm)
    out: dict[str, float | None] = {"accuracy": float((preds == labels).mean())}
    for c, name in enumerate(spec.CLASS_NAMES[: probs.shape[1]]):
        out[f"sensitivity/{name}"] = rates[name]["sensitivity"]
        out[f"auc/{name}"] = _auc(labels, probs, c)
    return out


def bootstrap_indices(n: int, *, n_boot: int, seed: int = 0,
                      groups: Sequence[str] | None = None) -> Iterator[np.ndarray]:
    """``n_boot`` seeded bootstrap resamples of ``n`` items: whole groups (patients) drawn with
    replacement when ``groups`` (one id per item) is given, so one patient's images stay
    together; single items otherwise."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, n)
        return
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(str(g), []).append(i)
    members = [np.array(v) for v in index.values()]
    for _ in range(n_boot):
        yield np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                 groups: Sequence[str] | None = None) -> dict[str, list[float] | None]:
    """Percentile 95 % intervals of :func:`_point_metrics` over ``n_boot`` resamples of patients
    (``groups``, one id per image) or, without groups, of images."""
    samples: dict[str, list[float]] = {}
    for idx in bootstrap_indices(len(labels), n_boot=n_boot, seed=seed, groups=groups):
        for k, v in _point_metrics(labels[idx], probs[idx]).items():
            if v is not None:
                samples.setdefault(k, []).append(v)
    return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in samples.items()}


def classification_metrics(
    labels: Sequence[int],
    probs: np.ndarray,
    *,
    uncalibrated: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> dict[str, object]:
    """The full metrics dictionary for integer ``labels`` (N,) and ``probs`` (N, C).

    ``uncalibrated`` (the probabilities before temperature scaling) adds ECE before/after.
    ``groups`` (a patient id per image) makes the bootstrap resample patients, not images.
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(labels) != len(probs):
        raise ValueError(f"labels {labels.shape} and probs {probs.shape} do not match")
    if len(labels) == 0:
        raise ValueError("no examples to evaluate")
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, probs.shape[1])
    point = _point_metrics(labels, probs)
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"{len(groups)} group ids for {len(labels)} labels")
    ci = bootstrap_ci(labels, probs, n_boot=n_boot, seed=seed, groups=groups) if n_boot else {}
    names = spec.CLASS_NAMES[: probs.shape[1]]
    rates = per_class_rates(cm)
    per_class: dict[str, dict[str, object]] = {}
    for name in names:
        entry: dict[str, object] = {k: {"value": v} for k, v in rates[name].items() if k != "support"}
        entry["sensitivity"] = {"value": rates[name]["sensitivity"], "ci95": ci.get(f"sensitivity/{name}")}
        entry["auc"] = {"value": point[f"auc/{name}"], "ci95": ci.get(f"auc/{name}")}
        entry["support"] = rates[name]["support"]
        per_class[name] = entry
    row_sums = cm.sum(axis=1, keepdims=True)
    tp = np.diag(cm).sum()
    fp_total = cm.sum() - tp  # micro: every error is one FP and one FN
    macro = {
        key: {"value": _mean_defined([rates[n][key] for n in names])}
        for key in ("sensitivity", "specificity", "ppv", "npv", "f1")
    }
    aucs = [point[f"auc/{n}"] for n in names]
    macro["auc"] = {"value": _mean_defined(aucs)}
    onehot = np.eye(probs.shape[1])[labels]
    micro_auc = float(roc_auc_score(onehot.ravel(), probs.ravel())) if 0 < onehot.sum() < onehot.size else None
    micro = {
        "sensitivity": {"value": _ratio(tp, tp + fp_total)},
        "ppv": {"value": _ratio(tp, tp + fp_total)},
        "f1": {"value": _ratio(tp, tp + fp_total)},
        "auc": {"value": micro_auc},
    }
    out: dict[str, object] = {
        "n": int(len(labels)),
        "class_names": list(names),
        "accuracy": {"value": point["accuracy"], "ci95": ci.get("accuracy")},
        "per_class": per_class,
        "macro": macro,
        "micro": micro,
        "confusion_matrix": {
            "counts": cm.tolist(),
            "row_normalised": np.divide(cm, row_sums, out=np.zeros(cm.shape), where=row_sums > 0).round(6).tolist(),
        },
        "ece": {"value": expected_calibration_error(probs, labels)},
        "bootstrap": {"n": n_boot, "seed": seed,
                      "method": f"percentile, resampling {'patients' if groups is not None else 'images'}",
                      **({"groups": len(set(map(str, groups)))} if groups is not None else {})},
    }
    if uncalibrated is not None:
        out["ece_before_temperature"] = {"value": expected_calibration_error(np.asarray(uncalibrated), labels)}
    return out


def _mean_defined(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def metrics_by_group(labels: Sequence[int], probs: np.ndarray, groups: Sequence[str], *,
                     patients: Sequence[str] | None = None, **kwargs) -> dict[str, dict[str, object]]:
    """:func:`classification_metrics` for every distinct non-empty value of ``groups`` (e.g. source);
    ``patients`` (one id per image) makes each bootstrap resample patients."""
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    pats = np.asarray(patients) if patients is not None else None
    return {
        g: classification_metrics(labels[groups == g], np.asarray(probs)[groups == g],
                                  groups=None if pats is None else pats[groups == g].tolist(), **kwargs)
        for g in sorted(set(groups.tolist()))
        if g
    }


def roc_curves(labels: Sequence[int], probs: np.ndarray) -> dict[str, dict[str, list[float]]]:
    """One-vs-rest ROC points per class (classes absent or universal are skipped)."""
    labels = np.asarray(labels)
    out = {}
    for c, name in enumerate(spec.CLASS_NAMES[: probs.shape[1]]):
        y = labels == c
        if y.any() and not y.all():
            fpr, tpr, _ = roc_curve(y, probs[:, c])
            out[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return out


def reliability(labels: Sequence[int], probs: np.ndarray) -> dict[str, list[float]]:
    """Reliability-diagram bins (see ensemble.calibration.reliability_bins)."""
    return reliability_bins(np.asarray(probs), np.asarray(labels))
