"""`cxr reproduce experiments/X.toml [--scale small]`: the paper's experiments as typed, flat TOML files.

Every file has ``task`` and ``name``; the other keys are the experiment's own (:class:`Experiment`)
and the training settings of its stage(s) (ensemble.train.ClassifierSettings,
segmenter.settings.SegmenterSettings; where a task has both, the segmenter's keys take a ``seg_``
prefix). Unknown or missing keys fail listing the allowed ones. Paths are relative to the TOML
file's folder.

Tasks: ``dataset`` (Table I), ``classifier`` (Tables II and III), ``segmenter``, ``protocol``
(classifier then segmenter) and ``annotation_loop`` (pipeline.annotation_loop).

A paper file sets every value the paper states; every setting it does not state is listed in
``assumed`` ("key: why"), and comparison.md prints that list. ``--scale small`` applies the file's
``[small]`` table (image size, epochs, no downloads) so the experiment runs on a 2-core CPU;
comparison.md says which scale ran. ``protocols`` runs a classifier under the paper's random
image-level 80:20 split (validation accuracy, as the paper reports) and/or our patient-disjoint
70/15/15 split (test accuracy with CIs), on the same data with the same settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, build_settings, read_toml, settings_to_toml
from pipeline.report import ci_text

TASKS = ("dataset", "classifier", "segmenter", "protocol", "annotation_loop")
#: `cxr reproduce --scale`: the paper's settings, or the file's [small] table for a 2-core CPU.
SCALES = ("paper", "small")
#: "paper": random image-level 80:20 train/validation, validation accuracy (leaky: one patient's images
#: fall on both sides); "patient": patient-disjoint 70/15/15, accuracy on the held-out test patients.
PROTOCOLS = ("paper", "patient")
PROTOCOL_TEXT = {"paper": "paper: random image-level 80:20, validation accuracy",
                 "patient": "ours: patient-disjoint 70/15/15, test accuracy"}
#: The paper's headline figures (ensemble accuracy on validation; segmentation Dice and IoU).
PAPER = {"accuracy": 0.992, "dice": 0.92, "iou": 0.90}
_STAGES = {"dataset": {}, "classifier": {"": "clf"}, "segmenter": {"": "seg"},
           "protocol": {"": "clf", "seg_": "seg"}, "annotation_loop": {"": "clf", "seg_": "seg"}}


@dataclass(frozen=True)
class Experiment:
    """Keys every experiment file may have besides its stage settings."""

    task: str
    name: str
    data: str | tuple[str, ...] = ("../../shared/data/cxr",)  # one folder or several (e.g. cxr and large/cxr)
    masks: str | tuple[str, ...] = ("../../shared/data/cxr_masks",)  # the mask folder of each data folder
    manifest: str = ""
    splits: str = ""
    bootstrap: int = 1000
    description: str = ""
    protocols: tuple[str, ...] = ("patient",)
    assumed: tuple[str, ...] = ()  # "key: why" for each setting the paper does not state
    small: dict[str, Any] = field(default_factory=dict)  # --scale small: the stage keys that change
    draft_threshold: float = 0.5  # annotation_loop: Grad-CAM draft mask = heatmap ≥ this
    weights_fallback: str = ""  # a per-member weights file that is absent: use this instead (said in comparison.md)
    paper_counts: dict[str, int] = field(default_factory=dict)  # Table I as printed in the paper
    published: tuple[dict[str, Any], ...] = ()  # Table III: the published rows the paper compares with
    notes: tuple[str, ...] = ()  # what a reader of comparison.md must know (printed as given)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} unknown; valid: {', '.join(TASKS)}")
        for name in ("data", "masks"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        unknown = sorted(set(self.protocols) - set(PROTOCOLS))
        if unknown or not self.protocols:
            raise ValueError(f"protocols {list(self.protocols)}: choose from {', '.join(PROTOCOLS)}")
        bad = [a for a in self.assumed if ":" not in a]
        if bad:
            raise ValueError(f"assumed entries are 'key: why'; not: {bad[0]!r}")

    @property
    def assumed_keys(self) -> set[str]:
        return {a.split(":", 1)[0].strip() for a in self.assumed}


def load_experiment(path: str | Path, *, scale: str = "paper") -> tuple[Experiment, Any, Any]:
    """(experiment, classifier settings or None, segmenter settings or None) from a TOML file,
    with the file's ``[small]`` table applied when ``scale`` is "small"."""
    from ensemble.train import ClassifierSettings, with_preset
    from segmenter.settings import SegmenterSettings
    from segmenter.settings import with_preset as with_seg_preset

    if scale not in SCALES:
        raise ConfigError(f"scale {scale!r} unknown; valid: {', '.join(SCALES)}")
    path = Path(path)
    values = read_toml(path)
    exp_keys = {f.name for f in dataclasses.fields(Experiment)}
    task = values.get("task")
    stages = _STAGES.get(task if isinstance(task, str) else "")
    if stages is None:
        raise ConfigError(f"{path}: 'task' must be one of {', '.join(TASKS)} (got {task!r})")
    classes = {"clf": ClassifierSettings, "seg": SegmenterSettings}
    allowed = set(exp_keys)
    for prefix, stage in stages.items():
        allowed |= {prefix + f.name for f in dataclasses.fields(classes[stage])}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    exp = build_settings(Experiment, {k: v for k, v in values.items() if k in exp_keys}, source=str(path),
                         required=("task", "name"))
    stage_values = {k: v for k, v in values.items() if k not in exp_keys}
    if scale == "small":
        if not exp.small and stages:
            raise ConfigError(f"{path}: no [small] table; add one (image_size, epochs, weights) to run --scale small")
        bad = sorted(set(exp.small) - (allowed - exp_keys))
        if bad:
            raise ConfigError(f"{path}: [small] sets unknown key(s) {', '.join(bad)}")
        stage_values.update(exp.small)
    split: dict[str, dict[str, Any]] = {prefix: {} for prefix in stages}
    for key, value in stage_values.items():
        prefix = "seg_" if key.startswith("seg_") and "seg_" in stages else ""
        split[prefix][key[len(prefix):]] = value
    built: dict[str, Any] = {"clf": None, "seg": None}
    for prefix, stage in stages.items():
        fill = with_preset if stage == "clf" else with_seg_preset
        built[stage] = build_settings(classes[stage], fill(split[prefix]), source=str(path))
    return exp, built["clf"], built["seg"]


