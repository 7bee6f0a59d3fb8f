"""The whole pipeline against the arithmetic: one run, one table, the same figures as JSON.

Models are the paper's architectures with random weights (weights=None: nothing is downloaded;
speed does not depend on the values): the 3-member soft-vote ensemble at --size and the
DenseNet121 U-Net at --seg-size, saved as bundles and loaded like trained ones.

* ``ceiling_gflops``: numpy float32 matrix multiply (BLAS), best of 5.
* ``keras_predict_img_s``: ``model.predict`` of the ensemble (Keras, batch --batch).
* ``cls_img_s``: ``Classifier.predict`` on --engine (probabilities and conv maps, one pass).
* ``cls_cam_img_s``: the same plus every member's closed-form Grad-CAM and the fused map.
* ``run_img_s``: ``cxr run --segment-all`` on --images files (real X-rays from --data, repeated),
  decode to report, on --engine. Every image is segmented so that the work matches ``naive``.
* ``naive_img_s``: the seeds' loop on the same files: per image decode, ``model.predict``, one
  Grad-CAM tape pass per member, ``segmenter.predict``, overlays written.
* ``run_ceiling_share``: nominal GFLOP/s achieved by ``run`` over ``ceiling_gflops``.
* ``rss_mb_<N>``: peak RSS of a ``cxr run`` process over N files (for each of --rss-files),
  with models at --rss-size so that large N finish on a CPU.

With ``--engine onnx-int8`` both models are first quantised (`cxr export --format onnx-int8`),
calibrated on --calibration real X-rays; that one-off cost is ``engine_setup_s``.

    .venv/bin/python benchmarks/bench_pipeline.py [--images 48] [--engine onnx|onnx-int8|keras] [--json OUT]
        [--rss-files 1000,10000] [--rss-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _measure import matmul_gflops, model_flops  # noqa: E402
from _measure import median_rate as rate  # noqa: E402

from data.runtime.engines import ENGINES  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr"


def make_bundles(out: Path, size: int, seg_size: int) -> tuple[Path, Path, float]:
    """Random-weight classifier and segmenter bundles; returns their paths and nominal GFLOPs/image."""
    import keras

    from data.runtime.bundle import save_bundle
    from ensemble.classifier import save_classifier
    from ensemble.ensemble import build_ensemble
    from segmenter.model import KIND
    from segmenter.settings import SegmenterSettings, build_segmenter

    keras.utils.set_random_seed(0)
    members = ("densenet121", "efficientnetb0", "vgg19")
    clf = build_ensemble(members, input_shape=(size, size, 3), weights=None)
    save_classifier(clf, out / "clf", members=members, variant="softvote", image_size=size, config={"bench": True})
    settings = SegmenterSettings(arch="unet-densenet121", kind="infection", image_size=seg_size, weights=None)
    seg = build_segmenter(settings)
    save_bundle(seg, out / "seg", kind=KIND, image_size=seg_size, config=settings.to_dict(),
                meta={"arch": settings.arch, "kind": settings.kind, "classes": "binary", "threshold": 0.5,
                      "min_lesion_area": 16, "resize_mode": "stretch", "clahe": False})
    return out / "clf", out / "seg", (model_flops(clf) + model_flops(seg)) / 1e9


def link_folder(data: Path, n: int, out: Path) -> Path:
    """``out`` with n symlinks cycling over the PNGs under ``data``."""
    files = sorted(data.rglob("*.png"))
    if not files:
        raise SystemExit(f"{data}: no PNG files; pass --data (the real X-rays live in ../shared/data/cxr)")
    out.mkdir(parents=True)
    for i in range(n):
        os.symlink(files[i % len(files)], out / f"{i:06d}.png")
    return out


def int8_exports(bundles: tuple[Path, ...], data: Path, count: int) -> None:
    """`cxr export --format onnx-int8` for each bundle, calibrated on ``count`` images of ``data``."""
    from pipeline.export_jobs import export_model

    for b in bundles:
        export_model(b, "onnx-int8", calibration=data, calibration_count=count)


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS of ``cmd`` (run in a fresh interpreter so only that child is counted)."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    res = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if res.returncode not in (0, 1):
        raise SystemExit(f"cxr run failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=48, help="files for run_img_s (real X-rays, repeated)")
    parser.add_argument("--naive-images", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seg-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--engine", choices=ENGINES, default="onnx")
    parser.add_argument("--calibration", type=int, default=16, help="calibration images for --engine onnx-int8")
    parser.add_argument("--rss-files", default="", help="e.g. 1000,10000 (each is a full cxr run)")
    parser.add_argument("--rss-size", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()

    from data.io import read_image
    from data.preprocess import preprocess_image, to_rgb_float
    from ensemble.classifier import load_classifier
    from gradcam.cam import cam_from_gradients, member_heatmaps
    from gradcam.gradients import feature_gradients
    from gradcam.masks import mask_overlay, overlay
    from pipeline.run import run_pipeline
    from segmenter.model import load_segmenter

    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    res: dict[str, float | int | str] = {"engine": args.engine, "size": args.size, "seg_size": args.seg_size,
                                         "batch": args.batch, "images": args.images}
    res["ceiling_gflops"] = matmul_gflops()
    clf_dir, seg_dir, gflops = make_bundles(tmp / "models", args.size, args.seg_size)
    res["pipeline_gflops_per_image"] = gflops
    keras_clf = load_classifier(clf_dir)
    clf = load_classifier(clf_dir)
    seg = load_segmenter(seg_dir)
    t = time.perf_counter()
    if args.engine == "onnx-int8":
        int8_exports((clf_dir, seg_dir), Path(args.data), args.calibration)
    clf.use_engine(args.engine)
    seg.use_engine(args.engine)
    res["engine_setup_s"] = time.perf_counter() - t
    x = np.random.default_rng(0).uniform(0, 255, (4 * args.batch, args.size, args.size, 3)).astype(np.float32)
    batches = [x[i : i + args.batch] for i in range(0, len(x), args.batch)]
    heads = clf.head_weights()

    res["keras_predict_img_s"] = rate(lambda: keras_clf.model.predict(x, batch_size=args.batch, verbose=0), len(x))
    res["cls_img_s"] = rate(lambda: [clf.predict(b) for b in batches], len(x))

    def cls_cam():
        for b in batches:
            p = clf.predict(b)
            member_heatmaps(p.features, heads, p.probs.argmax(1), member_weights=clf.member_weights, size=args.size)

    res["cls_cam_img_s"] = rate(cls_cam, len(x))
    print("  measured classification", file=sys.stderr, flush=True)

    folder = link_folder(Path(args.data), args.images, tmp / "images")
    run_pipeline(folder, tmp / "warm", classifier=clf, segmenter=seg, segment_all=True, batch_size=args.batch)
    t = time.perf_counter()
    run_pipeline(folder, tmp / "run", classifier=clf, segmenter=seg, segment_all=True, batch_size=args.batch)
    res["run_img_s"] = args.images / (time.perf_counter() - t)
    res["run_ceiling_share"] = res["run_img_s"] * gflops / res["ceiling_gflops"]
    print("  measured cxr run", file=sys.stderr, flush=True)

    files = sorted(folder.iterdir())[: args.naive_images]
    model, members = keras_clf.model, keras_clf.members
    keras_seg = load_segmenter(seg_dir)

    def naive():
        import cv2

        for f in files:
            image = read_image(f)
            xi, geo = preprocess_image(image, size=args.size)
            out = model.predict(xi[None], verbose=0)
            c = np.asarray(out["probs"]).argmax(1)
            cams = [cam_from_gradients(*feature_gradients(model, xi[None], feature_layer=f"{m}_features",
                                                          score_layer=f"{m}_head", class_index=c))[0]
                    for m in members]
            heat = np.mean([cv2.resize(np.asarray(cm, np.float32), (args.size, args.size)) for cm in cams], axis=0)
            si, sgeo = preprocess_image(image, size=args.seg_size)
            prob = keras_seg.model.predict(si[None], verbose=0)[0, ..., 0]
            original = to_rgb_float(image)
            overlay(original, geo.map_to_original(heat))
            mask_overlay(original, sgeo.to_original(prob) > 0.5)

    res["naive_img_s"] = rate(naive, len(files), repeats=1)
    print("  measured naive loop", file=sys.stderr, flush=True)

    for n in [int(v) for v in args.rss_files.split(",") if v]:
        small = make_bundles(tmp / f"rss_models_{n}", args.rss_size, max(64, args.rss_size))
        if args.engine == "onnx-int8":
            int8_exports(small[:2], Path(args.data), args.calibration)
        big = link_folder(Path(args.data), n, tmp / f"rss_images_{n}")
        cmd = [str(Path(sys.executable).with_name("cxr")), "run", str(big), "--classifier", str(small[0]),
               "--segmenter", str(small[1]), "--out", str(tmp / f"rss_out_{n}"), "--engine", args.engine]
        t = time.perf_counter()
        res[f"rss_mb_{n // 1000}k" if n % 1000 == 0 else f"rss_mb_{n}"] = peak_rss_mb(cmd)
        res[f"rss_run_s_{n}"] = time.perf_counter() - t
        print(f"  measured RSS for {n} files", file=sys.stderr, flush=True)

    print(f"\n{args.images} real X-rays ({args.data}), ensemble densenet121+efficientnetb0+vgg19 at {args.size}, "
          f"U-Net DenseNet121 at {args.seg_size}, batch {args.batch}, engine {args.engine}, random weights")
    print("| figure | value |")
    print("|---|---|")
    for k, v in res.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
