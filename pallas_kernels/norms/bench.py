"""Norm kernels against what XLA fuses by itself, at the Wan DiT's real shapes, every path timed in one process.

    python -m pallas_kernels.norms.bench            # the table of issue 8 (about 2 minutes on an H100)
    python -m pallas_kernels.norms.bench --sweep    # also block_rows / num_warps / tile_warps candidates
    python -m pallas_kernels.norms.bench --shapes 2x40x256 --interpret --calls 1 --reps 1   # CPU smoke run

Per shape [B, L, C] (1 x 32760 x 1536: 1.3B-480p; 1 x 75600 x 5120: 14B-720p), each op as the DiT calls it in
TurboDiffusion's dtype flow (bf16 residual, bf16 out), three rows: "copy" (XLA's elementwise -x over the op's input:
one read and one write of those bytes, the measured copy bandwidth), "XLA" (the jitted pure-jnp reference: what XLA
fuses by itself) and "Triton" (the kernel). The fused LN + modulation + W8A8 quantiser is compared with XLA's norm
followed by the Triton quantiser (`int8_matmul.triton.quantize_blockwise`, what the DiT runs unfused) and with the
all-XLA reference. "speed-up": the Triton row against XLA, for the quantiser against XLA norm + Triton quantiser.

GB/s counts the bytes an op must move: its inputs once (x, tables, vectors) and its outputs once. The goal is >= 80%
of the copy's GB/s; where XLA already gets there, XLA stays. Times: `calls` back-to-back calls per repetition,
blocking on the last, median over `reps`: kernels of tens of microseconds, timed without a host round trip per call.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.int8_matmul import triton as int8_triton
from pallas_kernels.norms import reference, triton
from pallas_kernels.norms.triton import NormConfig

SHAPES = [(1, 32760, 1536), (1, 75600, 5120)]
HEAD_DIM = 128
EPS = 1e-6
bf16, f32 = jnp.bfloat16, jnp.float32


def stream_ms(fn, *args, calls: int, reps: int) -> float:
    """Median over reps of the wall time per call of `calls` back-to-back calls of fn (jitted), after two warm-up
    calls: the first call of a Pallas kernel in a process can change jax's tracing context, so the second compiles
    again."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return 1e3 * statistics.median(times)


def nbytes(*trees) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(trees))