def _resolve(base: Path, value: str) -> Path | None:
    return (base / value).resolve() if value else None


def reproduce(path: str | Path, out: str | Path | None = None, *, scale: str = "paper", progress=None,
              verbose: int | None = None) -> Path:
    """Run one experiment file at ``scale``; returns the run directory (default runs/<name>[_small])."""
    from data.files import write_json
    from pipeline.common import prepare_output_dir, run_metadata

    path = Path(path)
    exp, clf, seg = load_experiment(path, scale=scale)
    base = path.resolve().parent
    default = Path("runs") / (exp.name if scale == "paper" else f"{exp.name}_{scale}")
    run = prepare_output_dir(Path(out) if out else default, marker="comparison.md")
    substituted: list[str] = []
    if clf is not None and isinstance(clf.weights, dict):
        clf, substituted = _member_weights(clf, base, exp.weights_fallback)
    data = [_resolve(base, d) for d in exp.data]
    masks = [_resolve(base, m) for m in exp.masks]
    resolved = {**dataclasses.asdict(exp), "data": [str(d) for d in data], "masks": [str(m) for m in masks],
                "scale": scale}
    if clf:
        resolved["classifier"] = clf.to_dict()
    if seg:
        resolved["segmenter"] = seg.to_dict()
    (run / "config.toml").write_text(settings_to_toml(resolved))
    seeds = {"classifier": clf.seed if clf else None, "segmenter": seg.seed if seg else None}
    write_json(run / "run.json", {**run_metadata(resolved, seed=seeds["classifier"] or 0), "seeds": seeds,
                                  "scale": scale, "substituted": substituted})
    lines = [f"# {exp.name}", "", exp.description, ""]
    if exp.task != "dataset":  # nothing is trained: the scale changes nothing
        lines += [_scale_line(exp, scale), ""]
    lines += [f"- {s}" for s in substituted] + ([""] if substituted else [])
    ctx = _Context(exp, run, base, data, masks, _resolve(base, exp.manifest), _resolve(base, exp.splits), progress,
                   verbose)
    if exp.task == "dataset":
        lines += _dataset_table(ctx)
    elif exp.task == "annotation_loop":
        from pipeline.annotation_loop import run_annotation_loop

        lines += run_annotation_loop(ctx, clf, seg)
    else:
        if clf:
            lines += _classifier_protocols(ctx, clf)
        if seg:
            lines += _segmenter_run(ctx, seg)
    lines += _assumed_section(exp) + [f"- {n}" for n in exp.notes] + ([""] if exp.notes else [])
    (run / "comparison.md").write_text("\n".join(lines) + "\n")
    return run


@dataclass
class _Context:
    """What the task runners share: the experiment, its run folder and resolved inputs."""

    exp: Experiment
    run: Path
    base: Path
    data: list[Path]
    masks: list[Path]
    manifest: Path | None
    splits: Path | None
    progress: Any
    verbose: int | None

    def records(self, mask_kinds=None):
        """The records of every data folder (masks paired from the matching mask folder)."""
        from pipeline.api import gather_folders, gather_records

        if len(self.data) == 1 and self.manifest is not None:
            masks = self.masks[0] if self.masks and self.masks[0].is_dir() else None
            return gather_records(self.data[0], manifest=self.manifest, masks=masks, mask_kinds=mask_kinds)
        return gather_folders(self.data, [m if m.is_dir() else None for m in self.masks], mask_kinds=mask_kinds)


