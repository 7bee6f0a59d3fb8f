"""Grad-CAM and Grad-CAM++ from feature maps and gradients, batched.

Two ways to get the gradients of a class logit with respect to feature maps A (N, h, w, K):

* **closed form** (:func:`head_gradients`): when the maps feed global average pooling and a
  dense layer, ``logit_c = Σ_k W[k, c] · mean_ij A_ijk + b_c``, so ``∂logit_c / ∂A_ijk =
  W[k, c] / (h·w)`` everywhere. The forward pass that predicts already returned A: no
  gradient pass at all. Grad-CAM then equals ReLU(Σ_k W[k, c] A_k) / (h·w).
* **autograd** (:mod:`gradcam.gradients`): any Keras model and top-level layer, one
  backward pass per batch on the active backend.

Both feed the same :func:`cam_from_gradients`, so the two paths can be checked against
each other. Maps are normalised per image to [0, 1] with an epsilon: a class with only
negative evidence gives zeros, never NaN.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

METHODS = ("gradcam", "gradcam++")
_EPS = 1e-7


def head_gradients(features: np.ndarray, kernel: np.ndarray, class_index: np.ndarray) -> np.ndarray:
    """∂logit/∂A for a GAP + dense head: (N, h, w, K) filled with W[k, c_n] / (h·w)."""
    n, h, w, k = features.shape
    if kernel.shape[0] != k:
        raise ValueError(f"head kernel has {kernel.shape[0]} inputs, features have {k} channels")
    per_image = kernel[:, np.asarray(class_index)].T / float(h * w)  # (N, K)
    return np.broadcast_to(per_image[:, None, None, :], features.shape).astype(np.float32)


def cam_from_gradients(features: np.ndarray, grads: np.ndarray, method: str = "gradcam") -> np.ndarray:
    """(N, h, w, K) maps and gradients → (N, h, w) float32 heatmaps in [0, 1].

    Grad-CAM (Selvaraju et al. 2017): weights = spatial mean of the gradients.
    Grad-CAM++ (Chattopadhay et al. 2018), with the exponential-score identity used by its
    reference implementation: α = g² / (2g² + Σ_ab A_ab · g³), weights = Σ_ij α · ReLU(g).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    a = np.asarray(features, dtype=np.float32)
    g = np.asarray(grads, dtype=np.float32)
    if a.shape != g.shape or a.ndim != 4:
        raise ValueError(f"features {a.shape} and gradients {g.shape} must be the same (N, h, w, K) shape")
    if method == "gradcam":
        weights = g.mean(axis=(1, 2))  # (N, K)
    else:
        g2, g3 = g * g, g * g * g
        sum_a = a.sum(axis=(1, 2), keepdims=True)
        denom = 2.0 * g2 + sum_a * g3
        alpha = np.where(g != 0, g2 / np.where(np.abs(denom) > _EPS, denom, _EPS), 0.0)
        weights = (alpha * np.maximum(g, 0.0)).sum(axis=(1, 2))
    cam = np.maximum(np.einsum("nhwk,nk->nhw", a, weights), 0.0)
    return normalise_maps(cam)


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """Scale each (h, w) map to [0, 1] by its maximum; all-zero maps stay zero (no NaN)."""
    m = np.maximum(np.asarray(maps, dtype=np.float32), 0.0)
    peak = m.reshape(len(m), -1).max(axis=1).reshape(-1, *([1] * (m.ndim - 1)))
    return np.where(peak > _EPS, m / np.maximum(peak, _EPS), 0.0).astype(np.float32)


def closed_form_cam(features: np.ndarray, kernel: np.ndarray, class_index: np.ndarray,
                    method: str = "gradcam") -> np.ndarray:
    """Heatmaps (N, h, w) in [0, 1] for a GAP + dense head, with no gradient pass."""
    return cam_from_gradients(features, head_gradients(features, kernel, class_index), method)


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) → (N, size, size) by bilinear interpolation, clipped to [0, 1]."""
    out = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR) for m in np.asarray(maps, np.float32)])
    return np.clip(out, 0.0, 1.0)


def fuse_maps(member_maps: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of same-shaped (N, H, W) member maps, renormalised per image to [0, 1]."""
    if len(member_maps) != len(weights) or not member_maps:
        raise ValueError(f"{len(member_maps)} maps for {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float32)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"fusion weights must be non-negative with a positive sum, got {list(weights)}")
    fused = sum(wi * m for wi, m in zip(w / w.sum(), member_maps))
    return normalise_maps(fused)


def member_heatmaps(
    features: dict[str, np.ndarray],
    heads: dict[str, tuple[np.ndarray, np.ndarray]],
    class_index: np.ndarray,
    *,
    member_weights: Sequence[float],
    size: int,
    method: str = "gradcam",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Closed-form heatmaps of every member and their fusion, on the (size, size) model grid.

    ``features[m]``: (N, h, w, K) last conv maps from the predicting pass; ``heads[m]``: the
    (kernel (K, C), bias) mapping m's pooled features to logits; ``member_weights`` in the
    order of ``features``. Returns ({member: (N, size, size)}, fused (N, size, size)), float32 in [0, 1].
    """
    maps = {m: upsample(closed_form_cam(f, heads[m][0], class_index, method), size) for m, f in features.items()}
    return maps, fuse_maps(list(maps.values()), member_weights)
