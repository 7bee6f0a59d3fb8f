"""Training scaffolding: BatchNorm re-estimation is the plain average of batch statistics, the
cosine schedule warms up and decays as stated, presets fill only what a config leaves out, a
time budget runs the epochs that fit and decays the rate over them."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from data.runtime.training import (
    FitRecipe,
    WallTimeBudget,
    batchnorm_layers,
    build_lr_schedule,
    build_optimizer,
    check_recipe,
    fit_best,
    reestimate_batchnorm,
    set_bn_momentum,
    share_of_time_left,
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
    (dict(time_budget_s=-5.0), "time_budget_s"),
    (dict(time_budget_s=float("inf")), "time_budget_s"),
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


class _Clock:
    """A fake wall clock that a callback moves on by a set number of seconds per batch."""

    def __init__(self, per_batch, first_epoch_extra=0.0):
        self.now, self.per_batch, self.first_epoch_extra = 0.0, per_batch, first_epoch_extra

    def __call__(self):
        return self.now


class _Ticks(keras.callbacks.Callback):
    """Moves the clock on after each batch (plus a one-off cost in epoch 0, as tracing has) and
    records the learning rate each batch trained with."""

    def __init__(self, clock):
        super().__init__()
        self.clock, self.lrs, self.epoch = clock, [], 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.lrs.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        self.clock.now += self.clock.per_batch + (self.clock.first_epoch_extra if self.epoch == 0 and batch == 0 else 0)


def _budget_fit(budget, clock, *, epochs=10):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-2), "categorical_crossentropy", run_eagerly=True)
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    y = keras.utils.to_categorical(np.arange(16) % 2, 2)
    ticks = _Ticks(clock)
    hist = model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0, callbacks=[budget, ticks])
    return hist.history, ticks.lrs


def test_time_budget_stops_when_the_next_epoch_would_not_fit_and_decays_over_the_planned_epochs():
    clock = _Clock(per_batch=2.5)  # 4 batches: 10 s an epoch
    budget = WallTimeBudget(35.0, max_epochs=10, steps_per_epoch=4, learning_rate=1e-2, warmup_epochs=2, clock=clock)
    history, lrs = _budget_fit(budget, clock)
    # after epoch 2 (20 s used, 15 left) one more fits; after epoch 3 (30 s) none does
    assert len(history["loss"]) == 3 and budget.planned == 3 and budget.cut_short
    assert history["epoch_seconds"] == [10.0, 10.0, 10.0]
    assert history["planned_epochs"] == [10.0, 3.0, 3.0]
    # the full run's 2-epoch warm-up (8 steps) to the peak, then cosine to 0 over the one epoch left
    assert lrs[:8] == pytest.approx([1e-2 * s / 8 for s in range(8)], rel=1e-5)
    assert lrs[8] == pytest.approx(1e-2, rel=1e-5)
    assert lrs[8:] == pytest.approx([1e-2 * 0.5 * (1 + np.cos(np.pi * s / 4)) for s in range(4)], rel=1e-4)


def test_time_budget_does_not_plan_from_the_first_epoch_that_carries_tracing():
    clock = _Clock(per_batch=2.5, first_epoch_extra=90.0)  # epoch 0: 100 s, the rest 10 s
    budget = WallTimeBudget(150.0, max_epochs=10, steps_per_epoch=4, learning_rate=1e-2, clock=clock)
    history, _ = _budget_fit(budget, clock)
    # planning on epoch 0's pace would stop at once; on the second epoch's, 4 more fit after it
    assert len(history["loss"]) == 6
    assert clock.now <= 150.0


def test_a_budget_that_is_not_needed_leaves_the_cosine_schedule_as_without_one():
    clock = _Clock(per_batch=1.0)
    budget = WallTimeBudget(1000.0, max_epochs=4, steps_per_epoch=4, learning_rate=1e-2, warmup_epochs=1, clock=clock)
    history, lrs = _budget_fit(budget, clock, epochs=4)
    assert len(history["loss"]) == 4 and not budget.cut_short
    plain = build_lr_schedule(1e-2, schedule="cosine", epochs=4, steps_per_epoch=4, warmup_epochs=1)
    np.testing.assert_allclose(lrs, [float(plain(s)) for s in range(16)], rtol=1e-5, atol=1e-9)


def test_fit_best_under_a_spent_budget_runs_one_epoch_and_logs_its_time(tmp_path):
    tf = pytest.importorskip("tensorflow")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    y = keras.utils.to_categorical(np.arange(16) % 2, 2)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    recipe = FitRecipe(optimizer="adamw", learning_rate=1e-2, lr_schedule="cosine", epochs=5, batch_size=4,
                       run_eagerly=True, time_budget_s=1e-6)
    fitted = fit_best(model, data, data, recipe=recipe, n_train=16, loss="categorical_crossentropy",
                      metrics=["accuracy"], out_dir=tmp_path)
    assert fitted.epochs_run == 1 and fitted.cut_short
    header = (tmp_path / "training_log.csv").read_text().splitlines()[0].split(",")
    assert "epoch_seconds" in header and "planned_epochs" in header


def test_a_fit_gets_its_costs_share_of_the_time_left_and_what_is_spent_passes_on():
    costs = {"cnn": 1.0, "ensemble": 6.0, "lung": 1.0}
    assert share_of_time_left(800.0, costs, "ensemble") == pytest.approx(600.0)
    assert share_of_time_left(800.0, costs, "cnn") == pytest.approx(100.0)
    # made again from what is left when the next fit starts: an overrun shrinks the later shares
    assert share_of_time_left(350.0, {"ensemble": 6.0, "lung": 1.0}, "lung") == pytest.approx(50.0)
    assert share_of_time_left(-20.0, costs, "lung") == pytest.approx(1e-3)  # spent: one epoch still runs


@pytest.mark.parametrize("costs, name, match", [
    ({"cnn": 1.0}, "lung", "'lung' needs a cost"),
    ({"cnn": 0.0}, "cnn", "'cnn' needs a cost"),
    ({"cnn": 1.0, "lung": -1.0}, "cnn", "costs ≥ 0"),
])
def test_bad_shares_are_refused(costs, name, match):
    with pytest.raises(ValueError, match=match):
        share_of_time_left(100.0, costs, name)