def _member_weights(clf, base: Path, fallback: str):
    """Per-member weight files resolved against the TOML's folder; an absent one is replaced by
    ``fallback`` (when the file names one) and said; ConfigError otherwise."""
    from data.runtime.weights import is_none

    table, said = {}, []
    for member, value in clf.weights.items():
        if value == "imagenet" or is_none(value):
            table[member] = value
            continue
        file = (base / value).resolve()
        if file.exists():
            table[member] = str(file)
        elif fallback:
            table[member] = fallback
            said.append(f"{member}: weights file {file} is absent; used {fallback!r} instead (the paper's "
                        f"initialisation for it could not be had; convert one with `cxr convert-weights`)")
        else:
            raise ConfigError(f"{file}: {member} weights file absent; make it with `cxr convert-weights`, or set "
                              "weights_fallback in the experiment file")
    for line in said:
        print(f"cxr reproduce: {line}")
    return dataclasses.replace(clf, weights=table), said


def _scale_line(exp: Experiment, scale: str) -> str:
    if scale == "paper":
        return "**Scale: paper** (the settings below as the paper states them, and the assumptions listed)."
    changed = ", ".join(f"{k} = {v!r}" for k, v in exp.small.items())
    point = {"annotation_loop": "; the gap between drafts and expert masks is the point",
             "classifier": "; the gap between the two protocols is the point" if len(exp.protocols) > 1 else ""}
    return (f"**Scale: small** ({changed}), for a 2-core CPU: not the paper's settings, so its numbers are not "
            f"expected{point.get(exp.task, '')}.")


def _assumed_section(exp: Experiment) -> list[str]:
    if not exp.assumed:
        return []
    return ["## Settings the paper does not state (assumed here)", ""] + [f"- {a}" for a in exp.assumed] + [""]


def _dataset_table(ctx: _Context) -> list[str]:
    """Table I: images per class (and per class and source) beside the paper's counts."""
    from data.check import check_records
    from data.files import write_json
    from data.spec import CLASS_NAMES

    report = check_records(ctx.records())
    write_json(ctx.run / "metrics.json", report.to_dict())
    paper = ctx.exp.paper_counts
    lines = ["## Table I: images per class", "", "| class | ours | paper |", "|---|---|---|"]
    lines += [f"| {c} | {report.per_class.get(c, 0)} | {paper.get(c, '')} |" for c in CLASS_NAMES]
    lines += [f"| total | {sum(report.per_class.values())} | {sum(paper.values()) if paper else ''} |", ""]
    lines += ["| class | source | images |", "|---|---|---|"]
    lines += [f"| {c} | {s} | {n} |" for (c, s), n in sorted(report.per_class_source.items())]
    return lines + [""]


def _classifier_protocols(ctx: _Context, clf) -> list[str]:
    """Train and score the classifier under each protocol; the side-by-side table, then Table III."""
    from pipeline.classifier_jobs import evaluate_classifier_job, train_classifier_job

    records = ctx.records()
    results = {}
    for protocol in ctx.exp.protocols:
        splits, leaks = protocol_splits(records, protocol, ctx.run / f"splits_{protocol}.csv", seed=clf.seed,
                                        given=ctx.splits, progress=ctx.progress)
        model = ctx.run / f"classifier_{protocol}"
        train_classifier_job(records, model, overrides=clf.to_dict(), splits=splits, allow_leaks=True,
                             progress=ctx.progress, verbose=ctx.verbose)
        scored = "val" if protocol == "paper" else "test"
        m = evaluate_classifier_job(model, records, ctx.run / f"classifier_{protocol}_eval", splits=splits,
                                    split=scored, n_boot=ctx.exp.bootstrap, progress=ctx.progress)
        results[protocol] = (m, leaks)
    return classifier_comparison(results, ctx.exp.published)


def protocol_splits(records, protocol: str, out: Path, *, seed: int, given: Path | None = None,
                    progress=None) -> tuple[Path, int]:
    """Write the ``protocol``'s split of ``records`` to ``out``; (path, patients or near-duplicate groups
    that fall on more than one side). "paper": every image on its own, 80 % train, 20 % val (stratified
    by class, seeded); "patient": ``given`` or the patient-level 70/15/15 split."""
    from data.splits import assign_splits, find_leaks, plan_split, read_splits, write_splits

    plan = plan_split(records, splits=read_splits(given) if given and protocol == "patient" else None, seed=seed,
                      progress=progress)
    assignment = plan.assignment
    if protocol == "paper":
        assignment = assign_splits(plan.usable, {r.key: r.key for r in plan.usable}, val=0.2, test=0.0, seed=seed)
    write_splits(out, plan.usable, assignment, plan.groups)
    return out, len(find_leaks(plan.usable, assignment, plan.hashes))


