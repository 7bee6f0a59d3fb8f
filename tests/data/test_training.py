"""Training scaffolding: BatchNorm re-estimation is the plain average of batch statistics, the
cosine schedule warms up and decays as stated, presets fill only what a config leaves out."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from data.runtime.training import (
    batchnorm_layers,
    build_lr_schedule,
    build_optimizer,
    check_recipe,
    reestimate_batchnorm,
    set_bn_momentum,
    write_history_csv,
)


def _bn_model():
    inp = keras.Input((4,))
    x = keras.layers.BatchNormalization(name="bn1")(inp)
    inner = keras.Model(inp, keras.layers.BatchNormalization(name="bn2")(x), name="inner")
    outer_in = keras.Input((4,))
    return keras.Model(outer_in, keras.layers.Dense(2, name="head")(inner(outer_in)))


def test_reestimate_sets_moving_stats_to_the_mean_of_batch_stats():
    model = _bn_model()
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0 + i, 1.0 + i, (16, 4)).astype(np.float32) for i in range(5)]
    weights_before = [w.copy() for w in model.get_layer("head").get_weights()]
    used = reestimate_batchnorm(model, iter(batches), max_batches=4)
    assert used == 4
    bn1 = model.get_layer("inner").get_layer("bn1")
    expect_mean = np.mean([b.mean(axis=0) for b in batches[:4]], axis=0)
    expect_var = np.mean([b.var(axis=0) for b in batches[:4]], axis=0)
    np.testing.assert_allclose(np.asarray(bn1.moving_mean), expect_mean, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(bn1.moving_variance), expect_var, rtol=1e-3)
    assert bn1.momentum == 0.99  # restored
    for a, b in zip(weights_before, model.get_layer("head").get_weights()):
        np.testing.assert_array_equal(a, b)


def test_reestimate_skips_frozen_layers_and_zero_batches():
    model = _bn_model()
    model.get_layer("inner").get_layer("bn1").trainable = False
    assert reestimate_batchnorm(model, iter([np.ones((4, 4), np.float32)]), max_batches=0) == 0
    reestimate_batchnorm(model, iter([np.full((4, 4), 7.0, np.float32)]), max_batches=1)
    np.testing.assert_allclose(np.asarray(model.get_layer("inner").get_layer("bn1").moving_mean), 0.0)


def test_set_bn_momentum_reaches_nested_layers():
    model = _bn_model()
    assert len(batchnorm_layers(model)) == 2
    assert set_bn_momentum(model, 0.9) == 2
    assert all(layer.momentum == 0.9 for layer in batchnorm_layers(model))
    assert set_bn_momentum(model, None) == 0


def test_cosine_schedule_warms_up_then_decays_to_zero():
    sched = build_lr_schedule(1e-3, schedule="cosine", epochs=10, steps_per_epoch=5, warmup_epochs=2)
    assert float(sched(0)) == pytest.approx(0.0)
    assert float(sched(10)) == pytest.approx(1e-3, rel=1e-5)  # end of warm-up
    assert float(sched(50)) == pytest.approx(0.0, abs=1e-9)
    assert float(sched(30)) < float(sched(20)) < 1e-3
    assert build_lr_schedule(1e-3, schedule="plateau", epochs=10, steps_per_epoch=5) == 1e-3


def test_warmup_is_capped_at_half_the_run():
    sched = build_lr_schedule(1e-3, schedule="cosine", epochs=1, steps_per_epoch=4, warmup_epochs=2)
    assert float(sched(0)) == pytest.approx(1e-3)  # 1 epoch: no warm-up


def test_adamw_does_not_decay_biases_or_batchnorm():
    opt = build_optimizer("adamw", 1e-3, schedule="plateau", epochs=2, steps_per_epoch=1, weight_decay=0.5)
    model = _bn_model()
    opt.build(model.trainable_variables)
    decayed = {v.path.split("/")[-1]: opt._use_weight_decay(v) for v in model.trainable_variables}
    assert decayed["kernel"] and not decayed["bias"] and not decayed["gamma"] and not decayed["beta"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(optimizer="sgd"), "optimizer"),
    (dict(lr_schedule="step"), "lr_schedule"),
    (dict(warmup_epochs=-1), "warmup"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(bn_momentum=1.0), "bn_momentum"),
    (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_recipe_values_are_named(kwargs, match):
    base = dict(optimizer="adam", lr_schedule="plateau", warmup_epochs=0, epochs=3)
    with pytest.raises(ValueError, match=match):
        check_recipe(**{**base, **kwargs})


def test_history_csv_has_a_column_per_key_and_blank_after_early_stop(tmp_path):
    write_history_csv(tmp_path / "h.csv", {"a_loss": [1.0, 0.5, 0.25], "b_loss": [2.0]})
    lines = (tmp_path / "h.csv").read_text().splitlines()
    assert lines[0] == "epoch,a_loss,b_loss"
    assert lines[1] == "0,1.0,2.0" and lines[3] == "2,0.25,"
