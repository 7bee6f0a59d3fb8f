"""Do the models learn? Train on real X-rays, score held-out patients, compare with baselines.

    python benchmarks/bench_quality.py [--json OUT] [--quick] [--data DIR ...] [--masks DIR ...]

Default data: ../shared/data/cxr + ../shared/data/large/cxr (masks beside each). One
patient-disjoint split (patients, manifest groups and near-duplicates never straddle it) is
used by everything trained in this run:

* baselines trained here, on the same split: a random forest on 32x32 thumbnails and a plain
  small CNN (four conv-conv-pool blocks) at the classifier's input size;
* the ensemble, trained by the production trainer (``ensemble.train.train_classifier``, the
  "scratch" preset), each member alone and the soft vote;
* the infection and lung U-Nets (``segmenter.train.train_segmenter``, "scratch" preset: the infection
  model also trains on lesion-free normal X-rays, and is scored on held-out ones for false alarms).

Printed: accuracy with a 95 % CI (bootstrap over patients), per-class sensitivity, macro AUC,
per-source accuracy, ECE, training wall time and img/s; then Dice/IoU with CIs (for the infection
U-Net also within bands of lesion size, as ``cxr evaluate-segmenter`` reports them). The sizes and
epochs in force are printed first. The default profile took 63 minutes end to end on the 2-core
reference CPU (2026-11-27, nothing else running: RF 4 s, small CNN 332 s, members 642 / 358 / 1,399 s,
infection U-Net at 96 px 591 s, lung U-Net 267 s of training); ``--quick`` took 602-648 s on 2026-11-26.
The run keeps to a wall-time budget (``--budget-minutes``, 90 for the default profile; 0: none): each
trained stage's fits run the epochs that fit its share, so a slower machine trains fewer epochs (rows
say "9 of 16 ep") and the reference CPU, inside its budget, trains them all.
U-Nets are scored by ``cxr evaluate-segmenter``'s job (pipeline.segmenter_jobs), each test image at
its own size. ``--encoder-from lung`` trains the lung U-Net first and starts the ensemble's
DenseNet121 from its encoder (``cxr export --format encoder``); ``--encoder-for infection`` starts the
infection U-Net's encoder from it instead (or ``--encoder-for ensemble infection``, both).
Results are written after each stage (``--json``), so an interrupted run keeps what it finished.
Skips with a reason when the data folders are absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data import spec  # noqa: E402
from data.datasets import DatasetError, load_example  # noqa: E402
from data.io import ImageReadError  # noqa: E402
from data.splits import assign_splits, group_records, hash_records, select_split, write_splits  # noqa: E402
from pipeline.common import patient_ids  # noqa: E402
from pipeline.report import ci_text, lesion_size_text  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DATA = [SHARED / "cxr", SHARED / "large" / "cxr"]
DEFAULT_MASKS = [SHARED / "cxr_masks", SHARED / "large" / "cxr_masks"]

#: (default, --quick) settings; each fits its time budget on the 2-core reference CPU. The default was
#: 10 member epochs and a 300-image U-Net cap while other jobs shared the CPU (87 min); measured alone
#: the members train about twice as fast, so it now takes 16 epochs and 600 images (66 min). The
#: infection U-Net then went from 64 to 96 px (``seg_size``; Dice 0.603 -> 0.644, 460 -> 794 s of
#: training); the lung U-Net stays at 64 px (``lung_size``), where it already scores 0.92. Run end to
#: end on 2026-11-27 it took 63 min (3,779 s), against the 90-minute budget.
PROFILES = {
    "default": dict(size=64, epochs=16, max_train=None, seg_size=96, lung_size=64, seg_epochs=10, lung_epochs=4,
                    seg_max_train=600, cnn_epochs=16, members=("densenet121", "efficientnetb0", "vgg19")),
    "quick": dict(size=64, epochs=3, max_train=400, seg_size=64, lung_size=64, seg_epochs=4, lung_epochs=2,
                  seg_max_train=150, cnn_epochs=6, members=("densenet121", "efficientnetb0", "vgg19")),
}

#: The whole run's wall-time budget by profile (``--budget-minutes``; 0: none). A machine slower than the
#: reference CPU trains the epochs of each fit that fit its share (``time_budget_s``); a faster one trains
#: them all, so on the reference CPU the figures are those of an unbudgeted run. ``--quick`` has none:
#: its time is mostly tracing and scoring, which no budget shortens. On the AMD machine (2026-11-27) it
#: took 20 min unbudgeted and still 16 min 28 s under 10 minutes, with every fit cut to 1-4 epochs and
#: EfficientNetB0 and VGG19 at chance (0.324, 0.347 against 0.443, 0.489 unbudgeted).
BUDGET_MINUTES = {"default": 90, "quick": 0}
#: Each trained stage's share of the budget goes by its cost: its seconds of training in the default
#: profile on the reference CPU (2026-11-27; the ensemble's three members together). The shares are made
#: again from the time left as each stage starts, so what one stage overran or left passes to the next.
STAGE_COSTS = {"cnn": 332, "ensemble": 2399, "infection": 591, "lung": 267}
#: Seconds each stage needs beside its fit's budget: its work after the fit (BatchNorm re-estimate,
#: calibration, saving, scoring the test split) and a last epoch that overruns the plan. Kept back
#: from the time left for every stage still to run. Measured on the slower 2-core AMD machine
#: (2026-11-27, ``--quick --budget-minutes 10``): the ensemble's stage took 161 s beyond its three
#: fits, the infection U-Net's 148 s beyond its 26-s budget (one epoch with its tracing, then scoring).
STAGE_RESERVE_S = {"cnn": 30, "ensemble": 240, "infection": 180, "lung": 180}


def thumbnails(records, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for r in records:
        try:
            x, _ = load_example(r, size=size)
        except ImageReadError:
            continue
        xs.append(x.mean(axis=2).ravel() / 255.0)
        ys.append(spec.class_index(r.label))
    return np.array(xs, np.float32), np.array(ys)


def score(name: str, labels: np.ndarray, probs: np.ndarray, records, *, seconds: float, images_seen: int,
          n_boot: int) -> dict:
    from ensemble.evaluate import classification_metrics, metrics_by_group

    pats = patient_ids(records)
    m = classification_metrics(labels, probs, n_boot=n_boot, groups=pats)
    per_source = metrics_by_group(labels, probs, [r.source for r in records], patients=pats, n_boot=0)
    return {
        "model": name, "n": int(len(labels)),
        "accuracy": m["accuracy"],
        "sensitivity": {c: m["per_class"][c]["sensitivity"]["value"] for c in spec.CLASS_NAMES},
        "macro_auc": m["macro"]["auc"]["value"],
        "ece": m["ece"]["value"],
        "per_source_accuracy": {s: {"value": v["accuracy"]["value"], "n": v["n"]} for s, v in per_source.items()},
        "confusion": m["confusion_matrix"]["counts"],
        # per test image, for paired comparisons between rows or runs on the same split
        "per_image": {"file": [r.key for r in records], "patient": pats, "label": np.asarray(labels).tolist(),
                      "predicted": np.asarray(probs).argmax(axis=1).tolist()},
        "train_seconds": round(seconds, 1),
        "train_img_per_s": round(images_seen / seconds, 2) if seconds else None,
    }


def random_forest(train, test, n_boot: int) -> dict:
    from sklearn.ensemble import RandomForestClassifier

    xt, yt = thumbnails(train)
    xs, ys = thumbnails(test)
    t0 = time.perf_counter()
    rf = RandomForestClassifier(n_estimators=300, class_weight="balanced", random_state=0, n_jobs=-1).fit(xt, yt)
    seconds = time.perf_counter() - t0
    return score("thumbnail RF (32x32)", ys, rf.predict_proba(xs), test, seconds=seconds, images_seen=len(yt),
                 n_boot=n_boot)


def small_cnn(train, val, test, *, size: int, epochs: int, n_boot: int, workdir: Path, budget_s: float = 0.0) -> dict:
    """Four conv-conv-pool blocks with BatchNorm, GAP, softmax; the "scratch" optimiser recipe, fitted by
    the trainers' ``fit_best`` (the last epoch kept; under ``budget_s`` > 0 the epochs that fit; its
    log in ``workdir/cnn/training_log.csv``)."""
    import keras
    from keras import layers

    from data.augment import AugmentParams
    from data.datasets import make_dataset
    from data.runtime.training import FitRecipe, fit_best, reestimate_batchnorm

    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, 3))
    x = layers.Rescaling(1 / 255.0)(inp)
    for filters in (32, 64, 128, 256):
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization(momentum=0.9)(x)
            x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    model = keras.Model(inp, layers.Dense(spec.NUM_CLASSES, activation="softmax")(x))
    recipe = FitRecipe(optimizer="adamw", learning_rate=1e-3, lr_schedule="cosine", epochs=epochs, batch_size=32,
                       warmup_epochs=1, weight_decay=0.01, select_best=False, time_budget_s=budget_s)
    common = dict(size=size, batch_size=32, seed=0)
    out_dir = workdir / "cnn"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ran = fit_best(model, make_dataset(train, shuffle=True, augment_params=AugmentParams(), cache=True, **common),
                   make_dataset(val, cache=True, **common), recipe=recipe, n_train=len(train),
                   loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1), metrics=["accuracy"],
                   out_dir=out_dir, verbose=0).epochs_run
    reestimate_batchnorm(model, (np.asarray(x) for x, _ in make_dataset(train, shuffle=True, **common)), max_batches=16)
    seconds = time.perf_counter() - t0
    xs, ys = [], []
    for x, y in make_dataset(test, **common):
        xs.append(model.predict_on_batch(np.asarray(x)))
        ys.append(np.asarray(y).argmax(1))
    row = score(f"small CNN ({size} px, {epochs_text(ran, epochs)})", np.concatenate(ys), np.concatenate(xs), test,
                seconds=seconds, images_seen=len(train) * ran, n_boot=n_boot)
    return {**row, "epochs_run": ran, "budget_s": budget_s or None}


def epochs_text(ran: int, epochs: int) -> str:
    """"16 ep", or "9 of 16 ep" where a time budget ended the fit sooner."""
    return f"{epochs} ep" if ran >= epochs else f"{ran} of {epochs} ep"


def ensemble_rows(train, val, test, *, size: int, epochs: int, members, n_boot: int, workdir: Path,
                  overrides: dict | None = None, budget_s: float = 0.0) -> list[dict]:
    from ensemble.train import ClassifierSettings, train_classifier, with_preset
    from pipeline.classifier_jobs import classify_files

    settings = ClassifierSettings(**with_preset({"weights": "none", "members": members, "image_size": size,
                                                 "epochs": epochs, "time_budget_s": budget_s,
                                                 **(overrides or {})}))
    t0 = time.perf_counter()
    res = train_classifier(settings, train, val, workdir / "classifier", verbose=0)
    seconds = time.perf_counter() - t0
    table = classify_files(res.classifier, [r.path for r in test])
    kept = [test[i] for i in table.indices]
    labels = np.array([spec.class_index(r.label) for r in kept])
    rows = []
    runs = res.validation["epochs_run"]  # by training unit: each member (soft vote), or the one joint unit
    ran = {m: runs[m] if m in runs else next(iter(runs.values())) for m in members}
    for m in members:
        s = res.validation["train_seconds"].get(m, seconds)
        rows.append({**score(f"{m} ({size} px, {epochs_text(ran[m], epochs)})", labels, table.member_probs[m], kept,
                             seconds=s, images_seen=len(train) * ran[m], n_boot=n_boot), "epochs_run": ran[m]})
    rows.append(score(f"ensemble soft vote ({len(members)})", labels, table.probs, kept, seconds=seconds,
                      images_seen=len(train) * sum(ran.values()), n_boot=n_boot))
    rows[-1]["budget_s"] = budget_s or None
    rows[-1]["validation"] = res.validation
    rows[-1]["preset"] = settings.to_dict()
    return rows


def segmenter_row(records, assignment, splits_csv: Path, *, kind: str, size: int, epochs: int, n_boot: int,
                  workdir: Path, max_train: int | None = None, overrides: dict | None = None,
                  budget_s: float = 0.0) -> dict:
    """Train the ``kind`` U-Net with the scratch preset (lesion models also on lesion-free normal X-rays,
    the cut fitted on validation) and score its held-out images with ``cxr evaluate-segmenter``'s job
    (at each image's own size): Dice/IoU on those with a ``kind`` mask; for a lesion kind, also the
    false alarms on held-out normal X-rays (share with a lesion found; share of their drawn lung marked)."""
    from data.datasets import mark_lesion_free
    from pipeline.segmenter_jobs import evaluate_segmenter_job
    from segmenter.settings import SegmenterSettings, with_preset
    from segmenter.train import train_segmenter

    settings = SegmenterSettings(**with_preset({"weights": "none", "kind": kind, "image_size": size,
                                               "epochs": epochs, "batch_size": 16, "time_budget_s": budget_s,
                                               **(overrides or {})}))
    if settings.lesion_kinds:  # normal X-rays are lesion-free; every X-ray has lungs
        records = mark_lesion_free(records, [kind])
    usable = [r for r in records if r.has_mask(kind)]
    train, val = (select_split(usable, assignment, s) for s in ("train", "val"))
    lesion_train = [r for r in train if kind in r.masks]
    if max_train and len(lesion_train) > max_train:  # the cap counts lesion images; the trainer draws the rest
        pick = set(np.random.default_rng(0).choice(len(lesion_train), max_train, replace=False).tolist())
        keep = {lesion_train[i].key for i in pick}
        train = [r for r in train if kind not in r.masks or r.key in keep]
    t0 = time.perf_counter()
    res = train_segmenter(settings, train, val, workdir / f"seg_{kind}", verbose=0)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    # held-out normal X-rays are scored for false alarms whatever lesion_free is, on their drawn lung:
    # those without one are left out (the job would otherwise score every one on its whole image)
    scored = [r for r in records if not settings.lesion_kinds or kind in r.masks or settings.lung_kind in r.masks
              or r.label not in spec.LESION_FREE_CLASSES]
    m = evaluate_segmenter_job(workdir / f"seg_{kind}", scored, workdir / f"seg_{kind}_eval", kind=kind,
                               splits=splits_csv, split="test", n_boot=n_boot, gallery=0)
    ran = len(res.history["loss"])
    tta = "" if settings.tta == "none" else f", tta {settings.tta}"
    start = "" if settings.weights in (None, "none") else f", encoder from {Path(settings.weights).parent.name}"
    row = {"model": f"{kind} U-Net DenseNet121 ({size} px, {epochs_text(ran, epochs)}{tta}{start})",
           "n_train": res.n_train,
           "n_train_lesion_free": res.n_train_lesion_free, "n_test": m["n"], "dice": m["dice"], "iou": m["iou"],
           "pooled_dice": m["pooled"]["dice"], "train_seconds": round(seconds, 1),
           "train_img_per_s": round(res.n_train * ran / seconds, 2), "epochs_run": ran, "budget_s": budget_s or None,
           "eval_seconds": round(time.perf_counter() - t0, 1),
           "threshold": m["threshold"], "threshold_fit": res.segmenter.meta.get("threshold_fit"),
           "dice_by_lesion_size": m.get("by_lesion_size")}
    free = m.get("lesion_free")
    if free:
        row["lesion_free_test"] = {"n": free["n"], "with_lesion_found": free["with_lesion_found"],
                                   "marked_pct": free["marked_pct"], "marked_of": free["marked_of"]}
    return row


def lung_encoder(bundle: Path, usable, assignment) -> Path:
    """Export the lung U-Net's encoder (``cxr export --format encoder``), checked by
    ``cxr train-classifier``'s own leak check against this run's test split (it trains on this run's
    split, so no test image or patient should be among what it saw)."""
    from pipeline.classifier_jobs import check_encoder_leaks
    from pipeline.export_jobs import export_model

    path = export_model(bundle, "encoder")
    check_encoder_leaks(usable, assignment, {"densenet121": str(path)}, allow_leaks=False)
    return path


def print_tables(result: dict) -> None:
    print("\n| model | accuracy [95 % CI] | sens. normal / pneumonia / covid | macro AUC | ECE | per-source accuracy | "
          "train s | train img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["classifiers"]:
        sens = " / ".join("-" if v is None else f"{v:.2f}" for v in r["sensitivity"].values())
        src = ", ".join(f"{s} {v['value']:.2f} (n {v['n']})" for s, v in r["per_source_accuracy"].items())
        auc = "-" if r["macro_auc"] is None else f"{r['macro_auc']:.3f}"
        print(f"| {r['model']} | {ci_text(r['accuracy'])} | {sens} | {auc} | {r['ece']:.3f} | {src} | "
              f"{r['train_seconds']} | {r['train_img_per_s']} |")
    if result.get("segmenters"):
        print("\n| segmenter | n train (lesion-free) / test | Dice [95 % CI] | IoU [95 % CI] | threshold (val Dice "
              "there / at 0.5) | normal test X-rays: with a lesion found; % marked | train s | train img/s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["segmenters"]:
            fit = r.get("threshold_fit") or {}
            cut = f"{r.get('threshold', '-')}" + (f" ({fit['val_dice']:.3f} / {fit['val_dice_at_0.5']:.3f})"
                                                  if "val_dice" in fit else "")
            free = r.get("lesion_free_test")
            alarms = (f"{ci_text(free['with_lesion_found'], 2)}; {ci_text(free['marked_pct'], 1)} of "
                      f"{free['marked_of']} (n {free['n']})" if free else "-")
            print(f"| {r['model']} | {r['n_train']} ({r.get('n_train_lesion_free', 0)}) / {r['n_test']} | "
                  f"{ci_text(r['dice'])} | {ci_text(r['iou'])} | {cut} | {alarms} | {r['train_seconds']} | "
                  f"{r['train_img_per_s']} |")
        for r in result["segmenters"]:
            sizes = lesion_size_text(r.get("dice_by_lesion_size"))
            if sizes:
                print(f"\n{r['model']}: {sizes}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here (after each stage)")
    ap.add_argument("--quick", action="store_true", help="small sizes and few epochs (about 10 minutes)")
    ap.add_argument("--data", type=Path, nargs="+", default=DEFAULT_DATA)
    ap.add_argument("--masks", type=Path, nargs="+", default=DEFAULT_MASKS)
    ap.add_argument("--work", type=Path, help="keep the trained models here (default: a temporary folder)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--budget-minutes", type=float,
                    help=f"wall time for the whole run; each trained stage runs the epochs that fit its share "
                         f"(default {BUDGET_MINUTES['default']}, with --quick {BUDGET_MINUTES['quick']}; 0: none)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("rf", "cnn", "ensemble", "infection", "lung"))
    for key in ("size", "epochs", "max_train", "seg_size", "lung_size", "seg_epochs", "lung_epochs", "seg_max_train",
                "cnn_epochs"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int)
    ap.add_argument("--members", type=lambda s: tuple(s.split(",")), help="ensemble members, comma-separated")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a classifier setting over the scratch preset, as TOML "
                         "(e.g. learning_rate=3e-3, augment=false)")
    ap.add_argument("--encoder-from", choices=("lung",),
                    help="start the ensemble's DenseNet121 (or what --encoder-for names) from the encoder of the "
                         "lung U-Net trained in this run (on this run's training split; the lung step then runs first)")
    ap.add_argument("--encoder-for", nargs="+", choices=("ensemble", "infection"), default=["ensemble"],
                    help="what --encoder-from starts: the ensemble's DenseNet121 (default), the infection U-Net's "
                         "encoder, or both")
    ap.add_argument("--seg-set", dest="seg_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of both segmenters over the scratch preset, as TOML (e.g. lesion_free=0)")
    args = ap.parse_args(argv)
    import tomllib

    overrides = tomllib.loads("\n".join(args.overrides))
    seg_overrides = tomllib.loads("\n".join(args.seg_overrides))
    if args.encoder_from and ({"lung", *args.encoder_for} & set(args.skip)):
        ap.error(f"--encoder-from lung trains the lung U-Net and starts {' and '.join(args.encoder_for)} from it: "
                 "do not skip them")
    missing = [str(d) for d in args.data if not d.is_dir()]
    if missing:
        print(f"skipped: data folder(s) {', '.join(missing)} absent (this benchmark needs ../shared/data)")
        return 0
    profile = dict(PROFILES["quick" if args.quick else "default"])
    budget_minutes = BUDGET_MINUTES["quick" if args.quick else "default"] if args.budget_minutes is None \
        else args.budget_minutes
    if not (budget_minutes >= 0 and np.isfinite(budget_minutes)):
        ap.error(f"--budget-minutes {budget_minutes} must be a number of minutes ≥ 0 (0: no budget)")
    profile.update({k: v for k, v in vars(args).items() if k in profile and v is not None})
    if args.encoder_from and "ensemble" in args.encoder_for and "densenet121" not in profile["members"]:
        ap.error("--encoder-from lung gives DenseNet121 its start: keep densenet121 among --members")
    import keras

    t_start = time.perf_counter()
    from data.runtime.training import share_of_time_left
    from pipeline.api import gather_folders

    records = gather_folders(args.data, args.masks, ["infection", "lung"])
    hashes = hash_records(records)
    usable = [r for r in records if r.key in hashes]
    groups = group_records(usable, hashes)
    assignment = assign_splits(usable, groups, val=0.1, test=0.2, seed=0)
    train, val, test = (select_split(usable, assignment, s) for s in ("train", "val", "test"))
    if profile["max_train"] and len(train) > profile["max_train"]:
        rng = np.random.default_rng(0)
        train = [train[i] for i in sorted(rng.choice(len(train), profile["max_train"], replace=False))]
    result = {"settings": {**profile, "members": list(profile["members"]), "budget_minutes": budget_minutes,
                           "overrides": overrides,
                           "segmenter_overrides": seg_overrides,
                           "data": [str(d) for d in args.data],
                           "n_train": len(train), "n_val": len(val), "n_test": len(test),
                           "test_patients": len(set(patient_ids(test))), "keras": keras.__version__,
                           "backend": keras.backend.backend(), "cpus": os.cpu_count()},
              "classifiers": [], "segmenters": []}
    print("settings:", json.dumps(result["settings"]), flush=True)

    def save() -> None:
        result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        splits_csv = work / "splits.csv"  # the one split, as `cxr data split` writes it, for the segmenter scoring
        write_splits(splits_csv, usable, assignment, groups)
        def classifier_step(name, rows):
            result["classifiers"] += rows
            print(f"[{name}] done: " + "; ".join(f"{r['model']} {ci_text(r['accuracy'])}" for r in rows[-4:]),
                  flush=True)

        def segmenter_step(kind, size, epochs, budget_s):
            try:
                row = segmenter_row(usable, assignment, splits_csv, kind=kind, size=size, epochs=epochs,
                                    n_boot=args.bootstrap, workdir=work, max_train=profile["seg_max_train"],
                                    overrides={**seg_overrides, **seg_starts.get(kind, {})}, budget_s=budget_s)
            except (ValueError, DatasetError) as err:
                print(f"[{kind}] skipped: {err}")
                return
            result["segmenters"].append(row)
            print(f"[{kind}] Dice {ci_text(row['dice'])}", flush=True)

        seg_starts: dict[str, dict] = {}  # kind -> its start (--encoder-for infection)

        def encoder_step():
            shutil.copy(splits_csv, work / "seg_lung" / "splits.csv")  # the record of what the encoder learnt from
            encoder = lung_encoder(work / "seg_lung", usable, assignment)
            if "ensemble" in args.encoder_for:
                overrides["preset"] = "scratch"
                overrides["weights"] = {m: str(encoder) if m == "densenet121" else "none" for m in profile["members"]}
                result["settings"]["overrides"] = overrides
            if "infection" in args.encoder_for:  # a path is not "none": name the preset
                seg_starts["infection"] = {"preset": "scratch", "weights": str(encoder)}
                result["settings"]["infection_start"] = seg_starts["infection"]
            print(f"[encoder] {' and '.join(args.encoder_for)} start(s) from {encoder}", flush=True)

        steps = [  # each takes its fit's time budget in seconds (0: none)
            ("rf", lambda b: classifier_step("rf", [random_forest(train, test, args.bootstrap)])),
            ("cnn", lambda b: classifier_step("cnn", [small_cnn(train, val, test, size=profile["size"],
                                                                epochs=profile["cnn_epochs"], n_boot=args.bootstrap,
                                                                workdir=work, budget_s=b)])),
            ("ensemble", lambda b: classifier_step("ensemble", ensemble_rows(
                train, val, test, size=profile["size"], epochs=profile["epochs"], members=profile["members"],
                n_boot=args.bootstrap, workdir=work, overrides=overrides, budget_s=b))),
            ("infection", lambda b: segmenter_step("infection", profile["seg_size"], profile["seg_epochs"], b)),
            ("lung", lambda b: segmenter_step("lung", profile["lung_size"], profile["lung_epochs"], b)),
        ]
        if args.encoder_from:  # the lung U-Net first, then its encoder for the ensemble
            steps.sort(key=lambda step: step[0] != "lung")
            steps.insert(1, ("encoder", lambda b: encoder_step()))
        steps = [step for step in steps if step[0] not in args.skip]
        deadline = t_start + 60 * budget_minutes
        for i, (name, step) in enumerate(steps):
            budget_s = 0.0
            if budget_minutes and name in STAGE_COSTS:
                to_come = [n for n, _ in steps[i:] if n in STAGE_COSTS]
                left = deadline - time.perf_counter() - sum(STAGE_RESERVE_S[n] for n in to_come)
                budget_s = share_of_time_left(left, {n: STAGE_COSTS[n] for n in to_come}, name)  # > 0: on
                print(f"[{name}] time budget for its training: {budget_s:.0f} s"
                      + (" (none left: one epoch)" if budget_s < 1 else ""), flush=True)
            t0 = time.perf_counter()
            step(budget_s)
            print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)
            save()
    save()
    print_tables(result)
    print(f"\nwall time {result['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
