"""Shared fixtures: the real data folder (skipped where absent) and a generated bad-input corpus."""

from __future__ import annotations

import collections
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from data import spec
from data.datasets import load_records
from data.runtime.bundle import MODEL_FILE, SIDECAR
from ensemble.classifier import Classifier, load_classifier
from fakes import BAD_CORPUS_EXPECT, make_bad_corpus, png_bytes, xray_like

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: Session fixtures too costly to build on each pytest-xdist worker: the files that use one run on one
#: worker (``make test`` distributes with ``--dist loadgroup``). The three-member ``trained_bundle`` took
#: 76-103 s to build on each of the two workers of a CI-sized machine (``--durations``, 2026-11-28).
SHARED_ON_ONE_WORKER = ("trained_bundle",)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the marks into its work units
def pytest_collection_modifyitems(config, items):
    """Group each file's tests on one worker, as ``--dist loadfile`` does (module fixtures are built
    once), and every file that uses a fixture of :data:`SHARED_ON_ONE_WORKER` in that fixture's group."""
    group = {item.path: item.nodeid.split("::", 1)[0] for item in items}  # the file, as reports name it
    for item in items:
        shared = [f for f in SHARED_ON_ONE_WORKER if f in item.fixturenames]
        if shared:
            group[item.path] = shared[0]
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group[item.path]))


@pytest.fixture(scope="session")
def shared_cxr() -> Path:
    """../shared/data/cxr, or a skip that says why (a user's clone has no shared data)."""
    path = SHARED_DATA / "cxr"
    if not (path / "manifest.csv").is_file():
        pytest.skip(f"real X-rays not found at {path} (the project's shared data lives beside the checkout)")
    return path


