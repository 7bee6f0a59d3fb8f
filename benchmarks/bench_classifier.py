"""Stage-1 throughput on this machine: inference and training images/second per member and for
the ensemble, next to a measured matrix-multiply ceiling and each model's nominal FLOPs.

    .venv/bin/python benchmarks/bench_classifier.py [--size 224] [--repeats 3] [--json OUT]

Models use weights=None (throughput does not depend on the weight values), graph mode
(compiled predict/train steps, traced once before timing), XLA off. Figures are medians
over ``--repeats`` timed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _measure import matmul_gflops, model_flops, time_call  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--members", default="densenet121,efficientnetb0,vgg19")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    parser.add_argument("--json", help="also write the table as JSON")
    args = parser.parse_args()

    import keras

    from ensemble.ensemble import build_ensemble, loss_outputs, parse_members

    keras.utils.set_random_seed(0)
    members = parse_members(args.members)
    ceiling = matmul_gflops()
    rows = []
    shape = (args.size, args.size, 3)
    configs = [(m, (m,)) for m in members] + ([("ensemble", members)] if len(members) > 1 else [])
    for label, names in configs:
        model = build_ensemble(names, input_shape=shape, weights=None)
        flops = model_flops(model)
        row = {"model": label, "gflops_per_image": flops / 1e9}
        for batch in (1, 8):
            x = np.random.default_rng(0).uniform(0, 255, (batch, *shape)).astype(np.float32)
            rate = time_call(lambda model=model, x=x: model.predict_on_batch(x), args.repeats, batch)
            row[f"infer_b{batch}_img_s"] = rate
            row[f"infer_b{batch}_gflop_s"] = rate * flops / 1e9
        if not args.no_train:
            outs = loss_outputs(names, "softvote")
            trainer = keras.Model(model.input, {o: model.output[o] for o in outs})
            trainer.compile(keras.optimizers.Adam(1e-4), loss={o: "categorical_crossentropy" for o in outs},
                            jit_compile=False)
            x = np.random.default_rng(0).uniform(0, 255, (8, *shape)).astype(np.float32)
            y = {o: np.eye(3, dtype=np.float32)[np.arange(8) % 3] for o in outs}
            step = lambda trainer=trainer, x=x, y=y: trainer.train_on_batch(x, y)  # noqa: E731
            row["train_b8_img_s"] = time_call(step, args.repeats, 8, min_seconds=2.0)
        rows.append(row)
        keras.backend.clear_session()
        print(f"  measured {label}", file=sys.stderr, flush=True)

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; keras {keras.__version__} "
          f"on {keras.backend.backend()}; input {args.size}x{args.size}, weights=None, graph mode, XLA off")
    print(f"matmul ceiling (numpy float32 2048^3): {ceiling:.1f} GFLOP/s\n")
    head = "| model | GFLOPs/img | infer b1 img/s | infer b8 img/s | b8 GFLOP/s (share of ceiling) | train b8 img/s |"
    print(head)
    print("|" + "---|" * 6)
    for r in rows:
        share = r["infer_b8_gflop_s"] / ceiling
        print(f"| {r['model']} | {r['gflops_per_image']:.2f} | {r['infer_b1_img_s']:.2f} | {r['infer_b8_img_s']:.2f} | "
              f"{r['infer_b8_gflop_s']:.1f} ({share:.0%}) | {r.get('train_b8_img_s', float('nan')):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"ceiling_gflops": ceiling, "size": args.size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
