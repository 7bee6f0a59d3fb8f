"""`cxr` command line: argument parsing and printing only. Every command calls one function of
pipeline.api, which holds the rules (model loading, engines, defaults), so Python callers get the
same behaviour.

Exit codes: 0 everything succeeded, 1 some inputs failed (listed), 2 bad usage or
unusable inputs (nothing was processed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from data.errors import CxrError, UsageError
from pipeline import __version__, api

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
MB = 1024 * 1024
SERVE = api.ServeSettings()  # the serve flags' defaults
_LOCAL_RAY = "local"  # --ray given without an address


def _cmd_data_check(args: argparse.Namespace) -> int:
    result = api.check_data(args.dir, manifest=args.manifest, masks=args.masks, splits=args.splits,
                            max_pixels=args.max_pixels, json_out=args.json)
    rep = result.report
    print(f"{args.manifest or args.dir}: {rep.n_images} images, {rep.n_readable} readable")
    print("per class: " + ", ".join(f"{c} {n}" for c, n in sorted(rep.per_class.items())))
    if rep.per_class_source:
        print("per class and source:")
        for (label, source), n in sorted(rep.per_class_source.items()):
            print(f"  {label:<10} {source:<45} {n:>5}")
    if rep.min_size:
        print(f"image size: smallest {rep.min_size[0]}x{rep.min_size[1]}, largest {rep.max_size[0]}x{rep.max_size[1]}")
    if args.masks:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(rep.masks_per_kind.items())) or "none"
        print(f"masks paired: {kinds}")
        for kind, names in result.orphans.items():
            print(f"  {kind}: {len(names)} mask(s) match no image, e.g. {names[0]}")
    print(f"near-duplicate pairs: {len(rep.near_duplicates)}")
    for a, b, d in rep.near_duplicates[:20]:
        print(f"  {a}  ~  {b}  (distance {d})")
    if args.splits:
        print(f"leaks across splits: {len(rep.leaks)}")
        for leak in rep.leaks:
            print(f"  {leak.describe()}")
    _print_failures("unreadable", rep.failures, always=True)
    return EXIT_OK if rep.ok else EXIT_SOME_FAILED


def _cmd_data_split(args: argparse.Namespace) -> int:
    res = api.split_data(args.dir, args.out, manifest=args.manifest, val=args.val, test=args.test, seed=args.seed)
    print(f"wrote {res.path} ({res.n_groups} patient/duplicate groups)")
    for split, counts in res.counts.items():
        print(f"  {split:<5} " + ", ".join(f"{c} {n}" for c, n in counts.items()) + f"  (total {sum(counts.values())})")
    if res.leaks:
        print(f"  warning: {res.leaks} near-duplicate pair(s) across splits; see `cxr data check --splits`")
    return _print_failures("left out", res.failures)


def _print_failures(what: str, failures, *, always: bool = False) -> int:
    """List (path, reason) pairs; EXIT_SOME_FAILED when there are any."""
    if always:
        print(f"{what}: {len(failures)}")
    for path, reason in failures:
        print(f"  {path}: {reason}" if always else f"  {what} {path}: {reason}")
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _progress(desc: str):
    return lambda items: api.progress_bar(items, desc=desc)


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    overrides = {"members": args.members.split(",") if args.members else None, "variant": args.variant,
                 "image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size,
                 "weights": args.weights, "seed": args.seed, "time_budget_s": args.time_budget,
                 **_distribute_overrides(args)}
    res = api.train_classifier(args.data, args.out, manifest=args.manifest, config=args.config, overrides=overrides,
                               splits=args.splits, allow_leaks=args.allow_leaks, progress=_progress("hashing"))
    best = min(res.history.get("val_loss", [float("nan")]))
    print(f"trained in {res.seconds:.0f} s on {res.split_counts['train']} images "
          f"(val {res.split_counts['val']}, test {res.split_counts['test']} held out); best val_loss {best:.4f}, "
          f"temperature {res.temperature:.3f}")
    _print_budget(res.history)
    print(f"model: {res.out}  (curves: {res.out / 'training_curves.png'}, splits: {res.out / 'splits.csv'})")
    return _print_failures("skipped", res.failures)


def _print_budget(history: dict[str, list[float]]) -> None:
    """Under a time budget (its callback logs ``planned_epochs``): the epochs each fit ran."""
    runs = api.budget_epochs(history)
    if runs:
        print("time budget: " + ", ".join(f"{name} ran {n} epoch(s)" for name, n in runs.items()))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    metrics = api.evaluate_classifier(args.model, args.data, args.out, manifest=args.manifest, splits=args.splits,
                                      split=args.split, n_boot=args.bootstrap, engine=args.engine,
                                      include_training=args.include_training, progress=_progress("evaluating"))
    _print_scope(metrics["evaluated"])
    print(api.metrics_table(metrics))
    for source, m in metrics.get("per_source", {}).items():
        print(f"source {source}: accuracy {m['accuracy']['value']:.3f} (n = {m['n']})")
    print(f"wrote {Path(args.out) / 'metrics.json'}")
    return EXIT_SOME_FAILED if metrics["failures"] else EXIT_OK


def _print_scope(scope: dict) -> None:
    """Say which images were scored (held-out only unless --include-training)."""
    excluded = scope.get("excluded_training_images", 0)
    extra = (f"; left out {excluded} image(s) the model trained or validated on (--include-training scores them)"
             if excluded else "")
    print(f"scored: {scope['scored']}{extra}")


def _cmd_predict(args: argparse.Namespace) -> int:
    table = api.predict(args.model, args.files)
    print("file\tlabel\t" + "\t".join(f"p_{c}" for c in api.CLASS_NAMES))
    for i, p in zip(table.indices, table.probs):
        print(f"{args.files[i]}\t{api.CLASS_NAMES[int(p.argmax())]}\t" + "\t".join(f"{v:.4f}" for v in p))
    for path, reason in table.failures:
        print(f"cxr: {path}: {reason}", file=sys.stderr)
    return EXIT_SOME_FAILED if table.failures else EXIT_OK


def _cmd_gradcam(args: argparse.Namespace) -> int:
    res = api.gradcam(
        args.dir, args.model, args.out, members=args.members.split(",") if args.members else None,
        target=args.target, threshold=args.threshold, method=args.method, lung_masks=args.lung_masks,
        lesion_masks=args.lesion_masks, formats=[f.strip() for f in args.formats.split(",") if f.strip()],
        image_prefix=args.image_prefix, prefixes={"cvat": args.cvat_prefix, "labelstudio": args.labelstudio_prefix,
                                                  "sagemaker": args.sagemaker_prefix},
        copy_images=args.copy_images, pseudonymize=args.pseudonymize, pseudonym_map=args.pseudonym_map,
        batch_size=args.batch_size, progress=_progress("grad-cam"),
    )
    print(f"{res.n_images} images, {res.n_drafts} draft masks → {res.out} (manifest.csv)")
    for label, members in res.audit.get("per_class_member", {}).items():
        for member, e in members.items():
            parts = [f"{k} {v['mean']:.3f} (n {v['n']})" for k, v in e.items() if isinstance(v, dict)]
            print(f"  audit {label:<9} {member:<14} " + ", ".join(parts))
    return _print_failures("failed", res.failures)


def _cmd_import_masks(args: argparse.Namespace) -> int:
    res = api.import_masks(args.export, args.format, args.images, args.out, kind=args.kind)
    print(f"wrote {len(res.written)} mask(s) to {Path(args.out) / args.kind}")
    for ref, problem in res.problems:
        print(f"  {ref}: {problem}")
    return EXIT_SOME_FAILED if res.problems else EXIT_OK


def _distribute_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"distribute": args.distribute, "replicas": args.replicas}


def _distribute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distribute", choices=api.DISTRIBUTE_STRATEGIES,
                   help="mirrored: tf.distribute.MirroredStrategy over this host's GPUs (--batch-size stays the "
                        "global batch; BatchNorm synchronised); multiworker is refused (Keras 3 bug, see README)")
    p.add_argument("--replicas", type=_positive_int,
                   help="with --distribute mirrored: how many GPUs (default all); without GPUs, N logical CPU "
                        "devices (checks the distributed path, not faster)")


def _cmd_train_segmenter(args: argparse.Namespace) -> int:
    overrides = {"arch": args.arch, "kind": args.kind, "image_size": args.image_size, "epochs": args.epochs,
                 "batch_size": args.batch_size, "weights": args.weights, "seed": args.seed, "classes": args.classes,
                 "modality": args.modality, "time_budget_s": args.time_budget, **_distribute_overrides(args)}
    res = api.train_segmenter(args.images, args.out, masks=args.masks, manifest=args.manifest, config=args.config,
                              overrides=overrides, splits=args.splits, allow_leaks=args.allow_leaks,
                              progress=_progress("hashing"))
    best = min(res.history.get("val_loss", [float("nan")]))
    print(f"trained in {res.seconds:.0f} s on {res.n_train} images ({res.n_train_lesion_free} lesion-free; "
          f"val {res.n_val}); best val_loss {best:.4f}")
    _print_budget(res.history)
    if res.lesion_free_asked and not res.n_train_lesion_free:
        print("note: no lesion-free X-ray among the training images (a normal one, by class folder or manifest "
              "label, with the other masks the model needs), so the model saw lesion images only")
    print(f"model: {res.out}")
    return _print_failures("skipped", res.failures)


def _cmd_evaluate_segmenter(args: argparse.Namespace) -> int:
    m = api.evaluate_segmenter(args.model, args.images, args.out, masks=args.masks, kind=args.kind,
                               manifest=args.manifest, splits=args.splits, split=args.split, n_boot=args.bootstrap,
                               engine=args.engine, include_training=args.include_training,
                               progress=_progress("segmenting"))
    _print_scope(m["evaluated"])
    for k in api.SEGMENTATION_SCORES:
        print(f"{k:<9} {api.ci_text(m[k])}")
    for c, cm in m.get("per_class", {}).items():
        print(f"{c}: dice {api.ci_text(cm['dice'])}, iou {api.ci_text(cm['iou'])} (n {cm['n']})")
    sizes = api.lesion_size_text(m.get("by_lesion_size"))
    if sizes:
        print(sizes)
    if m["hd95"]["value"] is not None:
        print(f"hd95      {m['hd95']['value']:.1f} px (n {m['hd95']['n']})")
    free = m.get("lesion_free")
    if free:
        print(f"lesion-free X-rays (n {free['n']}): a lesion found on {api.ci_text(free['with_lesion_found'])} "
              f"of them; {free['marked_of']} marked {api.ci_text(free['marked_pct'], 1)} %")
    print(f"n = {m['n']}; wrote {Path(args.out) / 'metrics.json'}, cut_sweep.csv (every cut) and gallery.png")
    return EXIT_SOME_FAILED if m["failures"] else EXIT_OK


def _cmd_set_threshold(args: argparse.Namespace) -> int:
    old, new = api.set_threshold(args.model, args.cut, why=args.why)
    print(f"{args.model}: probability cut {old:g} -> {new:g} (recorded in model.json, meta.edits); "
          "cxr run, segment, serve and evaluate-segmenter use it from now on")
    return EXIT_OK


def _cmd_segment(args: argparse.Namespace) -> int:
    rows, failures = api.segment(args.model, args.files, lung_model=args.lung_model)
    for path, res in rows:
        pct = f"{res.lung_affected_pct:.1f} %" if res.lung_affected_pct is not None else "n/a (no lung field)"
        by_type = ", ".join(f"{t} {a} px" for t, a in res.area_by_type.items())
        print(f"{path}: {len(res.lesions)} lesion(s) ({by_type}), lung affected {pct}")
        for les in res.lesions:
            share = f", {les.lung_pct:.1f} % of lung" if les.lung_pct is not None else ""
            x, y, w, h = les.box
            print(f"  {les.type}: box x={x} y={y} w={w} h={h}, {les.area_px} px{share}, score {les.score:.2f}")
    for path, reason in failures:
        print(f"cxr: {path}: {reason}", file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _load_models(args: argparse.Namespace) -> api.Models:
    """The bundles of `cxr run` / `cxr serve`, checked before any image is read or the server starts."""
    return api.load_models(args.classifier, args.segmenter, args.lung_model, engine=args.engine)


def _cmd_run(args: argparse.Namespace) -> int:
    modality = api.detect_modality(args.dir) if args.modality == "auto" else args.modality
    if modality == "ct":
        return _run_ct(args)
    if args.classifier is None:
        raise UsageError("--classifier is needed for X-rays (only --modality ct runs the segmenter alone)")
    res = api.run_folder(args.dir, args.out, _load_models(args), segment_all=args.segment_all,
                         batch_size=args.batch_size, max_pixels=args.max_pixels, pseudonymize=args.pseudonymize,
                         pseudonym_map=args.pseudonym_map, ray=_ray_options(args), progress=_progress("run"))
    print(f"{res.n_done} image(s) processed, {res.n_skipped} already done earlier, {res.n_failed} failed")
    print(f"report: {res.report}")
    return EXIT_SOME_FAILED if res.n_failed else EXIT_OK


def _run_ct(args: argparse.Namespace) -> int:
    ignored = [flag for flag, on in (("--ray", args.ray is not None), ("--pseudonymize", args.pseudonymize),
                                     ("--segment-all", args.segment_all)) if on]
    if ignored:
        raise UsageError(f"{', '.join(ignored)}: not available with CT input (--modality ct)")
    if args.classifier is not None:
        print("CT input: stage 1 (an X-ray classifier) is skipped; the segmenter runs slice by slice")
    res = api.run_ct(args.dir, args.out, args.segmenter, lung_model=args.lung_model, batch_size=args.batch_size,
                     engine=args.engine, progress=_progress("volumes"))
    print(f"{res.n_done} CT input(s) processed, {res.n_skipped} already done earlier, {res.n_failed} failed")
    print(f"results: {Path(res.out) / 'ct_results.csv'}")
    return EXIT_SOME_FAILED if res.n_failed else EXIT_OK


def _ray_options(args: argparse.Namespace) -> api.RayOptions | None:
    if args.ray is None:
        return None
    return api.RayOptions(address=None if args.ray == _LOCAL_RAY else args.ray, workers=args.ray_workers,
                          ship_bundles=True if args.ray_ship_bundles else None, threads=args.ray_threads)


def _cmd_export(args: argparse.Namespace) -> int:
    res = api.export_model(args.model, args.format, calibration=args.calibration,
                           calibration_count=args.calibration_count)
    print(f"exported {res.path}")
    if args.format == "encoder":
        print(f"a classifier member on the same keras.applications model (DenseNet121 for unet-densenet121) can "
              f"start from it: weights = {{ densenet121 = \"{res.path}\", ... }}; cxr train-classifier checks "
              "that none of its test images trained it")
    if res.record is not None:
        r = res.record
        print(f"calibrated on {r['calibration_images']} image(s); largest output difference from the float "
              f"export on {r['check_batch']} of them: {r['max_abs_diff_vs_float']:.4f}. Measure what it "
              f"costs with `cxr evaluate` (or `cxr evaluate-segmenter`) --engine onnx-int8 against --engine onnx")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    models = _load_models(args)
    settings = api.ServeSettings(max_upload_bytes=args.max_upload_mb * MB, max_batch=args.max_batch,
                                 segment_all=args.segment_all, max_pixels=args.max_pixels,
                                 request_timeout_s=float(args.request_timeout),
                                 max_result_bytes=args.max_results_mb * MB)
    print(f"cxr serve: http://{args.host}:{args.port}/ (API docs at /docs). Research use only; not for diagnosis.")
    api.serve(models, host=args.host, port=args.port, settings=settings)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    print("cxr demo: small demo models trained from scratch at 64 px; NOT for diagnosis.")
    res = api.demo(args.out, cache=args.cache, progress=_progress("demo"))
    print(f"{'trained' if res.trained else 'reused cached'} demo models in {res.models} (data: {res.data_source})")
    print(res.held_out)
    print(f"done in {res.seconds:.0f} s. Open the report: {res.report}")
    print("Reminder: research use only; these demo weights are not fit for any clinical decision.")
    return EXIT_OK


def _cmd_reproduce(args: argparse.Namespace) -> int:
    run = api.reproduce(args.experiment, args.out, scale=args.scale, progress=_progress("reproduce"))
    print((run / "comparison.md").read_text())
    print(f"run directory: {run}")
    return EXIT_OK


def _cmd_convert_weights(args: argparse.Namespace) -> int:
    record = api.convert_weights(args.source, args.out)
    print(f"wrote {args.out} (DenseNet121 backbone; {len(record['dropped'])} tensor(s) not part of it dropped: "
          f"{', '.join(record['dropped'][:4]) or 'none'})")
    print(f"input scaling: {record['input_scaling_formula']}. Use it as a member's weights, e.g. in a TOML: "
          f'weights = {{ densenet121 = "{args.out}", efficientnetb0 = "imagenet", vgg19 = "imagenet" }}')
    return EXIT_OK


def _existing_dir(value: str) -> str:
    if not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"{value}: no such folder")
    return value


def _existing_file(value: str) -> str:
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return value


def _checked(convert: Callable[[str], float], ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type: ``convert`` the text, then require ``ok`` (the message says ``rule``)."""
    what = "an integer" if convert is int else "a number"

    def parse(value: str):
        try:
            number = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if not ok(number):
            raise argparse.ArgumentTypeError(f"{value} must be {rule}")
        return number

    return parse


