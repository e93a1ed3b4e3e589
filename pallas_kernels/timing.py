"""Wall-clock timing shared by the kernel benchmarks (pallas_kernels does not depend on turbojax)."""

from __future__ import annotations

import math
import statistics
import time

import jax

ROUND_MS = 5.0  # shortest round: enough back-to-back calls that one host synchronisation is noise
MAX_CALLS = 200


def bench(fn, *args, iters: int) -> float:
    """Steady-state time in ms per call of fn(*args) (jitted): the median over `iters` rounds of a round's wall time
    over its call count, each round issuing enough calls back to back (ROUND_MS, at most MAX_CALLS) with one
    synchronisation at its end, after a warm-up. That is the cost inside a model, where the next op is already
    queued: one host round trip per call (~0.1-0.3 ms) would dominate sub-millisecond ops. An op shorter than the
    host's dispatch of one call (~0.01-0.02 ms) measures the dispatch instead."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    calls = max(1, min(MAX_CALLS, math.ceil(ROUND_MS / (1e3 * (time.perf_counter() - t0)))))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)  # one device stream: the last call done means all are
        times.append((time.perf_counter() - t0) / calls)
    return 1e3 * statistics.median(times)