def inputs(b: int, l: int, c: int, seed: int = 0) -> dict:
    """bf16 x [B, L, C] with a per-row offset and spread; fp32 modulation rows, norm vectors and RoPE tables (the
    values do not change the speed, only the shapes and dtypes do)."""
    k = jax.random.split(jax.random.key(seed), 8)
    x = jax.random.normal(k[0], (b, l, c), f32) * jax.random.uniform(k[1], (b, l, 1), f32, 0.5, 4.0)
    angles = jax.random.uniform(k[2], (l, HEAD_DIM // 2), f32, 0.0, 6.3)
    return dict(
        x=(x + jax.random.normal(k[3], (b, l, 1), f32)).astype(bf16),
        shift=0.5 * jax.random.normal(k[4], (b, c), f32), scale=0.5 * jax.random.normal(k[5], (b, c), f32),
        weight=1.0 + 0.2 * jax.random.normal(k[6], (c,), f32), bias=0.1 * jax.random.normal(k[7], (c,), f32),
        cos=jnp.cos(angles), sin=jnp.sin(angles),
    )


LN_MOD, AFFINE, RMS, RMS_ROPE = ("LN + modulation (norm1/norm2)", "affine LN (norm3)",
                                 "q/k RMSNorm (cross-attention q)", "q/k RMSNorm + RoPE (self-attention)")
TILE_OP = "LN + modulation + W8A8 quantiser"
ROW_OPS = (LN_MOD, RMS_ROPE)  # the row kernels the sweep times


def ops(config: NormConfig, interpret: bool) -> dict:
    """name -> (operand names, XLA reference, Triton kernel), TurboDiffusion's flow."""
    launch = dict(config=config, interpret=interpret)
    ln = dict(eps=EPS, out_dtype=bf16, normed_dtype=bf16)
    affine = rms = dict(eps=EPS, out_dtype=bf16)
    rope = dict(rms, head_dim=HEAD_DIM)
    table = {
        LN_MOD: (("x", "shift", "scale"), ln, reference.layer_norm_modulate, triton.layer_norm_modulate),
        AFFINE: (("x", "weight", "bias"), affine, reference.layer_norm_affine, triton.layer_norm_affine),
        RMS: (("x", "weight"), rms, reference.rms_norm_rope, triton.rms_norm_rope),
        RMS_ROPE: (("x", "weight", "cos", "sin"), rope, reference.rms_norm_rope, triton.rms_norm_rope),
        TILE_OP: (("x", "shift", "scale"), ln, reference.layer_norm_modulate_quantize,
                  triton.layer_norm_modulate_quantize),
    }
    return {op: (names, functools.partial(ref, **kw), functools.partial(kernel, **kw, **launch))
            for op, (names, kw, ref, kernel) in table.items()}


def differ(out, ref) -> dict:
    """How far out is from the reference: the fraction of elements that differ and the largest difference relative
    to the reference's largest value (both over every output)."""
    pairs = list(zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
    frac = max(float(jnp.mean(a != b)) for a, b in pairs)
    rel = max(float(jnp.abs(a.astype(f32) - b.astype(f32)).max() / jnp.abs(b.astype(f32)).max()) for a, b in pairs)
    return dict(frac_differ=frac, max_rel_diff=rel)


def table(shapes, config: NormConfig, calls: int, reps: int, interpret: bool) -> list[dict]:
    rows = []
    copy = jax.jit(jnp.negative)
    for b, l, c in shapes:
        data = inputs(b, l, c)
        copy_ms = stream_ms(copy, data["x"], calls=calls, reps=reps)
        copy_gbs = 2 * nbytes(data["x"]) / copy_ms / 1e6

        def row(op, path, ms, moved, **extra):
            gbs = moved / ms / 1e6
            rows.append(dict(shape=[b, l, c], op=op, path=path, ms=ms, gbs=gbs, of_copy=gbs / copy_gbs, **extra))
            print(json.dumps(rows[-1]), flush=True)

        row("copy", "XLA -x", copy_ms, 2 * nbytes(data["x"]))
        for op, (names, ref_fn, kernel) in ops(config, interpret).items():
            args = [data[n] for n in names]
            xla, ours = jax.jit(ref_fn), jax.jit(kernel)
            want = xla(*args)
            moved = nbytes(args, want)
            baseline_ms = stream_ms(xla, *args, calls=calls, reps=reps)
            row(op, "XLA (reference)", baseline_ms, moved)
            if op == TILE_OP:
                unfused = jax.jit(lambda *a: int8_triton.quantize_blockwise(
                    reference.layer_norm_modulate(*a, eps=EPS, out_dtype=bf16, normed_dtype=bf16).reshape(-1, c),
                    interpret=interpret))
                baseline_ms = stream_ms(unfused, *args, calls=calls, reps=reps)
                row(op, "XLA norm + Triton quantiser", baseline_ms, moved)
                stats = jax.jit(functools.partial(triton.row_stats, eps=EPS, config=config, interpret=interpret))
                row(op, "  Triton row statistics alone", stream_ms(stats, data["x"], calls=calls, reps=reps),
                    nbytes(data["x"], stats(data["x"])))
            try:
                ms = stream_ms(ours, *args, calls=calls, reps=reps)
            except Exception as e:  # report a kernel that fails to build, keep the other rows
                print(f"Triton {op} failed at {[b, l, c]}: {type(e).__name__}: {str(e)[:400]}", flush=True)
                continue
            row(op, "Triton", ms, moved, vs_baseline=baseline_ms / ms, **differ(ours(*args), want))
    return rows


def sweep(shapes, calls: int, reps: int, interpret: bool) -> list[dict]:
    """Launch parameters: block_rows x num_warps for two row kernels, tile_warps for the quantising tile kernel."""
    rows = []
    for b, l, c in shapes:
        data = inputs(b, l, c)
        width = 1 << (c - 1).bit_length()
        runs = [(op, NormConfig(block_rows=r, num_warps=w)) for r in (1, 2, 4, 8) for w in (4, 8, 16)
                if r * width <= 16384 for op in ROW_OPS]
        runs += [(TILE_OP, NormConfig(tile_warps=w)) for w in (4, 8, 16)]
        for op, config in runs:
            names, _, kernel = ops(config, interpret)[op]
            try:
                ms = stream_ms(jax.jit(kernel), *[data[n] for n in names], calls=calls, reps=reps)
            except Exception as e:  # a config the compiler rejects (registers, shared memory) is reported
                ms = float("nan")
                print(f"{op}, {config}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append(dict(shape=[b, l, c], op=op, config=dataclasses.asdict(config), ms=ms))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _shape(text: str) -> tuple[int, int, int]:
    b, l, c = (int(v) for v in text.lower().split("x"))
    return b, l, c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", type=_shape, default=SHAPES, metavar="BxLxC")
    p.add_argument("--calls", type=int, default=20, help="back-to-back calls per timed repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--block-rows", type=int)
    p.add_argument("--num-warps", type=int)
    p.add_argument("--tile-warps", type=int, default=NormConfig.tile_warps)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--interpret", action="store_true", help="Triton kernels in the Pallas interpreter (CPU smoke run)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    config = NormConfig(block_rows=args.block_rows, num_warps=args.num_warps, tile_warps=args.tile_warps)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {config}")
    out = {"sweep": sweep(args.shapes, args.calls, args.reps, args.interpret)} if args.sweep else {}
    out["table"] = table(args.shapes, config, args.calls, args.reps, args.interpret)
    print("\n| B x L x C | op | path | ms | GB/s | % of copy | speed-up | differ from reference (elements, max rel.) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["table"]:
        vs = f"{r['vs_baseline']:.2f}x" if "vs_baseline" in r else ""
        diff = f"{r['frac_differ']:.1e}, {r['max_rel_diff']:.1e}" if "frac_differ" in r else ""
        print(f"| {' x '.join(map(str, r['shape']))} | {r['op']} | {r['path']} | {r['ms']:.3f} | {r['gbs']:.0f} "
              f"| {100 * r['of_copy']:.0f}% | {vs} | {diff} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
