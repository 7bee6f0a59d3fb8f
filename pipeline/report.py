"""Plots and tables written by the jobs (matplotlib's object API: no global backend state)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _figure(**kwargs: Any):
    """A matplotlib Figure (imported here, so commands that draw nothing never load matplotlib)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_history(history: dict[str, list[float]], path: Path) -> Path:
    """Per-epoch curves, train vs validation: one panel per metric present (accuracy or Dice) and loss."""
    metrics = [m for m in ("accuracy", "dice_coefficient") if any(k.endswith(m) for k in history)] + ["loss"]
    fig = _figure(figsize=(5 * len(metrics), 4))
    for ax, metric in zip(np.atleast_1d(fig.subplots(1, len(metrics))), metrics):
        for key, values in sorted(history.items()):
            if key.endswith(metric):
                style = "--" if key.startswith("val_") else "-"
                ax.plot(range(1, len(values) + 1), values, style, label=key, marker="o", markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_confusion(counts: Sequence[Sequence[int]], class_names: Sequence[str], path: Path) -> Path:
    """Confusion matrix: row-normalised colour, counts as text."""
    cm = np.asarray(counts, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = _figure(figsize=(4.5, 4))
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}\n{norm[i, j]:.0%}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _save(fig, path)


def plot_roc(curves: dict[str, dict[str, list[float]]], aucs: dict[str, float | None], path: Path) -> Path:
    """One-vs-rest ROC curve per class with its AUC in the legend."""
    fig = _figure(figsize=(4.5, 4))
    ax = fig.subplots()
    for name, c in curves.items():
        auc = aucs.get(name)
        ax.plot(c["fpr"], c["tpr"], label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("sensitivity")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_reliability(bins: dict[str, list[float]], path: Path, *, title: str = "") -> Path:
    """Reliability diagram: accuracy vs confidence per bin, with the diagonal."""
    fig = _figure(figsize=(4.5, 4))
    ax = fig.subplots()
    centers = [(lo + hi) / 2 for lo, hi in zip(bins["lower"], bins["upper"])]
    acc = [a if not math.isnan(a) else 0.0 for a in bins["accuracy"]]
    ax.bar(centers, acc, width=bins["upper"][0] - bins["lower"][0], edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_gallery(examples, path: Path) -> Path:
    """Rows of image | ground truth | prediction; ``examples`` holds (name, image, truth, pred)."""
    fig = _figure(figsize=(9, 3 * len(examples)))
    axes = np.atleast_2d(fig.subplots(len(examples), 3))
    for row, (name, image, truth, pred) in zip(axes, examples):
        gray = np.clip(np.asarray(image), 0, 255).mean(axis=2) / 255.0
        for ax, (title, mask, colour) in zip(row, ((name, None, None), ("ground truth", truth, (0.1, 0.8, 0.1)),
                                                  ("prediction", pred, (0.9, 0.1, 0.1)))):
            rgb = np.repeat(gray[..., None], 3, axis=2)
            if mask is not None:
                rgb[mask] = rgb[mask] * 0.5 + np.asarray(colour) * 0.5
            ax.imshow(rgb)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    return _save(fig, path)


def metrics_table(metrics: dict[str, Any]) -> str:
    """A short Markdown table of the headline classification metrics."""

    lines = [f"accuracy: {ci_text(metrics['accuracy'])}  (n = {metrics['n']})", "",
             "| class | sensitivity | specificity | PPV | F1 | AUC |", "|---|---|---|---|---|---|"]
    for name, e in metrics["per_class"].items():
        cells = " | ".join(ci_text(e[k]) for k in ("sensitivity", "specificity", "ppv", "f1", "auc"))
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def ci_text(entry: dict[str, Any] | None, digits: int = 3) -> str:
    """``{"value": v, "ci95": [lo, hi]}`` → "v [lo, hi]" ("v" without an interval, "n/a" without a value)."""
    if not entry or entry.get("value") is None:
        return "n/a"
    ci = entry.get("ci95")
    text = f"{entry['value']:.{digits}f}"
    return text + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def lesion_size_text(by_lesion_size: dict[str, Any] | None) -> str | None:
    """evaluate-segmenter's ``metrics["by_lesion_size"]`` as one line ("<5 % 0.401 [0.329, 0.476] (n 29);
    ..."), None where it is absent (a lung model) or has no band."""
    bands = (by_lesion_size or {}).get("bands")
    if not bands:
        return None
    return ("Dice by drawn lesion size (share of the image): "
            + "; ".join(f"{b} {ci_text(v['dice'])} (n {v['n']})" for b, v in bands.items()))


def budget_epochs(history: dict[str, list[float]]) -> dict[str, int]:
    """The epochs each fit of a training run ran under a time budget (data.runtime.training.WallTimeBudget
    logs ``planned_epochs`` each epoch), by unit: a soft-vote member's output ("densenet121_probs"), or
    "model" for a single fit. Empty without a budget."""
    return {key.removesuffix("planned_epochs").rstrip("_") or "model": len(values)
            for key, values in sorted(history.items()) if key.endswith("planned_epochs")}
