"""Measurement helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import statistics
import time

import numpy as np


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 GEMM rate of numpy (BLAS) on an n×n problem, in GFLOP/s."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def model_flops(model) -> float:
    """Nominal forward FLOPs per image (2 × multiply-adds of conv, depthwise conv and dense layers)."""
    import keras

    total = 0.0

    def visit(layer):
        nonlocal total
        if isinstance(layer, keras.Model):
            for sub in layer.layers:
                visit(sub)
            return
        out = layer.output.shape if hasattr(layer, "output") else None
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw = layer.kernel_size
            total += 2.0 * out[1] * out[2] * out[3] * kh * kw
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw = layer.kernel_size
            cin = layer.kernel.shape[2]
            total += 2.0 * out[1] * out[2] * out[3] * kh * kw * cin
        elif isinstance(layer, keras.layers.Dense):
            total += 2.0 * layer.kernel.shape[0] * layer.kernel.shape[1]

    visit(model)
    return total


def median_rate(fn, n_images: int, repeats: int = 3) -> float:
    """Images/second of one call of ``fn`` (processing ``n_images``): warm-up, then the median of ``repeats``."""
    fn()  # warm-up (tracing, session start)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_images / statistics.median(times)


def time_call(fn, repeats: int, n_images: int, min_seconds: float = 1.0) -> float:
    """Median images/second of ``fn`` (each call processes ``n_images``)."""
    fn()  # warm-up (tracing)
    rates = []
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            if time.perf_counter() - t0 >= min_seconds:
                break
        rates.append(calls * n_images / (time.perf_counter() - t0))
    return statistics.median(rates)
