"""Backend-specific autograd for Grad-CAM: the one place that knows TensorFlow, PyTorch or JAX.

:func:`feature_gradients` returns, for one batch and one backward pass, the feature maps
of a top-level layer and the gradient of each image's target-class score with respect to
them. The score is the logit: when ``score_layer`` is a Dense layer with an activation
(softmax), its pre-activation ``x @ W + b`` is differentiated, as Grad-CAM prescribes.
"""

from __future__ import annotations

import keras
import numpy as np


def split_at(model: keras.Model, feature_layer: str, score_layer: str):
    """(lower: image → A, upper: A → score-layer input or output, head layer)."""
    feats = model.get_layer(feature_layer).output
    head = model.get_layer(score_layer)
    target = head.input if isinstance(head, keras.layers.Dense) else head.output
    # A single input is passed as a tensor, not a one-element list: the structure Keras expects when
    # the sub-model is called on one batch (otherwise it warns on every call).
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(inputs, feats), keras.Model(feats, target), head


def _logits(head, target, ops):
    if isinstance(head, keras.layers.Dense):
        out = ops.matmul(target, head.kernel)
        return ops.add(out, head.bias) if head.use_bias else out
    return target


def feature_gradients(model: keras.Model, images: np.ndarray, *, feature_layer: str, score_layer: str,
                      class_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A, ∂score/∂A), both (N, h, w, K) float32, for ``class_index`` (N,) per image."""
    from keras import ops

    lower, upper, head = split_at(model, feature_layer, score_layer)
    x = np.asarray(images, dtype=np.float32)
    cls = np.asarray(class_index, dtype=np.int64)
    feats = lower(x, training=False)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(feats)
            logits = _logits(head, upper(feats, training=False), ops)
            # Images are independent, so one backward pass of the sum gives every image's gradient.
            total = tf.reduce_sum(tf.gather(logits, cls, axis=1, batch_dims=1))
        grads = tape.gradient(total, feats)
        return np.asarray(feats), np.asarray(grads)
    if backend == "torch":
        import torch

        feats = feats.detach().requires_grad_(True)
        logits = _logits(head, upper(feats, training=False), ops)
        scores = logits.gather(1, torch.as_tensor(cls, device=logits.device)[:, None])
        (grads,) = torch.autograd.grad(scores.sum(), feats)
        return feats.detach().cpu().numpy(), grads.detach().cpu().numpy()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def total(a):
            logits = _logits(head, upper(a, training=False), ops)
            return jnp.take_along_axis(logits, jnp.asarray(cls)[:, None], axis=1).sum()

        return np.asarray(feats), np.asarray(jax.grad(total)(feats))
    raise ValueError(f"Grad-CAM autograd supports the tensorflow, torch and jax backends, not {backend!r}")
