"""Training on several devices of one host: tf.distribute.MirroredStrategy.

``distribute = "mirrored"`` (settings, or ``--distribute mirrored``) builds, compiles and fits
the model under a MirroredStrategy over every GPU of the machine (``replicas = N``: the first
N). On a machine without GPUs, ``replicas = N`` splits the CPU into N logical devices: no
faster, but the same code path, which is how the tests check it.

* **Batch and learning rate.** ``batch_size`` stays the *global* batch: each replica takes
  ``batch_size / replicas`` images per step and the gradients are summed across replicas, so a
  run on N devices takes the same steps as on one. The learning rate is therefore not rescaled
  (scale 1.0, recorded in the bundle); a user who raises the global batch to fill more devices
  chooses the learning rate for it.
* **BatchNorm** is synchronised across replicas while fitting (Keras' ``synchronized=True``), so
  the batch statistics are those of the global batch, as on one device; the saved model is
  plain BatchNorm again (``synchronized`` exists on TensorFlow only).
* **Last batches.** TensorFlow splits a short last batch by filling the first replica first, so
  a replica can get none, which EfficientNetB0 fails on. Under the strategy the training and
  validation streams drop a last batch smaller than the global batch (fewer than
  ``batch_size`` images per epoch; training order is reshuffled every epoch). Only the fit runs
  under the strategy: the fitted weights then go into a copy of the model built outside it
  (:func:`off_strategy`), and BatchNorm re-estimation, calibration on *every* validation image,
  and saving run as on one device.
* **Several hosts** (``multiworker``, MultiWorkerMirroredStrategy from ``TF_CONFIG``, which is
  also what Ray Train's TensorflowTrainer runs) is refused with the reason: ``fit`` of Keras 3
  fails under it (keras-team/keras#20585, open; ray-project/ray#47464); checked here with
  Keras 3.15.1 and TensorFlow 2.21 on two local workers: ``ValueError: Attempt to convert a
  value (PerReplica...)`` in ``_maybe_symbolic_build``, then, past that, an invalid reduction
  of the scalar metrics in ``reduce_per_replica``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from data.errors import CxrError

STRATEGIES = ("none", "mirrored", "multiworker")
MULTIWORKER_REFUSAL = (
    "distribute = 'multiworker' is not available: Keras 3's fit fails under TensorFlow's "
    "MultiWorkerMirroredStrategy (keras-team/keras#20585, open; Ray Train's TensorflowTrainer runs the same "
    "strategy); train on one host with distribute = 'mirrored' over its GPUs")


_STRATEGIES: dict[tuple[str, ...], Any] = {}


class DistributionError(CxrError):
    """A distribution that cannot be set up here (and why)."""


def check_distribute(distribute: str, replicas: int) -> None:
    """ValueError naming the bad value (settings check)."""
    if distribute not in STRATEGIES:
        raise ValueError(f"unknown distribute {distribute!r}; valid: {', '.join(STRATEGIES)}")
    if distribute == "multiworker":
        raise ValueError(MULTIWORKER_REFUSAL)
    if replicas < 0:
        raise ValueError(f"replicas {replicas} must be ≥ 0 (0: every GPU)")
    if replicas and distribute == "none":
        raise ValueError("replicas needs distribute = 'mirrored'")


@dataclass(frozen=True)
class Distribution:
    """How a run is spread: what the bundle records under ``meta.distribute``, and the strategy."""

    strategy: str
    devices: tuple[str, ...]
    global_batch: int
    per_replica_batch: int
    learning_rate_scale: float = 1.0
    sync_batchnorm: bool = True
    drop_remainder: bool = True
    tf_strategy: Any = field(default=None, repr=False, compare=False)

    @property
    def replicas(self) -> int:
        return len(self.devices)

    def record(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "tf_strategy"}
        return {**out, "devices": list(self.devices), "replicas": self.replicas}


def start_distribution(distribute: str, *, replicas: int, global_batch: int) -> Distribution | None:
    """The :class:`Distribution` of a training run (None for "none").

    DistributionError when it cannot be set up: another backend than TensorFlow, fewer GPUs than
    ``replicas``, a CPU-only machine without ``replicas``, a global batch that the replicas do not
    divide, or TensorFlow already started in this process (logical CPU devices must come first).
    """
    check_distribute(distribute, replicas)
    if distribute == "none":
        return None
    import keras

    if keras.backend.backend() != "tensorflow":
        raise DistributionError(f"distribute = {distribute!r} needs the TensorFlow backend "
                                f"(KERAS_BACKEND is {keras.backend.backend()!r})")
    import tensorflow as tf

    devices = _devices(tf, replicas)
    if global_batch % len(devices):
        raise DistributionError(f"batch_size {global_batch} (the global batch) is not a multiple of the "
                                f"{len(devices)} replicas; use a multiple")
    # One strategy per device set and process: two MirroredStrategy objects over the same devices
    # hand out the same collective keys, and the second fit then aborts ("Shape mismatch in the
    # collective instance 100"), seen here training two models in one process.
    if devices not in _STRATEGIES:
        _STRATEGIES[devices] = tf.distribute.MirroredStrategy(list(devices))
    return Distribution(distribute, devices, global_batch, global_batch // len(devices),
                        tf_strategy=_STRATEGIES[devices])


def check_fit_sizes(dist: Distribution | None, *, n_train: int, n_val: int) -> None:
    """DistributionError when the training or validation split is smaller than one global batch:
    with the short last batch dropped, the fit would see no batch at all."""
    if dist is None:
        return
    for name, n in (("training", n_train), ("validation", n_val)):
        if n < dist.global_batch:
            raise DistributionError(f"the {name} split has {n} image(s), fewer than one global batch "
                                    f"({dist.global_batch}) on {dist.replicas} replicas; lower batch_size")


def distribution_scope(dist: Distribution | None):
    """Where to build, compile and fit: the strategy's scope, or nothing on one device."""
    return dist.tf_strategy.scope() if dist is not None else contextlib.nullcontext()


