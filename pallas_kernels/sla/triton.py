"""SLA as Pallas-Triton kernels: the block-sparse softmax branch, and the linear branch's output fused with proj_l.

`sparse_attention`: one program per (query block, batch, head). It loads its query block once, then walks the k
selected key blocks of its LUT row: a data-dependent load of each K/V block, an exp2 online softmax in fp32, and a
bf16 P.V with fp32 accumulation. Rows and keys past the sequence end are masked, so ragged lengths (32,760 =
255.9 x 128) need no padding copies. q, k, v stay in the DiT's [B, L, H, D] layout; each program sees its (b, h)
slice as an [L, D] ref.

`key_statistics`: everything SLA needs of all the keys in one pass over k and v: the linear branch's per-head state
kv = phi(k)^T v, k_sum = sum phi(k) (`linear_state` returns those two), and the block map's key mean.

`pooled_blocks`: the block map's block means of q and of the mean-centred k in one pass over q and k.

`linear_epilogue`: o = o_sparse + proj_l(phi(q) kv / (1e-5 + phi(q) . k_sum)) per (row block, batch, head), with the
per-head state (kv, k_sum) computed beforehand. In XLA this output side is ~10 passes over [B, L, H, D] tensors
(phi(q), two products, the division, proj_l, the sum); here it is one read of q and o_sparse and one write.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.rounding import divide, round_to
from pallas_kernels.sla import reference

LOG2E = math.log2(math.e)


def _dot(a, b, **kw):
    """Tensor-core dot with fp32 accumulation; fp32 operands get full fp32 (Triton's fp32 default is TF32)."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return pltr.dot(a, b, precision=precision, **kw)


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch parameters; block sizes come from the SLA block map itself."""

    num_warps: int = 8
    num_stages: int = 2


def _sparse_kernel(lut_ref, q_ref, k_ref, v_ref, o_ref, *, seq_len, block_q, block_k, n_sel, scale):
    """lut_ref [k_pad] int32; q_ref, k_ref, v_ref, o_ref [L, D] of this (batch, head)."""
    i = pl.program_id(0)
    rows = i * block_q + jnp.arange(block_q)
    row_ok = (rows < seq_len)[:, None]
    q = pltr.load(q_ref.at[pl.ds(i * block_q, block_q), :], mask=row_ok, other=0.0)
    d = q.shape[-1]

    def body(t, carry):
        acc, m, l = carry
        start = lut_ref[t] * block_k
        col_ok = start + jnp.arange(block_k) < seq_len
        k = pltr.load(k_ref.at[pl.ds(start, block_k), :], mask=col_ok[:, None], other=0.0)
        s = _dot(q, k.T) * (scale * LOG2E)
        s = jnp.where(col_ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = pltr.load(v_ref.at[pl.ds(start, block_k), :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    init = (
        jnp.zeros((block_q, d), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, _, l = jax.lax.fori_loop(0, n_sel, body, init)
    pltr.store(o_ref.at[pl.ds(i * block_q, block_q), :], (acc / l[:, None]).astype(o_ref.dtype), mask=row_ok)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "config", "interpret"))
def sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lut: jax.Array,
    *,
    block_q: int,
    block_k: int,
    config: TritonConfig = TritonConfig(),
    interpret: bool = False,
) -> jax.Array:
    """Block-sparse softmax attention over the key blocks in lut [B, H, Nq, k]; q, k, v [B, L, H, D] -> [B, L, H, D].

    Same semantics as `reference.sparse_attention`."""
    b, l, h, d = q.shape
    nq, n_sel = lut.shape[2], lut.shape[3]
    if nq != pl.cdiv(l, block_q):
        raise ValueError(f"lut has {nq} query blocks; L={l} with block_q={block_q} needs {pl.cdiv(l, block_q)}")
    k_pad = pl.next_power_of_2(n_sel)
    lut = jnp.pad(lut.astype(jnp.int32), ((0, 0), (0, 0), (0, 0), (0, k_pad - n_sel)))
    seq = pl.BlockSpec((None, l, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    kernel = functools.partial(
        _sparse_kernel, seq_len=l, block_q=block_q, block_k=block_k, n_sel=n_sel, scale=1.0 / math.sqrt(d)
    )
    return pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=[pl.BlockSpec((None, None, None, k_pad), lambda i, bi, hi: (bi, hi, i, 0)), seq, seq, seq],
        out_specs=seq,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltr.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="sla_sparse_fwd",
    )(lut, q, k, v)


def _epilogue_kernel(q_ref, os_ref, kv_ref, ksum_ref, w_ref, b_ref, o_ref, *, seq_len, block):
    """q/os/o_ref [L, D] of this (batch, head); kv_ref [D, D]; ksum_ref, b_ref [D]; w_ref [D, D] ([out, in])."""
    i = pl.program_id(0)
    rows = pl.ds(i * block, block)
    row_ok = (i * block + jnp.arange(block) < seq_len)[:, None]
    dt = o_ref.dtype
    q = pltr.load(q_ref.at[rows, :], mask=row_ok, other=0.0).astype(jnp.float32)
    e = jnp.exp(q - jnp.max(q, axis=1, keepdims=True))
    phi = (e / jnp.sum(e, axis=1, keepdims=True)).astype(dt)
    num = _dot(phi, kv_ref[...]).astype(dt)
    den = jnp.sum((phi * ksum_ref[...][None, :]).astype(jnp.float32), axis=1, keepdims=True).astype(dt)
    o_lin = (num.astype(jnp.float32) / (den + jnp.asarray(1e-5, dt)).astype(jnp.float32)).astype(dt)
    proj = (_dot(o_lin, w_ref[...].T) + b_ref[...][None, :].astype(jnp.float32)).astype(dt)
    o_sparse = pltr.load(os_ref.at[rows, :], mask=row_ok, other=0.0)
    pltr.store(o_ref.at[rows, :], (o_sparse.astype(jnp.float32) + proj.astype(jnp.float32)).astype(dt), mask=row_ok)


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def linear_epilogue(
    q: jax.Array, o_sparse: jax.Array, kv: jax.Array, k_sum: jax.Array, proj_w: jax.Array, proj_b: jax.Array | None,
    *, block: int = 64, interpret: bool = False,
) -> jax.Array:
    """o_sparse + proj_l(linear_output(q, kv, k_sum)), rounded like `reference.add_linear_branch`.

    q, o_sparse [B, L, H, D]; kv [B, H, D, D]; k_sum [B, H, D]; proj_w [D, D]; proj_b [D] or None."""
    b, l, h, d = q.shape
    dt = q.dtype
    proj_b = jnp.zeros((d,), dt) if proj_b is None else proj_b.astype(dt)
    seq = pl.BlockSpec((None, l, None, d), lambda i, bi, hi: (bi, 0, hi, 0))
    whole = lambda shape: pl.BlockSpec(shape, lambda i, bi, hi: (0,) * len(shape))
    return pl.pallas_call(
        functools.partial(_epilogue_kernel, seq_len=l, block=block),
        grid=(pl.cdiv(l, block), b, h),
        in_specs=[
            seq, seq,
            pl.BlockSpec((None, None, d, d), lambda i, bi, hi: (bi, hi, 0, 0)),
            pl.BlockSpec((None, None, d), lambda i, bi, hi: (bi, hi, 0)),
            whole((d, d)), whole((d,)),
        ],
        out_specs=seq,
        out_shape=jax.ShapeDtypeStruct(q.shape, dt),
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="sla_linear_epilogue",
    )(q, o_sparse, kv.astype(dt), k_sum.astype(dt), proj_w.astype(dt), proj_b)


def _state_kernel(k_ref, v_ref, kv_ref, ksum_ref, kcol_ref, *, seq_len, block, chunk):
    """Partial sums over rows [s * chunk, (s + 1) * chunk) of this (batch, head): kv_ref [D, D], ksum_ref [D] (phi(k)
    summed) and kcol_ref [D] (k summed, for the block map's key mean), fp32."""
    start = pl.program_id(0) * chunk
    d = k_ref.shape[-1]

    def body(i, carry):
        kv, ksum, kcol = carry
        rows = pl.ds(start + i * block, block)
        row_ok = (start + i * block + jnp.arange(block) < seq_len)[:, None]
        k = pltr.load(k_ref.at[rows, :], mask=row_ok, other=0.0).astype(jnp.float32)
        e = jnp.exp(k - jnp.max(k, axis=1, keepdims=True))
        # One reciprocal per row, not a division per element (its bf16 phi came out identical on an H100).
        phi = jnp.where(row_ok, e * (1.0 / jnp.sum(e, axis=1, keepdims=True)), 0.0).astype(v_ref.dtype)
        v = pltr.load(v_ref.at[rows, :], mask=row_ok, other=0.0)
        return (kv + _dot(phi, v, trans_a=True), ksum + jnp.sum(phi.astype(jnp.float32), axis=0),
                kcol + jnp.sum(k, axis=0))

    zeros = jnp.zeros((d,), jnp.float32)
    kv, ksum, kcol = jax.lax.fori_loop(0, chunk // block, body, (jnp.zeros((d, d), jnp.float32), zeros, zeros))
    kv_ref[...] = kv
    ksum_ref[...] = ksum
    kcol_ref[...] = kcol


@functools.partial(jax.jit, static_argnames=("block", "rows", "num_warps", "num_stages", "interpret"))
def key_statistics(k: jax.Array, v: jax.Array, *, block: int = 32, rows: int = 1536, num_warps: int = 4,
                   num_stages: int = 3, interpret: bool = False):
    """One pass over k and v [B, L, H, D] for everything SLA needs of all the keys: the linear branch's state
    (`reference.linear_state`: kv [B, H, D, D], k_sum [B, H, D]) and the block map's key mean
    (`reference.key_mean`, [B, H, D]), all in k's dtype.

    Each program sums about `rows` tokens of one (batch, head), `block` at a time; the fp32 partial sums are added in
    XLA and rounded once, like the reference's fp32-accumulated product. The defaults measured fastest on an H100
    (docs/PERF.md): the [D, D] fp32 accumulator fills most of the register file (Nsight Compute: one 8-warp program
    per SM at 64-row blocks), so short `block`s leave registers for the loads, and ~1,500-row programs (22 per head
    at L = 32,760) balance the SMs: 0.150 ms at H = 12, L = 32,760 (64-row blocks, 8 warps, 32 programs per head:
    0.189 ms)."""
    b, l, h, d = k.shape
    chunk = pl.cdiv(min(rows, l), block) * block
    n = pl.cdiv(l, chunk)
    seq = pl.BlockSpec((None, l, None, d), lambda s, bi, hi: (bi, 0, hi, 0))
    vec = pl.BlockSpec((None, None, None, d), lambda s, bi, hi: (s, bi, hi, 0))
    kv, ksum, kcol = pl.pallas_call(
        functools.partial(_state_kernel, seq_len=l, block=block, chunk=chunk),
        grid=(n, b, h),
        in_specs=[seq, seq],
        out_specs=[pl.BlockSpec((None, None, None, d, d), lambda s, bi, hi: (s, bi, hi, 0, 0)), vec, vec],
        out_shape=[jax.ShapeDtypeStruct((n, b, h, d, d), jnp.float32),
                   jax.ShapeDtypeStruct((n, b, h, d), jnp.float32), jax.ShapeDtypeStruct((n, b, h, d), jnp.float32)],
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sla_linear_state",
    )(k, v)
    return reference.sum_key_statistics(kv, ksum, kcol, l, k.dtype)


def linear_state(k: jax.Array, v: jax.Array, **launch):
    """`reference.linear_state` by `key_statistics`' pass: (kv [B, H, D, D], k_sum [B, H, D]) in k's dtype."""
    kv, k_sum, _ = key_statistics(k, v, **launch)
    return kv, k_sum


def pool_block(x_ref, out_ref, row0, block: int, center, *, seq_len: int, interpret: bool):
    """The mean of x_ref [L, D] rows [row0, row0 + block) (minus `center` [D], rounded to x's dtype, where given)
    stored at row row0 // block of out_ref [N, D], like `reference.pooled_blocks`: sums in fp32, divided by the real
    row count. Returns the block's rows in fp32 ([block, D], centred, rows past L zero) and their mask [block, 1],
    for a caller that has more to do with them (`sage_triton.pool_and_quantize`)."""
    ok = (row0 + jnp.arange(block) < seq_len)[:, None]
    x = pltr.load(x_ref.at[pl.ds(row0, block), :], mask=ok, other=0.0).astype(jnp.float32)
    if center is not None:
        x = jnp.where(ok, round_to(x - center.astype(jnp.float32)[None, :], x_ref.dtype, interpret), 0.0)
    total = jnp.sum(x, axis=0, keepdims=True)
    count = jnp.clip(seq_len - row0, 1, block).astype(jnp.float32)  # 1 past the end: not stored
    blk = row0 // block
    mean = divide(total, jnp.full_like(total, count), interpret)  # IEEE: the ragged last block's count
    pltr.store(out_ref.at[pl.ds(blk, 1), :], mean.astype(out_ref.dtype),
               mask=jnp.full(mean.shape, blk * block < seq_len))
    return x, ok


def _pool_kernel(q_ref, k_ref, kmean_ref, pq_ref, pk_ref, *, seq_len, block_q, block_k, chunk, interpret):
    """Block means over rows [s * chunk, (s + 1) * chunk) of this (batch, head): q_ref, k_ref [L, D]; kmean_ref [D];
    pq_ref [Nq, D] and pk_ref [Nk, D] take the means of q's and of (k - k_mean)'s blocks (`pool_block`)."""
    start = pl.program_id(0) * chunk
    for j in range(chunk // block_q):
        pool_block(q_ref, pq_ref, start + j * block_q, block_q, None, seq_len=seq_len, interpret=interpret)
    for j in range(chunk // block_k):
        pool_block(k_ref, pk_ref, start + j * block_k, block_k, kmean_ref[...], seq_len=seq_len, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "rows", "num_warps", "interpret"))
def pooled_blocks(q: jax.Array, k: jax.Array, k_mean: jax.Array, *, block_q: int, block_k: int, rows: int = 256,
                  num_warps: int = 4, interpret: bool = False):
    """`reference.pooled_blocks` in one pass over q and k [B, L, H, D] (k_mean [B, H, D]): (pooled q [B, H, Nq, D]
    in q's dtype, pooled centred k [B, H, Nk, D] in k's dtype). Each program pools about `rows` rows of one (batch,
    head): the nearest multiple of both block sizes at or above it. The defaults measured fastest on an H100 at every
    benchmark shape, or within 5% (docs/PERF.md): 0.086 ms at H = 12, L = 32,760, where XLA takes ~0.11 ms."""
    b, l, h, d = q.shape
    chunk = pl.cdiv(rows, math.lcm(block_q, block_k)) * math.lcm(block_q, block_k)
    nq, nk = pl.cdiv(l, block_q), pl.cdiv(l, block_k)
    seq = pl.BlockSpec((None, l, None, d), lambda s, bi, hi: (bi, 0, hi, 0))
    pooled = lambda n: pl.BlockSpec((None, None, n, d), lambda s, bi, hi: (bi, hi, 0, 0))
    return pl.pallas_call(
        functools.partial(_pool_kernel, seq_len=l, block_q=block_q, block_k=block_k, chunk=chunk,
                          interpret=interpret),
        grid=(pl.cdiv(l, chunk), b, h),
        in_specs=[seq, seq, pl.BlockSpec((None, None, d), lambda s, bi, hi: (bi, hi, 0))],
        out_specs=[pooled(nq), pooled(nk)],
        out_shape=[jax.ShapeDtypeStruct((b, h, nq, d), q.dtype), jax.ShapeDtypeStruct((b, h, nk, d), k.dtype)],
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="sla_pool_blocks",
    )(q, k, k_mean.astype(k.dtype))
