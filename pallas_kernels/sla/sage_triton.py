"""SageSLA's sparse branch as a Pallas-Triton kernel: the portable path (any GPU with fp8 conversions, sm89+).

One program per (query block, batch, head), like `triton.sparse_attention`, walking its LUT row in ascending order:
an int8 x int8 -> int32 Q.K^T per key block, dequantised with the q- and k-block scales into base-2 logits; the
online softmax of `sage_reference` (P~ = 2^(s - m + 8.807) in (0, 448], its fp32 row sums as the denominator);
e4m3(P~) . e4m3 V into a fresh fp32 block product added to the rescaled accumulator; the per-channel V scale in the
epilogue. Triton lowers the e4m3 dot on Hopper to f16 mma.sync (e4m3 values are exact in f16), not fp8 tensor-core
instructions: the Mosaic GPU kernel (`sage_mosaic`) is the fast path there.

`quantize` prepares both kernels' operands: q and k to int8 by a Pallas-Triton pass each (one program per token
block of one (batch, head), reading the tokens where they lie: XLA's version transposes to heads and back), v to
e4m3 by XLA (a per-channel max over all tokens, then one scaling pass).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.rounding import divide, round_to
from pallas_kernels.sla import reference, sage_reference
from pallas_kernels.sla.sage_reference import FP8, INT8_MAX, P_EXP_OFFSET, QK_SCALE_EPS, base2_scale
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

    def body(t, carry):
        acc, m, l = carry
        j = lut_ref[t]
        col_ok = j * block_k + jnp.arange(block_k) < seq_len
        rows = pl.ds(j * block_k, block_k)
        k = pltr.load(k_ref.at[rows, :], mask=col_ok[:, None], other=0)
        s = pltr.dot(q, k, trans_b=True).astype(jnp.float32) * (c * (q_scale * ks_ref[j]))
        s = jnp.where(col_ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None] + P_EXP_OFFSET)
        v = pltr.load(v_ref.at[rows, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + pltr.dot(p.astype(FP8), v)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    init = (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, _, l = jax.lax.fori_loop(0, n_sel, body, init)
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
    # Reduced one axis at a time: a full reduction does not trace for a GPU target under an explicit mesh.
    scale = jnp.max(jnp.max(jnp.abs(x), axis=1), axis=0) * np.float32(1 / INT8_MAX) + np.float32(QK_SCALE_EPS)
    y = divide(x, jnp.full_like(x, scale), interpret)
    # |y| < 127.5 (the scale exceeds max|x| / 127 but for rounding): y +- 0.5 truncated is y rounded half away from 0.
    x8 = (y + jnp.where(y >= 0, 0.5, -0.5)).astype(jnp.int32).astype(jnp.int8)
    pltr.store(o_ref.at[rows, :], x8, mask=ok)
    pltr.store(s_ref.at[pl.ds(i, 1)], jnp.full((1,), scale, jnp.float32))


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


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
def quantize(q, k, v, *, block_q: int, block_k: int, k_mean: jax.Array | None = None, interpret: bool = False):
    """`sage_reference.quantize` (K smoothed): (q8, q_scale, k8, k_scale, v8, v_scale). k_mean [B, H, D]: the key
    mean where the caller has it (the key-statistics passes compute it for the block map), else `reference.key_mean`
    here."""
    k_mean = reference.key_mean(k) if k_mean is None else k_mean
    q8, q_scale = quantize_blocks(q, block=block_q, interpret=interpret)
    k8, k_scale = quantize_blocks(k, k_mean, block=block_k, interpret=interpret)
    return (q8, q_scale, k8, k_scale, *sage_reference.quantize_v(v))
