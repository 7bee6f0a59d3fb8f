"""`cxr serve`: the two-stage pipeline behind a web API and an upload page (FastAPI + uvicorn).

- Models load once. One worker thread owns them: requests queue up and are analysed in
  batches of up to ``max_batch`` (waiting at most ``max_wait_ms`` for company), so concurrent
  users neither corrupt each other nor each pay for a separate pass. The analysis is
  :func:`pipeline.analysis.analyse_batch`, the same code ``cxr run`` uses.
- Uploads are judged by their bytes, never by name or declared type: over ``max_upload_bytes``
  → 413 (FastAPI's ``max_body_size``: from the Content-Length, or counted as the body streams in); not PNG, JPEG,
  BMP, TIFF or DICOM by content → 415; decodable format but a broken or refused image → 422.
- Nothing from the client is used on disk: results (overlay and mask PNGs) live in memory
  under a 256-bit random token, expire after ``result_ttl_s`` and are capped in number.
- DICOM patient tags are never read into the response (data.io decodes pixels only), and the
  client's file name is not echoed; error bodies never echo what the client sent.
- Slow clients cannot hold the server: a connection must deliver a request's headers and body
  within ``request_timeout_s`` or it is closed (:class:`DeadlineH11Protocol`); finished results are
  bounded in count and in bytes.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import sys
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from data import spec
from data.files import encode_png
from data.io import ImageReadError, decode_image, sniff_format
from data.stream import Prepared
from pipeline import serve_schema as schema
from pipeline.analysis import RESULT_IMAGES, ImageAnalysis, analyse_batch, result_images
from pipeline.config import ServeSettings
from pipeline.serve_page import UPLOAD_PAGE

RESULT_FILES = tuple(f"{name}.png" for name in RESULT_IMAGES)


class Busy(Exception):
    """The analysis queue is full."""


@dataclass
class _Job:
    prepared: Prepared
    future: Future


class Engine:
    """Owns the models; analyses queued images in batches on one worker thread."""

    def __init__(self, classifier, segmenter, lung_model=None, *, settings: ServeSettings = ServeSettings()) -> None:
        self.classifier, self.segmenter, self.lung_model = classifier, segmenter, lung_model
        self.settings = settings
        self.heads = classifier.head_weights()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="cxr-serve-engine", daemon=True)
        self.batches: deque[int] = deque(maxlen=10_000)  # sizes of the latest batches (tests, benchmark)
        self._thread.start()

    def submit(self, image: np.ndarray) -> Future:
        """Queue a decoded image (data.io array); the future resolves to an ImageAnalysis."""
        if self._queue.qsize() >= self.settings.max_queue:
            raise Busy(f"{self._queue.qsize()} images are waiting; retry shortly")
        job = _Job(self.classifier.prepare(image), Future())
        self._queue.put(job)
        return job.future

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            deadline = time.monotonic() + self.settings.max_wait_ms / 1000
            while len(jobs) < self.settings.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(nxt)
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            ps = [j.prepared for j in jobs]
            analyses = analyse_batch(np.stack([p.x for p in ps]), [p.original for p in ps],
                                     [p.geometry for p in ps], classifier=self.classifier, heads=self.heads,
                                     segmenter=self.segmenter, lung_model=self.lung_model,
                                     segment_all=self.settings.segment_all)
        except Exception as err:  # noqa: BLE001 - every waiting request must hear about it
            for j in jobs:
                j.future.set_exception(err)
            return
        self.batches.append(len(jobs))
        for j, a in zip(jobs, analyses):
            j.future.set_result((a, j.prepared.original))
        del jobs, analyses
        release_free_memory()  # decoded uploads are large and short-lived: keep RSS flat (bench_serve --soak)


class ResultStore:
    """In-memory PNGs per request under unguessable tokens; bounded in count, bytes and age."""

    def __init__(self, *, ttl_s: float, max_items: int, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.ttl_s, self.max_items, self.max_bytes = ttl_s, max_items, max_bytes
        self._items: OrderedDict[str, tuple[float, dict[str, bytes]]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def put(self, files: dict[str, bytes]) -> str:
        token = secrets.token_urlsafe(32)  # 256 bits: ids cannot be guessed or enumerated
        with self._lock:
            self._expire()
            self._items[token] = (time.monotonic(), files)
            self.bytes += _size(files)
            while len(self._items) > self.max_items or (self.bytes > self.max_bytes and len(self._items) > 1):
                self._drop_oldest()
        return token

    def __len__(self) -> int:
        return len(self._items)

    def _drop_oldest(self) -> None:
        _, (_, files) = self._items.popitem(last=False)
        self.bytes -= _size(files)

    def get(self, token: str, name: str) -> bytes | None:
        with self._lock:
            self._expire()
            item = self._items.get(token)
        return None if item is None else item[1].get(name)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        while self._items and next(iter(self._items.values()))[0] < cutoff:
            self._drop_oldest()


def _size(files: dict[str, bytes]) -> int:
    return sum(len(b) for b in files.values())


def render_files(analysis: ImageAnalysis, original: np.ndarray) -> dict[str, bytes]:
    """pipeline.analysis.result_images of one analysed image, as PNG bytes named ``<name>.png``."""
    return {f"{name}.png": encode_png(rgb) for name, rgb in result_images(analysis, original).items()}


def check_upload(data: bytes, max_pixels: int = spec.DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The decoded image; UploadRejected 415 for content in no supported format, 422 for a broken one."""
    if not data:
        raise UploadRejected(422, "cannot use this image: empty file (0 bytes)")
    if sniff_format(data[:132]) is None:
        raise UploadRejected(415, "not an image: the content is not PNG, JPEG, BMP, TIFF or DICOM "
                                  "(judged by the bytes; the file name and declared type are not used)")
    try:
        return decode_image(data, name="upload", max_pixels=max_pixels)
    except ImageReadError as err:
        raise UploadRejected(422, f"cannot use this image: {err.reason}") from None


class UploadRejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def create_app(classifier, segmenter, lung_model=None, *, settings: ServeSettings = ServeSettings()):
    """The FastAPI application (models already loaded and checked)."""
    engine = Engine(classifier, segmenter, lung_model, settings=settings)
    store = ResultStore(ttl_s=settings.result_ttl_s, max_items=settings.max_results,
                        max_bytes=settings.max_result_bytes)

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    # FastAPI's own limit: 413 from the declared Content-Length, and while a body without one streams in.
    app = FastAPI(title="cxr-triage", version=_version(), lifespan=lifespan, max_body_size=settings.max_upload_bytes,
                  description="Chest X-ray triage research pipeline: classification with Grad-CAM, then lesion "
                              "segmentation of images flagged pneumonia or COVID. Research use only; "
                              "not for diagnosis.")
    app.state.engine, app.state.store = engine, store

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return UPLOAD_PAGE

    @app.get("/v1/health", response_model=schema.Health)
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "classes": list(spec.CLASS_NAMES),
            "segment_classes": sorted(spec.SEGMENT_CLASSES),
            "models": {"classifier": classifier.checkpoint_sha256, "segmenter": segmenter.checkpoint_sha256,
                       "lung_model": lung_model.checkpoint_sha256 if lung_model else None},
            "queued": engine.queued,
            "max_upload_bytes": settings.max_upload_bytes,
        }

    @app.post("/v1/predict", response_model=schema.Prediction,
              responses={413: {"model": schema.Error}, 415: {"model": schema.Error}, 422: {"model": schema.Error},
                         503: {"model": schema.Error}})
    async def predict(file: UploadFile = File(..., description="PNG, JPEG, BMP, TIFF or DICOM")) -> dict[str, Any]:
        data = await file.read()
        await file.close()
        del file  # the bytes are all that is kept
        try:
            image = await run_in_threadpool(check_upload, data, settings.max_pixels)
        except UploadRejected as err:
            raise HTTPException(err.status, err.reason) from None
        try:
            future = engine.submit(image)
        except Busy as err:
            raise HTTPException(503, f"server busy: {err}") from None
        analysis, original = await asyncio.wrap_future(future)
        files = await run_in_threadpool(render_files, analysis, original)
        return prediction_body(analysis, original, files, store.put(files))

    @app.get("/v1/results/{token}/{name}", responses={200: {"content": {"image/png": {}}},
                                                      404: {"model": schema.Error}})
    def result_file(token: str, name: str) -> Response:
        body = store.get(token, name) if name in RESULT_FILES else None
        if body is None:
            raise HTTPException(404, "no such result (results expire, and ids are per request)")
        return Response(body, media_type="image/png", headers={"Cache-Control": "private, no-store"})

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.middleware("http")(_security_headers)
    return app