_fraction = _checked(float, lambda f: 0.0 <= f < 1.0, "in [0, 1)")
_positive_int = _checked(int, lambda n: n >= 1, "≥ 1")
_seconds = _checked(float, lambda f: 0.0 < f < float("inf"), "a number of seconds > 0")


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
    for add in (_add_data_commands, _add_classifier_commands, _add_segmenter_commands, _add_pipeline_commands):
        add(sub)
    return parser


def _add_data_commands(sub) -> None:
    """cxr data check | split."""
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


def _add_classifier_commands(sub) -> None:
    """train-classifier, evaluate, predict, gradcam, import-masks."""
    train = sub.add_parser("train-classifier", help="train the stage-1 ensemble classifier")
    _data_args(train)
    train.add_argument("--splits", type=_existing_file,
                       help="splits CSV (default: a patient-level split is made and saved)")
    train.add_argument("--out", required=True, help="model directory to create")
    train.add_argument("--config", type=_existing_file, help="TOML with ClassifierSettings keys (flags override it)")
    train.add_argument("--members", help="comma-separated subset of densenet121,efficientnetb0,vgg19")
    train.add_argument("--variant", choices=("softvote", "concat"))
    train.add_argument("--image-size", type=_positive_int)
    train.add_argument("--epochs", type=_positive_int)
    train.add_argument("--time-budget", type=_seconds, metavar="SECONDS",
                       help="wall seconds for the fit: the epochs that fit run, the cosine schedule decays over them")
    train.add_argument("--batch-size", type=_positive_int)
    train.add_argument("--weights", help="imagenet | none | a .h5 file | a folder of Keras *_notop.h5 files")
    train.add_argument("--seed", type=int)
    train.add_argument("--allow-leaks", action="store_true", help="train even if a patient or duplicate spans splits")
    _distribute_args(train)
    train.set_defaults(func=_cmd_train_classifier)

    ev = sub.add_parser("evaluate", help="metrics, per-source table and plots for a trained classifier")
    ev.add_argument("--model", required=True, type=_existing_dir)
    _data_args(ev)
    ev.add_argument("--splits", type=_existing_file)
    ev.add_argument("--split", choices=("train", "val", "test"), default="test")
    ev.add_argument("--bootstrap", type=int, default=1000,
                    help="bootstrap resamples (of patients) for the 95%% CIs (0: none)")
    ev.add_argument("--include-training", action="store_true",
                    help="also score images the model trained or validated on (default: held-out images only)")
    ev.add_argument("--out", required=True)
    _engine_arg(ev)
    ev.set_defaults(func=_cmd_evaluate)

    pr = sub.add_parser("predict", help="label and probabilities per file")
    pr.add_argument("--model", required=True, type=_existing_dir)
    pr.add_argument("files", nargs="+")
    pr.set_defaults(func=_cmd_predict)

    gc = sub.add_parser("gradcam",
                        help="heatmaps, overlays and draft masks for annotators (CVAT, Label Studio, SageMaker)")
    gc.add_argument("dir", type=_existing_dir, help="folder of images (searched recursively)")
    gc.add_argument("--model", required=True, type=_existing_dir)
    gc.add_argument("--out", required=True)
    gc.add_argument("--members", help="subset of the model's members to fuse and export (default: all)")
    gc.add_argument("--target", default="predicted", help="predicted | normal | pneumonia | covid")
    gc.add_argument("--threshold", type=float, default=0.5, help="heatmap level of the draft mask (0, 1]")
    gc.add_argument("--method", default="gradcam", choices=("gradcam", "gradcam++"))
    gc.add_argument("--lung-masks", type=_existing_dir,
                    help="same-named lung masks: drafts stay inside, audit reports mass in lung")
    gc.add_argument("--lesion-masks", type=_existing_dir,
                    help="same-named lesion masks for the pointing game and draft IoU")
    gc.add_argument("--formats", default=",".join(api.ANNOTATION_FORMATS))
    gc.add_argument("--image-prefix", default="",
                    help="prefix for image references (e.g. s3://bucket/xrays/ or /data/local-files/?d=xrays/)")
    for tool, example in (("cvat", "a CVAT task's image path"), ("labelstudio", "/data/local-files/?d=xrays/"),
                          ("sagemaker", "s3://bucket/cxr-out/: where OUT is uploaded; every ref is then absolute")):
        gc.add_argument(f"--{tool}-prefix", help=f"image prefix in the {tool} export only (e.g. {example}); "
                                                 "default --image-prefix")
    gc.add_argument("--copy-images", action="store_true",
                    help="write every image once as 8-bit PNG under OUT/images/ and reference those (always done for "
                         "DICOM, 16-bit, TIFF and BMP inputs, with --pseudonymize, and with an s3:// SageMaker prefix)")
    _pseudonym_args(gc)
    gc.add_argument("--batch-size", type=_positive_int, default=8)
    gc.set_defaults(func=_cmd_gradcam)

    im = sub.add_parser("import-masks", help="annotators' edited masks back as binary PNGs for the segmenter")
    im.add_argument("export", type=_existing_file,
                    help="COCO JSON (cvat), Label Studio JSON export, or GT output manifest")
    im.add_argument("--format", required=True, choices=api.ANNOTATION_FORMATS)
    im.add_argument("--images", required=True, type=_existing_dir)
    im.add_argument("--out", required=True, help="mask folder; masks go to OUT/<kind>/<image stem>.png")
    im.add_argument("--kind", default="lesion")
    im.set_defaults(func=_cmd_import_masks)


