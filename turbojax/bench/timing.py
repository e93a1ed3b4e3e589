"""The timing loop and the report the benchmarks share."""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np


def time_calls(call: Callable[[int], Any], iters: int) -> dict:
    """Median and min wall time in ms of call(i) for i in range(iters), each blocked on until ready."""
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(call(i))
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times)}


def time_first_call(call: Callable[[int], Any], iters: int) -> dict:
    """call(0) timed alone, in seconds (a first call: tracing and compilation included), then call(1..iters) as
    time_calls does."""
    t0 = time.perf_counter()
    jax.block_until_ready(call(0))
    first_s = time.perf_counter() - t0
    return {"first_call_s": first_s, **time_calls(lambda i: call(i + 1), iters)}


def time_compiled(lower: Callable[[], jax.stages.Lowered], args: tuple, iters: int, to_host: bool = False):
    """Compiles lower() (lowering counted in compile_s), calls it on args once as a warm-up, then times iters calls.
    Returns the timings, the compiled program (for memory_analysis) and the warm-up call's output; to_host makes that
    a float32 numpy array before the timed calls, so its device buffer does not count in the device's memory stats."""
    t0 = time.perf_counter()
    compiled = lower().compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))
    if to_host:
        out = np.asarray(out, np.float32)
    timings = time_calls(lambda _: compiled(*args), iters)
    return {**timings, "compile_s": compile_s}, compiled, out


def program_bytes(compiled: jax.stages.Compiled) -> int | None:
    """Device bytes XLA plans for one call of a compiled program: arguments + temporaries + outputs - aliased
    (None where the backend gives no memory analysis)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)


def memory_stat(key: str, device: jax.Device | None = None) -> int | None:
    """One allocator statistic of a device ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"), in bytes; None
    where the device keeps none (the CPU)."""
    stats = (device or jax.devices()[0]).memory_stats() or {}
    return stats.get(key)


def report(rows: list[dict], columns: dict[str, str], json_path: str | None) -> None:
    """Prints rows as a markdown table (column header -> str.format template over a row's keys); writes them to
    json_path too if given."""
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(template.format(**r) for template in columns.values()) + " |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
