"""`cxr run` on one process against `cxr run --ray` with 1 and 2 actors: one run, one table.

The same folder (real X-rays from --data, repeated as symlinks), the same random-weight bundles
(the 3-member soft-vote ensemble at --size and the DenseNet121 U-Net at --seg-size, as in
bench_pipeline.py), every image segmented (--segment-all), on the Keras engine. Each
configuration writes into a fresh output folder. Ray is a local Ray started here with --cpus CPUs.

Ray Data hands results back in bursts, so rates are not read off arrival times: each
configuration runs twice, on a small folder (--small images) and on the full one (--images),
each a whole `cxr run` (claiming OUT to report.html) with the models already loaded here (and,
for the local run, already traced by a warm-up run).

* ``wall_s``: the full run. For Ray that includes starting the actors, which import TensorFlow,
  load the bundles and trace their predict functions.
* ``img_s``: marginal rate, (N - small) / (wall_N - wall_small): start-up cancels out.
* ``startup_s``: wall_small minus small / img_s, the fixed cost of a run.
* ``overhead_ms``: per image, 1000 / img_s minus the same for the local run (what Ray adds once
  running: pickling, the object store, the driver's writes, and fewer threads per model).
* ``write_ms``: per image of the full run, the time spent writing its files and its fsynced log
  line (``_FolderRun._write_rendered``): on Ray the driver does this alone for the whole
  cluster, so 1000 / write_ms is the ceiling of a cluster run on this storage.

    .venv/bin/python benchmarks/bench_scale.py [--images 96] [--small 16] [--size 128] [--seg-size 128] [--cpus 2]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import DEFAULT_DATA, link_folder, make_bundles  # noqa: E402

WRITE_SECONDS: list[float] = []


def _timed_writes() -> None:
    """Record the seconds of every image's writes (files and log line) in WRITE_SECONDS."""
    from pipeline import run as run_module

    real = run_module._FolderRun._write_rendered

    def timed(self, *args):
        t = time.perf_counter()
        try:
            return real(self, *args)
        finally:
            WRITE_SECONDS.append(time.perf_counter() - t)

    run_module._FolderRun._write_rendered = timed


def timed_run(folder: Path, out: Path, models, *, batch: int, ray_options=None) -> tuple[float, float]:
    """(wall seconds, mean write ms per image) of one `cxr run` (pipeline.api.run_folder, every image segmented)."""
    from pipeline import api

    WRITE_SECONDS.clear()
    start = time.perf_counter()
    res = api.run_folder(folder, out, models, segment_all=True, batch_size=batch, ray=ray_options)
    wall = time.perf_counter() - start
    if res.n_failed or res.n_skipped:
        raise SystemExit(f"{out}: {res.n_done} done, {res.n_failed} failed, {res.n_skipped} skipped")
    return wall, 1000 * sum(WRITE_SECONDS) / max(1, len(WRITE_SECONDS))


def measure(data: Path, tmp: Path, name: str, models, *, small: int, images: int, batch: int,
            ray_options=None) -> dict[str, float]:
    walls, write_ms = {}, 0.0
    for n in (small, images):
        folder = tmp / f"in{n}"
        if not folder.exists():
            link_folder(data, n, folder)
        walls[n], write_ms = timed_run(folder, tmp / f"{name}-{n}", models, batch=batch, ray_options=ray_options)
    rate = (images - small) / (walls[images] - walls[small])
    return {"wall_s": walls[images], "img_s": rate, "startup_s": walls[small] - small / rate, "write_ms": write_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--small", type=int, default=16, help="images of the short run that measures start-up")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seg-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--json")
    args = parser.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        raise SystemExit(f"{data}: not found; pass --data (the real X-rays live in ../shared/data/cxr)")

    import ray

    from pipeline import api

    _timed_writes()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clf, seg, _ = make_bundles(tmp, args.size, args.seg_size)
        models = api.load_models(clf, seg)
        rows: dict[str, dict[str, float]] = {}
        sizes = dict(small=args.small, images=args.images, batch=args.batch)
        # the local models trace their predict functions once per process: a first run keeps that out
        measure(data, tmp, "warm-up", models, **{**sizes, "images": 2 * args.small})
        rows["local"] = measure(data, tmp, "local", models, **sizes)
        t = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_start = time.perf_counter() - t
        try:
            for workers in (1, 2):
                threads = max(1, args.cpus // workers)
                rows[f"ray {workers} actor × {threads} thr"] = measure(
                    data, tmp, f"ray{workers}", models, **sizes,
                    ray_options=api.RayOptions(workers=workers, threads=threads))
        finally:
            ray.shutdown()

    local = rows["local"]["img_s"]
    for row in rows.values():
        row["overhead_ms"] = 1000 / row["img_s"] - 1000 / local
    print(f"cxr run, {args.small} then {args.images} real X-rays (segment-all), classifier {args.size} px, "
          f"segmenter {args.seg_size} px, batch {args.batch}, Keras engine; "
          f"local Ray with {args.cpus} CPUs started in {ray_start:.1f} s")
    print(f"{'configuration':<24} {'wall s':>8} {'startup s':>10} {'img/s':>7} {'overhead ms/img':>16} "
          f"{'write ms/img':>13}")
    for name, row in rows.items():
        print(f"{name:<24} {row['wall_s']:>8.1f} {row['startup_s']:>10.1f} {row['img_s']:>7.2f} "
              f"{row['overhead_ms']:>16.1f} {row['write_ms']:>13.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "ray_start_s": ray_start, "rows": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
