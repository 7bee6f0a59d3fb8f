"""The paper's annotation loop, measured (`task = "annotation_loop"` in experiments/).

The paper trained its segmenter on Grad-CAM regions that annotators cropped in SageMaker Ground Truth.
What are such drafts worth? On one patient-level split:

1. train the classifier (train/val patients) and score it on the test patients;
2. Grad-CAM of the image's own class (COVID or pneumonia) for every such image → a draft mask
   (heatmap ≥ ``draft_threshold``), exported as the annotation tools take it;
3. the drafts against the experts' masks where there are some (``infection``, else ``opacity``): IoU
   and the pointing game (gradcam.masks), per class;
4. the segmenter trained once on the drafts and once on the expert masks (train/val patients), both
   scored against the expert masks on the same test patients.

Here the drafts are used as Grad-CAM drew them (no annotator corrected them), so the Dice of step 4
is a floor for what corrected drafts give.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from data import spec
from data.datasets import DatasetError
from pipeline.report import ci_text

#: The expert masks the drafts are measured against, first present wins: COVID infection (QaTa-COV19)
#: and the radiologists' opacity (ground glass ∪ consolidation).
EXPERT_KINDS = ("infection", "opacity")


def run_annotation_loop(ctx, clf, seg) -> list[str]:
    """Run the loop (module docstring) in ``ctx.run``; the comparison.md lines."""
    from pipeline.classifier_jobs import evaluate_classifier_job, train_classifier_job
    from pipeline.experiments import protocol_splits, segmenter_comparison
    from pipeline.gradcam_jobs import gradcam_job
    from pipeline.segmenter_jobs import evaluate_segmenter_job, train_segmenter_job

    run, exp = ctx.run, ctx.exp
    records = ctx.records()
    splits, _ = protocol_splits(records, "patient", run / "splits_patient.csv", seed=clf.seed, given=ctx.splits,
                                progress=ctx.progress)
    train_classifier_job(records, run / "classifier", overrides=clf.to_dict(), splits=splits, progress=ctx.progress,
                         verbose=ctx.verbose)
    m_clf = evaluate_classifier_job(run / "classifier", records, run / "classifier_eval", splits=splits,
                                    n_boot=exp.bootstrap, progress=ctx.progress)

    lesion_records = _by_stem([r for r in records if r.label in spec.SEGMENT_CLASSES])
    expert_dir, draft_dir = run / "masks" / "expert", run / "masks" / "draft"
    for d in (expert_dir, draft_dir):
        d.mkdir(parents=True, exist_ok=True)
    for stem, r in lesion_records.items():
        kind = next((k for k in EXPERT_KINDS if k in r.masks), None)
        if kind is not None:
            _link(r.masks[kind], expert_dir / f"{stem}.png")
    audits = {}
    for label in spec.SEGMENT_CLASSES:
        folder = run / "gradcam_in" / label
        folder.mkdir(parents=True, exist_ok=True)
        for stem, r in lesion_records.items():
            if r.label == label:
                _link(r.path, folder / f"{stem}{r.path.suffix}")
        out = run / f"gradcam_{label}"
        res = gradcam_job(folder, run / "classifier", out, target=label, threshold=exp.draft_threshold,
                          lesion_masks=expert_dir, formats=("sagemaker",), progress=ctx.progress)
        audits[label] = res.audit.get("per_class_member", {}).get(label, {}).get("ensemble", {})
        for stem, r in lesion_records.items():
            draft = out / "masks" / f"{stem}{r.path.suffix}.png"
            if r.label == label and draft.is_file():
                shutil.copyfile(draft, draft_dir / f"{stem}.png")

    with_masks = [dataclasses.replace(r, masks={k: p for k, p in (("draft", draft_dir / f"{s}.png"),
                                                                     ("expert", expert_dir / f"{s}.png"))
                                               if p.exists()})
                  for s, r in lesion_records.items()]
    trained, scores = {}, {}
    for kind in ("draft", "expert"):
        model = run / f"segmenter_{kind}"
        res = train_segmenter_job(with_masks, model, overrides={**seg.to_dict(), "kind": kind}, splits=splits,
                                  progress=ctx.progress, verbose=ctx.verbose)
        trained[kind] = res.n_train
        scores[kind] = evaluate_segmenter_job(model, with_masks, run / f"segmenter_{kind}_eval", kind="expert",
                                              splits=splits, split="test", n_boot=exp.bootstrap,
                                              progress=ctx.progress)
    return _loop_lines(m_clf, audits, trained, scores) + segmenter_comparison(scores["expert"], what="expert-trained")


def _by_stem(records) -> dict[str, Any]:
    """Records by file stem (masks pair by stem); two images with one stem cannot both be paired."""
    out: dict[str, Any] = {}
    for r in records:
        if r.path.stem in out:
            raise DatasetError(f"two images named {r.path.stem!r} ({out[r.path.stem].key}, {r.key}); masks pair "
                               "by file name: rename one")
        out[r.path.stem] = r
    return out


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    os.symlink(Path(src).resolve(), dst)


def _loop_lines(m_clf, audits, trained, scores) -> list[str]:
    lines = ["## 1. Classifier (held-out test patients)", "", f"accuracy {ci_text(m_clf['accuracy'])} on "
             f"{m_clf['n']} test images.", "",
             "## 2-3. Grad-CAM drafts against the experts' masks", "",
             "| class | images drafted | pointing game: hit rate | (n) | draft IoU: mean | (n) |",
             "|---|---|---|---|---|---|"]
    for label, a in audits.items():  # n: images with an expert mask (and, for the pointing game, a non-zero map)
        hit, iou = a.get("pointing_hit", {}), a.get("draft_iou", {})
        lines.append(f"| {label} | {a.get('n', 0)} | {hit.get('mean', float('nan')):.3f} | {hit.get('n', 0)} | "
                     f"{iou.get('mean', float('nan')):.3f} | {iou.get('n', 0)} |")
    lines += ["", "## 4. The segmenter trained on the drafts vs on the expert masks", "",
              "Both scored against the expert masks on the same held-out test patients.", "",
              "| trained on | training images | Dice (95 % CI) | IoU (95 % CI) | test images |",
              "|---|---|---|---|---|"]
    for kind, m in scores.items():
        lines.append(f"| {kind} masks | {trained[kind]} | {ci_text(m['dice'])} | {ci_text(m['iou'])} | {m['n']} |")
    return lines + [""]