def off_strategy(model, dist: Distribution | None):
    """``model`` itself on one device; after a distributed fit, a copy built outside the strategy
    with the fitted weights, so that what follows (BatchNorm re-estimate, calibration, saving)
    runs as on one device."""
    if dist is None:
        return model
    import keras

    plain = keras.models.clone_model(model)
    plain.set_weights(model.get_weights())
    return plain


def _devices(tf, replicas: int) -> tuple[str, ...]:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if replicas > len(gpus):
            raise DistributionError(f"replicas {replicas} but this machine has {len(gpus)} GPU(s)")
        return tuple(f"/gpu:{k}" for k in range(replicas or len(gpus)))
    if not replicas:
        raise DistributionError("no GPU here: distribute = 'mirrored' needs GPUs, or replicas = N to split the "
                                "CPU into N logical devices (for checking the distributed path; not faster)")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu) or []
    if len(current) != replicas:
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
        except RuntimeError:
            raise DistributionError(f"TensorFlow already started in this process with {max(len(current), 1)} CPU "
                                    f"device(s); {replicas} logical CPU devices must be set before it starts "
                                    "(run the training as its own cxr command)") from None
    return tuple(f"/cpu:{k}" for k in range(replicas))


@contextlib.contextmanager
def synchronized_batchnorm(model, distribution: Distribution | None) -> Iterator[int]:
    """While fitting on several replicas, every BatchNorm of ``model`` uses the global batch's
    statistics; restored to plain BatchNorm afterwards (what is saved). Yields how many were set."""
    from data.runtime.training import batchnorm_layers

    layers = batchnorm_layers(model) if distribution is not None and distribution.replicas > 1 else []
    for layer in layers:
        layer.synchronized = True
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.synchronized = False
