"""`cxr` command line: argument parsing and printing; the work is in pipeline's job modules
(api, run, serve, gradcam_jobs, classifier_jobs, segmenter_jobs, ...). Making pipeline.api the one
façade for every command is open work (issue "One house").

Exit codes: 0 everything succeeded, 1 some inputs failed (listed), 2 bad usage or
unusable inputs (nothing was processed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from data.errors import CxrError
from data.runtime.engines import ENGINES
from pipeline import __version__
from pipeline.export_jobs import DEFAULT_CALIBRATION_COUNT, FORMATS

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(CxrError):
    """Bad arguments or unusable inputs: printed without a traceback, exit 2."""


def _cmd_data_check(args: argparse.Namespace) -> int:
    from pipeline import api

    result = api.check_data(
        args.dir, manifest=args.manifest, masks=args.masks, splits=args.splits, max_pixels=args.max_pixels
    )
    rep = result.report
    out = sys.stdout
    print(f"{args.manifest or args.dir}: {rep.n_images} images, {rep.n_readable} readable", file=out)
    print("per class: " + ", ".join(f"{c} {n}" for c, n in sorted(rep.per_class.items())), file=out)
    if rep.per_class_source:
        print("per class and source:", file=out)
        for (label, source), n in sorted(rep.per_class_source.items()):
            print(f"  {label:<10} {source:<45} {n:>5}", file=out)
    if rep.min_size:
        print(f"image size: smallest {rep.min_size[0]}x{rep.min_size[1]}, largest {rep.max_size[0]}x{rep.max_size[1]}", file=out)
    if args.masks:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(rep.masks_per_kind.items())) or "none"
        print(f"masks paired: {kinds}", file=out)
        for kind, names in result.orphans.items():
            print(f"  {kind}: {len(names)} mask(s) match no image, e.g. {names[0]}", file=out)
    print(f"near-duplicate pairs: {len(rep.near_duplicates)}", file=out)
    for a, b, d in rep.near_duplicates[:20]:
        print(f"  {a}  ~  {b}  (distance {d})", file=out)
    if args.splits:
        print(f"leaks across splits: {len(rep.leaks)}", file=out)
        for leak in rep.leaks:
            print(f"  {leak.describe()}", file=out)
    print(f"unreadable: {len(rep.failures)}", file=out)
    for path, reason in rep.failures:
        print(f"  {path}: {reason}", file=out)
    if args.json:
        Path(args.json).write_text(json.dumps(rep.to_dict(), indent=2) + "\n")
    return EXIT_OK if rep.ok else EXIT_SOME_FAILED


def _cmd_data_split(args: argparse.Namespace) -> int:
    from pipeline import api

    res = api.split_data(args.dir, args.out, manifest=args.manifest, val=args.val, test=args.test, seed=args.seed)
    print(f"wrote {res.path} ({res.n_groups} patient/duplicate groups)")
    for split, counts in res.counts.items():
        print(f"  {split:<5} " + ", ".join(f"{c} {n}" for c, n in counts.items()) + f"  (total {sum(counts.values())})")
    if res.leaks:
        print(f"  warning: {res.leaks} near-duplicate pair(s) across splits; see `cxr data check --splits`")
    for path, reason in res.failures:
        print(f"  left out {path}: {reason}")
    return EXIT_SOME_FAILED if res.failures else EXIT_OK


def _progress(desc: str):
    from pipeline.api import progress_bar

    return lambda items: progress_bar(items, desc=desc)


def _records_from_args(args: argparse.Namespace):
    from pipeline.api import gather_records

    return gather_records(args.data, manifest=args.manifest)


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from pipeline.classifier_jobs import train_classifier_job

    overrides = {
        "members": args.members.split(",") if args.members else None,
        "variant": args.variant,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "weights": args.weights,
        "seed": args.seed,
    }
    records = _records_from_args(args)
    res = train_classifier_job(records, args.out, config=args.config, overrides=overrides, splits=args.splits,
                               allow_leaks=args.allow_leaks, progress=_progress("hashing"))
    best = min(res.history.get("val_loss", [float("nan")]))
    print(f"trained in {res.seconds:.0f} s on {res.split_counts['train']} images "
          f"(val {res.split_counts['val']}, test {res.split_counts['test']} held out); best val_loss {best:.4f}, "
          f"temperature {res.temperature:.3f}")
    print(f"model: {res.out}  (curves: {res.out / 'training_curves.png'}, splits: {res.out / 'splits.csv'})")
    for path, reason in res.failures:
        print(f"  skipped {path}: {reason}")
    return EXIT_SOME_FAILED if res.failures else EXIT_OK


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.classifier_jobs import evaluate_classifier_job
    from pipeline.report import metrics_table

    records = _records_from_args(args)
    metrics = evaluate_classifier_job(args.model, records, args.out, splits=args.splits, split=args.split,
                                      n_boot=args.bootstrap, engine=args.engine, include_training=args.include_training,
                                      progress=_progress("evaluating"))
    _print_scope(metrics["evaluated"])
    print(metrics_table(metrics))
    for source, m in metrics.get("per_source", {}).items():
        print(f"source {source}: accuracy {m['accuracy']['value']:.3f} (n = {m['n']})")
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return EXIT_SOME_FAILED if metrics["failures"] else EXIT_OK


def _print_scope(scope: dict) -> None:
    """Say which images were scored (held-out only unless --include-training)."""
    excluded = scope.get("excluded_training_images", 0)
    extra = f"; left out {excluded} image(s) the model trained or validated on (--include-training scores them)" if excluded else ""
    print(f"scored: {scope['scored']}{extra}")


def _cmd_predict(args: argparse.Namespace) -> int:
    from data import spec
    from ensemble.classifier import load_classifier
    from pipeline.classifier_jobs import classify_files

    classifier = load_classifier(args.model)
    table = classify_files(classifier, args.files)
    print("file\tlabel\t" + "\t".join(f"p_{c}" for c in spec.CLASS_NAMES))
    for i, p in zip(table.indices, table.probs):
        print(f"{args.files[i]}\t{spec.CLASS_NAMES[int(p.argmax())]}\t" + "\t".join(f"{v:.4f}" for v in p))
    for path, reason in table.failures:
        print(f"cxr: {path}: {reason}", file=sys.stderr)
    return EXIT_SOME_FAILED if table.failures else EXIT_OK


def _cmd_gradcam(args: argparse.Namespace) -> int:
    from pipeline.gradcam_jobs import gradcam_job

    res = gradcam_job(
        args.dir, args.model, args.out, members=args.members.split(",") if args.members else None,
        target=args.target, threshold=args.threshold, method=args.method, lung_masks=args.lung_masks,
        lesion_masks=args.lesion_masks, formats=[f.strip() for f in args.formats.split(",") if f.strip()],
        image_prefix=args.image_prefix, batch_size=args.batch_size, progress=_progress("grad-cam"),
    )
    print(f"{res.n_images} images, {res.n_drafts} draft masks → {res.out} (manifest.csv)")
    for label, members in res.audit.get("per_class_member", {}).items():
        for member, e in members.items():
            parts = [f"{k} {v['mean']:.3f} (n {v['n']})" for k, v in e.items() if isinstance(v, dict)]
            print(f"  audit {label:<9} {member:<14} " + ", ".join(parts))
    for path, reason in res.failures:
        print(f"  failed {path}: {reason}")
    return EXIT_SOME_FAILED if res.failures else EXIT_OK


def _cmd_import_masks(args: argparse.Namespace) -> int:
    from gradcam.imports import import_masks

    res = import_masks(args.export, args.format, args.images, args.out, kind=args.kind)
    print(f"wrote {len(res.written)} mask(s) to {Path(args.out) / args.kind}")
    for ref, problem in res.problems:
        print(f"  {ref}: {problem}")
    return EXIT_SOME_FAILED if res.problems else EXIT_OK


def _cmd_train_segmenter(args: argparse.Namespace) -> int:
    from pipeline.api import gather_records
    from pipeline.segmenter_jobs import train_segmenter_job

    # Every mask kind is paired: a lung-lesion model needs the lung masks too (the job checks the kinds).
    records = gather_records(args.images, manifest=args.manifest, masks=args.masks)
    overrides = {"arch": args.arch, "kind": args.kind, "image_size": args.image_size, "epochs": args.epochs,
                 "batch_size": args.batch_size, "weights": args.weights, "seed": args.seed,
                 "classes": args.classes, "loss": "cce_dice" if args.classes == "lung-lesion" else None}
    res = train_segmenter_job(records, args.out, config=args.config, overrides=overrides, splits=args.splits,
                              allow_leaks=args.allow_leaks, progress=_progress("hashing"))
    best = min(res.history.get("val_loss", [float("nan")]))
    print(f"trained in {res.seconds:.0f} s on {res.n_train} images (val {res.n_val}); best val_loss {best:.4f}")
    print(f"model: {res.out}")
    for path, reason in res.failures:
        print(f"  skipped {path}: {reason}")
    return EXIT_SOME_FAILED if res.failures else EXIT_OK


def _cmd_evaluate_segmenter(args: argparse.Namespace) -> int:
    from pipeline.api import gather_records
    from pipeline.segmenter_jobs import SCORE_KEYS, evaluate_segmenter_job

    records = gather_records(args.images, manifest=args.manifest, masks=args.masks, mask_kinds=[args.kind])
    m = evaluate_segmenter_job(args.model, records, args.out, kind=args.kind, splits=args.splits, split=args.split,
                               n_boot=args.bootstrap, engine=args.engine, include_training=args.include_training,
                               progress=_progress("segmenting"))
    _print_scope(m["evaluated"])
    for k in SCORE_KEYS:
        ci = m[k].get("ci95")
        print(f"{k:<9} {m[k]['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    if m["hd95"]["value"] is not None:
        print(f"hd95      {m['hd95']['value']:.1f} px (n {m['hd95']['n']})")
    print(f"n = {m['n']}; wrote {Path(args.out) / 'metrics.json'} and gallery.png")
    return EXIT_SOME_FAILED if m["failures"] else EXIT_OK


def _cmd_segment(args: argparse.Namespace) -> int:
    from pipeline.segmenter_jobs import segment_files

    rows, failures = segment_files(args.model, args.files, lung_model=args.lung_model)
    for path, res in rows:
        pct = f"{res.lung_affected_pct:.1f} %" if res.lung_affected_pct is not None else "n/a (no --lung-model)"
        print(f"{path}: {len(res.lesions)} lesion(s), lung affected {pct}")
        for les in res.lesions:
            share = f", {les.lung_pct:.1f} % of lung" if les.lung_pct is not None else ""
            print(f"  box x={les.box[0]} y={les.box[1]} w={les.box[2]} h={les.box[3]}, {les.area_px} px{share}, score {les.score:.2f}")
    for path, reason in failures:
        print(f"cxr: {path}: {reason}", file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.run import run_pipeline

    # Models and their sidecars are checked before any image is read.
    classifier, segmenter, lung = _load_models(args)
    res = run_pipeline(args.dir, args.out, classifier=classifier, segmenter=segmenter, lung_model=lung,
                       segment_all=args.segment_all, batch_size=args.batch_size, progress=_progress("run"),
                       max_pixels=args.max_pixels)
    print(f"{res.n_done} image(s) processed, {res.n_skipped} already done earlier, {res.n_failed} failed")
    print(f"report: {res.report}")
    return EXIT_SOME_FAILED if res.n_failed else EXIT_OK


def _load_models(args: argparse.Namespace):
    """(classifier, segmenter, lung model or None), loaded, checked and on the chosen engine."""
    from ensemble.classifier import load_classifier
    from segmenter.model import load_segmenter

    classifier = load_classifier(args.classifier)
    segmenter = load_segmenter(args.segmenter)
    lung = load_segmenter(args.lung_model) if args.lung_model else None
    for model in (classifier, segmenter, lung):
        if model is not None:
            model.use_engine(args.engine)
    return classifier, segmenter, lung


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export_jobs import export_model

    out = export_model(args.model, args.format, calibration=args.calibration,
                       calibration_count=args.calibration_count)
    print(f"exported {out}")
    if args.format == "onnx-int8":
        record = json.loads(out.with_name(out.name + ".json").read_text(encoding="utf-8"))
        print(f"calibrated on {record['calibration_images']} image(s); largest output difference from the float "
              f"export on {record['check_batch']} of them: {record['max_abs_diff_vs_float']:.4f}. Measure what it "
              f"costs with `cxr evaluate` (or `cxr evaluate-segmenter`) --engine onnx-int8 against --engine onnx")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.serve import ServeSettings, serve

    classifier, segmenter, lung = _load_models(args)  # checked before the server starts
    settings = ServeSettings(max_upload_bytes=args.max_upload_mb * 1024 * 1024, max_batch=args.max_batch,
                             segment_all=args.segment_all, max_pixels=args.max_pixels,
                             request_timeout_s=float(args.request_timeout),
                             max_result_bytes=args.max_results_mb * 1024 * 1024)
    print(f"cxr serve: http://{args.host}:{args.port}/ (API docs at /docs). Research use only; not for diagnosis.")
    serve(classifier, segmenter, lung, host=args.host, port=args.port, settings=settings)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    print("cxr demo: small demo models trained from scratch at 64 px; NOT for diagnosis.")
    res = run_demo(Path(args.out), cache=Path(args.cache) if args.cache else None, progress=_progress("demo"))
    print(f"{'trained' if res.trained else 'reused cached'} demo models in {res.models} (data: {res.data_source})")
    print(res.held_out)
    print(f"done in {res.seconds:.0f} s. Open the report: {res.report}")
    print("Reminder: research use only; these demo weights are not fit for any clinical decision.")
    return EXIT_OK


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from pipeline.experiments import reproduce

    run = reproduce(args.experiment, args.out, progress=_progress("reproduce"))
    print((run / "comparison.md").read_text())
    print(f"run directory: {run}")
    return EXIT_OK


def _existing_dir(value: str) -> str:
    if not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"{value}: no such folder")
    return value


def _existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return value


def _fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= f < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return f


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} must be ≥ 1")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The full `cxr` argument parser."""
    parser = argparse.ArgumentParser(
        prog="cxr",
        description="Chest X-ray triage research pipeline: classify (normal/pneumonia/covid), "
        "explain (Grad-CAM) and segment. Research use only, not for diagnosis.",
    )
    parser.add_argument("--version", action="version", version=f"cxr {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show TensorFlow's start-up lines and log notices (hidden by default)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="inspect and split data folders")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(help_parser=data)

    check = data_sub.add_parser("check", help="counts, sizes, masks, unreadable files, duplicates, leaks")
    check.add_argument("dir", type=_existing_dir, help="folder with normal/ pneumonia/ covid/ (or the --manifest root)")
    check.add_argument("--manifest", type=_existing_file, help="CSV with file,label[,patient_id][,source]")
    check.add_argument("--masks", type=_existing_dir, help="mask folder MASKDIR/<kind>/<image name>")
    check.add_argument("--splits", type=_existing_file, help="splits CSV to check for patient/duplicate leaks")
    _max_pixels_arg(check)
    check.add_argument("--json", help="also write the report as JSON to this file")
    check.set_defaults(func=_cmd_data_check)

    split = data_sub.add_parser("split", help="patient-level stratified train/val/test split")
    split.add_argument("dir", type=_existing_dir)
    split.add_argument("--out", required=True, help="splits CSV to write")
    split.add_argument("--manifest", type=_existing_file)
    split.add_argument("--val", type=_fraction, default=0.15)
    split.add_argument("--test", type=_fraction, default=0.15)
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(func=_cmd_data_split)

    train = sub.add_parser("train-classifier", help="train the stage-1 ensemble classifier")
    _data_args(train)
    train.add_argument("--splits", type=_existing_file, help="splits CSV (default: a patient-level split is made and saved)")
    train.add_argument("--out", required=True, help="model directory to create")
    train.add_argument("--config", type=_existing_file, help="TOML with ClassifierSettings keys (flags override it)")
    train.add_argument("--members", help="comma-separated subset of densenet121,efficientnetb0,vgg19")
    train.add_argument("--variant", choices=("softvote", "concat"))
    train.add_argument("--image-size", type=_positive_int)
    train.add_argument("--epochs", type=_positive_int)
    train.add_argument("--batch-size", type=_positive_int)
    train.add_argument("--weights", help="imagenet | none | a .h5 file | a folder of Keras *_notop.h5 files")
    train.add_argument("--seed", type=int)
    train.add_argument("--allow-leaks", action="store_true", help="train even if a patient or duplicate spans splits")
    train.set_defaults(func=_cmd_train_classifier)

    ev = sub.add_parser("evaluate", help="metrics, per-source table and plots for a trained classifier")
    ev.add_argument("--model", required=True, type=_existing_dir)
    _data_args(ev)
    ev.add_argument("--splits", type=_existing_file)
    ev.add_argument("--split", choices=("train", "val", "test"), default="test")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (of patients) for the 95%% CIs (0: none)")
    ev.add_argument("--include-training", action="store_true",
                    help="also score images the model trained or validated on (default: held-out images only)")
    ev.add_argument("--out", required=True)
    _engine_arg(ev)
    ev.set_defaults(func=_cmd_evaluate)

    pr = sub.add_parser("predict", help="label and probabilities per file")
    pr.add_argument("--model", required=True, type=_existing_dir)
    pr.add_argument("files", nargs="+")
    pr.set_defaults(func=_cmd_predict)

    gc = sub.add_parser("gradcam", help="heatmaps, overlays and draft masks for annotators (CVAT, Label Studio, SageMaker)")
    gc.add_argument("dir", type=_existing_dir, help="folder of images (searched recursively)")
    gc.add_argument("--model", required=True, type=_existing_dir)
    gc.add_argument("--out", required=True)
    gc.add_argument("--members", help="subset of the model's members to fuse and export (default: all)")
    gc.add_argument("--target", default="predicted", help="predicted | normal | pneumonia | covid")
    gc.add_argument("--threshold", type=float, default=0.5, help="heatmap level of the draft mask (0, 1]")
    gc.add_argument("--method", default="gradcam", choices=("gradcam", "gradcam++"))
    gc.add_argument("--lung-masks", type=_existing_dir, help="same-named lung masks: drafts stay inside, audit reports mass in lung")
    gc.add_argument("--lesion-masks", type=_existing_dir, help="same-named lesion masks for the pointing game and draft IoU")
    gc.add_argument("--formats", default="cvat,labelstudio,sagemaker")
    gc.add_argument("--image-prefix", default="", help="prefix for image references (e.g. s3://bucket/xrays/ or /data/local-files/?d=xrays/)")
    gc.add_argument("--batch-size", type=_positive_int, default=8)
    gc.set_defaults(func=_cmd_gradcam)

    im = sub.add_parser("import-masks", help="annotators' edited masks back as binary PNGs for the segmenter")
    im.add_argument("export", type=_existing_file, help="COCO JSON (cvat), Label Studio JSON export, or GT output manifest")
    im.add_argument("--format", required=True, choices=("cvat", "labelstudio", "sagemaker"))
    im.add_argument("--images", required=True, type=_existing_dir)
    im.add_argument("--out", required=True, help="mask folder; masks go to OUT/<kind>/<image stem>.png")
    im.add_argument("--kind", default="lesion")
    im.set_defaults(func=_cmd_import_masks)

    ts = sub.add_parser("train-segmenter", help="train the stage-2 lesion (or lung-field) segmenter")
    ts.add_argument("--images", required=True, type=_existing_dir, help="image folder (class folders or --manifest root)")
    ts.add_argument("--manifest", type=_existing_file)
    ts.add_argument("--masks", required=True, type=_existing_dir, help="MASKDIR with <kind>/<image name>.png")
    ts.add_argument("--kind", required=True, help="mask kind to learn: infection, opacity, lung, ...")
    ts.add_argument("--out", required=True)
    ts.add_argument("--arch", choices=("unet-densenet121", "fc-densenet103"))
    ts.add_argument("--classes", choices=("binary", "lung-lesion"),
                    help="binary lesion head (default) or background/lung/lesion softmax (needs lung masks too)")
    ts.add_argument("--config", type=_existing_file, help="TOML with SegmenterSettings keys (flags override it)")
    ts.add_argument("--image-size", type=_positive_int)
    ts.add_argument("--epochs", type=_positive_int)
    ts.add_argument("--batch-size", type=_positive_int)
    ts.add_argument("--weights", help="encoder init for the U-Net: imagenet | none | DenseNet121 no-top .h5")
    ts.add_argument("--splits", type=_existing_file)
    ts.add_argument("--seed", type=int)
    ts.add_argument("--allow-leaks", action="store_true")
    ts.set_defaults(func=_cmd_train_segmenter)

    es = sub.add_parser("evaluate-segmenter", help="Dice, IoU, precision, recall (95 %% CIs), HD95 and a gallery")
    es.add_argument("--model", required=True, type=_existing_dir)
    es.add_argument("--images", required=True, type=_existing_dir)
    es.add_argument("--manifest", type=_existing_file)
    es.add_argument("--masks", required=True, type=_existing_dir)
    es.add_argument("--kind", required=True)
    es.add_argument("--splits", type=_existing_file)
    es.add_argument("--split", choices=("train", "val", "test"), default="test")
    es.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (of patients) for the 95%% CIs")
    es.add_argument("--include-training", action="store_true",
                    help="also score images the model trained or validated on (default: held-out images only)")
    es.add_argument("--out", required=True)
    _engine_arg(es)
    es.set_defaults(func=_cmd_evaluate_segmenter)

    sg = sub.add_parser("segment", help="lesions and share of lung affected per file")
    sg.add_argument("--model", required=True, type=_existing_dir)
    sg.add_argument("--lung-model", type=_existing_dir)
    sg.add_argument("files", nargs="+")
    sg.set_defaults(func=_cmd_segment)

    rn = sub.add_parser("run", help="full pipeline on a folder: CSV/JSON results, overlays, masks, report.html")
    rn.add_argument("dir", type=_existing_dir, help="folder of X-rays (searched recursively)")
    rn.add_argument("--classifier", required=True, type=_existing_dir)
    rn.add_argument("--segmenter", required=True, type=_existing_dir)
    rn.add_argument("--lung-model", type=_existing_dir, help="lung-field segmenter for the share of lung affected")
    rn.add_argument("--out", required=True)
    rn.add_argument("--segment-all", action="store_true", help="segment every image, not only pneumonia/covid")
    rn.add_argument("--batch-size", type=_positive_int, default=8)
    _max_pixels_arg(rn)
    _engine_arg(rn)
    rn.set_defaults(func=_cmd_run)

    sv = sub.add_parser("serve", help="web API (POST /v1/predict, OpenAPI at /docs) and an upload page at /")
    sv.add_argument("--classifier", required=True, type=_existing_dir)
    sv.add_argument("--segmenter", required=True, type=_existing_dir)
    sv.add_argument("--lung-model", type=_existing_dir, help="lung-field segmenter for the share of lung affected")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_positive_int, default=8000)
    sv.add_argument("--max-upload-mb", type=_positive_int, default=64, help="larger uploads get 413 (default 64)")
    sv.add_argument("--max-batch", type=_positive_int, default=8, help="concurrent requests analysed together")
    sv.add_argument("--segment-all", action="store_true", help="segment every upload, not only pneumonia/covid")
    sv.add_argument("--request-timeout", type=_positive_int, default=60,
                    help="seconds a client may take to send a request's headers and body (default 60; slower "
                         "clients are disconnected)")
    sv.add_argument("--max-results-mb", type=_positive_int, default=256,
                    help="memory for finished results' pictures; the oldest go first (default 256)")
    _max_pixels_arg(sv)
    _engine_arg(sv)
    sv.set_defaults(func=_cmd_serve)

    ex = sub.add_parser("export", help="export a classifier or segmenter bundle (ONNX, checked against Keras)")
    ex.add_argument("--model", required=True, type=_existing_dir)
    ex.add_argument("--format", choices=FORMATS, default="onnx",
                    help="onnx (float, checked against Keras), onnx-int8 (static int8, needs --calibration) "
                         "or savedmodel")
    ex.add_argument("--calibration", type=_existing_dir,
                    help="onnx-int8: folder of training images to calibrate on (only the bundle's training "
                         "split where its splits.csv lists them)")
    ex.add_argument("--calibration-count", type=_positive_int, default=DEFAULT_CALIBRATION_COUNT,
                    help=f"onnx-int8: images to calibrate on (default {DEFAULT_CALIBRATION_COUNT})")
    ex.set_defaults(func=_cmd_export)

    dm = sub.add_parser("demo", help="train small demo models (cached) and run the pipeline on the bundled sample")
    dm.add_argument("--out", default="runs/demo", help="output folder (regenerated), default runs/demo")
    dm.add_argument("--cache", help="model cache folder (default $CXR_CACHE or ~/.cache/cxr-triage)")
    dm.set_defaults(func=_cmd_demo)

    rp = sub.add_parser("reproduce", help="run a paper experiment from experiments/*.toml")
    rp.add_argument("experiment", type=_existing_file)
    rp.add_argument("--out", help="run directory (default runs/<name>)")
    rp.set_defaults(func=_cmd_reproduce)
    return parser


