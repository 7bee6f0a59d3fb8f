"""Refer instead of guess: when the classifier should hand an image to a person.

Two checks, both fitted when the classifier is trained and kept in its sidecar (meta "refer"):

* **Input check** (is this a chest X-ray like the training ones?). A 32x32 grey thumbnail of the
  model input, standardised, is correlated with the mean standardised thumbnail of the training
  images (a chest X-ray's layout: dark lungs, bright mediastinum and borders). Photographs are
  caught by colour, blank images by their spread, inverted images and CT slices by a low or
  negative layout correlation. The correlation threshold is the 1st percentile over the
  training images, so about 1 % of in-distribution X-rays are referred by it.
* **Confidence** (calibrated top probability). The threshold is the lowest one at which the
  validation images kept (not referred) have an error rate ≤ ``target_error``.
"""

from __future__ import annotations

from typing import Any, Iterable

import cv2
import numpy as np

THUMB = 32
#: Mean absolute channel difference (0–255) above which an input is a colour picture, not an X-ray.
COLOUR_LIMIT = 12.0
#: Pixel standard deviation (0–255) below which an input is blank.
BLANK_LIMIT = 4.0
DEFAULT_TARGET_ERROR = 0.10


def layout_vector(x: np.ndarray) -> np.ndarray:
    """(S, S, 3) model input in [0, 255] → (1024,) standardised grey thumbnail (zeros if flat)."""
    grey = np.asarray(x, np.float32).mean(axis=2)
    t = cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
    sd = float(t.std())
    return (t - t.mean()) / sd if sd > 1e-6 else np.zeros_like(t)


def fit_input_check(inputs: Iterable[np.ndarray], *, percentile: float = 1.0) -> dict[str, Any]:
    """The input check's template and threshold from training inputs ((S, S, 3) in [0, 255] each)."""
    return input_check_from_vectors((layout_vector(x) for x in inputs), percentile=percentile)


def input_check_from_vectors(vectors: Iterable[np.ndarray], *, percentile: float = 1.0) -> dict[str, Any]:
    """:func:`fit_input_check` from the inputs' :func:`layout_vector` (so a caller streaming the
    training set once can collect them on the way)."""
    vectors = np.stack(list(vectors))
    if len(vectors) < 2:
        raise ValueError("the input check needs at least 2 training images")
    template = vectors.mean(axis=0)
    template = (template - template.mean()) / max(float(template.std()), 1e-6)
    corr = vectors @ template / template.size
    return {"template": [round(float(v), 4) for v in template],
            "min_correlation": float(np.percentile(corr, percentile)),
            "percentile": percentile, "colour_limit": COLOUR_LIMIT, "blank_limit": BLANK_LIMIT,
            "n_images": int(len(vectors))}


def fit_confidence_threshold(probs: np.ndarray, labels: np.ndarray, *,
                             target_error: float = DEFAULT_TARGET_ERROR) -> dict[str, Any]:
    """Lowest top-probability threshold whose kept validation images err at most ``target_error``.

    ``probs``: (N, C) calibrated probabilities; ``labels``: (N,) ints. When no threshold reaches
    the target, the threshold is 1.0: every image is referred (the model is not good enough).
    """
    conf = probs.max(axis=1)
    wrong = probs.argmax(axis=1) != labels
    threshold = 1.0
    for t in np.unique(conf):  # ascending: the first that meets the target refers the fewest
        kept = conf >= t
        if wrong[kept].mean() <= target_error:
            threshold = float(t)
            break
    kept = conf >= threshold
    return {"confidence_threshold": threshold, "target_error": target_error, "n_val": int(len(labels)),
            "val_referred_share": float(1.0 - kept.mean()),
            "val_error_kept": float(wrong[kept].mean()) if kept.any() else None}


def refer_decisions(x: np.ndarray, probs: np.ndarray, rule: dict[str, Any] | None) -> list[tuple[bool | None, str]]:
    """(refer, reason) per image of a batch: ``x`` (N, S, S, 3) model inputs in [0, 255], ``probs``
    (N, C) calibrated. Without a rule (a bundle trained before it existed): (None, why)."""
    if not rule:
        return [(None, "no refer rule in this classifier bundle (retrain to get one)")] * len(x)
    check = rule["input_check"]
    template = np.asarray(check["template"], np.float32)
    out = []
    for xi, p in zip(np.asarray(x, np.float32), probs):
        colour = float(np.abs(xi - xi.mean(axis=2, keepdims=True)).mean())
        corr = float(layout_vector(xi) @ template / template.size)
        conf = float(np.max(p))
        if xi.std() < check["blank_limit"]:
            out.append((True, "blank image"))
        elif colour > check["colour_limit"]:
            out.append((True, f"colour image (channel difference {colour:.0f}), not an X-ray"))
        elif corr < check["min_correlation"]:
            out.append((True, f"unlike the training X-rays (layout correlation {corr:.2f} "
                              f"< {check['min_correlation']:.2f})"))
        elif conf < rule["confidence"]["confidence_threshold"]:
            out.append((True, f"low confidence ({conf:.2f} < {rule['confidence']['confidence_threshold']:.2f})"))
        else:
            out.append((False, ""))
    return out
