"""`cxr train-segmenter`, `cxr evaluate-segmenter`, `cxr segment` on a tiny generated set."""

from __future__ import annotations

import json

import pytest

from data.runtime.bundle import BundleError
from fakes import png_bytes
from pipeline.cli import main


def test_train_writes_bundle(seg_model):
    side = json.loads((seg_model / "model.json").read_text())
    assert side["kind"] == "segmenter" and side["meta"]["arch"] == "fc-densenet103"
    assert side["meta"]["kind"] == "lesion"
    for name in ("model.keras", "splits.csv", "training_curves.png", "training_log.csv", "config.toml"):
        assert (seg_model / name).is_file()


def test_classifier_loader_refuses_a_segmenter(seg_model):
    from ensemble.classifier import load_classifier

    with pytest.raises(BundleError, match="holds a 'segmenter' model, expected a 'classifier'"):
        load_classifier(seg_model)


def test_evaluate_writes_metrics_with_cis(seg_model, seg_data, tmp_path):
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
    for k in ("dice", "iou", "precision", "recall"):
        lo, hi = m[k]["ci95"]
        assert 0.0 <= lo <= m[k]["value"] <= hi <= 1.0
    assert (out / "gallery.png").stat().st_size > 0
    assert (out / "per_image.csv").read_text().count("\n") == 9


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


def test_lung_lesion_head_trains_from_two_mask_kinds(seg_data, tmp_path):
    import shutil

    import numpy as np

    from segmenter.model import load_segmenter

    masks = tmp_path / "masks"
    shutil.copytree(seg_data / "masks", masks)
    (masks / "lung").mkdir()
    for p in (masks / "lesion").iterdir():  # a lung field around every lesion
        m = np.zeros((72, 64), np.uint8)
        m[4:68, 4:60] = 255
        (masks / "lung" / p.name).write_bytes(png_bytes(m))
    cfg = tmp_path / "c.toml"
    cfg.write_text('arch = "fc-densenet103"\nimage_size = 64\nepochs = 1\nbatch_size = 2\nweights = "none"\n'
                   'run_eagerly = true\n')
    out = tmp_path / "m"
    assert main(["train-segmenter", "--images", str(seg_data / "images"), "--masks", str(masks), "--kind", "lesion",
                 "--classes", "lung-lesion", "--out", str(out), "--config", str(cfg)]) == 0
    seg = load_segmenter(out)
    assert seg.classes == "lung-lesion" and seg.model.output.shape[-1] == 3
    probs = seg.predict(np.full((2, 64, 64, 3), 120.0, np.float32))
    assert probs.shape == (2, 64, 64) and 0.0 <= probs.min() and probs.max() <= 1.0


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
