"""Every experiment TOML loads into typed settings; bad files fail naming the key; reproduce runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.experiments import load_experiment, reproduce

EXPERIMENTS = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.toml"))


def test_the_paper_experiments_exist():
    names = {p.stem for p in EXPERIMENTS}
    assert {"paper_table1_dataset", "paper_table2_ensemble", "paper_segmentation", "paper_table3_comparison",
            "dev_quick"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_file_loads(path):
    exp, clf, seg = load_experiment(path)
    assert exp.name == path.stem
    if exp.task in ("classifier", "protocol"):
        assert clf is not None and clf.members
    if exp.task in ("segmenter", "protocol"):
        assert seg is not None and seg.kind


def test_paper_values_are_as_given():
    _, clf, _ = load_experiment(next(p for p in EXPERIMENTS if p.stem == "paper_table2_ensemble"))
    assert (clf.learning_rate, clf.batch_size, clf.epochs) == (1e-4, 30, 60)
    assert clf.class_weights == {"normal": 701.0, "pneumonia": 1587.0, "covid": 4283.0}
    _, _, seg = load_experiment(next(p for p in EXPERIMENTS if p.stem == "paper_segmentation"))
    assert (seg.arch, seg.learning_rate, seg.batch_size, seg.epochs) == ("fc-densenet103", 1e-4, 30, 40)


@pytest.mark.parametrize(
    "text, message",
    [
        ('task = "classifier"\nname = "x"\nepoch = 3\n', "unknown key(s) epoch; allowed:"),
        ('task = "classifier"\n', "missing key(s) name"),
        ('task = "training"\nname = "x"\n', "'task' must be one of"),
        ('task = "protocol"\nname = "x"\nseg_arch = "resnet"\n', "unknown arch"),
        ('task = "segmenter"\nname = "x"\nseg_kind = "lung"\n', "unknown key(s) seg_kind"),
    ],
)
def test_bad_experiment_files(tmp_path, text, message):
    p = tmp_path / "e.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_experiment(p)


def test_reproduce_dataset_table_on_the_bundled_sample(tmp_path):
    from data.datasets import SAMPLE_MASKS_DIR, SAMPLES_DIR

    p = tmp_path / "t1.toml"
    p.write_text(f'task = "dataset"\nname = "t1"\ndata = "{SAMPLES_DIR}"\nmasks = "{SAMPLE_MASKS_DIR}"\n')
    run = reproduce(p, tmp_path / "run")
    md = (run / "comparison.md").read_text()
    assert "| covid | 3 |" in md and "| normal | 3 |" in md and "| pneumonia | 3 |" in md
    for name in ("config.toml", "metrics.json", "run.json"):
        assert (run / name).is_file()


@pytest.mark.slow
def test_dev_quick_protocol(shared_cxr, tmp_path, capsys):
    """`make test-slow`: the whole dev_quick protocol on ../shared/data (target: under 30 min here)."""
    import time

    t0 = time.perf_counter()
    run = reproduce(next(p for p in EXPERIMENTS if p.stem == "dev_quick"), tmp_path / "dev_quick")
    with capsys.disabled():
        print(f"\n[slow] dev_quick took {time.perf_counter() - t0:.0f} s\n" + (run / "comparison.md").read_text())
    assert "## Classification" in (run / "comparison.md").read_text()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_settings_survive_the_round_trip_reproduce_makes(path):
    """reproduce hands to_dict() to the jobs as overrides: weights = "none" must not turn into the default."""
    from ensemble.train import ClassifierSettings
    from pipeline.config import build_settings
    from segmenter.settings import SegmenterSettings

    _, clf, seg = load_experiment(path)
    for settings, cls in ((clf, ClassifierSettings), (seg, SegmenterSettings)):
        if settings is not None:
            values = {k: v for k, v in settings.to_dict().items() if v is not None}
            assert build_settings(cls, values) == settings
