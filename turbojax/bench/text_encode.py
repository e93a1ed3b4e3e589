"""umT5 text-encoder latency and memory: 512-token encodes of the full-size encoder with random weights.

    python -m turbojax.bench.text_encode                    # umt5-xxl on the GPU: bf16, then int8 weight-only
    python -m turbojax.bench.text_encode --tiny --iters 2   # CPU smoke run at the tiny config

Each variant is built on the device in one compiled program, timed (median of --iters calls after a warm-up; compile
time separately), then unloaded before the next, so the device memory figures are its own: the weights, the compiled
program's temporaries, the device's peak bytes in use since the start (cumulative over variants; GPU only) and the
bytes still in use after unload(). The int8 variant draws the same random weights, so its output's relative difference
to bf16 is the weight quantisation error at this scale.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import numpy as np
from flax import nnx

from turbojax import text
from turbojax.bench.timing import memory_stat, report, time_compiled
from turbojax.models.umt5 import UMT5_PRESETS, UMT5Encoder
from turbojax.text import TEXT_LEN, TextEncoder

PROMPT_TOKENS = 120  # a typical augmented prompt; every row is computed anyway


def random_umt5(preset: str, quantized: bool = False, seed: int = 0) -> UMT5Encoder:
    """A umT5 module with random weights, initialised on the device in one compiled program."""
    cfg = UMT5_PRESETS[preset]
    return nnx.jit(lambda: UMT5Encoder(cfg, quantized=quantized, rngs=nnx.Rngs(seed)))()


def random_encoder(preset: str, quantized: bool, seed: int = 0) -> TextEncoder:
    return TextEncoder(random_umt5(preset, quantized, seed))


def inputs(vocab: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """ids [B, 512] with PROMPT_TOKENS real tokens (the last one </s>) then padding, and their mask."""
    rng = np.random.default_rng(0)
    ids = np.zeros((batch, TEXT_LEN), np.int32)
    ids[:, :PROMPT_TOKENS] = rng.integers(3, vocab, (batch, PROMPT_TOKENS))
    ids[:, PROMPT_TOKENS - 1] = 1
    return ids, (ids > 0).astype(np.int32)


def _device_gib(key: str) -> float:
    value = memory_stat(key)
    return float("nan") if value is None else value / 2**30


def run_variant(preset: str, quantized: bool, batch: int, iters: int) -> tuple[dict, np.ndarray]:
    t0 = time.perf_counter()
    enc = random_encoder(preset, quantized)
    init_s = time.perf_counter() - t0
    weights_gib = sum(x.nbytes for x in jax.tree.leaves(enc._weights())) / 2**30
    args = (enc._weights(), *inputs(enc.cfg.vocab_size, batch))
    forward = jax.jit(functools.partial(text._forward, enc._graphdef))
    timings, compiled, out = time_compiled(lambda: forward.lower(*args), args, iters, to_host=True)
    mem = compiled.memory_analysis()
    peak = _device_gib("peak_bytes_in_use")
    enc.unload()
    row = {
        "preset": preset, "weights": "int8" if quantized else "bf16", "batch": batch,
        "median_ms": timings["median_ms"], "min_ms": timings["min_ms"],
        "init_s": init_s, "compile_s": timings["compile_s"], "weights_gib": weights_gib,
        "temp_gib": mem.temp_size_in_bytes / 2**30 if mem else float("nan"),
        "peak_gib": peak, "after_unload_gib": _device_gib("bytes_in_use"),
    }
    return row, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny config (CPU smoke run)")
    p.add_argument("--weights", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    preset = "tiny" if args.tiny else "umt5-xxl"
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, preset {preset}, "
          f"{TEXT_LEN} tokens x batch {args.batch}")
    rows, first = [], None
    for weights in args.weights:
        row, out = run_variant(preset, weights == "int8", args.batch, args.iters)
        first = out if first is None else first
        row["rel_diff_vs_first"] = float(np.abs(out - first).max() / np.abs(first).max())
        rows.append(row)
        print(json.dumps(row), flush=True)

    report(rows, {"preset": "{preset}", "weights": "{weights}", "batch": "{batch}",
                  "encode median (ms)": "{median_ms:.1f}", "min (ms)": "{min_ms:.1f}", "compile (s)": "{compile_s:.1f}",
                  "weights GiB": "{weights_gib:.2f}", "temp GiB": "{temp_gib:.2f}", "peak GiB": "{peak_gib:.2f}",
                  "after unload GiB": "{after_unload_gib:.2f}", "rel. diff vs first": "{rel_diff_vs_first:.2e}"},
           args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
