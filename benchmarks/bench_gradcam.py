"""Cost of Grad-CAM on top of classification, same model, same images, one run:

* ``cls``: the ensemble's compiled predict on batches (probabilities + conv maps come out anyway);
* ``cls+cam``: the same pass plus every member's closed-form heatmap and the fused map;
* ``autograd``: the same plus one batched backward pass per member (the general path);
* ``naive``: the seeds' style: per image predict, then one tape pass per member per image.

    .venv/bin/python benchmarks/bench_gradcam.py [--size 224] [--images 16] [--batch 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _measure import median_rate as rate  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--members", default="densenet121,efficientnetb0,vgg19")
    args = parser.parse_args()

    import keras

    from ensemble.ensemble import build_ensemble, head_weights, parse_members
    from gradcam.cam import cam_from_gradients, member_heatmaps
    from gradcam.gradients import feature_gradients

    keras.utils.set_random_seed(0)
    members = parse_members(args.members)
    model = build_ensemble(members, input_shape=(args.size, args.size, 3), weights=None)
    heads = head_weights(model, members, "softvote")
    weights = [1.0 / len(members)] * len(members)
    x = np.random.default_rng(0).uniform(0, 255, (args.images, args.size, args.size, 3)).astype(np.float32)
    batches = [x[i : i + args.batch] for i in range(0, len(x), args.batch)]

    def cls():
        for b in batches:
            model.predict_on_batch(b)

    def cls_cam():
        for b in batches:
            out = model.predict_on_batch(b)
            c = np.asarray(out["probs"]).argmax(1)
            member_heatmaps({m: np.asarray(out[f"{m}_features"]) for m in members}, heads, c,
                            member_weights=weights, size=args.size)

    def autograd():
        for b in batches:
            c = np.asarray(model.predict_on_batch(b)["probs"]).argmax(1)
            for m in members:
                cam_from_gradients(*feature_gradients(model, b, feature_layer=f"{m}_features",
                                                      score_layer=f"{m}_head", class_index=c))

    def naive():
        for img in x:
            c = np.asarray(model.predict(img[None], verbose=0)["probs"]).argmax(1)
            for m in members:
                cam_from_gradients(*feature_gradients(model, img[None], feature_layer=f"{m}_features",
                                                      score_layer=f"{m}_head", class_index=c))

    results = {}
    for name, fn in (("cls", cls), ("cls+cam", cls_cam), ("autograd", autograd), ("naive", naive)):
        results[name] = rate(fn, len(x), args.repeats)
        print(f"  measured {name}", file=sys.stderr, flush=True)
    base = results["cls"]
    print(f"\nensemble {'+'.join(members)}, {args.size}x{args.size}, {args.images} images, batch {args.batch}, "
          f"weights=None, keras {keras.__version__} on {keras.backend.backend()}, median of {args.repeats}")
    print("| path | img/s | time vs classification alone |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r:.2f} | {base / r:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
