"""Refer instead of guess: the confidence threshold meets its validation error target, and the
input check catches blank, colour, inverted and non-chest inputs (real CT slices and photographs
where ../shared/data is present) while passing held-out chest X-rays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data.datasets import load_example, load_records
from data.io import read_image
from data.preprocess import preprocess_image
from ensemble.refer import fit_confidence_threshold, fit_input_check, refer_decisions
from fakes import xray_like


def _input(gray: np.ndarray, size: int = 64) -> np.ndarray:
    return preprocess_image(gray, size=size)[0]


def test_confidence_threshold_is_the_lowest_meeting_the_error_target():
    # 10 confident and right, 4 unsure and wrong, 6 unsure and right.
    conf = np.r_[np.full(10, 0.95), np.full(4, 0.5), np.full(6, 0.55)]
    labels = np.r_[np.zeros(10, int), np.ones(4, int), np.zeros(6, int)]
    probs = np.stack([conf, 1 - conf, np.zeros_like(conf)], axis=1)
    rule = fit_confidence_threshold(probs, labels, target_error=0.1)
    # At 0.5 every image is kept: 4/20 wrong (20 %); at 0.55: 0/16 wrong.
    assert rule["confidence_threshold"] == pytest.approx(0.55)
    assert rule["val_error_kept"] == 0.0 and rule["val_referred_share"] == pytest.approx(0.2)
    hopeless = fit_confidence_threshold(probs, 1 - labels, target_error=0.1)
    assert hopeless["confidence_threshold"] == 1.0  # nothing meets the target: refer everything


def test_input_check_on_generated_images():
    train = [_input(xray_like(96, 80, seed=s)) for s in range(40)]
    rule = {"input_check": fit_input_check(train), "confidence": {"confidence_threshold": 0.6}}
    sure = np.array([[0.9, 0.05, 0.05]])
    unsure = np.array([[0.4, 0.35, 0.25]])
    xray = _input(xray_like(96, 80, seed=999))
    colour = xray.copy()
    colour[..., 0] = np.clip(colour[..., 0] + 80, 0, 255)
    cases = {
        "an X-ray like the training ones": (xray, sure, False, ""),
        "the same, unsure": (xray, unsure, True, "low confidence"),
        "blank": (np.full_like(xray, 128.0), sure, True, "blank"),
        "colour": (colour, sure, True, "colour"),
        "inverted": (255.0 - xray, sure, True, "unlike the training X-rays"),
    }
    for name, (x, p, refer, reason) in cases.items():
        [(got, why)] = refer_decisions(x[None], p, rule)
        assert got is refer and reason in why, name
    assert refer_decisions(xray[None], sure, None) == [(None,
                                                        "no refer rule in this classifier bundle (retrain to get one)")]


def test_input_check_detection_rates_on_real_inputs(shared_cxr, capsys):
    """Fitted on 180 real X-rays; reports (and bounds) how often each kind of input is referred."""
    from sklearn.datasets import load_sample_images

    records = load_records(shared_cxr)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(records))
    fit_on, held = [records[i] for i in order[:180]], [records[i] for i in order[180:]]
    rule = {"input_check": fit_input_check(load_example(r, size=64)[0] for r in fit_on),
            "confidence": {"confidence_threshold": 0.0}}
    sure = np.array([[1.0, 0.0, 0.0]])

    def referred(inputs) -> float:
        inputs = list(inputs)
        return sum(refer_decisions(x[None], sure, rule)[0][0] for x in inputs) / len(inputs)

    xrays = [load_example(r, size=64)[0] for r in held]
    ct_dir = shared_cxr.parent / "ct" / "images"
    if not ct_dir.is_dir():
        pytest.skip(f"CT slices not found at {ct_dir}")
    rates = {
        "held-out chest X-rays (should pass)": referred(xrays),
        "CT slices": referred(_input(read_image(p)) for p in sorted(Path(ct_dir).glob("*.png"))),
        "inverted X-rays": referred(255.0 - x for x in xrays),
        "photographs (scikit-learn samples)": referred(_input(im) for im in load_sample_images().images),
        "blank": referred([np.full((64, 64, 3), v, np.float32) for v in (0.0, 128.0, 255.0)]),
    }
    with capsys.disabled():
        for name, rate in rates.items():
            print(f"\n[refer] {name}: {100 * rate:.0f} % referred", end="")
        print()
    assert rates["held-out chest X-rays (should pass)"] <= 0.05
    assert rates["CT slices"] >= 0.9
    assert rates["inverted X-rays"] >= 0.95
    assert rates["photographs (scikit-learn samples)"] == 1.0 and rates["blank"] == 1.0
