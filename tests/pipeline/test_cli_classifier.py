"""`cxr train-classifier`, `cxr evaluate`, `cxr predict` through the CLI entry point."""

from __future__ import annotations

import csv
import json

import pytest

from pipeline.cli import main


def test_predict_prints_rows_and_reports_bad_files(trained_bundle, tiny_tree, tmp_path, capsys,
                                                   classifiers_loaded_once):
    out, _ = trained_bundle
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    good = sorted((tiny_tree / "covid").iterdir())[:2]
    code = main(["predict", "--model", str(out), *map(str, good), str(bad)])
    cap = capsys.readouterr()
    rows = cap.out.strip().splitlines()
    assert code == 1
    assert rows[0].split("\t") == ["file", "label", "p_normal", "p_pneumonia", "p_covid"]
    assert len(rows) == 3
    probs = [float(v) for v in rows[1].split("\t")[2:]]
    assert abs(sum(probs) - 1.0) < 1e-3
    assert "bad.png: not an image" in cap.err


def test_evaluate_writes_metrics_and_plots(trained_bundle, tiny_tree, tmp_path, capsys, classifiers_loaded_once):
    out, _ = trained_bundle
    ev = tmp_path / "eval"
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_tree), "--out", str(ev), "--bootstrap", "50"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert m["n"] == 12 and set(m["per_class"]) == {"normal", "pneumonia", "covid"}
    assert set(m["per_member"]) == {"densenet121", "efficientnetb0", "vgg19"}
    assert "ece_before_temperature" in m and m["model"]["sha256"]
    for name in ("confusion_matrix.png", "roc.png", "reliability.png", "predictions.csv"):
        assert (ev / name).stat().st_size > 0
    # A finished evaluation is never overwritten, and is refused before the model is loaded.
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_tree), "--out", str(ev)]) == 2
    assert "already holds a result" in capsys.readouterr().err
    assert classifiers_loaded_once[out.resolve()] == 1


@pytest.mark.parametrize(
    "toml, message",
    [
        ("epochs = 1\nlearnig_rate = 0.1\n", "unknown key(s) learnig_rate; allowed:"),
        ("epochs = 'many'\n", "epochs: expected an integer"),
        ("members = ['alexnet']\n", "valid members"),
        ("epochs = [\n", "invalid TOML"),
    ],
)
def test_train_config_errors_exit_2(tiny_tree, tmp_path, capsys, toml, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    code = main(["train-classifier", "--data", str(tiny_tree), "--out", str(tmp_path / "m"), "--config", str(cfg)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # checked before anything was written


def test_missing_local_weights_exit_2(tiny_tree, tmp_path, capsys):
    code = main(["train-classifier", "--data", str(tiny_tree), "--out", str(tmp_path / "m"), "--members", "vgg19",
                 "--image-size", "64", "--weights", str(tmp_path)])
    assert code == 2
    assert "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5" in capsys.readouterr().err


def test_train_classifier_cli_single_member(tiny_tree, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('members = ["efficientnetb0"]\nimage_size = 64\nepochs = 1\nbatch_size = 16\n'
                   'weights = "none"\nrun_eagerly = true\n'
                   'class_weights = { normal = 701, pneumonia = 1587, covid = 4283 }\n')
    out = tmp_path / "m"
    assert main(["train-classifier", "--data", str(tiny_tree), "--out", str(out), "--config", str(cfg)]) == 0
    assert "trained in" in capsys.readouterr().out
    for name in ("model.keras", "model.json", "splits.csv", "training_curves.png", "training_log.csv", "run.json",
                 "config.toml"):
        assert (out / name).is_file(), name
    side = json.loads((out / "model.json").read_text())
    assert side["config"]["class_weight_table"] == {"normal": 701.0, "pneumonia": 1587.0, "covid": 4283.0}
    assert side["config"]["preset"] == "scratch" and side["config"]["optimizer"] == "adamw"  # weights = "none"
    assert main(["train-classifier", "--data", str(tiny_tree), "--out", str(out), "--config", str(cfg)]) == 2

    # Honest evaluation: the folder it trained on is scored on its held-out images only, unless asked.
    with (out / "splits.csv").open() as handle:
        n_test = sum(1 for row in csv.DictReader(handle) if row["split"] == "test")
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_tree), "--out", str(tmp_path / "e1"),
                 "--bootstrap", "20"]) == 0
    said = capsys.readouterr().out
    held = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert 0 < n_test < 12 and held["n"] == n_test
    assert held["evaluated"]["excluded_training_images"] == 12 - n_test
    assert f"left out {12 - n_test} image(s) the model trained or validated on" in said
    assert held["bootstrap"]["method"] == "percentile, resampling patients"
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_tree), "--out", str(tmp_path / "e2"),
                 "--bootstrap", "20", "--include-training"]) == 0
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["n"] == 12
