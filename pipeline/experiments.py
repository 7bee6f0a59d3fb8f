"""`cxr reproduce experiments/X.toml`: the paper's experiments as typed, flat TOML files.

Every file has ``task`` (``dataset``, ``classifier``, ``segmenter`` or ``protocol`` = classifier
then segmenter) and ``name``; the other keys are the experiment's own (below) and the
training settings of its stage(s) (ensemble.train.ClassifierSettings,
segmenter.settings.SegmenterSettings; for ``protocol`` the segmenter's keys take a ``seg_``
prefix). Unknown or missing keys fail listing the allowed ones. Paths are relative to the
TOML file's folder. Each run writes the resolved config, git revision, package versions,
seeds, metrics, plots and ``comparison.md`` (our numbers beside the paper's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, build_settings, read_toml, settings_to_toml
from pipeline.report import ci_text

TASKS = ("dataset", "classifier", "segmenter", "protocol")
#: The paper's headline figures (ensemble accuracy; segmentation Dice and IoU).
PAPER = {"accuracy": 0.992, "dice": 0.92, "iou": 0.90}


@dataclass(frozen=True)
class Experiment:
    """Keys every experiment file may have besides its stage settings."""

    task: str
    name: str
    data: str = "../../shared/data/cxr"
    masks: str = "../../shared/data/cxr_masks"
    manifest: str = ""
    splits: str = ""
    bootstrap: int = 1000
    description: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} unknown; valid: {', '.join(TASKS)}")


def load_experiment(path: str | Path) -> tuple[Experiment, Any, Any]:
    """(experiment, classifier settings or None, segmenter settings or None) from a TOML file."""
    from ensemble.train import ClassifierSettings, with_preset
    from segmenter.settings import SegmenterSettings
    from segmenter.settings import with_preset as with_seg_preset

    path = Path(path)
    values = read_toml(path)
    exp_keys = {f.name for f in dataclasses.fields(Experiment)}
    task = values.get("task")
    stage_fields = {
        "dataset": {},
        "classifier": {"": ClassifierSettings},
        "segmenter": {"": SegmenterSettings},
        "protocol": {"": ClassifierSettings, "seg_": SegmenterSettings},
    }.get(task if isinstance(task, str) else "", None)
    if stage_fields is None:
        raise ConfigError(f"{path}: 'task' must be one of {', '.join(TASKS)} (got {task!r})")
    split: dict[str, dict[str, Any]] = {prefix: {} for prefix in stage_fields}
    allowed = set(exp_keys)
    for prefix, cls in stage_fields.items():
        allowed |= {prefix + f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    exp_values = {k: v for k, v in values.items() if k in exp_keys}
    for key, value in values.items():
        if key in exp_keys:
            continue
        prefix = "seg_" if key.startswith("seg_") and "seg_" in stage_fields else ""
        split[prefix][key[len(prefix):]] = value
    exp = build_settings(Experiment, exp_values, source=str(path), required=("task", "name"))
    clf = (build_settings(ClassifierSettings, with_preset(split[""]), source=str(path))
           if task in ("classifier", "protocol") else None)
    seg = None
    if task == "segmenter":
        seg = build_settings(SegmenterSettings, with_seg_preset(split[""]), source=str(path))
    elif task == "protocol":
        seg = build_settings(SegmenterSettings, with_seg_preset(split["seg_"]), source=str(path))
    return exp, clf, seg


def _resolve(base: Path, value: str) -> Path | None:
    return (base / value).resolve() if value else None


def reproduce(path: str | Path, out: str | Path | None = None, *, progress=None, verbose: int | None = None) -> Path:
    """Run one experiment file; returns the run directory (default runs/<name>)."""
    from data.check import check_records
    from data.files import write_json
    from pipeline.api import gather_records
    from pipeline.classifier_jobs import evaluate_classifier_job, train_classifier_job
    from pipeline.common import prepare_output_dir, run_metadata
    from pipeline.segmenter_jobs import evaluate_segmenter_job, train_segmenter_job

    path = Path(path)
    exp, clf, seg = load_experiment(path)
    base = path.resolve().parent
    run = prepare_output_dir(Path(out) if out else Path("runs") / exp.name, marker="comparison.md")
    data, masks = _resolve(base, exp.data), _resolve(base, exp.masks)
    manifest, splits = _resolve(base, exp.manifest), _resolve(base, exp.splits)
    resolved = {**dataclasses.asdict(exp), "data": str(data), "masks": str(masks)}
    if clf:
        resolved["classifier"] = clf.to_dict()
    if seg:
        resolved["segmenter"] = seg.to_dict()
    (run / "config.toml").write_text(settings_to_toml(resolved))
    seeds = {"classifier": clf.seed if clf else None, "segmenter": seg.seed if seg else None}
    write_json(run / "run.json", {**run_metadata(resolved, seed=seeds["classifier"] or 0), "seeds": seeds})
    lines = [f"# {exp.name}", "", exp.description, ""]
    if exp.task == "dataset":
        records = gather_records(data, manifest=manifest, masks=masks if masks and masks.is_dir() else None)
        report = check_records(records)
        write_json(run / "metrics.json", report.to_dict())
        lines += ["| class | images |", "|---|---|"] + [f"| {c} | {n} |" for c, n in sorted(report.per_class.items())]
        lines += ["", "| class | source | images |", "|---|---|---|"]
        lines += [f"| {c} | {s} | {n} |" for (c, s), n in sorted(report.per_class_source.items())]
        lines += ["", "The paper's Table II class weights (COVID-19 4283, pneumonia 1587, normal 701) are "
                      "reproduced as given by `class_weights` in paper_table2_ensemble.toml."]
    if clf:
        records = gather_records(data, manifest=manifest)
        train_classifier_job(records, run / "classifier", overrides=clf.to_dict(),
                             splits=splits, progress=progress, verbose=verbose)
        m = evaluate_classifier_job(run / "classifier", records, run / "classifier_eval",
                                    splits=run / "classifier" / "splits.csv", n_boot=exp.bootstrap, progress=progress)
        lines += _classifier_comparison(m)
    if seg:
        records = gather_records(data, manifest=manifest, masks=masks, mask_kinds=[seg.kind])
        train_segmenter_job(records, run / "segmenter", overrides=seg.to_dict(), splits=splits,
                            progress=progress, verbose=verbose)
        m = evaluate_segmenter_job(run / "segmenter", records, run / "segmenter_eval", kind=seg.kind,
                                   splits=run / "segmenter" / "splits.csv", n_boot=exp.bootstrap, progress=progress)
        lines += _segmenter_comparison(m)
    (run / "comparison.md").write_text("\n".join(lines) + "\n")
    return run


def _classifier_comparison(m: dict[str, Any]) -> list[str]:
    lines = ["## Classification (held-out patient-level test split)", "",
             "| model | accuracy (95 % CI) | macro AUC | paper accuracy |", "|---|---|---|---|",
             f"| ensemble ({m['model']['variant']}) | {ci_text(m['accuracy'])} | {ci_text(m['macro']['auc'])} | "
             f"{PAPER['accuracy']:.3f} |"]
    for member, mm in m.get("per_member", {}).items():
        lines.append(f"| {member} alone | {ci_text(mm['accuracy'])} | {ci_text(mm['macro']['auc'])} | |")
    lines += ["", f"n = {m['n']} test images."]
    if "per_source" in m:
        lines += ["", "| source | accuracy | n |", "|---|---|---|"]
        lines += [f"| {s} | {ci_text(sm['accuracy'])} | {sm['n']} |" for s, sm in m["per_source"].items()]
        lines += ["", "A large gap between sources means the model may be reading the source (e.g. pediatric "
                      "pneumonia images) rather than the disease."]
    return lines + [""]


def _segmenter_comparison(m: dict[str, Any]) -> list[str]:
    return ["## Segmentation (held-out patient-level test split)", "",
            "| metric | ours (95 % CI) | paper |", "|---|---|---|",
            f"| Dice | {ci_text(m['dice'])} | {PAPER['dice']:.2f} |",
            f"| IoU | {ci_text(m['iou'])} | {PAPER['iou']:.2f} |",
            f"| precision | {ci_text(m['precision'])} | |", f"| recall | {ci_text(m['recall'])} | |",
            "", f"n = {m['n']} test images, mask kind {m['kind']}.", ""]