def _max_pixels_arg(p: argparse.ArgumentParser) -> None:
    from data.spec import DEFAULT_MAX_PIXELS

    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels, judged from the header before decoding "
                        f"(default {DEFAULT_MAX_PIXELS // 1_000_000}M)")


def _engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="keras",
                   help="keras (default); onnx: ONNX Runtime, exported next to each model on first use "
                        "(model.onnx, checked against Keras and by sha256); onnx-int8: the int8 export made "
                        "by `cxr export --format onnx-int8`")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=_existing_dir, help="folder with normal/ pneumonia/ covid/ (or the --manifest root)")
    p.add_argument("--manifest", type=_existing_file, help="CSV with file,label[,patient_id][,source]")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cxr` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        # No command, or a group without its subcommand: show that level's help.
        getattr(args, "help_parser", parser).print_help(sys.stderr)
        return EXIT_USAGE
    from pipeline.console import quiet_start

    quiet_start(args.verbose, needs_models=args.command != "data")
    try:
        return func(args)
    except CxrError as err:
        print(f"cxr: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # a full disk or a folder that cannot be written, met outside the per-file paths
        if args.verbose:
            raise
        from pipeline.outputs import describe_os_error

        print(f"cxr: error: {describe_os_error(err)} (cxr -v shows where)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
