"""`cxr gradcam` end to end on a trained tiny classifier: files, drafts, audit, determinism."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from fakes import png_bytes
from pipeline.cli import main


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lung_dir(tiny_tree, tmp_path_factory):
    d = tmp_path_factory.mktemp("lungs")
    for p in tiny_tree.rglob("*.png"):
        m = np.zeros((80, 72), np.uint8)
        m[10:70, 8:64] = 255
        (d / p.name).write_bytes(png_bytes(m))
    return d


def test_gradcam_writes_everything_and_is_deterministic(trained_bundle, tiny_tree, lung_dir, tmp_path, capsys):
    model, _ = trained_bundle
    args = ["gradcam", str(tiny_tree), "--model", str(model), "--target", "covid", "--threshold", "0.4",
            "--lung-masks", str(lung_dir), "--lesion-masks", str(lung_dir)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert a == b  # same checkpoint, same images → byte-identical outputs
    out = tmp_path / "a"
    for name in ("coco_instances.json", "labelstudio_tasks.json", "labelstudio_config.xml",
                 "sagemaker_manifest.jsonl", "manifest.csv", "audit.json", "failures.csv"):
        assert (out / name).is_file(), name
    maps = np.load(out / "maps" / "covid" / "covid_0.png.npz")  # named with the input's extension
    assert set(maps.files) == {"ensemble", "densenet121", "efficientnetb0", "vgg19"}
    heat = maps["ensemble"]
    assert heat.shape == (80, 72) and heat.dtype == np.float32 and 0.0 <= heat.min() and heat.max() <= 1.0
    mask = out / "masks" / "covid" / "covid_0.png.png"
    import cv2
    m = cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE) > 0
    np.testing.assert_array_equal(m, (heat >= 0.4) & _lung_box())  # threshold, restricted to the lung field
    rows = (out / "manifest.csv").read_text().splitlines()
    assert len(rows) == 1 + 12 * 4  # header + (ensemble + 3 members) per image
    audit = json.loads((out / "audit.json").read_text())
    entry = audit["per_class_member"]["covid"]["ensemble"]
    assert 0.0 <= entry["lung_mass"]["mean"] <= 1.0 and entry["lung_mass"]["n"] == 12
    assert "draft_iou" in entry and "pointing_hit" in entry
    assert "audit covid" in capsys.readouterr().out


def _lung_box():
    box = np.zeros((80, 72), bool)
    box[10:70, 8:64] = True
    return box


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target", "cancer"], "--target 'cancer'"),
        (["--members", "resnet50"], "not in this model"),
        (["--threshold", "0"], "must be in (0, 1]"),
        (["--formats", "coco"], "unknown format"),
    ],
)
def test_gradcam_bad_arguments(trained_bundle, tiny_tree, tmp_path, capsys, extra, message):
    model, _ = trained_bundle
    assert main(["gradcam", str(tiny_tree), "--model", str(model), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_gradcam_on_a_full_disk_says_so_without_a_traceback(light_bundle, tiny_tree, tmp_path, monkeypatch, capsys):
    import errno

    from data import files

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(files, "write_bytes_atomic", full)
    assert main(["gradcam", str(tiny_tree), "--model", str(light_bundle), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and "Traceback" not in err
