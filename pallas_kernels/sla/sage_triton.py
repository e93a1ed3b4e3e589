"""SageSLA's sparse branch as a Pallas-Triton kernel: the portable path (any GPU with fp8 conversions, sm89+).

One program per (query block, batch, head), like `triton.sparse_attention`, walking its LUT row in ascending order
in `sage_reference`'s 128-key steps: an int8 x int8 -> int32 Q.K^T per key block, dequantised with the q- and
k-block scales into base-2 logits; the online softmax of `sage_reference` (P~ = 2^(s - m + 8.807) in (0, 448], m
the running max after the step, its fp32 row sums as the denominator); e4m3(P~) . e4m3 V into a fresh fp32 step
product added to the rescaled accumulator; the per-channel V scale in the epilogue. Triton lowers the e4m3 dot
on Hopper to f16 mma.sync (e4m3 values are exact in f16), not fp8 tensor-core instructions: the Mosaic GPU kernel
(`sage_mosaic`) is the fast path there.

`quantize` gives both kernels' token-major operands (the tests' and the benchmark's): q and k to int8 by a
Pallas-Triton pass each (one program per token block of one (batch, head), reading the tokens where they lie: XLA's
version transposes to heads and back), v to e4m3 by XLA (a per-channel max over all tokens, then one scaling pass).
The dispatcher (`sla.sage_sla_attention`) quantises q and k in the block map's pooling pass instead
(`pool_and_quantize`), and for the Mosaic kernel writes v's e4m3 values K-major in one pass after XLA's
per-channel max (`quantize_values_transposed`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.rounding import divide, divide_by_reciprocal, round_to
from pallas_kernels.sla import reference, sage_reference, triton
from pallas_kernels.sla.sage_reference import FP8, INT8_MAX, P_EXP_OFFSET, QK_SCALE_EPS, V_SCALE_MAX, base2_scale
from pallas_kernels.sla.triton import TritonConfig


def supports(q: jax.Array, block_q: int, block_k: int) -> bool:
    """Power-of-two tiles: block_q >= 16 (the dot M), block_k and head_dim >= 32 (the K of 8-bit dots)."""
    pow2 = lambda n, lo: n >= lo and n & (n - 1) == 0
    return pow2(block_q, 16) and pow2(block_k, 32) and pow2(q.shape[-1], 32)


def _kernel(lut_ref, q_ref, qs_ref, k_ref, ks_ref, v_ref, vs_ref, o_ref, *, seq_len, block_q, block_k, n_sel, c):
    """lut_ref [k_pad] int32; q/k_ref int8, v_ref e4m3, o_ref [L, D] of this (batch, head); qs_ref [Nq] and
    ks_ref [Nk] fp32 block scales; vs_ref [D] fp32 channel scales."""
    i = pl.program_id(0)
    row_ok = (i * block_q + jnp.arange(block_q) < seq_len)[:, None]
    q = pltr.load(q_ref.at[pl.ds(i * block_q, block_q), :], mask=row_ok, other=0)
    q_scale = qs_ref[i]
    d = q.shape[-1]
    per_step = sage_reference.blocks_per_step(block_k)

    def step(t, carry, width=per_step):
        """The 128-key softmax step t: LUT blocks per_step * t, ..., + width - 1 under one running max."""
        acc, m, l = carry
        logits, values = [], []
        for half in range(width):
            j = lut_ref[t * per_step + half]
            col_ok = j * block_k + jnp.arange(block_k) < seq_len
            rows = pl.ds(j * block_k, block_k)
            k = pltr.load(k_ref.at[rows, :], mask=col_ok[:, None], other=0)
            s = pltr.dot(q, k, trans_b=True).astype(jnp.float32) * (c * (q_scale * ks_ref[j]))
            logits.append(jnp.where(col_ok[None, :], s, -jnp.inf))
            values.append(pltr.load(v_ref.at[rows, :], mask=col_ok[:, None], other=0.0))
        m_new = functools.reduce(jnp.maximum, [jnp.max(s, axis=1) for s in logits], m)
        alpha = jnp.exp2(m - m_new)
        ps = [jnp.exp2(s - m_new[:, None] + P_EXP_OFFSET) for s in logits]
        products = [pltr.dot(p.astype(FP8), v) for p, v in zip(ps, values)]
        acc = acc * alpha[:, None] + functools.reduce(jnp.add, products)
        return acc, m_new, functools.reduce(jnp.add, [jnp.sum(p, axis=1) for p in ps], l * alpha)

    carry = (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = jax.lax.fori_loop(0, n_sel // per_step, step, carry)
    if n_sel % per_step:  # the last step's remaining blocks
        carry = step(n_sel // per_step, carry, width=n_sel % per_step)
    acc, _, l = carry
    out = acc * (1.0 / l)[:, None] * vs_ref[...][None, :]
    pltr.store(o_ref.at[pl.ds(i * block_q, block_q), :], out.astype(o_ref.dtype), mask=row_ok)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "out_dtype", "config", "interpret"))
def sparse_attention(
    q8: jax.Array, q_scale: jax.Array, k8: jax.Array, k_scale: jax.Array, v8: jax.Array, v_scale: jax.Array,
    lut: jax.Array, *, block_q: int, block_k: int, out_dtype=jnp.bfloat16, config: TritonConfig = TritonConfig(),
    interpret: bool = False,
) -> jax.Array:
    """`sage_reference.sparse_attention` as one Pallas-Triton kernel; same operands ([B, L, H, D] int8 q8, k8 and
    e4m3 v8; block scales [B, H, Nq] / [B, H, Nk]; channel scales [B, H, D]; lut [B, H, Nq, k]) and result."""
    b, l, h, d = q8.shape
    nq, n_sel = lut.shape[2], lut.shape[3]
    if nq != pl.cdiv(l, block_q):
        raise ValueError(f"lut has {nq} query blocks; L={l} with block_q={block_q} needs {pl.cdiv(l, block_q)}")
    k_pad = pl.next_power_of_2(n_sel)
    lut = jnp.pad(lut.astype(jnp.int32), ((0, 0), (0, 0), (0, 0), (0, k_pad - n_sel)))
    seq = pl.BlockSpec((None, l, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    per_head = lambda n: pl.BlockSpec((None, None, n), lambda i, bi, hi: (bi, hi, 0))
    kernel = functools.partial(_kernel, seq_len=l, block_q=block_q, block_k=block_k, n_sel=n_sel,
                               c=float(base2_scale(d)))
    return pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=[pl.BlockSpec((None, None, None, k_pad), lambda i, bi, hi: (bi, hi, i, 0)),
                  seq, per_head(nq), seq, per_head(k_scale.shape[-1]), seq, per_head(d)],
        out_specs=seq,
        out_shape=jax.ShapeDtypeStruct((b, l, h, d), out_dtype),
        compiler_params=pltr.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="sagesla_sparse_fwd",
    )(lut, q8, q_scale, k8, k_scale, v8, v_scale)


HALF_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # inputs whose codes the fast quotient keeps


def _int8_block(x: jax.Array, source_dtype, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """One block's `sage_reference.quantize_blocks` inside a kernel: x [block, D] fp32 (rows past L zero) holding
    source_dtype values -> (int8 [block, D], its fp32 scale). For bf16/fp16 sources x / scale is
    `rounding.divide_by_reciprocal` (its codes equal the IEEE quotient's on every such input, checked by
    enumeration in the tests; 0.17-0.18 instead of 0.23 ms for the pooling pass at H=12, L=32,760 on an H100,
    docs/PERF.md); otherwise the IEEE division."""
    # Reduced one axis at a time: a full reduction does not trace for a GPU target under an explicit mesh.
    scale = jnp.max(jnp.max(jnp.abs(x), axis=1), axis=0) * np.float32(1 / INT8_MAX) + np.float32(QK_SCALE_EPS)
    if jnp.dtype(source_dtype) in HALF_PRECISION:
        recip = divide(jnp.ones((1, 1), jnp.float32), jnp.full((1, 1), scale), interpret)
        y = divide_by_reciprocal(x, jnp.full_like(x, scale), jnp.broadcast_to(recip, x.shape), interpret)
    else:
        y = divide(x, jnp.full_like(x, scale), interpret)
    # |y| < 127.5 (the scale exceeds max|x| / 127 but for rounding): y +- 0.5 truncated is y rounded half away from 0.
    return (y + jnp.where(y >= 0, 0.5, -0.5)).astype(jnp.int32).astype(jnp.int8), scale


def _store_int8_block(x, ok, row0, block, o_ref, s_ref, *, source_dtype, seq_len, interpret):
    """Quantise x [block, D] (rows past L zero; ok [block, 1] their mask; source_dtype values) into o_ref [L, D]
    rows [row0, row0 + block) and its scale into s_ref [N] at row0 // block (nothing where the block starts past
    L)."""
    x8, scale = _int8_block(x, source_dtype, interpret)
    pltr.store(o_ref.at[pl.ds(row0, block), :], x8, mask=ok)
    pltr.store(s_ref.at[pl.ds(row0 // block, 1)], jnp.full((1,), scale, jnp.float32),
               mask=jnp.full((1,), row0 < seq_len))


def _quantize_kernel(x_ref, *refs, seq_len, block, smooth, interpret):
    """Token block i of this (batch, head), like `sage_reference.quantize_blocks`: x_ref [L, D]; with `smooth`, a
    mean_ref [D] whose difference from x is rounded to x's dtype first (`sage_reference.smooth_keys`); o_ref [L, D]
    int8; s_ref [N] fp32 block scales. Rows past L count as 0 and are not stored."""
    mean_ref, o_ref, s_ref = refs if smooth else (None, *refs)
    i = pl.program_id(0)
    rows = pl.ds(i * block, block)
    ok = (i * block + jnp.arange(block) < seq_len)[:, None]
    x = pltr.load(x_ref.at[rows, :], mask=ok, other=0.0).astype(jnp.float32)
    if smooth:
        x = jnp.where(ok, round_to(x - mean_ref[...].astype(jnp.float32)[None, :], x_ref.dtype, interpret), 0.0)
    _store_int8_block(x, ok, i * block, block, o_ref, s_ref, source_dtype=x_ref.dtype, seq_len=seq_len,
                      interpret=interpret)


def _pool_quantize_kernel(q_ref, k_ref, kmean_ref, pq_ref, pk_ref, q8_ref, qs_ref, k8_ref, ks_ref, *, seq_len,
                          block_q, block_k, chunk, interpret):
    """`triton._pool_kernel`'s block means over rows [s * chunk, (s + 1) * chunk), and the same blocks quantised
    (`_quantize_kernel`, k smoothed by the pooling's centring): q8_ref, k8_ref [L, D] int8, qs_ref [Nq], ks_ref [Nk]
    fp32 scales."""
    start = pl.program_id(0) * chunk
    for j in range(chunk // block_q):
        row0 = start + j * block_q
        x, ok = triton.pool_block(q_ref, pq_ref, row0, block_q, None, seq_len=seq_len, interpret=interpret)
        _store_int8_block(x, ok, row0, block_q, q8_ref, qs_ref, source_dtype=q_ref.dtype, seq_len=seq_len,
                          interpret=interpret)
    for j in range(chunk // block_k):
        row0 = start + j * block_k
        x, ok = triton.pool_block(k_ref, pk_ref, row0, block_k, kmean_ref[...], seq_len=seq_len, interpret=interpret)
        _store_int8_block(x, ok, row0, block_k, k8_ref, ks_ref, source_dtype=k_ref.dtype, seq_len=seq_len,
                          interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "rows", "num_warps", "interpret"))
def pool_and_quantize(q: jax.Array, k: jax.Array, k_mean: jax.Array, *, block_q: int, block_k: int, rows: int = 128,
                      num_warps: int = 8, interpret: bool = False):
    """`triton.pooled_blocks` and `quantize_blocks` of q and of k smoothed by k_mean in one pass over q and k
    [B, L, H, D]: ((pooled q [B, H, Nq, D], pooled centred k [B, H, Nk, D]), (q8, q_scale [B, H, Nq], k8,
    k_scale [B, H, Nk])). The block map's pooling and SageSLA's quantisation read the same blocks (the pooled
    keys are the smoothed ones), so one pass serves both. rows: as `triton.pooled_blocks`'. The defaults measured
    fastest on an H100 (docs/PERF.md): 0.234 ms at H = 12, L = 32,760, where the pooling and the two quantisers
    take 0.09 + 0.09 + 0.10 ms as separate passes; 256-row programs with 4 warps took 0.75 ms."""
    b, l, h, d = q.shape
    if any(n & (n - 1) for n in (block_q, block_k, d)):
        raise ValueError(f"the Triton pooling quantiser needs power-of-two blocks and head_dim; got ({block_q}, "
                         f"{block_k}), head_dim={d}")
    chunk = pl.cdiv(rows, math.lcm(block_q, block_k)) * math.lcm(block_q, block_k)
    nq, nk = pl.cdiv(l, block_q), pl.cdiv(l, block_k)
    seq = pl.BlockSpec((None, l, None, d), lambda s, bi, hi: (bi, 0, hi, 0))
    per_head = lambda *shape: pl.BlockSpec((None, None, *shape), lambda s, bi, hi: (bi, hi) + (0,) * len(shape))
    pq, pk, q8, q_scale, k8, k_scale = pl.pallas_call(
        functools.partial(_pool_quantize_kernel, seq_len=l, block_q=block_q, block_k=block_k, chunk=chunk,
                          interpret=interpret),
        grid=(pl.cdiv(l, chunk), b, h),
        in_specs=[seq, seq, per_head(d)],
        out_specs=[per_head(nq, d), per_head(nk, d), seq, per_head(nq), seq, per_head(nk)],
        out_shape=[jax.ShapeDtypeStruct((b, h, nq, d), q.dtype), jax.ShapeDtypeStruct((b, h, nk, d), k.dtype),
                   jax.ShapeDtypeStruct(q.shape, jnp.int8), jax.ShapeDtypeStruct((b, h, nq), jnp.float32),
                   jax.ShapeDtypeStruct(k.shape, jnp.int8), jax.ShapeDtypeStruct((b, h, nk), jnp.float32)],
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="sagesla_pool_quantize",
    )(q, k, k_mean.astype(k.dtype))
    return (pq, pk), (q8, q_scale, k8, k_scale)


@functools.partial(jax.jit, static_argnames=("block", "num_warps", "interpret"))
def quantize_blocks(x: jax.Array, mean: jax.Array | None = None, *, block: int, num_warps: int = 4,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`sage_reference.quantize_blocks` of x [B, L, H, D], or of x - mean (mean [B, H, D], the difference rounded to
    x's dtype) where mean is given: (int8 [B, L, H, D], fp32 scales [B, H, ceil(L/block)]); block a power of two."""
    b, l, h, d = x.shape
    if block < 1 or block & (block - 1) or d & (d - 1):
        raise ValueError(f"the Triton quantiser needs a power-of-two block and head_dim; got block={block}, "
                         f"head_dim={d} (use sage_reference.quantize_blocks)")
    n = pl.cdiv(l, block)
    seq = pl.BlockSpec((None, l, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    per_head = lambda size: pl.BlockSpec((None, None, size), lambda i, bi, hi: (bi, hi, 0))
    smooth = mean is not None
    return pl.pallas_call(
        functools.partial(_quantize_kernel, seq_len=l, block=block, smooth=smooth, interpret=interpret),
        grid=(n, b, h),
        in_specs=[seq] + ([per_head(d)] if smooth else []),
        out_specs=[seq, per_head(n)],
        out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.int8), jax.ShapeDtypeStruct((b, h, n), jnp.float32)],
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="sagesla_quantize_blocks",
    )(x, *([mean.astype(x.dtype)] if smooth else []))


def _values_kernel(v_ref, recip_ref, o_ref, *, seq_len, block, key_order):
    """Token block i of this (batch, head): v_ref [L, D] -> o_ref [D, L_pad] columns i * block + [0, block), the
    e4m3 values of `sage_reference.quantize_v` (recip_ref [D]: 2.25 / amax per channel), transposed; key_order:
    the tokens of each 16-token group in `sage_mosaic.KEY_ORDER` (token 16g + 8h + 2c + e at column
    16g + 4c + 2h + e). Tokens past L are zeros."""
    i = pl.program_id(0)
    ok = (i * block + jnp.arange(block) < seq_len)[:, None]
    x = pltr.load(v_ref.at[pl.ds(i * block, block), :], mask=ok, other=0.0).astype(jnp.float32)
    # Tokens past L are zeros also where amax is subnormal and its reciprocal inf (0 * inf would be NaN).
    v8 = jnp.where(ok, x * recip_ref[...][None, :], 0.0).astype(FP8)  # [block, D]
    d = v8.shape[1]
    vt = v8.reshape(block // 16, 2, 4, 2, d).transpose(4, 0, 2, 1, 3).reshape(d, block) if key_order else v8.T
    o_ref[:, pl.ds(i * block, block)] = vt


@functools.partial(jax.jit, static_argnames=("block_k", "key_order", "num_warps", "interpret"))
def quantize_values_transposed(v: jax.Array, *, block_k: int, key_order: bool, num_warps: int = 4,
                               interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`sage_reference.quantize_v` of v [B, L, H, D] written K-major for an 8-bit P.V: (e4m3 [B, H, D, L_pad],
    fp32 per-channel scales [B, H, D]), L_pad = L rounded up to block_k, zero-padded; key_order: the tokens of each
    16-token group in `sage_mosaic.KEY_ORDER` (P's key order when the Mosaic kernel reads P from registers).
    The same bytes as transposing `quantize_v`'s output (`sage_mosaic.transpose_values`), in one pass over v after
    XLA's per-channel max: XLA's transpose with the key permutation took 0.40 ms alone at H=12, L=32,760 (H100).
    One program per key block of one (batch, head) (128-token programs measured the same)."""
    b, l, h, d = v.shape
    l_pad = pl.cdiv(l, block_k) * block_k
    if block_k % 16 or block_k & (block_k - 1) or d & (d - 1):
        raise ValueError(f"the Triton V quantiser needs a power-of-two block_k >= 16 and head_dim; got "
                         f"block_k={block_k}, head_dim={d}")
    amax = jnp.max(jnp.abs(v), axis=1).astype(jnp.float32)  # [B, H, D]
    recip = jnp.where(amax > 0, V_SCALE_MAX / jnp.where(amax > 0, amax, 1.0), 0.0)
    vt = pl.pallas_call(
        functools.partial(_values_kernel, seq_len=l, block=block_k, key_order=key_order),
        grid=(l_pad // block_k, b, h),
        in_specs=[pl.BlockSpec((None, l, None, d), lambda i, bi, hi: (bi, 0, hi, 0)),
                  pl.BlockSpec((None, None, d), lambda i, bi, hi: (bi, hi, 0))],
        out_specs=pl.BlockSpec((None, None, d, l_pad), lambda i, bi, hi: (bi, hi, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, d, l_pad), FP8),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="sagesla_quantize_values",
    )(v, recip)
    return vt, amax * np.float32(1 / V_SCALE_MAX)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
def quantize(q, k, v, *, block_q: int, block_k: int, k_mean: jax.Array | None = None, interpret: bool = False):
    """`sage_reference.quantize` (K smoothed): (q8, q_scale, k8, k_scale, v8, v_scale). k_mean [B, H, D]: the key
    mean where the caller has it (the key-statistics passes compute it for the block map), else `reference.key_mean`
    here."""
    k_mean = reference.key_mean(k) if k_mean is None else k_mean
    q8, q_scale = quantize_blocks(q, block=block_q, interpret=interpret)
    k8, k_scale = quantize_blocks(k, k_mean, block=block_k, interpret=interpret)
    return (q8, q_scale, k8, k_scale, *sage_reference.quantize_v(v))