def classifier_comparison(results: dict[str, tuple[dict[str, Any], int]], published=()) -> list[str]:
    """Both protocols side by side (and each member alone), per source, then Table III when given."""
    lines = ["## Classification: the paper's protocol beside a patient-disjoint one", "",
             "| protocol | scored on | accuracy (95 % CI) | macro AUC | COVID sensitivity | leaks | paper |",
             "|---|---|---|---|---|---|---|"]
    for protocol, (m, leaks) in results.items():
        paper = f"{PAPER['accuracy']:.3f} (validation)" if protocol == "paper" else ""
        covid = m.get("per_class", {}).get("covid", {}).get("sensitivity")
        lines.append(f"| {PROTOCOL_TEXT[protocol]} | {m['n']} images | {ci_text(m['accuracy'])} | "
                     f"{ci_text(m['macro']['auc'])} | {ci_text(covid) if covid else ''} | {leaks} | {paper} |")
    lines += ["", "Leaks: patients or near-duplicate groups with images on both sides of the split. Under the "
                  "paper's protocol the score is measured on validation images that can share a patient with "
                  "training images (and, with select_best or early stopping on, also chose the epoch); ours on "
                  "patients the model never saw.", ""]
    members = [(protocol, member, mm) for protocol, (m, _) in results.items()
               for member, mm in m.get("per_member", {}).items()]
    if members:  # soft vote only: a concatenated ensemble has no member heads
        lines += ["| protocol | member alone | accuracy (95 % CI) |", "|---|---|---|"]
        lines += [f"| {protocol} | {member} | {ci_text(mm['accuracy'])} |" for protocol, member, mm in members]
    for protocol, (m, _) in results.items():
        if "per_source" in m:
            lines += ["", f"Per source ({protocol}):", "", "| source | accuracy | n |", "|---|---|---|"]
            lines += [f"| {s} | {ci_text(sm['accuracy'])} | {sm['n']} |" for s, sm in m["per_source"].items()]
    lines += ["", "A large gap between sources means the model may be reading the source (e.g. pediatric "
                  "pneumonia images) rather than the disease.", ""]
    if published:
        lines += ["## Table III: published results the paper compares with, and ours", "",
                  "| work | method | COVID images | other images | validation accuracy | source |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p.get('work', '')} | {p.get('method', '')} | {p.get('covid_images', '')} | "
                  f"{p.get('other_images', '')} | {p.get('accuracy', '')} | {p.get('source', '')} |" for p in published]
        for protocol, (m, _) in results.items():
            covid = m.get("per_class", {}).get("covid", {}).get("support", "")
            lines.append(f"| this run ({protocol}), scored images | ensemble | {covid} | {m['n'] - (covid or 0)} | "
                         f"{ci_text(m['accuracy'])} | comparison above |")
        lines.append("")
    return lines


def _segmenter_run(ctx: _Context, seg) -> list[str]:
    from pipeline.segmenter_jobs import evaluate_segmenter_job, train_segmenter_job

    records = ctx.records(mask_kinds=list(dict.fromkeys(seg.mask_kinds)))
    splits = ctx.splits or (ctx.run / "splits_patient.csv" if (ctx.run / "splits_patient.csv").is_file() else None)
    train_segmenter_job(records, ctx.run / "segmenter", overrides=seg.to_dict(), splits=splits,
                        progress=ctx.progress, verbose=ctx.verbose)
    m = evaluate_segmenter_job(ctx.run / "segmenter", records, ctx.run / "segmenter_eval", kind=seg.kind,
                               splits=ctx.run / "segmenter" / "splits.csv", n_boot=ctx.exp.bootstrap,
                               progress=ctx.progress)
    return segmenter_comparison(m)


def segmenter_comparison(m: dict[str, Any], what: str = "ours") -> list[str]:
    return ["## Segmentation (held-out patient-level test split)", "",
            f"| metric | {what} (95 % CI) | paper |", "|---|---|---|",
            f"| Dice | {ci_text(m['dice'])} | {PAPER['dice']:.2f} |",
            f"| IoU | {ci_text(m['iou'])} | {PAPER['iou']:.2f} |",
            f"| precision | {ci_text(m['precision'])} | |", f"| recall | {ci_text(m['recall'])} | |",
            "", f"n = {m['n']} test images, mask kind {m['kind']}.", ""]
