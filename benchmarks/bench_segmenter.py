"""Stage-2 inference throughput on this machine: the three architectures (DenseNet121 U-Net,
MobileNetV2 U-Net, FC-DenseNet103) at 256 and 512 px, batch 1 and 4, with their parameter counts,
nominal FLOPs and a measured matrix-multiply ceiling; batch 4 also through a test-time augmentation
set (segmenter.tta, ``tta`` of a bundle: one pass per zoom beside the plain one).

    .venv/bin/python benchmarks/bench_segmenter.py [--sizes 256,512] [--repeats 3] [--tta zoom]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _measure import matmul_gflops, model_flops, time_call  # noqa: E402

from segmenter.tta import TTA_SETS, averaged_maps  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tta", default="zoom", choices=sorted(TTA_SETS))
    args = parser.parse_args()

    import keras

    from segmenter.tiramisu import build_fc_densenet103
    from segmenter.unet import build_unet

    keras.utils.set_random_seed(0)
    ceiling = matmul_gflops()
    scales = TTA_SETS[args.tta]
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        builders = (("unet-densenet121", lambda s: build_unet(input_size=s)),
                    ("unet-mobilenetv2", lambda s: build_unet(input_size=s, encoder="mobilenetv2")),
                    ("fc-densenet103", lambda s: build_fc_densenet103(input_size=s)))
        for name, build in builders:
            model = build(size)
            flops = model_flops(model)
            row = {"model": name, "size": size, "gflops": flops / 1e9, "params": model.count_params()}
            for batch in (1, 4):
                x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
                row[f"b{batch}"] = time_call(lambda model=model, x=x: model.predict_on_batch(x), args.repeats, batch)
            # x is the loop's last, batch-4 input
            row["tta"] = time_call(lambda model=model, x=x: averaged_maps(model.predict_on_batch, x, scales),
                                   args.repeats, 4)
            rows.append(row)
            keras.backend.clear_session()
            print(f"  measured {name} at {size}", file=sys.stderr, flush=True)
    print(f"\nkeras {keras.__version__} on {keras.backend.backend()}, weights=None, graph mode, XLA off; "
          f"matmul ceiling {ceiling:.1f} GFLOP/s")
    print("| model | params | size | GFLOPs/img | b1 img/s | b4 img/s | b4 GFLOP/s (share) "
          f"| b4 tta {args.tta} img/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = r["b4"] * r["gflops"]
        print(f"| {r['model']} | {r['params']:,} | {r['size']} | {r['gflops']:.1f} | {r['b1']:.2f} | {r['b4']:.2f} | "
              f"{g:.0f} ({g / ceiling:.0%}) | {r['tta']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
