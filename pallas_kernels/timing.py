"""Wall-clock timing shared by the kernel benchmarks (pallas_kernels does not depend on turbojax)."""

from __future__ import annotations

import statistics
import time

import jax


def bench(fn, *args, iters: int) -> float:
    """Median wall time in ms of fn(*args) (jitted), after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
