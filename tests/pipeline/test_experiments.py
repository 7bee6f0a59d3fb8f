"""Every experiment TOML loads into typed settings; bad files fail naming the key; reproduce runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.experiments import load_experiment, reproduce

EXPERIMENTS = sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.toml"))


def test_the_paper_experiments_exist():
    names = {p.stem for p in EXPERIMENTS}
    assert {"paper_table1_dataset", "paper_table2_ensemble", "paper_segmentation", "paper_table3_comparison",
            "dev_quick"} <= names


PAPER_FILES = [p for p in EXPERIMENTS if p.stem.startswith("paper_")]

#: What the paper (../shared/reference/004_…) states, by setting: Table II, sections III-A and IV-A.
PAPER_CLASSIFIER = {"members": ("densenet121", "efficientnetb0", "vgg19"), "variant": "concat",
                    "learning_rate": 1e-4, "batch_size": 30, "epochs": 60,
                    "class_weights": {"normal": 701.0, "pneumonia": 1587.0, "covid": 4283.0}}
PAPER_SEGMENTER = {"arch": "fc-densenet103", "learning_rate": 1e-4, "batch_size": 30, "epochs": 40}
#: Keys a file sets that are not settings at all (what the run reads, writes and prints).
NOT_SETTINGS = {"task", "name", "description", "data", "masks", "manifest", "splits", "bootstrap", "protocols",
                "assumed", "small", "paper_counts", "published", "notes", "weights_fallback"}
#: Stated by the paper besides PAPER_CLASSIFIER / PAPER_SEGMENTER: the members' initial weights
#: (a chest-X-ray DenseNet121, ImageNet for the others) and that some early layers are frozen (how
#: many is not stated, so freeze_fraction is in `assumed`).
ALSO_STATED = {"weights"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_file_loads(path):
    exp, clf, seg = load_experiment(path)
    assert exp.name == path.stem
    if exp.task in ("classifier", "protocol", "annotation_loop"):
        assert clf is not None and clf.members
    if exp.task in ("segmenter", "protocol", "annotation_loop"):
        assert seg is not None and seg.kind
    if path in PAPER_FILES:  # every paper experiment also runs at the small scale
        exp_small, clf_small, seg_small = load_experiment(path, scale="small")
        for settings in (clf_small, seg_small):
            assert settings is None or (settings.image_size <= 96 and settings.epochs <= 10)


@pytest.mark.parametrize("path", PAPER_FILES, ids=lambda p: p.stem)
def test_paper_files_follow_the_paper_and_list_every_assumption(path):
    import tomllib

    exp, clf, seg = load_experiment(path)
    if clf is not None:
        assert {k: getattr(clf, k) for k in PAPER_CLASSIFIER} == PAPER_CLASSIFIER
        assert clf.weights["densenet121"].endswith("xrv.weights.h5")  # chest-X-ray weights (cxr convert-weights)
        assert clf.weights["efficientnetb0"] == clf.weights["vgg19"] == "imagenet"
        assert exp.protocols == ("paper", "patient") or exp.task == "annotation_loop"
    if seg is not None:
        assert {k: getattr(seg, k) for k in PAPER_SEGMENTER} == PAPER_SEGMENTER
    raw = tomllib.loads(path.read_text())
    stated = set(PAPER_CLASSIFIER) | {f"seg_{k}" for k in PAPER_SEGMENTER} | ALSO_STATED
    if exp.task == "segmenter":
        stated = set(PAPER_SEGMENTER)
    unstated = set(raw) - NOT_SETTINGS - stated - {"draft_threshold"} - ({"kind"} if exp.task == "segmenter" else set())
    assert unstated <= exp.assumed_keys, f"neither stated by the paper nor assumed: {unstated - exp.assumed_keys}"
    assert exp.assumed_keys <= set(raw) | {"temperature", "drafts", "kind"}  # no reason for a key the file does not set
    if exp.task == "annotation_loop":
        assert "draft_threshold" in exp.assumed_keys
    if exp.task == "segmenter":
        assert "kind" in exp.assumed_keys  # expert masks stand in for the paper's annotated drafts


def test_comparison_prints_assumptions_and_the_scale(tmp_path):
    from data.datasets import SAMPLE_MASKS_DIR, SAMPLES_DIR

    p = tmp_path / "t1.toml"
    p.write_text(f'task = "dataset"\nname = "t1"\ndata = "{SAMPLES_DIR}"\nmasks = "{SAMPLE_MASKS_DIR}"\n'
                 'paper_counts = {{ normal = 1587, pneumonia = 4283, covid = 701 }}\n'
                 'assumed = ["image_size: 224 because"]\nnotes = ["a note"]\n'.replace("{{", "{").replace("}}", "}"))
    md = (reproduce(p, tmp_path / "run") / "comparison.md").read_text()
    assert "| covid | 3 | 701 |" in md and "| total | 9 | 6571 |" in md
    assert "**Scale" not in md  # a dataset table trains nothing
    assert "- image_size: 224 because" in md and "- a note" in md


def test_the_paper_protocol_leaks_patients_and_ours_does_not(tmp_path):
    from data.datasets import Record
    from fakes import png_bytes, xray_like
    from pipeline.experiments import protocol_splits

    records = []
    for i in range(30):  # 10 patients × 3 images, one class per patient
        label = ("normal", "pneumonia", "covid")[i // 3 % 3]
        path = tmp_path / f"p{i}.png"
        path.write_bytes(png_bytes(xray_like(64, 64, seed=i)))
        records.append(Record(path, label, name=path.name, patient_id=f"patient{i // 3}"))
    paper, paper_leaks = protocol_splits(records, "paper", tmp_path / "paper.csv", seed=0)
    ours, our_leaks = protocol_splits(records, "patient", tmp_path / "ours.csv", seed=0)
    assert paper_leaks > 0 and our_leaks == 0
    from data.splits import read_splits

    shares = read_splits(paper)
    assert sorted(set(shares.values())) == ["train", "val"] and list(shares.values()).count("val") == 6  # 20 %
    assert set(read_splits(ours).values()) == {"train", "val", "test"}


def test_an_absent_member_weights_file_is_said_and_replaced(tmp_path):
    from ensemble.train import ClassifierSettings
    from pipeline.experiments import _member_weights

    s = ClassifierSettings(members=("densenet121", "vgg19"), weights={"densenet121": "w/x.weights.h5", "vgg19": "none"})
    replaced, said = _member_weights(s, tmp_path, "imagenet")
    assert replaced.weights == {"densenet121": "imagenet", "vgg19": "none"}
    assert "densenet121: weights file" in said[0] and "used 'imagenet' instead" in said[0]
    with pytest.raises(ConfigError, match="weights file absent; make it with `cxr convert-weights`"):
        _member_weights(s, tmp_path, "")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "x.weights.h5").write_bytes(b"")
    assert _member_weights(s, tmp_path, "imagenet")[0].weights["densenet121"] == str(tmp_path / "w" / "x.weights.h5")


@pytest.mark.parametrize(
    "text, message",
    [
        ('task = "classifier"\nname = "x"\nepoch = 3\n', "unknown key(s) epoch; allowed:"),
        ('task = "classifier"\n', "missing key(s) name"),
        ('task = "training"\nname = "x"\n', "'task' must be one of"),
        ('task = "protocol"\nname = "x"\nseg_arch = "resnet"\n', "unknown arch"),
        ('task = "segmenter"\nname = "x"\nseg_kind = "lung"\n', "unknown key(s) seg_kind"),
        ('task = "classifier"\nname = "x"\nassumed = ["no reason"]\n', "assumed entries are 'key: why'"),
        ('task = "classifier"\nname = "x"\nprotocols = ["kfold"]\n', "choose from paper, patient"),
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


@pytest.fixture(scope="module")
def lesion_tree(tmp_path_factory):
    """3 classes × 10 small X-rays (one patient each), a bright lesion on the COVID and pneumonia ones, and
    its mask as `infection` (COVID) or `opacity` (pneumonia)."""
    from fakes import png_bytes, xray_like

    root = tmp_path_factory.mktemp("lesions")
    for kind in ("infection", "opacity"):
        (root / "masks" / kind).mkdir(parents=True)
    for ci, label in enumerate(("normal", "pneumonia", "covid")):
        (root / "cxr" / label).mkdir(parents=True)
        for i in range(10):
            img = xray_like(64, 64, seed=300 + 10 * ci + i)
            m = np.zeros((64, 64), np.uint8)
            if label != "normal":
                y, x = 8 + 3 * i, 10 + 2 * i
                img[y:y + 16, x:x + 20], m[y:y + 16, x:x + 20] = 250, 255
                kind = "infection" if label == "covid" else "opacity"
                (root / "masks" / kind / f"{label}{i}.png").write_bytes(png_bytes(m))
            (root / "cxr" / label / f"{label}{i}.png").write_bytes(png_bytes(img))
    return root


@pytest.mark.slow
def test_annotation_loop_measures_drafts_and_both_segmenters(lesion_tree, tmp_path):
    """`make test-slow` (about 60 s): the whole loop on a tiny set: classifier, Grad-CAM drafts scored against
    the expert masks, the segmenter trained on drafts and on expert masks, both on the same test patients."""
    p = tmp_path / "loop.toml"
    p.write_text(f'task = "annotation_loop"\nname = "loop"\ndata = "{lesion_tree / "cxr"}"\n'
                 f'masks = "{lesion_tree / "masks"}"\nbootstrap = 20\n'
                 'members = ["efficientnetb0"]\nimage_size = 64\nweights = "none"\nepochs = 1\nbatch_size = 8\n'
                 'run_eagerly = true\nseg_arch = "unet-mobilenetv2"\nseg_image_size = 64\nseg_weights = "none"\n'
                 'seg_epochs = 1\nseg_batch_size = 8\nseg_run_eagerly = true\n')
    run = reproduce(p, tmp_path / "run")
    md = (run / "comparison.md").read_text()
    assert "## 2-3. Grad-CAM drafts against the experts' masks" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    for label in ("covid", "pneumonia"):
        cells = [c.strip() for c in rows[label].split("|")[1:-1]]
        assert int(cells[1]) == 10 and int(cells[5]) == 10  # every image drafted, each scored against its mask
        assert 0.0 <= float(cells[2]) <= 1.0 and 0 < int(cells[3]) <= 10 and 0.0 <= float(cells[4]) <= 1.0
    for kind in ("draft", "expert"):
        assert f"| {kind} masks |" in md
        m = json.loads((run / f"segmenter_{kind}_eval" / "metrics.json").read_text())
        assert m["kind"] == "expert" and m["evaluated"]["scored"].startswith("split 'test'")
    tested = [json.loads((run / f"segmenter_{k}_eval" / "metrics.json").read_text())["n"] for k in ("draft", "expert")]
    assert tested[0] == tested[1] > 0  # the same held-out patients
    assert len(list((run / "masks" / "draft").iterdir())) == 20


def test_protocol_table_puts_the_papers_number_beside_its_own_protocol_only():
    from pipeline.experiments import classifier_comparison

    def metrics(acc, n):
        return {"n": n, "accuracy": {"value": acc, "ci95": [acc - 0.05, acc + 0.05]}, "macro": {"auc": {"value": 0.9}},
                "per_class": {"covid": {"sensitivity": {"value": 0.8}, "support": n // 3}},
                "per_member": {"vgg19": {"accuracy": {"value": acc - 0.1}}}}

    published = [{"work": "Narin et al. 2020 [10]", "method": "ResNet50", "accuracy": "93.3 %", "source": "arXiv"}]
    lines = classifier_comparison({"paper": (metrics(0.95, 480), 57), "patient": (metrics(0.80, 360), 0)}, published)
    rows = [line for line in lines if line.startswith("| paper:") or line.startswith("| ours:")]
    assert "| 57 | 0.992 (validation) |" in rows[0] and rows[1].endswith("| 0 |  |")
    assert "| paper | vgg19 | 0.850" in "\n".join(lines) and "## Table III" in "\n".join(lines)
    assert any(line.startswith("| Narin et al. 2020 [10] | ResNet50 |") for line in lines)
    assert any(line.startswith("| this run (patient), scored images | ensemble | 120 | 240 | 0.800") for line in lines)