def _add_segmenter_commands(sub) -> None:
    """train-segmenter, evaluate-segmenter, segment."""
    ts = sub.add_parser("train-segmenter", help="train the stage-2 lesion (or lung-field) segmenter")
    ts.add_argument("--images", required=True, type=_existing_dir,
                    help="image folder (class folders or --manifest root)")
    ts.add_argument("--manifest", type=_existing_file)
    ts.add_argument("--masks", required=True, type=_existing_dir, help="MASKDIR with <kind>/<image name>.png")
    ts.add_argument("--kind", required=True, help="mask kind to learn: infection, opacity, lung, ...")
    ts.add_argument("--out", required=True)
    ts.add_argument("--arch", choices=api.SEGMENTER_ARCHS)
    ts.add_argument("--classes", choices=api.SEGMENTER_CLASS_SCHEMES,
                    help="binary lesion head (default); lung-lesion: background/lung/lesion softmax (lung masks "
                         "too); lesion-types: background/ggo/consolidation (ggo and consolidation masks); "
                         "lung-lesion-types: background/lung/ggo/consolidation")
    ts.add_argument("--config", type=_existing_file, help="TOML with SegmenterSettings keys (flags override it)")
    ts.add_argument("--image-size", type=_positive_int)
    ts.add_argument("--epochs", type=_positive_int)
    ts.add_argument("--time-budget", type=_seconds, metavar="SECONDS",
                    help="wall seconds for the fit: the epochs that fit run, the cosine schedule decays over them")
    ts.add_argument("--batch-size", type=_positive_int)
    ts.add_argument("--weights", help="encoder init for a U-Net: imagenet | none | the encoder's no-top .h5")
    ts.add_argument("--modality", choices=api.SEGMENTER_MODALITIES,
                    help="ct: the images are CT slices in the lung window (cxr run --modality ct uses the model)")
    ts.add_argument("--splits", type=_existing_file)
    ts.add_argument("--seed", type=int)
    ts.add_argument("--allow-leaks", action="store_true")
    _distribute_args(ts)
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

    st = sub.add_parser("set-threshold", help="set a segmenter bundle's probability cut (e.g. from cut_sweep.csv)")
    st.add_argument("--model", required=True, type=_existing_dir)
    st.add_argument("--cut", required=True, type=float, help="the new cut, in (0, 1)")
    st.add_argument("--why", help="recorded with the change in the bundle (default: 'cxr set-threshold')")
    st.set_defaults(func=_cmd_set_threshold)

    sg = sub.add_parser("segment", help="lesions and share of lung affected per file")
    sg.add_argument("--model", required=True, type=_existing_dir)
    sg.add_argument("--lung-model", type=_existing_dir)
    sg.add_argument("files", nargs="+")
    sg.set_defaults(func=_cmd_segment)


