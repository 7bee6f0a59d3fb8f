"""Why from-scratch training ended at chance: per member, a few epochs of plain Adam (the old
default for weights = "none": Keras' BatchNorm momentum 0.99, no re-estimation) on ../shared/data/cxr,
and after each epoch the validation accuracy with BatchNorm in inference mode (moving statistics,
what `cxr run` sees) and in training mode (the batch's own statistics); at the end the temperature
the calibration fit picks, and the accuracy once only the BatchNorm statistics are re-estimated
(data.runtime.training.reestimate_batchnorm) on the same weights.

    python benchmarks/diagnose_training.py [--size 64] [--epochs 8] [--lr 1e-3] [--members densenet121,efficientnetb0]

Eager, in-memory: about 35 s per DenseNet121 epoch on the 2-core reference CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from data import spec  # noqa: E402
from data.datasets import load_example, load_records  # noqa: E402
from data.runtime.training import reestimate_batchnorm  # noqa: E402
from data.splits import assign_splits, group_records, hash_records, select_split  # noqa: E402
from ensemble.calibration import apply_temperature, fit_temperature  # noqa: E402
from ensemble.members import build_member  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"


def predict(model, x, *, training: bool) -> np.ndarray:
    return np.concatenate([np.asarray(model(x[i:i + 16], training=training)) for i in range(0, len(x), 16)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--members", default="densenet121,efficientnetb0,vgg19")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not (DATA / "manifest.csv").is_file():
        print(f"skipped: {DATA} absent")
        return 0
    records = load_records(DATA)
    assignment = assign_splits(records, group_records(records, hash_records(records)), seed=0)
    train, val = select_split(records, assignment, "train"), select_split(records, assignment, "val")
    xt = np.stack([load_example(r, size=args.size)[0] for r in train])
    yt = np.array([spec.class_index(r.label) for r in train])
    xv = np.stack([load_example(r, size=args.size)[0] for r in val])
    yv = np.array([spec.class_index(r.label) for r in val])
    print(f"train {len(yt)} val {len(yv)} at {args.size} px", flush=True)
    out = {}
    for name in args.members.split(","):
        keras.utils.set_random_seed(0)
        member = build_member(name, weights=None, input_shape=(args.size, args.size, 3))
        model = keras.Model(member.input, member.output[f"{name}_probs"])
        model.compile(keras.optimizers.Adam(args.lr), "categorical_crossentropy", metrics=["accuracy"],
                      run_eagerly=True)
        curve = []
        for epoch in range(args.epochs):
            t0 = time.perf_counter()
            h = model.fit(xt, keras.ops.one_hot(yt, 3), batch_size=16, epochs=1, verbose=0, shuffle=True)
            p_inf, p_batch = predict(model, xv, training=False), predict(model, xv, training=True)
            curve.append({"epoch": epoch + 1, "train_acc": round(h.history["accuracy"][0], 3),
                          "val_acc_inference": round(float((p_inf.argmax(1) == yv).mean()), 3),
                          "val_acc_batch_stats": round(float((p_batch.argmax(1) == yv).mean()), 3),
                          "val_predicted_counts": np.bincount(p_inf.argmax(1), minlength=3).tolist(),
                          "seconds": round(time.perf_counter() - t0, 1)})
            print(name, curve[-1], flush=True)
        t = fit_temperature(p_inf, yv)
        reestimate_batchnorm(model, (xt[i:i + 16] for i in range(0, len(xt), 16)), max_batches=len(xt))
        p_re = predict(model, xv, training=False)
        out[name] = {"curve": curve, "temperature": round(t, 3),
                     "mean_top_probability_after_temperature":
                         round(float(apply_temperature(p_inf, t).max(1).mean()), 3),
                     "val_acc_after_bn_reestimate": round(float((p_re.argmax(1) == yv).mean()), 3),
                     "temperature_after_bn_reestimate": round(fit_temperature(p_re, yv), 3)}
        print(name, {k: v for k, v in out[name].items() if k != "curve"}, flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
