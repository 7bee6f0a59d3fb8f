"""`cxr train-segmenter`, `cxr evaluate-segmenter`, `cxr segment` on a tiny generated set."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from data.runtime.bundle import BundleError
from fakes import png_bytes, xray_like
from pipeline.cli import main


def test_train_writes_bundle(seg_model):
    side = json.loads((seg_model / "model.json").read_text())
    assert side["kind"] == "segmenter" and side["meta"]["arch"] == "unet-mobilenetv2"
    assert side["meta"]["kind"] == "lesion" and side["meta"]["tta"] == "none"  # what every prediction goes through
    for name in ("model.keras", "splits.csv", "training_curves.png", "training_log.csv", "config.toml"):
        assert (seg_model / name).is_file()
    # --time-budget reaches the fit: its callback logs each epoch's time, the bundle the epochs run
    assert side["config"]["time_budget_s"] == 3600 and side["config"]["epochs_run"] == 1
    assert "epoch_seconds" in (seg_model / "training_log.csv").read_text().splitlines()[0].split(",")


def test_train_says_how_many_epochs_each_fit_ran_under_a_time_budget(capsys):
    from pipeline.cli import _print_budget

    _print_budget({"loss": [1.0, 0.9], "densenet121_probs_planned_epochs": [9.0, 6.0, 6.0],
                   "vgg19_probs_planned_epochs": [9.0, 2.0]})
    assert capsys.readouterr().out == "time budget: densenet121_probs ran 3 epoch(s), vgg19_probs ran 2 epoch(s)\n"
    _print_budget({"loss": [1.0], "planned_epochs": [4.0]})
    assert capsys.readouterr().out == "time budget: model ran 1 epoch(s)\n"
    _print_budget({"loss": [1.0]})  # no budget: nothing said
    assert capsys.readouterr().out == ""


def test_classifier_loader_refuses_a_segmenter(seg_model):
    from ensemble.classifier import load_classifier

    with pytest.raises(BundleError, match="holds a 'segmenter' model, expected a 'classifier'"):
        load_classifier(seg_model)


def test_evaluate_writes_metrics_with_cis(seg_model, seg_data, tmp_path, capsys):
    args = ["evaluate-segmenter", "--model", str(seg_model), "--images", str(seg_data / "images"),
            "--masks", str(seg_data / "masks"), "--kind", "lesion", "--bootstrap", "100"]
    assert main([*args, "--out", str(tmp_path / "held")]) == 0  # default: the bundle's held-out images only
    held = json.loads((tmp_path / "held" / "metrics.json").read_text())
    assert held["evaluated"]["scored"] == "held-out images only"
    assert held["n"] + held["evaluated"]["excluded_training_images"] == 8 and 0 < held["n"] < 8
    out = tmp_path / "e"
    assert main([*args, "--out", str(out), "--include-training"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 8 and m["evaluated"]["why"] == "--include-training"
    # A finished evaluation is never overwritten, and is refused before any model is read.
    (tmp_path / "empty").mkdir()  # no bundle: loading it first would say so instead
    assert main([*args, "--out", str(out), "--model", str(tmp_path / "empty")]) == 2
    assert "already holds a result" in capsys.readouterr().err
    assert m["tta"] == "none"  # scored as the bundle predicts
    for k in ("dice", "iou", "precision", "recall"):
        lo, hi = m[k]["ci95"]
        assert 0.0 <= lo <= m[k]["value"] <= hi <= 1.0
    assert (out / "gallery.png").stat().st_size > 0
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == 8
    # every drawn lesion is 20 x 24 px of a 72 x 64 image: 10.42 %, so all fall in one band, whose Dice
    # is the mean over all of them
    assert [float(r["lesion_pct"]) for r in rows] == pytest.approx([100 * 20 * 24 / (72 * 64)] * 8, abs=1e-3)
    sizes = m["by_lesion_size"]["bands"]
    assert set(sizes) == {"10-20 %"} and sizes["10-20 %"]["n"] == 8
    assert sizes["10-20 %"]["dice"]["value"] == pytest.approx(m["dice"]["value"])


def test_normal_x_rays_are_scored_apart_as_false_alarms(seg_model, seg_data, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for label in ("covid", "pneumonia"):
        shutil.copytree(seg_data / "images" / label, images / label)
    (images / "normal").mkdir()
    masks = tmp_path / "masks"
    shutil.copytree(seg_data / "masks", masks)
    (masks / "lung").mkdir()
    for i in range(3):  # no lesion mask: known lesion-free, so never in the Dice of the 8 lesion images
        (images / "normal" / f"n{i}.png").write_bytes(png_bytes(xray_like(72, 64, seed=500 + i)))
    for i in range(2):  # a lung drawn over the whole image, on two of the three
        (masks / "lung" / f"n{i}.png").write_bytes(png_bytes(np.full((72, 64), 255, np.uint8)))

    def evaluate(name: str) -> dict:
        assert main(["evaluate-segmenter", "--model", str(seg_model), "--images", str(images), "--masks", str(masks),
                     "--kind", "lesion", "--bootstrap", "50", "--include-training", "--out", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name / "metrics.json").read_text())

    m = evaluate("e")
    free = m["lesion_free"]  # one normal without a drawn lung: one definition for all, the whole image
    assert m["n"] == 8 and free["n"] == 3 and free["marked_of"] == "image"
    assert free["with_lesion_found"]["value"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert 0.0 <= free["marked_pct"]["value"] <= 100.0
    assert "lesion-free X-rays (n 3)" in capsys.readouterr().out
    with (tmp_path / "e" / "cut_sweep.csv").open() as handle:  # every cut of the fit's grid, the bundle's among them
        sweep = {float(row["cut"]): row for row in csv.DictReader(handle)}
    assert len(sweep) == 17 and m["threshold"] in sweep
    at_cut = sweep[m["threshold"]]
    assert float(at_cut["dice"]) == pytest.approx(m["dice"]["value"], abs=1e-4)
    assert float(at_cut["lesion_free_found"]) == pytest.approx(free["with_lesion_found"]["value"], abs=1e-4)
    assert float(at_cut["lesion_free_marked_pct"]) == pytest.approx(free["marked_pct"]["value"], abs=1e-2)
    marked = [float(sweep[c]["lesion_free_marked_pct"]) for c in sorted(sweep)]
    assert marked == sorted(marked, reverse=True)  # a higher cut never marks more

    # every normal with a drawn lung: a model without a lung class scores its false alarms on it
    (masks / "lung" / "n2.png").write_bytes(png_bytes(np.full((72, 64), 255, np.uint8)))
    drawn = evaluate("drawn")["lesion_free"]  # lungs over the whole image: the image's figures, named so
    assert drawn["marked_of"] == "drawn lung"
    assert drawn["marked_pct"]["value"] == pytest.approx(free["marked_pct"]["value"], abs=1e-6)
    assert drawn["with_lesion_found"]["value"] == free["with_lesion_found"]["value"]


def test_set_threshold_changes_the_bundles_cut_and_records_it(seg_model, tmp_path, capsys):
    from data.runtime.bundle import read_sidecar

    model = tmp_path / "m"
    shutil.copytree(seg_model, model)
    before = json.loads((model / "model.json").read_text())["meta"]
    assert main(["set-threshold", "--model", str(model), "--cut", "1.5"]) == 2  # refused, nothing written
    assert "a cut must lie in (0, 1), got 1.5" in capsys.readouterr().err
    assert json.loads((model / "model.json").read_text())["meta"] == before
    assert main(["set-threshold", "--model", str(model), "--cut", "0.35", "--why", "10 % of normal lung"]) == 0
    assert f"probability cut {before['threshold']:g} -> 0.35" in capsys.readouterr().out
    meta = read_sidecar(model, kind="segmenter")["meta"]  # the sidecar's hash was renewed: it passes the check
    assert meta["threshold"] == 0.35 and meta.get("threshold_fit") == before.get("threshold_fit")
    (edit,) = meta["edits"]
    assert edit["changed"] == {"threshold": [before["threshold"], 0.35]} and edit["why"] == "10 % of normal lung"
    assert main(["set-threshold", "--model", str(seg_model.parent), "--cut", "0.4"]) == 2  # not a bundle


def test_export_encoder_gives_keras_applications_weights_and_guards_the_test_split(seg_model, seg_data, tmp_path,
                                                                                   capsys):
    import keras

    from data.splits import read_splits
    from segmenter.model import load_segmenter

    model = tmp_path / "m"
    shutil.copytree(seg_model, model)
    assert main(["export", "--model", str(model), "--format", "encoder"]) == 0
    weights = model / "encoder.weights.h5"
    assert str(weights) in capsys.readouterr().out
    record = json.loads((model / "encoder.weights.h5.json").read_text())
    splits = read_splits(model / "splits.csv")
    assert record["encoder"] == "mobilenetv2" and record["kind"] == "lesion"
    assert record["trained_on"]["files"] == sorted(k for k, v in splits.items() if v != "test")
    # what keras.applications takes as weights: the features of the U-Net's trained encoder
    encoder = keras.applications.MobileNetV2(include_top=False, weights=str(weights), input_shape=(64, 64, 3))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    trained = load_segmenter(model).model.get_layer("mobilenetv2_encoder")(x)[0]
    np.testing.assert_allclose(encoder.predict(x, verbose=0), np.asarray(trained), rtol=1e-4, atol=1e-3)
    assert float(np.abs(np.asarray(trained)).max()) > 0
    # the member builder reads the same sidecar for the input scaling: the encoder's own, not "xrv"
    from ensemble.convert import KERAS_SCALING, input_scaling

    assert input_scaling(weights) == KERAS_SCALING
    # a classifier member started from it may not be tested on an image the encoder learnt from
    seen = record["trained_on"]["files"][0]
    leaky = tmp_path / "splits.csv"
    leaky.write_text("file,split\n" + "".join(f"{k},{'test' if k == seen else v}\n" for k, v in splits.items()))
    assert main(["train-classifier", "--data", str(seg_data / "images"), "--out", str(tmp_path / "c"), "--members",
                 "densenet121", "--weights", str(weights), "--splits", str(leaky)]) == 2
    err = capsys.readouterr().err
    assert "densenet121's initial encoder trained on 1 image(s) of this run's test split" in err and seen in err


def test_segment_prints_lesions_and_reports_bad_files(seg_model, seg_data, tmp_path, capsys):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"")
    good = sorted((seg_data / "images" / "covid").iterdir())[0]
    assert main(["segment", "--model", str(seg_model), "--lung-model", str(seg_model), str(good), str(bad)]) == 1
    cap = capsys.readouterr()
    assert f"{good}:" in cap.out and "lung affected" in cap.out
    assert "x.png: not an image: empty file" in cap.err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kind", "infection"], "no mask folder for kind(s) infection"),
        (["--kind", "lesion", "--arch", "fc-densenet103", "--weights", "imagenet"], "no pretrained weights"),
    ],
)
def test_train_segmenter_bad_usage(seg_data, tmp_path, capsys, extra, message):
    code = main(["train-segmenter", "--images", str(seg_data / "images"), "--masks", str(seg_data / "masks"),
                 "--out", str(tmp_path / "m"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_lesion_type_head_gives_lung_field_and_typed_lesions(seg_data, tmp_path, capsys):
    """One MobileNetV2 U-Net for background / lung / ground glass / consolidation: trained from four mask
    kinds, scored per class, and its own lung class gives the share of lung (no --lung-model)."""
    import shutil

    import numpy as np

    from data.io import read_mask
    from segmenter.model import load_segmenter

    masks = tmp_path / "masks"
    shutil.copytree(seg_data / "masks", masks)
    for kind in ("lung", "ggo", "consolidation"):
        (masks / kind).mkdir()
    for p in (masks / "lesion").iterdir():  # a lung field around every lesion; its left half ground glass
        lesion = read_mask(p)
        lung = np.zeros_like(lesion)
        lung[4:68, 4:60] = True
        cols = np.nonzero(lesion.any(axis=0))[0]
        ggo = lesion.copy()
        ggo[:, cols[len(cols) // 2]:] = False
        for kind, m in (("lung", lung), ("ggo", ggo), ("consolidation", lesion & ~ggo)):
            (masks / kind / p.name).write_bytes(png_bytes(m.astype(np.uint8) * 255))
    cfg = tmp_path / "c.toml"
    cfg.write_text('image_size = 64\nepochs = 1\nbatch_size = 8\nweights = "none"\nrun_eagerly = true\n'
                   'threshold = 0.05\nmin_lesion_area = 1\n')
    out = tmp_path / "m"
    assert main(["train-segmenter", "--images", str(seg_data / "images"), "--masks", str(masks), "--kind", "lesion",
                 "--arch", "unet-mobilenetv2", "--classes", "lung-lesion-types", "--out", str(out),
                 "--config", str(cfg)]) == 0
    trained = capsys.readouterr().out  # the scratch preset asks for lesion-free images; this set has no normal one
    assert "(0 lesion-free;" in trained and "the model saw lesion images only" in trained
    seg = load_segmenter(out)
    assert seg.channels == ("background", "lung", "ggo", "consolidation") and seg.meta["arch"] == "unet-mobilenetv2"
    maps = seg.predict_maps(np.full((2, 64, 64, 3), 120.0, np.float32))
    assert maps.shape == (2, 64, 64, 4)
    np.testing.assert_allclose(seg.lesion_probability(maps), maps[..., 2] + maps[..., 3], atol=1e-6)

    ev = tmp_path / "ev"
    assert main(["evaluate-segmenter", "--model", str(out), "--images", str(seg_data / "images"), "--masks",
                 str(masks), "--kind", "lesion", "--bootstrap", "50", "--include-training", "--out", str(ev)]) == 0
    per_class = json.loads((ev / "metrics.json").read_text())["per_class"]
    assert set(per_class) == {"ggo", "consolidation", "lung"} and per_class["lung"]["mask_kind"] == "lung"
    for c in per_class.values():
        assert c["n"] == 8 and 0.0 <= c["dice"]["value"] <= 1.0 and 0.0 <= c["iou"]["value"] <= c["dice"]["value"]
    assert "consolidation: dice" in capsys.readouterr().out

    image = sorted((seg_data / "images" / "covid").iterdir())[0]
    assert main(["segment", "--model", str(out), str(image)]) == 0
    said = capsys.readouterr().out
    assert "lung affected n/a" not in said  # the model's own lung class gave the lung field
    assert "ggo" in said and "consolidation" in said  # area by type, every type listed


def test_offline_train_segmenter_names_the_fix(seg_data, tmp_path, capsys, monkeypatch):
    """No --weights means ImageNet for the U-Net's encoder; offline that is a clear exit 2, not a traceback."""
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", offline)
    code = main(["train-segmenter", "--images", str(seg_data / "images"), "--masks", str(seg_data / "masks"),
                 "--kind", "lesion", "--out", str(tmp_path / "m"), "--image-size", "64", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5 into ~/.keras/models/" in err
    assert "weights='none'" in err and "Traceback" not in err
    assert main(["train-segmenter", "--images", str(seg_data / "images"), "--masks", str(seg_data / "masks"),
                 "--kind", "lesion", "--out", str(tmp_path / "m2"), "--weights", str(tmp_path)]) == 2
    assert "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()  # a missing local file is found before anything is written


def test_a_fresh_process_loads_a_segmenter(seg_model, seg_data, tmp_path):
    """Nothing of the builders is imported when `cxr segment` (or evaluate-segmenter) starts: loading must still
    find the models' own layers (every segmenter once failed here with "Could not locate class 'ChannelAffine'")."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    image = sorted((seg_data / "images" / "covid").iterdir())[0]
    root = str(Path(__file__).resolve().parents[2])
    args = [sys.executable, "-P", "-m", "pipeline.cli", "segment", "--model", str(seg_model), str(image)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{image}:" in done.stdout and "lesion(s)" in done.stdout

