"""TensorFlow settings that graph-mode training and inference need (one place: the trainers and the loaded
bundles call it)."""

from __future__ import annotations

from typing import Any


def configure_graph_training() -> None:
    """Turn off Grappler's arithmetic optimizer for this process.

    Its AddOpsRewrite turns the sum of several losses (the ensemble's one loss per member)
    into an accumulator backed by a per-step temporary variable. Keras ends every epoch of a
    dataset of unknown length (unreadable files are filtered out while streaming) with an
    end-of-data error inside the step, which leaves that variable behind; the next epoch's
    first step then fails with ``AlreadyExistsError: Resource __per_step_0/.../AddOpsRewrite_add_N/
    tmp_var``. Seen here with TF 2.21 on the 3-member ensemble at epoch 2 (tensorflow#23780 is
    the long-open report). Eager runs never use Grappler and are unaffected.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})


def limit_threads(threads: int) -> bool:
    """Run TensorFlow's ops on at most ``threads`` threads in this process (a Ray actor given that many
    CPUs, say). False when it cannot: TensorFlow already ran an op here (its pools are then fixed),
    or another backend is in use (left as it is)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        return False
    return True


def trace_for_any_batch(model: Any) -> bool:
    """Trace ``model``'s compiled predict step (one input) once for batches of any size. True when
    done; False where it does not apply (another backend, a model run eagerly): the caller then pads
    batches to a few sizes (data.stream.pad_to_bucket).

    Keras traces the step for the first batch's shape and, at the next shape (a folder's last batch,
    the images stage 1 flags for stage 2), traces it again with the batch size left open: each trace
    took ~6 s for the three-member ensemble on 2 cores. Traced open from the start, every batch size
    reuses one graph (tests/data/test_loaded.py checks that it is traced once).
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    model.make_predict_function()
    step = model.predict_function
    if not hasattr(step, "get_concrete_function"):  # run_eagerly: a plain function, nothing to trace
        return False
    # the structure Keras' predict_on_batch calls it with: [(x,)]
    step.get_concrete_function([(tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32),)])
    return True