def _add_pipeline_commands(sub) -> None:
    """run, serve, export, demo, reproduce."""
    rn = sub.add_parser("run", help="full pipeline on a folder: CSV/JSON results, overlays, masks, report.html")
    rn.add_argument("dir", type=_existing_dir, help="folder of X-rays, or of CT volumes (searched recursively)")
    rn.add_argument("--classifier", type=_existing_dir, help="stage-1 bundle (needed for X-rays)")
    rn.add_argument("--modality", choices=("auto", "xray", "ct"), default="auto",
                    help="ct: NIfTI volumes, DICOM series and CT slice images through the segmenter slice by slice "
                         "(auto: ct when DIR holds NIfTI files or CT DICOM files)")
    rn.add_argument("--segmenter", required=True, type=_existing_dir)
    rn.add_argument("--lung-model", type=_existing_dir, help="lung-field segmenter for the share of lung affected")
    rn.add_argument("--out", required=True)
    rn.add_argument("--segment-all", action="store_true", help="segment every image, not only pneumonia/covid")
    rn.add_argument("--batch-size", type=_positive_int, default=8)
    _pseudonym_args(rn)
    _max_pixels_arg(rn)
    _engine_arg(rn)
    ray = rn.add_argument_group("Ray (pip install 'cxr-triage[ray]')")
    ray.add_argument("--ray", nargs="?", const=_LOCAL_RAY, metavar="ADDRESS",
                     help="analyse on Ray: alone, a local Ray started here; 'auto' or ray://HOST:PORT, an existing "
                          "cluster (OUT must be writable here; the driver writes every file)")
    ray.add_argument("--ray-workers", type=_positive_int,
                     help="actors that load the models (default: one per GPU of the cluster, else one per CPU)")
    ray.add_argument("--ray-threads", type=_positive_int, default=1, help="CPUs (compute threads) per actor")
    ray.add_argument("--ray-ship-bundles", action="store_true",
                     help="send the bundles through Ray's object store (on by default with an ADDRESS; without it "
                          "every node must see the bundle folders at the same path)")
    rn.set_defaults(func=_cmd_run)

    sv = sub.add_parser("serve", help="web API (POST /v1/predict, OpenAPI at /docs) and an upload page at /")
    sv.add_argument("--classifier", required=True, type=_existing_dir)
    sv.add_argument("--segmenter", required=True, type=_existing_dir)
    sv.add_argument("--lung-model", type=_existing_dir, help="lung-field segmenter for the share of lung affected")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_positive_int, default=8000)
    sv.add_argument("--max-upload-mb", type=_positive_int, default=SERVE.max_upload_bytes // MB,
                    help=f"larger uploads get 413 (default {SERVE.max_upload_bytes // MB})")
    sv.add_argument("--max-batch", type=_positive_int, default=SERVE.max_batch,
                    help="concurrent requests analysed together")
    sv.add_argument("--segment-all", action="store_true", help="segment every upload, not only pneumonia/covid")
    sv.add_argument("--request-timeout", type=_positive_int, default=int(SERVE.request_timeout_s),
                    help="seconds a client may take to send a request's headers and body (default "
                         f"{SERVE.request_timeout_s:.0f}; slower clients are disconnected)")
    sv.add_argument("--max-results-mb", type=_positive_int, default=SERVE.max_result_bytes // MB,
                    help="memory for finished results' pictures; the oldest go first "
                         f"(default {SERVE.max_result_bytes // MB})")
    _max_pixels_arg(sv)
    _engine_arg(sv)
    sv.set_defaults(func=_cmd_serve)

    ex = sub.add_parser("export", help="export a classifier or segmenter bundle (ONNX, checked against Keras)")
    ex.add_argument("--model", required=True, type=_existing_dir)
    ex.add_argument("--format", choices=api.EXPORT_FORMATS, default="onnx",
                    help="onnx (float, checked against Keras), onnx-int8 (static int8, needs --calibration), "
                         "savedmodel, or encoder (a U-Net segmenter's encoder as keras.applications weights)")
    ex.add_argument("--calibration", type=_existing_dir,
                    help="onnx-int8: folder of training images to calibrate on (only the bundle's training "
                         "split where its splits.csv lists them)")
    ex.add_argument("--calibration-count", type=_positive_int, default=api.DEFAULT_CALIBRATION_COUNT,
                    help=f"onnx-int8: images to calibrate on (default {api.DEFAULT_CALIBRATION_COUNT})")
    ex.set_defaults(func=_cmd_export)

    dm = sub.add_parser("demo", help="train small demo models (cached) and run the pipeline on the bundled sample")
    dm.add_argument("--out", default="runs/demo", help="output folder (regenerated), default runs/demo")
    dm.add_argument("--cache", help="model cache folder (default $CXR_CACHE or ~/.cache/cxr-triage)")
    dm.set_defaults(func=_cmd_demo)

    rp = sub.add_parser("reproduce", help="run a paper experiment from experiments/*.toml")
    rp.add_argument("experiment", type=_existing_file)
    rp.add_argument("--out", help="run directory (default runs/<name>)")
    rp.add_argument("--scale", choices=api.SCALES, default="paper",
                    help="paper: the paper's settings (a machine that can afford them); small: the file's [small] "
                         "table (image size, epochs, no downloads) for a 2-core CPU; comparison.md says which ran")
    rp.set_defaults(func=_cmd_reproduce)

    cw = sub.add_parser("convert-weights", help="a chest-X-ray DenseNet121 from PyTorch (torchxrayvision) → Keras")
    cw.add_argument("source", type=_existing_file,
                    help="state dict: .pt/.pth (needs torch; e.g. torchxrayvision's densenet121-res224-all) or .npz")
    cw.add_argument("--out", required=True, help="Keras weights file to write, *.weights.h5 (a .json sidecar beside "
                                                 "it records the source and the input scaling)")
    cw.set_defaults(func=_cmd_convert_weights)


def _pseudonym_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pseudonymize", action="store_true",
                   help="name every input by a keyed pseudonym in every output (file names often carry patient "
                        "names or accession numbers); the key and the real names go to --pseudonym-map")
    p.add_argument("--pseudonym-map",
                   help="with --pseudonymize: the JSON file that keeps the key and the real names, outside --out "
                        "(default OUT.pseudonyms.json beside it); keep it private, reuse it to resume")


def _max_pixels_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-pixels", type=_positive_int, default=api.DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels, judged from the header before decoding "
                        f"(default {api.DEFAULT_MAX_PIXELS // 1_000_000}M)")


def _engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=api.ENGINES, default="keras",
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
        print(f"cxr: error: {api.describe_os_error(err)} (cxr -v shows where)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
