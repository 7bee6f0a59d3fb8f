"""Latency of `cxr serve` under concurrent uploads: p50/p95 per request, one at a time and N at once,
for each engine batch limit (1 = requests strictly serialised); with ``--soak N``, memory and open
connections over N rounds of 60 concurrent uploads plus slow clients instead.

    .venv/bin/python benchmarks/bench_serve.py --classifier MODEL_DIR --segmenter MODEL_DIR \
        [--lung-model DIR] [--images ../shared/data/cxr] [--requests 20] [--max-batch 1,8]
    .venv/bin/python benchmarks/bench_serve.py --classifier ... --segmenter ... --soak 10 \
        [--slow-clients 20] [--request-timeout 5] [--max-results-mb 32]

The server runs in this process (uvicorn on a free local port, loopback only, with the
configuration `cxr serve` uses) and is called over HTTP by a pool of client threads; uploads are
real X-rays from --images, the first --requests files found. The soak's RSS is this process's
(server and clients together); slow clients open sockets that send half a request and stall.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(app, settings):
    import uvicorn

    from pipeline.serve import uvicorn_config

    port = _free_port()
    server = uvicorn.Server(uvicorn_config(app, settings, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", required=True)
    parser.add_argument("--segmenter", required=True)
    parser.add_argument("--lung-model")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-batch", default="1,8")
    parser.add_argument("--soak", type=int, help="rounds of 60 concurrent uploads plus slow clients")
    parser.add_argument("--slow-clients", type=int, default=20, help="stalled connections opened per soak round")
    parser.add_argument("--request-timeout", type=float, default=5.0, help="the server's deadline in the soak (s)")
    parser.add_argument("--max-results-mb", type=int, default=32, help="the server's result memory in the soak")
    args = parser.parse_args()

    import httpx2 as httpx  # what Starlette's test client now uses (pip install -e .[test])

    from data.datasets import walk_images
    from ensemble.classifier import load_classifier
    from pipeline.serve import ServeSettings, create_app
    from segmenter.model import load_segmenter

    files = sorted(walk_images(Path(args.images)))
    if not files:
        print(f"{args.images}: no images; pass --images", file=sys.stderr)
        return 2
    uploads = [files[i % len(files)].read_bytes() for i in range(args.requests)]
    clf, seg = load_classifier(args.classifier), load_segmenter(args.segmenter)
    lung = load_segmenter(args.lung_model) if args.lung_model else None

    def post(client: httpx.Client, data: bytes) -> float:
        t = time.perf_counter()
        r = client.post("/v1/predict", files={"file": ("x", data)})
        r.raise_for_status()
        return time.perf_counter() - t

    if args.soak:
        from pipeline.serve import limit_malloc_arenas

        print(f"glibc malloc arenas capped as in `cxr serve`: {limit_malloc_arenas()}")
        settings = ServeSettings(max_batch=8, max_queue=128, request_timeout_s=args.request_timeout,
                                 max_result_bytes=args.max_results_mb * 1024 * 1024)
        return soak(create_app(clf, seg, lung, settings=settings), settings, files, args, post)

    rows = []
    for max_batch in [int(b) for b in args.max_batch.split(",")]:
        settings = ServeSettings(max_batch=max_batch)
        app = create_app(clf, seg, lung, settings=settings)
        server, thread, url = _start(app, settings)
        with httpx.Client(base_url=url, timeout=600) as client:
            for data in uploads[: min(4, len(uploads))]:  # warm-up: traces each batch shape once
                post(client, data)
            with ThreadPoolExecutor(args.requests) as pool:  # traces the batched shapes too
                list(pool.map(lambda d: post(client, d), uploads))
            sequential = [post(client, d) for d in uploads]
            n_batches = len(app.state.engine.batches)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.requests) as pool:
                concurrent = list(pool.map(lambda d: post(client, d), uploads))
            wall = time.perf_counter() - t0
        server.should_exit = True
        thread.join(timeout=30)
        timed_batches = list(app.state.engine.batches)[n_batches:]
        rows.append({
            "max_batch": max_batch,
            "seq_p50": _pct(sequential, 50), "seq_p95": _pct(sequential, 95),
            "conc_p50": _pct(concurrent, 50), "conc_p95": _pct(concurrent, 95),
            "conc_img_s": len(uploads) / wall, "mean_batch": statistics.mean(timed_batches),
        })

    print(f"{args.requests} uploads of real X-rays from {args.images}; classifier image size {clf.image_size}, "
          f"members {', '.join(clf.members)}; segmenter {seg.meta.get('arch')} at {seg.image_size}")
    n = args.requests
    print(f"| max batch | 1 at a time p50 / p95 (s) | {n} at once p50 / p95 (s) | {n} at once img/s | mean batch |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['max_batch']} | {r['seq_p50']:.3f} / {r['seq_p95']:.3f} | "
              f"{r['conc_p50']:.3f} / {r['conc_p95']:.3f} "
              f"| {r['conc_img_s']:.2f} | {r['mean_batch']:.1f} |")
    return 0


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stall(url: str, n: int) -> list[socket.socket]:
    """n connections that stop half-way: half in the headers, half in the body."""
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for i in range(n):
        s = socket.create_connection((host, int(port)))
        if i % 2:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n--b\r\n")
        else:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    return socks


def soak(app, settings, files, args, post) -> int:
    """RSS, open connections and stored results after each round; bounded by the deadline per round."""
    import gc

    import httpx2 as httpx

    uploads = [f.read_bytes() for f in files[:60]]
    uploads = [uploads[i % len(uploads)] for i in range(60)]
    server, thread, url = _start(app, settings)
    store = app.state.store
    print(f"soak: {args.soak} rounds of 60 concurrent uploads + {args.slow_clients} slow clients; request "
          f"timeout {settings.request_timeout_s:.0f} s, result memory {args.max_results_mb} MB; loopback only")
    print("| round | RSS MB | open connections (after round) | after the deadline | results kept | result MB | s |")
    print("|---|---|---|---|---|---|---|")
    t_start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as client:
        for k in range(1, args.soak + 1):
            t0 = time.perf_counter()
            stalled = _stall(url, args.slow_clients)
            with ThreadPoolExecutor(60) as pool:
                list(pool.map(lambda d: post(client, d), uploads))
            open_now = len(server.server_state.connections)
            time.sleep(settings.request_timeout_s + 1)
            open_later = len(server.server_state.connections)
            for s in stalled:
                s.close()
            gc.collect()
            print(f"| {k} | {_rss_mb():.0f} | {open_now} | {open_later} | {len(store)} | {store.bytes / 2**20:.1f} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)
    server.should_exit = True
    thread.join(timeout=30)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
