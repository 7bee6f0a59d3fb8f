"""Stream image files as preprocessed batches for inference, decoding ahead in threads.

Unlike the tf.data training pipeline, each batch keeps track of which file each row
came from and how it was resized, so outputs map back to files and original pixels.
At most ``prefetch`` batches are decoded ahead: memory stays flat however many files.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from data import spec
from data.datasets import FailureLog
from data.io import ImageReadError, peek_pixels, read_image
from data.preprocess import Geometry, preprocess_image, to_rgb_float

#: decoded bytes held per pixel: the file's array (up to 4 channels of uint16) and the float32 RGB
#: original (12) when kept, or only the array and its resized copy
BYTES_PER_PIXEL_ORIGINAL = 20
BYTES_PER_PIXEL_DECODE = 10
#: default bound on decoded images held at once by :func:`stream_images`
DEFAULT_MEMORY_BUDGET = 1 << 30


@dataclass
class Batch:
    """Up to ``batch_size`` decoded images, in input order (failed files left out)."""

    indices: list[int]  # positions in the input sequence
    paths: list[Path]
    x: np.ndarray  # (N, size, size, 3) float32 in [0, 255]
    geometries: list[Geometry]
    originals: list[np.ndarray] | None  # float32 (H, W, 3) in [0, 255] at the file's size, if kept


@dataclass
class Prepared:
    """One decoded image ready for a model: its input, how it was made, and the original if kept."""

    x: np.ndarray  # (size, size, 3) float32 in [0, 255]
    geometry: Geometry
    original: np.ndarray | None  # float32 (H, W, 3) in [0, 255] at the file's size


def prepare_image(image: np.ndarray, *, size: int, mode: str = spec.DEFAULT_RESIZE_MODE, clahe: bool = False,
                  keep_original: bool = True) -> Prepared:
    """A decoded image (data.io array) → :class:`Prepared` (used by the stream and by `cxr serve`)."""
    x, geo = preprocess_image(image, size=size, mode=mode, clahe=clahe)
    return Prepared(x, geo, to_rgb_float(image) if keep_original else None)


def _load(path: Path, size: int, mode: str, clahe: bool, keep_original: bool, max_pixels: int) -> Prepared:
    return prepare_image(read_image(path, max_pixels=max_pixels), size=size, mode=mode, clahe=clahe,
                         keep_original=keep_original)


def stream_images(
    paths: Sequence[str | os.PathLike[str]],
    *,
    size: int,
    batch_size: int = 8,
    mode: str = spec.DEFAULT_RESIZE_MODE,
    clahe: bool = False,
    failures: FailureLog | None = None,
    keep_original: bool = False,
    workers: int = 2,
    prefetch: int = 2,
    max_pixels: int = spec.DEFAULT_MAX_PIXELS,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Iterator[Batch]:
    """Yield :class:`Batch` objects over ``paths`` in order; unreadable files go to ``failures``.

    ``memory_budget`` (bytes) bounds the decoded images held at once (decoding, waiting, and in
    the batch being built), estimated from each header before its pixels are decoded: large
    images are decoded fewer at a time and end a batch early. One image over the budget is still
    decoded, alone (``max_pixels`` is the hard limit).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    failures = failures if failures is not None else FailureLog()
    paths = [Path(p) for p in paths]
    per_pixel = BYTES_PER_PIXEL_ORIGINAL if keep_original else BYTES_PER_PIXEL_DECODE
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        pending: deque[tuple[int, Future, int]] = deque()
        next_index = 0
        ahead = batch_size * (prefetch + 1)
        held = 0  # estimated bytes of pending decodes and of the rows of the batch being built

        costs: dict[int, int] = {}  # header estimates, read once per file

        def fill(rows_held: int) -> None:
            nonlocal next_index, held
            while next_index < len(paths) and len(pending) < ahead:
                i = next_index
                if i not in costs:
                    costs[i] = min(peek_pixels(paths[i]) or 0, max_pixels) * per_pixel
                cost = costs.pop(i)
                if (pending or rows_held) and held + rows_held + cost > memory_budget:
                    costs[i] = cost  # waits for memory to free up
                    return
                pending.append((i, pool.submit(_load, paths[i], size, mode, clahe, keep_original, max_pixels), cost))
                held += cost
                next_index += 1

        fill(0)
        rows: list[tuple[int, Prepared]] = []
        rows_cost = 0
        while pending:
            i, fut, cost = pending.popleft()
            try:
                rows.append((i, fut.result()))
                rows_cost += cost
            except ImageReadError as err:
                failures.add(err.path, err.reason)
            held -= cost
            full = len(rows) == batch_size or (rows and rows_cost >= memory_budget)
            if not full:
                fill(rows_cost)
            if full or (not pending and rows):
                yield Batch(
                    indices=[i for i, _ in rows],
                    paths=[paths[i] for i, _ in rows],
                    x=np.stack([item.x for _, item in rows]),
                    geometries=[item.geometry for _, item in rows],
                    originals=[item.original for _, item in rows] if keep_original else None,
                )
                rows, rows_cost = [], 0
                fill(0)


def pad_to_bucket(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Pad a batch with zero images up to the next power of two; returns (padded, original N).

    Compiled predict functions trace once per input shape: buckets keep that to a few
    shapes whatever the remainder batch or the number of images flagged for stage 2.
    """
    n = len(x)
    size = 1 << max(0, (n - 1).bit_length())
    if size == n:
        return x, n
    pad = np.zeros((size - n, *x.shape[1:]), dtype=x.dtype)
    return np.concatenate([x, pad]), n