@pytest.fixture(scope="session")
def shared_masks(shared_cxr: Path) -> Path:
    path = SHARED_DATA / "cxr_masks"
    if not path.is_dir():
        pytest.skip(f"masks not found at {path}")
    return path


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of awkward inputs made here; see fakes.BAD_CORPUS_EXPECT for what each must give."""
    return make_bad_corpus(tmp_path_factory.mktemp("bad_corpus"))


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory) -> Path:
    """3 classes × 4 images, 80×72 px, with a class-dependent bright blob so there is signal."""
    root = tmp_path_factory.mktemp("tiny")
    for ci, label in enumerate(spec.CLASS_NAMES):
        (root / label).mkdir()
        for i in range(4):
            img = xray_like(80, 72, seed=100 * ci + i)
            img[10 + 20 * ci : 25 + 20 * ci, 20:50] = 250
            (root / label / f"{label}_{i}.png").write_bytes(png_bytes(img))
    return root


@pytest.fixture(scope="session")
def tiny_records(tiny_tree):
    return load_records(tiny_tree)


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, tiny_records):
    """One eager epoch of the full three-member soft-vote ensemble at 64 px, saved: one step per member
    (the 9 training images in one batch), since each eager step of the three members costs seconds."""
    from ensemble.train import ClassifierSettings, train_classifier

    keras.utils.set_random_seed(0)
    out = tmp_path_factory.mktemp("clf")
    train = tiny_records[::2] + tiny_records[1::4]
    settings = ClassifierSettings(image_size=64, weights=None, epochs=1, batch_size=len(train), run_eagerly=True,
                                  freeze_fraction=0.3, augment=True)
    val = tiny_records[3::4]
    result = train_classifier(settings, train, val, out, verbose=0)
    return out, result


@pytest.fixture(scope="session")
def seg_data(tmp_path_factory):
    """8 images with a bright lesion and its mask in masks/lesion/ (class folders)."""
    root = tmp_path_factory.mktemp("seg")
    (root / "masks" / "lesion").mkdir(parents=True)
    for i in range(8):
        label = ("covid", "pneumonia")[i % 2]
        (root / "images" / label).mkdir(parents=True, exist_ok=True)
        img = xray_like(72, 64, seed=200 + i)
        m = np.zeros((72, 64), np.uint8)
        y, x = 8 + 4 * i, 6 + 3 * i
        img[y : y + 20, x : x + 24] = 250
        m[y : y + 20, x : x + 24] = 255
        (root / "images" / label / f"s{i}.png").write_bytes(png_bytes(img))
        (root / "masks" / "lesion" / f"s{i}.png").write_bytes(png_bytes(m))
    return root


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """``build(out)`` once per test session, by whichever pytest-xdist worker asks first; the others wait
    for it and reuse the folder (the pattern of pytest-xdist's docs, with filelock). Each worker trained
    its own light bundles before: 15-20 s apiece on 2 cores. Tests copy a bundle before changing it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's folder, shared by its workers
    out, done = root / f"once-{name}", root / f"once-{name}.built"
    with FileLock(str(root / f"once-{name}.lock")):
        if not done.is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def seg_model(seg_data, tmp_path_factory):
    return built_once(tmp_path_factory, "segmodel", lambda root: _train_seg_model(seg_data, root)) / "m"


def _train_seg_model(seg_data: Path, root: Path) -> None:
    out = root / "m"
    cfg = root / "c.toml"
    # The light MobileNetV2 U-Net, a batch as large as the split (each eager step costs seconds): FC-DenseNet103's
    # own training and export are checked in tests/segmenter.
    cfg.write_text('arch = "unet-mobilenetv2"\nimage_size = 64\nepochs = 1\nbatch_size = 8\nweights = "none"\n'
                   'run_eagerly = true\nmin_lesion_area = 4\n')
    from pipeline.cli import main

    code = main(["train-segmenter", "--images", str(seg_data / "images"), "--masks", str(seg_data / "masks"),
                 "--kind", "lesion", "--out", str(out), "--config", str(cfg), "--time-budget", "3600"])
    assert code == 0


@pytest.fixture(scope="session")
def light_bundle(tmp_path_factory, tiny_records):
    """A one-member (EfficientNetB0) classifier for pipeline tests: cheap to load and trace."""
    from ensemble.train import ClassifierSettings, train_classifier

    def build(out):
        train = tiny_records[::2] + tiny_records[1::4]
        settings = ClassifierSettings(members=("efficientnetb0",), image_size=64, weights=None, epochs=1,
                                      batch_size=len(train), run_eagerly=True)  # one step
        train_classifier(settings, train, tiny_records[3::4], out, verbose=0)

    return built_once(tmp_path_factory, "light_clf", build)


#: Classifiers loaded by :func:`classifier_loaded_once` on this worker, by (folder, the bundle files' mtimes).
_LOADED_CLASSIFIERS: dict[tuple, Classifier] = {}


def classifier_loaded_once(directory) -> Classifier:
    """The bundle in ``directory``, loaded once per worker: loading the three-member bundle and tracing its
    predict function cost ~25 s on 2 cores (cProfile of `cxr evaluate`, 2026-11-28). A folder whose
    model.keras or model.json changed since is loaded anew."""
    folder = Path(directory).resolve()
    try:
        key = (folder, *((folder / name).stat().st_mtime_ns for name in (MODEL_FILE, SIDECAR)))
    except OSError:
        return load_classifier(directory)  # the loader's own error
    if key not in _LOADED_CLASSIFIERS:
        _LOADED_CLASSIFIERS[key] = load_classifier(directory)
    return _LOADED_CLASSIFIERS[key]


@pytest.fixture
def classifiers_loaded_once(monkeypatch) -> collections.Counter:
    """``ensemble.classifier.load_classifier``, which every job imports where it runs, handing out
    :func:`classifier_loaded_once`: for tests of what a job does with a model (loading is checked in
    tests/ensemble and tests/pipeline/test_export.py). Returns the number of calls per folder."""
    from ensemble import classifier

    calls = collections.Counter()

    def load(directory):
        calls[Path(directory).resolve()] += 1
        return classifier_loaded_once(directory)

    monkeypatch.setattr(classifier, "load_classifier", load)
    return calls


@pytest.fixture(scope="session")
def loaded_bundles(light_bundle, seg_model):
    """(classifier, segmenter) loaded once: each load retraces the models' predict functions
    (seconds per call on 2 cores)."""
    from segmenter.model import load_segmenter

    return classifier_loaded_once(light_bundle), load_segmenter(seg_model)


@pytest.fixture
def models_loaded_once(loaded_bundles, monkeypatch):
    """The CLI as users call it, with `pipeline.api.load_models` handing out the bundles loaded once
    (the segmenter doubles as the lung model when one is asked for). Bundle checks have their own tests."""
    from pipeline import api

    monkeypatch.setattr(api, "load_models", _hand_out(*loaded_bundles))


def _hand_out(clf, seg):
    """A stand-in for `pipeline.api.load_models` that returns bundles already loaded."""
    from pipeline import api

    return lambda classifier, segmenter, lung_model=None, **kwargs: api.Models(clf, seg, seg if lung_model else None)


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory, bad_corpus):
    """Good X-rays plus the bad corpus. Six good ones lie at the top of the folder, which a run reads
    before its subfolders (data.datasets.walk_images): real ones from ../shared/data when present, else
    generated, so the folder has the same shape either way (a run stopped after 3 images has met no bad
    file, whether or not ../shared is there)."""
    d = tmp_path_factory.mktemp("mixed")
    real = SHARED_DATA / "cxr"
    good = []
    if (real / "manifest.csv").is_file():
        for label in ("covid", "pneumonia", "normal"):
            for p in sorted((real / label).glob("*.png"))[:2]:
                shutil.copy(p, d / f"real_{p.name}")
                good.append(f"real_{p.name}")
    else:
        for i in range(6):
            (d / f"top_g{i}.png").write_bytes(png_bytes(xray_like(90, 80, seed=310 + i)))
            good.append(f"top_g{i}.png")
    for i in range(3):
        (d / "gen").mkdir(exist_ok=True)
        (d / "gen" / f"g{i}.png").write_bytes(png_bytes(xray_like(90, 80, seed=300 + i)))
        good.append(f"gen/g{i}.png")
    (d / "gen" / "blank.png").write_bytes(png_bytes(np.full((90, 80), 128, np.uint8)))  # readable, not an X-ray
    good.append("gen/blank.png")
    (d / "bad").mkdir()
    bad = []
    for name, expect in BAD_CORPUS_EXPECT.items():
        shutil.copy(bad_corpus / name, d / "bad" / name)
        (bad if expect != "ok" else good).append(f"bad/{name}")
    return d, sorted(good), sorted(bad)


@pytest.fixture(scope="session")
def mixed_run(mixed_folder, loaded_bundles, light_bundle, seg_model, tmp_path_factory):
    """(exit code, OUT) of `cxr run --lung-model` on the mixed folder, with the bundles loaded once
    (the segmenter doubles as the lung model): test_run checks it, test_ray_run compares with it."""
    from pipeline import api
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("mixed-run") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "load_models", _hand_out(*loaded_bundles))
        code = main(["run", str(mixed_folder[0]), "--classifier", str(light_bundle), "--segmenter", str(seg_model),
                     "--lung-model", str(seg_model), "--out", str(out), "--batch-size", "4"])
    return code, out
