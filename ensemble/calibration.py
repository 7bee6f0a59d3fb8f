"""Temperature scaling (Guo et al. 2017) on probabilities, and expected calibration error.

The models output softmax probabilities; log-probabilities equal the logits up to a
per-row constant, which softmax ignores, so ``softmax(log p / T)`` is temperature scaling.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """(N, C) probabilities → (N, C) probabilities at ``temperature`` (1.0 leaves them unchanged)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = np.log(np.clip(np.asarray(probs, np.float64), _EPS, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of integer ``labels`` under ``probs``."""
    p = np.clip(np.asarray(probs, np.float64)[np.arange(len(labels)), labels], _EPS, 1.0)
    return float(-np.log(p).mean())


#: The range :func:`fit_temperature` searches.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(probs: np.ndarray, labels: np.ndarray, *,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """Temperature minimising validation NLL (golden-section search on log T; NLL is unimodal in T)."""
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on an empty validation set")
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    f = lambda t: nll(apply_temperature(probs, float(np.exp(t))), labels)  # noqa: E731
    g = (np.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(np.exp((a + b) / 2))


def fit_vote_weights(member_probs: list[np.ndarray], labels: np.ndarray, *, step: float = 0.05) -> list[float]:
    """Soft-vote weights (on the simplex, grid ``step``) minimising validation NLL of Σ w_i p_i.

    A member that has learned little gets little or no weight instead of a 1/n share that drags
    the vote towards chance. Ties keep the more even weighting (equal weights are tried first).
    """
    n = len(member_probs)
    if n == 1:
        return [1.0]
    k = int(round(1 / step))
    best_w, best = [1.0 / n] * n, nll(sum(p / n for p in member_probs), labels)
    for combo in _compositions(k, n):
        w = [c / k for c in combo]
        score = nll(sum(wi * p for wi, p in zip(w, member_probs)), labels)
        if score < best - 1e-9:
            best_w, best = w, score
    return [round(w, 6) for w in best_w]


def _compositions(total: int, parts: int):
    """All tuples of ``parts`` non-negative ints summing to ``total``."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-1 confidence over ``n_bins`` equal-width bins."""
    probs = np.asarray(probs)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count, for the reliability diagram."""
    probs = np.asarray(probs)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": [], "lower": [], "upper": []}
    for b in range(n_bins):
        inside = idx == b
        out["lower"].append(float(edges[b]))
        out["upper"].append(float(edges[b + 1]))
        out["count"].append(int(inside.sum()))
        out["confidence"].append(float(conf[inside].mean()) if inside.any() else float("nan"))
        out["accuracy"].append(float(correct[inside].mean()) if inside.any() else float("nan"))
    return out
