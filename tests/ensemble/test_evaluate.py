"""Metrics against hand-computed values on a fixed confusion matrix, and against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from ensemble.calibration import apply_temperature, expected_calibration_error, fit_temperature, nll
from ensemble.evaluate import classification_metrics, confusion_matrix, metrics_by_group, per_class_rates

# Fixed confusion matrix (rows true normal/pneumonia/covid, columns predicted):
#   [[8, 1, 1],
#    [2, 6, 2],
#    [0, 1, 9]]
CM = np.array([[8, 1, 1], [2, 6, 2], [0, 1, 9]])


def _labels_preds(cm):
    labels, preds = [], []
    for t in range(3):
        for p in range(3):
            labels += [t] * cm[t, p]
            preds += [p] * cm[t, p]
    return np.array(labels), np.array(preds)


def test_rates_by_hand():
    r = per_class_rates(CM)
    # pneumonia: TP 6, FN 4, FP 2, TN 30 - 6 - 4 - 2 = 18
    assert r["pneumonia"]["sensitivity"] == pytest.approx(6 / 10)
    assert r["pneumonia"]["specificity"] == pytest.approx(18 / 20)
    assert r["pneumonia"]["ppv"] == pytest.approx(6 / 8)
    assert r["pneumonia"]["npv"] == pytest.approx(18 / 22)
    assert r["pneumonia"]["f1"] == pytest.approx(12 / 18)
    assert r["pneumonia"]["fpr"] == pytest.approx(2 / 20)
    assert r["pneumonia"]["fnr"] == pytest.approx(4 / 10)
    assert r["pneumonia"]["fdr"] == pytest.approx(2 / 8)
    # covid: TP 9, FN 1, FP 3, TN 17
    assert r["covid"]["specificity"] == pytest.approx(17 / 20)
    assert r["covid"]["ppv"] == pytest.approx(9 / 12)


def test_against_sklearn_and_ci_contains_point():
    labels, preds = _labels_preds(CM)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=len(labels))
    probs[np.arange(len(labels)), preds] += 2.0  # make argmax equal the fixed predictions
    probs /= probs.sum(1, keepdims=True)
    m = classification_metrics(labels, probs, n_boot=200, seed=1)
    np.testing.assert_array_equal(m["confusion_matrix"]["counts"], CM)
    np.testing.assert_array_equal(confusion_matrix(labels, preds), skm.confusion_matrix(labels, preds))
    assert m["accuracy"]["value"] == pytest.approx(23 / 30)
    recall = skm.recall_score(labels, preds, average=None)
    precision = skm.precision_score(labels, preds, average=None)
    f1 = skm.f1_score(labels, preds, average=None)
    for c, name in enumerate(["normal", "pneumonia", "covid"]):
        e = m["per_class"][name]
        assert e["sensitivity"]["value"] == pytest.approx(recall[c])
        assert e["ppv"]["value"] == pytest.approx(precision[c])
        assert e["f1"]["value"] == pytest.approx(f1[c])
        assert e["auc"]["value"] == pytest.approx(skm.roc_auc_score(labels == c, probs[:, c]))
        lo, hi = e["sensitivity"]["ci95"]
        assert lo <= e["sensitivity"]["value"] <= hi
        lo, hi = e["auc"]["ci95"]
        assert lo <= e["auc"]["value"] <= hi
    lo, hi = m["accuracy"]["ci95"]
    assert lo <= 23 / 30 <= hi and hi - lo > 0.05
    assert m["macro"]["f1"]["value"] == pytest.approx(skm.f1_score(labels, preds, average="macro"))
    assert m["micro"]["f1"]["value"] == pytest.approx(skm.f1_score(labels, preds, average="micro"))
    assert m["macro"]["auc"]["value"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr",
                                                                         average="macro"))
    np.testing.assert_allclose(np.asarray(m["confusion_matrix"]["row_normalised"]).sum(1), 1.0)


def test_absent_class_gives_none_not_nan():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    m = classification_metrics(labels, probs, n_boot=50)
    assert m["per_class"]["covid"]["sensitivity"]["value"] is None
    assert m["per_class"]["covid"]["auc"]["value"] is None
    assert m["per_class"]["normal"]["auc"]["value"] == pytest.approx(1.0)


def test_metrics_by_group_splits_rows():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[[0, 1, 2, 1, 1, 1]] * 0.8 + 0.2 / 3
    out = metrics_by_group(labels, probs, ["a", "a", "a", "b", "b", "b"], n_boot=0)
    assert out["a"]["accuracy"]["value"] == 1.0
    assert out["b"]["accuracy"]["value"] == pytest.approx(1 / 3)


def test_temperature_fixes_overconfidence():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    logits = rng.normal(0, 1, (2000, 3))
    logits[np.arange(2000), labels] += 1.0  # true calibrated model at T = 1 ...
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    over = apply_temperature(true, 1 / 3)  # ... made 3x overconfident
    t = fit_temperature(over, labels)
    assert t == pytest.approx(3.0, rel=0.15)
    fixed = apply_temperature(over, t)
    assert nll(fixed, labels) < nll(over, labels)
    assert expected_calibration_error(fixed, labels) < expected_calibration_error(over, labels)
    np.testing.assert_allclose(apply_temperature(true, 1.0), true, atol=1e-6)


def test_bootstrap_resamples_whole_patients():
    from ensemble.evaluate import bootstrap_indices, classification_metrics

    groups = [f"p{i // 5}" for i in range(100)]  # 20 patients, 5 images each
    for idx in bootstrap_indices(100, n_boot=20, seed=1, groups=groups):
        drawn = [groups[i] for i in idx]
        assert all(drawn.count(g) % 5 == 0 for g in set(drawn))  # a patient comes with all 5 images
    # Each patient's 5 images agree, so the data hold 20 independent answers, not 100: the
    # patient bootstrap's interval is wider than the image bootstrap's.
    rng = np.random.default_rng(0)
    right = np.repeat(rng.random(20) < 0.7, 5)
    labels = np.zeros(100, int)
    probs = np.where(right[:, None], [[0.8, 0.1, 0.1]], [[0.1, 0.8, 0.1]])
    by_image = classification_metrics(labels, probs, n_boot=500)
    by_patient = classification_metrics(labels, probs, n_boot=500, groups=groups)
    width = lambda m: m["accuracy"]["ci95"][1] - m["accuracy"]["ci95"][0]  # noqa: E731
    assert width(by_patient) > 1.5 * width(by_image)
    assert by_patient["bootstrap"]["method"] == "percentile, resampling patients"
    assert by_patient["bootstrap"]["groups"] == 20


def test_vote_weights_drop_a_member_that_learned_nothing():
    from ensemble.calibration import fit_vote_weights, nll

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    good = np.full((200, 3), 0.1)
    good[np.arange(200), labels] = 0.8
    flat = np.full((200, 3), 1 / 3)
    w = fit_vote_weights([good, flat, good], labels)
    assert w[1] == 0.0 and sum(w) == pytest.approx(1.0)
    assert nll(sum(a * p for a, p in zip(w, [good, flat, good])), labels) < nll((good + flat + good) / 3, labels)
    assert fit_vote_weights([good, good], labels) == [0.5, 0.5]  # ties keep equal weights