def prediction_body(analysis: ImageAnalysis, original: np.ndarray, files: dict[str, bytes],
                    token: str) -> dict[str, Any]:
    """The JSON answer to one upload (schema.Prediction); its pictures are served under ``token``."""
    base = f"/v1/results/{token}"
    return {
        **analysis.answer_fields(),
        "probabilities": analysis.probabilities,
        "width": int(original.shape[1]),
        "height": int(original.shape[0]),
        "urls": {name.removesuffix(".png"): f"{base}/{name}" for name in files},
        "note": "research use only; not for diagnosis",
    }


async def _validation_error(request, err: RequestValidationError) -> JSONResponse:
    # FastAPI's default body echoes the client's input ("input": the whole upload, if sent as a
    # plain form field); say where the request is wrong and what is expected, never what it held.
    problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                for e in err.errors()]
    return JSONResponse({"detail": problems}, status_code=422)


async def _security_headers(request, call_next):
    response = await call_next(request)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _version() -> str:
    from pipeline import __version__

    return __version__


def serve(classifier, segmenter, lung_model=None, *, host: str = "127.0.0.1", port: int = 8000,
          settings: ServeSettings = ServeSettings()) -> None:
    """Run the server until interrupted (one process: the models are loaded once)."""
    import uvicorn

    limit_malloc_arenas()
    app = create_app(classifier, segmenter, lung_model, settings=settings)
    uvicorn.Server(uvicorn_config(app, settings, host=host, port=port, log_level="info")).run()


def _glibc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c") if sys.platform == "linux" else None
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (what ``MALLOC_ARENA_MAX`` sets) for the server process.

    Uploads are decoded and results drawn on Starlette's thread pool; with glibc's default of up to
    8 arenas per core, freed image buffers stay spread over many arenas and the process grew by
    ~15-30 MB per 60 uploads with the result store full (benchmarks/bench_serve.py --soak). The
    engine also hands freed memory back after each batch (:func:`release_free_memory`). Returns
    False where this is not glibc (macOS, musl): nothing done.
    """
    return bool(_LIBC is not None and _LIBC.mallopt(-8, int(arenas)))  # -8: M_ARENA_MAX in malloc.h


def release_free_memory() -> None:
    """glibc's malloc_trim(0): return freed heap pages to the system (no-op elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def uvicorn_config(app, settings: ServeSettings, *, host: str, port: int, log_level: str = "warning"):
    """The uvicorn configuration `cxr serve` runs with (one worker, the request deadline); tests and
    benchmarks start the same server with it."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, workers=1,
                          http=deadline_protocol(settings.request_timeout_s))


def deadline_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline: from the connection (and after each response) a
    client has ``timeout_s`` to send a whole request, headers and body, or the connection is
    closed. uvicorn itself only times out idle keep-alive connections, so a client that never
    finishes its headers or body would hold a connection for ever (slowloris)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DeadlineH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.call_later(timeout_s, self._deadline_passed)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._deadline.cancel()
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(timeout_s, self._deadline_passed)

        def connection_lost(self, exc) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

        def _deadline_passed(self) -> None:
            # A request received in full is being answered (the analysis may queue): leave it be.
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) or self.transport.is_closing():
                return
            self.logger.info("closed a connection that did not send its request within %.0f s", timeout_s)
            self.transport.close()

    return DeadlineH11Protocol
