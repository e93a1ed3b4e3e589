"""W8A8 benchmark at the Wan DiT's linear shapes, every path timed in one process on one GPU.

    python -m pallas_kernels.int8_matmul.bench            # the table of issue 7
    python -m pallas_kernels.int8_matmul.bench --sweep    # also a launch-parameter sweep at K = N = 5120
    python -m pallas_kernels.int8_matmul.bench --tokens 256 --interpret --iters 1   # CPU smoke run (times meaningless)

Rows per (K, N), at M = --tokens (32760: 480p): the XLA bf16 dot (cuBLASLt; the baseline); the XLA int8 dot (s8 x s8 ->
s32 with preferred_element_type=int32: cuBLASLt IMMA, no scales, so the ceiling); our W8A8 linear (activation
quantisation + block-scaled GEMM + bias) with the Mosaic GPU GEMM (Hopper) and the Pallas-Triton one, each GEMM
alone, the Triton quantiser alone; the pure-XLA reference W8A8.
Times are per call in steady state (`pallas_kernels.timing.bench`: median of --iters rounds of back-to-back calls);
rates count 2 M N K operations. Goals (issue 7): W8A8 >= 1.5x the bf16 dot and >= 0.9x the int8 dot.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp

from pallas_kernels import int8_matmul
from pallas_kernels.int8_matmul import mosaic, reference, triton
from pallas_kernels.int8_matmul.mosaic import MosaicConfig
from pallas_kernels.int8_matmul.triton import GemmConfig
from pallas_kernels.timing import bench

TOKENS = 32760
SHAPES = [(1536, 1536), (1536, 8960), (8960, 1536), (5120, 5120), (5120, 13824), (13824, 5120)]  # (K, N)
DOT = (((1,), (1,)), ((), ()))  # A [M, K] . B [N, K]^T


def inputs(m: int, k: int, n: int, seed: int = 0):
    """bf16 activations x [M, K], weights w [N, K] and bias [N]; the weights quantised once, as at load."""
    kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (jax.random.normal(kw, (n, k), jnp.float32) * k**-0.5).astype(jnp.bfloat16)
    bias = (0.02 * jax.random.normal(kb, (n,), jnp.float32)).astype(jnp.bfloat16)
    w_q, w_scale = jax.jit(reference.quantize_blockwise)(w)
    return x, w, bias, w_q, w_scale


def rel(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def table(m: int, iters: int, impls: list[str], config: GemmConfig, with_reference: bool,
          interpret: bool) -> list[dict]:
    bf16_dot = jax.jit(lambda x, w: jax.lax.dot_general(x, w, DOT))
    int8_dot = jax.jit(lambda a, b: jax.lax.dot_general(a, b, DOT, preferred_element_type=jnp.int32))
    configs = {"triton": config, "mosaic": None}
    quantize = jax.jit(functools.partial(triton.quantize_blockwise, interpret=interpret))
    rows = []
    for k, n in SHAPES:
        x, w, bias, w_q, w_scale = inputs(m, k, n)
        x_q, x_scale = quantize(x)
        ops = 2.0 * m * n * k

        def row(path, ms, **extra):
            rows.append(dict(k=k, n=n, path=path, ms=ms, tops=ops / ms / 1e9, **extra))
            print(json.dumps(rows[-1]), flush=True)

        t_bf16 = bench(bf16_dot, x, w, iters=iters)
        row("XLA bf16 dot", t_bf16)
        t_int8 = bench(int8_dot, x_q, w_q, iters=iters)
        row("XLA int8 dot (s32 out, no scales)", t_int8)
        ref_out = jax.jit(reference.int8_linear)(x, w_q, w_scale, bias) if with_reference else None
        if with_reference:
            row("W8A8, pure-XLA reference", bench(jax.jit(reference.int8_linear), x, w_q, w_scale, bias,
                                                  iters=max(2, iters // 3)))
        row("  quantiser alone (Triton)", bench(quantize, x, iters=iters))
        for impl in impls:
            kw = dict(implementation=impl, config=configs[impl], interpret=interpret)
            ours = jax.jit(functools.partial(int8_matmul.int8_linear, **kw))
            gemm = jax.jit(functools.partial(int8_matmul.int8_block_matmul, **kw))
            t_ours = bench(ours, x, w_q, w_scale, bias, iters=iters)
            diff = {} if ref_out is None else dict(rel_diff_vs_reference=rel(ours(x, w_q, w_scale, bias), ref_out))
            row(f"W8A8 (quantise + block-scaled GEMM + bias), {impl}", t_ours, vs_bf16=t_bf16 / t_ours,
                vs_int8=t_int8 / t_ours, **diff)
            row(f"  block-scaled GEMM alone ({impl})", bench(gemm, x_q, x_scale, w_q, w_scale, iters=iters))
        if k in FFN_OUT_K:
            gelu_rows(x, w, bias, w_q, w_scale, impls, configs, iters=iters, interpret=interpret, row=row)
    return rows


FFN_OUT_K = (8960, 13824)  # the FFN's second Linear (1.3B, 14B), whose input is GELU(first Linear's output)


def gelu_rows(x, w, bias, w_q, w_scale, impls, configs, *, iters, interpret, row) -> None:
    """Rows (by `row`) of the FFN's fc2 of GELU(h) as the DiT runs it: XLA's GELU pass then the bf16 dot (the float
    model), XLA's GELU then W8A8 (the DiT's previous W8A8 path), and W8A8 with the GELU inside the quantiser's
    pass."""
    gelu = lambda h: jax.nn.gelu(h.astype(jnp.float32), approximate=True).astype(h.dtype)
    t_bf16 = bench(jax.jit(lambda h, w, b: jax.lax.dot_general(gelu(h), w, DOT) + b), x, w, bias, iters=iters)
    row("GELU + fc2: XLA GELU, bf16 dot", t_bf16)
    for impl in impls:
        kw = dict(implementation=impl, config=configs[impl], interpret=interpret)
        unfused = jax.jit(lambda h, *ws: int8_matmul.int8_linear(gelu(h), *ws, **kw))
        fused = jax.jit(lambda h, *ws: int8_matmul.int8_linear(h, *ws, activation="gelu_tanh", **kw))
        t_unfused = bench(unfused, x, w_q, w_scale, bias, iters=iters)
        row(f"GELU + fc2: XLA GELU, W8A8 ({impl})", t_unfused, vs_bf16=t_bf16 / t_unfused)
        t_fused = bench(fused, x, w_q, w_scale, bias, iters=iters)
        row(f"GELU + fc2: W8A8, GELU in the quantiser ({impl})", t_fused, vs_bf16=t_bf16 / t_fused,
            vs_unfused=t_unfused / t_fused, rel_diff_vs_unfused=rel(fused(x, w_q, w_scale, bias),
                                                                    unfused(x, w_q, w_scale, bias)))


def sweep(m: int, iters: int, impls: list[str]) -> list[dict]:
    """Launch-parameter candidates for the GEMM alone at K = N = 5120: GemmConfig (Triton) and, on Hopper,
    MosaicConfig."""
    k = n = 5120
    x, _, _, w_q, w_scale = inputs(m, k, n)
    x_q, x_scale = jax.jit(triton.quantize_blockwise)(x)
    candidates = []
    if "triton" in impls:
        candidates += [("triton", GemmConfig(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                                             int_to_float=i2f))
                       for bm in (64, 128) for bn in (128, 256) for warps in (4, 8) for stages in (3, 4)
                       for i2f in ("bits", "convert")]
    if "mosaic" in impls:
        candidates += [("mosaic", MosaicConfig(tile_n=tn, max_concurrent_steps=s, group_m=g, overlap=ov, cluster=c))
                       for tn, ov in ((128, False), (128, True), (256, False)) for s in (4, 5) for g in (8, 16)
                       for c in (1, 2)]
    rows = []
    for impl, cfg in candidates:
        fn = jax.jit(functools.partial(int8_matmul.int8_block_matmul, implementation=impl, config=cfg))
        try:
            ms = bench(fn, x_q, x_scale, w_q, w_scale, iters=iters)
        except Exception as e:  # a config the compiler rejects (shared memory) is reported, not fatal
            ms = float("nan")
            print(f"{cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        rows.append(dict(implementation=impl, config=dataclasses.asdict(cfg), ms=ms, tops=2.0 * m * n * k / ms / 1e9))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=TOKENS, help="M, the rows of x (75600 for 720p)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--block-m", type=int, default=GemmConfig.block_m)
    p.add_argument("--block-n", type=int, default=GemmConfig.block_n)
    p.add_argument("--num-warps", type=int, default=GemmConfig.num_warps)
    p.add_argument("--num-stages", type=int, default=GemmConfig.num_stages)
    p.add_argument("--int-to-float", default=GemmConfig.int_to_float, choices=("bits", "convert"))
    p.add_argument("--impl", nargs="+", choices=("triton", "mosaic"),
                   help="our kernels to time (default: mosaic on Hopper, and triton)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="skip the pure-XLA reference rows")
    p.add_argument("--interpret", action="store_true", help="Triton kernels in the Pallas interpreter (CPU smoke run)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    config = GemmConfig(block_m=args.block_m, block_n=args.block_n, num_warps=args.num_warps,
                        num_stages=args.num_stages, int_to_float=args.int_to_float)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, M = {args.tokens}, {config}")
    impls = args.impl or (["mosaic"] if mosaic.supports(args.tokens, 128, 128) else []) + ["triton"]
    out = {"sweep": sweep(args.tokens, args.iters, impls)} if args.sweep else {}
    out["table"] = table(args.tokens, args.iters, impls, config, not args.no_reference, args.interpret)
    print("\n| K | N | path | ms | TOP/s | vs XLA bf16 | vs XLA int8 (GELU rows: vs unfused) | rel. diff vs reference "
          "(GELU rows: vs unfused) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["table"]:
        vs_bf16 = f"{r['vs_bf16']:.2f}x" if "vs_bf16" in r else ""
        vs_int8 = next((f"{r[key]:.2f}x" for key in ("vs_int8", "vs_unfused") if key in r), "")
        diff = next((f"{r[key]:.1e}" for key in ("rel_diff_vs_reference", "rel_diff_vs_unfused") if key in r), "")
        print(f"| {r['k']} | {r['n']} | {r['path']} | {r['ms']:.3f} | {r['tops']:.0f} | {vs_bf16} | {vs_int8} "
              f"| {diff} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
