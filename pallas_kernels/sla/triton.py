"""SLA as Pallas-Triton kernels: the block-sparse softmax branch, and the linear branch's output fused with proj_l.

`sparse_attention`: one program per (query block, batch, head). It loads its query block once, then walks the k
selected key blocks of its LUT row: a data-dependent load of each K/V block, an exp2 online softmax in fp32, and a
bf16 P.V with fp32 accumulation. Rows and keys past the sequence end are masked, so ragged lengths (32,760 =
255.9 x 128) need no padding copies. q, k, v stay in the DiT's [B, L, H, D] layout; each program sees its (b, h)
slice as an [L, D] ref.

`linear_state`: the linear branch's per-head state kv = phi(k)^T v, k_sum = sum phi(k) in one pass over k and v.

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


def _state_kernel(k_ref, v_ref, kv_ref, ksum_ref, *, seq_len, block, chunk):
    """Partial sums over rows [s * chunk, (s + 1) * chunk) of this (batch, head): kv_ref [D, D], ksum_ref [D] fp32."""
    start = pl.program_id(0) * chunk
    d = k_ref.shape[-1]

    def body(i, carry):
        kv, ksum = carry
        rows = pl.ds(start + i * block, block)
        row_ok = (start + i * block + jnp.arange(block) < seq_len)[:, None]
        k = pltr.load(k_ref.at[rows, :], mask=row_ok, other=0.0).astype(jnp.float32)
        e = jnp.exp(k - jnp.max(k, axis=1, keepdims=True))
        # One reciprocal per row, not a division per element (its bf16 phi came out identical on an H100).
        phi = jnp.where(row_ok, e * (1.0 / jnp.sum(e, axis=1, keepdims=True)), 0.0).astype(v_ref.dtype)
        v = pltr.load(v_ref.at[rows, :], mask=row_ok, other=0.0)
        return kv + _dot(phi, v, trans_a=True), ksum + jnp.sum(phi.astype(jnp.float32), axis=0)

    kv, ksum = jax.lax.fori_loop(0, chunk // block, body, (jnp.zeros((d, d), jnp.float32), jnp.zeros((d,), jnp.float32)))
    kv_ref[...] = kv
    ksum_ref[...] = ksum


def state_launch(slices: int) -> tuple[int, int]:
    """(num_warps, num_stages) of `linear_state` for `slices` = batch x heads, as measured fastest on an H100
    (docs/PERF.md): with 12 slices (1.3B) its 32 x 12 programs fill the GPU better with 8 warps and a 3-deep load
    pipeline (0.166 vs 0.237 ms at L = 32,760); with 40 (14B), 4 warps and 2 stages (0.93 ms at L = 75,600;
    8 warps 1.17 ms)."""
    return (8, 3) if slices < 32 else (4, 2)


@functools.partial(jax.jit, static_argnames=("block", "splits", "num_warps", "num_stages", "interpret"))
def linear_state(k: jax.Array, v: jax.Array, *, block: int = 64, splits: int = 32, num_warps: int | None = None,
                 num_stages: int | None = None, interpret: bool = False):
    """`reference.linear_state` in one pass over k and v: (kv [B, H, D, D], k_sum [B, H, D]) in k's dtype.

    The token axis is split `splits` ways so that B x H x splits programs fill the GPU; the fp32 partial sums are
    added in XLA and rounded once, like the reference's fp32-accumulated product. num_warps/num_stages None:
    `state_launch(B * H)`."""
    b, l, h, d = k.shape
    warps, stages = state_launch(b * h)
    chunk = pl.cdiv(pl.cdiv(l, splits), block) * block
    seq = pl.BlockSpec((None, l, None, d), lambda s, bi, hi: (bi, 0, hi, 0))
    kv, ksum = pl.pallas_call(
        functools.partial(_state_kernel, seq_len=l, block=block, chunk=chunk),
        grid=(pl.cdiv(l, chunk), b, h),
        in_specs=[seq, seq],
        out_specs=[pl.BlockSpec((None, None, None, d, d), lambda s, bi, hi: (s, bi, hi, 0, 0)),
                   pl.BlockSpec((None, None, None, d), lambda s, bi, hi: (s, bi, hi, 0))],
        out_shape=[jax.ShapeDtypeStruct((pl.cdiv(l, chunk), b, h, d, d), jnp.float32),
                   jax.ShapeDtypeStruct((pl.cdiv(l, chunk), b, h, d), jnp.float32)],
        compiler_params=pltr.CompilerParams(num_warps=num_warps or warps, num_stages=num_stages or stages),
        interpret=interpret,
        name="sla_linear_state",
    )(k, v)
    return kv.sum(axis=0).astype(k.dtype), ksum.sum(axis=0).astype(k.dtype)
