"""The stage-1 ensemble: any subset of the members, soft vote or feature concatenation.

One functional model, input (B, S, S, 3) float32 in [0, 255], outputs a dict:

* ``probs`` (B, 3): the ensemble's class probabilities (data.spec.CLASS_NAMES order);
* ``{member}_features`` (B, h, w, K): each member's last conv maps (for Grad-CAM);
* ``{member}_probs`` (B, 3): each member's own probabilities (soft vote only).

Soft vote trains every member on its own loss in one pass (``{member}_probs``) and averages
their probabilities; concat trains one head on the concatenated pooled features.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import layers, ops

from data import spec
from ensemble.members import MEMBERS, Weights, member_features, member_head, member_spec, validate_input_shape

VARIANTS = ("softvote", "concat")
CONCAT_HEAD = "concat_head"


@keras.saving.register_keras_serializable(package="cxr")
class WeightedAverage(layers.Layer):
    """Σ_i w_i · x_i over a list of same-shaped tensors, with fixed weights summing to 1."""

    def __init__(self, weights: Sequence[float], **kwargs) -> None:
        super().__init__(**kwargs)
        total = float(sum(weights))
        if total <= 0 or any(w < 0 for w in weights):
            raise ValueError(f"member weights must be non-negative with a positive sum, got {list(weights)}")
        self.member_weights = [float(w) / total for w in weights]

    def call(self, inputs):
        out = inputs[0] * self.member_weights[0]
        for x, w in zip(inputs[1:], self.member_weights[1:]):
            out = out + x * w
        return out

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "weights": self.member_weights}


def parse_members(members: str | Sequence[str]) -> tuple[str, ...]:
    """"densenet121,vgg19" or a sequence → validated, de-duplicated tuple in the given order."""
    names = [m.strip().lower() for m in (members.split(",") if isinstance(members, str) else members)]
    names = [m for m in names if m]
    if not names:
        raise ValueError(f"no members given; valid members: {', '.join(MEMBERS)}")
    for m in names:
        member_spec(m)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate members in {names}")
    return tuple(names)


def build_ensemble(
    members: str | Sequence[str] = tuple(MEMBERS),
    *,
    variant: str = "softvote",
    member_weights: Sequence[float] | None = None,
    num_classes: int = spec.NUM_CLASSES,
    weights: Weights = None,
    input_shape: tuple[int, int, int] = (spec.DEFAULT_IMAGE_SIZE, spec.DEFAULT_IMAGE_SIZE, spec.CHANNELS),
    freeze_fraction: float = 0.0,
    dropout: float = 0.3,
) -> keras.Model:
    """Build the ensemble described in the module docstring.

    ``weights``: "imagenet", None, a folder holding Keras's no-top weight files (one per member),
    or a table member → one of those (ensemble.members.weights_of). ``member_weights`` (soft vote
    only) default to equal.
    """
    names = parse_members(members)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if member_weights is not None:
        if variant != "softvote":
            raise ValueError("member_weights apply to the softvote variant only")
        if len(member_weights) != len(names):
            raise ValueError(f"{len(member_weights)} member weights for {len(names)} members {names}")
    validate_input_shape(input_shape, max(member_spec(m).min_size for m in names))
    inputs = keras.Input(shape=input_shape, name="image")
    outputs: dict[str, object] = {}
    # A named Identity layer carries each member's conv maps to its head and to the outputs:
    # exported graphs keep a stable name, and Grad-CAM can split the graph at that layer.
    feats = {
        m: layers.Identity(name=f"{m}_features")(
            member_features(m, inputs, weights=weights, freeze_fraction=freeze_fraction)
        )
        for m in names
    }
    outputs.update({f"{m}_features": f for m, f in feats.items()})
    if variant == "softvote":
        member_probs = []
        for m in names:
            p = member_head(m, feats[m], num_classes=num_classes, dropout=dropout)
            outputs[f"{m}_probs"] = layers.Identity(name=f"{m}_probs")(p)
            member_probs.append(p)
        vote = WeightedAverage(member_weights or [1.0] * len(names), name="probs") if len(names) > 1 else None
        outputs["probs"] = vote(member_probs) if vote else layers.Identity(name="probs")(member_probs[0])
    else:
        pooled = [layers.GlobalAveragePooling2D(name=f"{m}_gap")(feats[m]) for m in names]
        x = layers.Concatenate(name="concat_features")(pooled) if len(pooled) > 1 else pooled[0]
        x = layers.Dropout(dropout, name="concat_dropout")(x)
        p = layers.Dense(num_classes, activation="softmax", name=CONCAT_HEAD)(x)
        outputs["probs"] = layers.Identity(name="probs")(p)
    return keras.Model(inputs, outputs, name=f"ensemble_{variant}_{'_'.join(names)}")


def loss_outputs(members: Sequence[str], variant: str) -> list[str]:
    """Names of the outputs that carry a training loss for ``variant``."""
    return [f"{m}_probs" for m in members] if variant == "softvote" else ["probs"]


def head_weights(model: keras.Model, members: Sequence[str], variant: str) -> dict[str, tuple[object, object]]:
    """Per member, the (kernel (K, C), bias (C,)) that maps its pooled features to class logits.

    For concat, each member gets its slice of the shared head's kernel (bias is shared).
    These make Grad-CAM a closed form: CAM_c = ReLU(Σ_k W[k, c] · A_k).
    """
    if variant == "softvote":
        return {m: tuple(ops.convert_to_numpy(v) for v in model.get_layer(f"{m}_head").weights) for m in members}
    kernel, bias = (ops.convert_to_numpy(v) for v in model.get_layer(CONCAT_HEAD).weights)
    out, start = {}, 0
    for m in members:
        k = int(model.get_layer(f"{m}_features").output.shape[-1])
        out[m] = (kernel[start : start + k], bias)
        start += k
    return out
