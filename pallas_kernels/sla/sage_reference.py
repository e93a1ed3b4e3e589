"""Pure-jnp SageSLA: SLA with an INT8 Q.K^T and an FP8 P.V, the semantics every SageSLA kernel must reproduce.

Spec: acceleration.md 4, checked against TurboDiffusion's `SageSparseLinearAttention` and the SpargeAttn kernels it
calls (thu-ml/SpargeAttn bfd980b: `utils.qk_quantize`, `fused.cu:MeanScaleKernel`, `qk_int_sv_f8_cuda_sm90.cuh`).
The block map, the linear branch and proj_l are SLA's (`reference`); only the sparse branch changes. Per (batch,
head), with q, k, v [L, D] after the q/k RMSNorm and RoPE, in the order upstream rounds:

  K smoothing   km = mean_L(k) rounded to k's dtype; k_s = k - km rounded to k's dtype. Exact for the output: the
                softmax is invariant to the per-row shift q.km.
  Q, K to int8  per block of block_q (q) or block_k (k_s) tokens: scale = max|x|/127 + 1e-7 (fp32, padding rows
                count as 0); x8 = trunc(x/scale + 0.5 sign(x)), i.e. half away from zero, in [-127, 127].
  V to fp8      per channel over all L tokens: amax = max|v|; v_scale = amax/2.25; v8 = e4m3(v * fp32(2.25/amax)),
                round to nearest even. An all-zero channel (upstream divides by 0 and gets NaN) gets v8 = 0 and
                v_scale = 0 here.
                The divisions by the constants 127 and 2.25 are written as products with f32(1/127) and f32(1/2.25):
                XLA rewrites them so anyway, and upstream's may differ by an ulp (Triton's default fp32 division is
                approximate), so a value within an ulp of a .5 tie may land on the other integer. Divisions by
                data (x/scale, 2.25/amax) are IEEE on the CPU; on a GPU XLA's fp32 division is not correctly
                rounded (tests/test_int8_matmul.py), with the same effect on near-tie values.
  logits        base 2: s = f32(q8.k8 in int32) * (c * (q_scale_i * k_scale_j)), c = f32(f32(1/sqrt(D)) * log2 e);
                keys past L get -inf.
  softmax, P.V  online over the LUT's key blocks in ascending order (the order upstream's delta-coded LUT walks),
                in steps of 128 keys (`KEYS_PER_STEP`: 128 / block_k consecutive LUT blocks, the last step holding
                what remains; one block a step from 128 keys on), as upstream's sm90 kernel (64 x 128 blocks)
                steps over its 128-key blocks: s the step's logits,
                m' = max(m, rowmax s); alpha = 2^(m - m'); P~ = 2^(s - m' + 8.807); the denominator l' = alpha l +
                rowsum(P~) uses P~ in fp32; the step's product e4m3(P~) . v8 goes into a fresh fp32 accumulator that
                is added to alpha acc. So P~ is rounded to e4m3 against the running max of its 128-key step.
                With 64-key blocks both blocks of a step share one max: a deliberate departure from upstream, whose
                128 x 64 blocks run only off Hopper, in its sm89 kernel, one 64-key block a step (its first block's
                P~ rounded against a smaller max). The same quality (cos-sim to bf16 SLA equal to five digits,
                docs/PERF.md, twelfth session), other bits; the Hopper kernel runs half the steps, 18% faster.
                Upstream's own H100 blocks, 64 x 128, are one block a step either way.
                The 8.807 = log2(448) offset puts P~ in (0, 448], e4m3's range: this is what the
                sm90 kernel TurboDiffusion calls does (update_mdo<..., exp_offset=true>), and the sm89 one too.
                acceleration.md 4.4 says P is cast unscaled on sm90; upstream wins.
  output        o = acc * (1/l) * v_scale, rounded to the output dtype (bf16).
Differences from upstream's kernels that are not rounding-order: exp2 here is exact (upstream: ex2.approx.ftz), and
1/l is a true reciprocal (upstream: rcp.approx).

The int8 and e4m3 values are exact in bf16, and every product and partial sum of q8.k8 (|sum| <= 127^2 D < 2^24)
is exact in fp32, so the products below run as bf16 dots with fp32 accumulation: the int32 Q.K^T exactly, and
P.V as an fp32-accumulated e4m3 product, without XLA's slow integer-dot paths.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.rounding import exact_f32
from pallas_kernels.sla.reference import _einsum, _pad_blocks, _to_heads, add_linear_branch, block_map, key_mean

f32 = jnp.float32
INT8_MAX = 127.0
QK_SCALE_EPS = 1e-7  # added to every q/k block scale (an all-zero block quantises to 0)
V_SCALE_MAX = 2.25  # v8 spans [-2.25, 2.25]: TurboDiffusion's scale_max for every fp8 SageSLA kernel
P_EXP_OFFSET = 8.807  # log2(448): P~ = 2^(s - max + 8.807) <= 448, the largest finite e4m3 value
KEYS_PER_STEP = 128  # keys per online-softmax step (P's rounding max), upstream's sm90 key block
FP8 = jnp.float8_e4m3fn


def base2_scale(head_dim: int) -> np.float32:
    """The softmax scale in base 2, rounded like upstream: f32(f32(1/sqrt(D)) * f32(log2 e))."""
    return np.float32(np.float32(1.0 / math.sqrt(head_dim)) * np.float32(math.log2(math.e)))


def smooth_keys(k: jax.Array) -> jax.Array:
    """k - mean_L(k) over the tokens of each (batch, head), mean and difference rounded to k's dtype.
    k [B, L, H, D] -> same shape and dtype."""
    km = exact_f32(key_mean(k)[:, None])  # the block map's key mean, [B, 1, H, D]
    return exact_f32(exact_f32(k) - km).astype(k.dtype)  # pinned: under jit XLA could keep k - km in fp32


def quantize_blocks(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """x [B, L, H, D] -> (int8 [B, L, H, D], fp32 scales [B, H, ceil(L/block)]), one scale per block of tokens
    per (batch, head): scale = max|x|/127 + 1e-7, x8 = x/scale rounded half away from zero."""
    b, l, h, d = x.shape
    xb = _pad_blocks(_to_heads(x).astype(f32), block)  # [B, H, N, block, D]; padding rows are 0
    scale = jnp.max(jnp.abs(xb), axis=(3, 4)) * np.float32(1 / INT8_MAX) + QK_SCALE_EPS
    y = xb / scale[..., None, None]
    x8 = jnp.trunc(y + jnp.where(y >= 0, 0.5, -0.5)).astype(jnp.int8)
    x8 = x8.reshape(b, h, -1, d)[:, :, :l]
    return jnp.swapaxes(x8, 1, 2), scale


def quantize_qk(q: jax.Array, k: jax.Array, *, block_q: int, block_k: int, smooth_k: bool = True):
    """(q8, q_scale [B, H, Nq], k8, k_scale [B, H, Nk]) for q, k [B, L, H, D]; k is mean-smoothed first unless
    smooth_k=False (which exists to measure what the smoothing buys)."""
    q8, q_scale = quantize_blocks(q, block_q)
    k8, k_scale = quantize_blocks(smooth_keys(k) if smooth_k else k, block_k)
    return q8, q_scale, k8, k_scale


@jax.jit
def quantize_v(v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """v [B, L, H, D] -> (e4m3 [B, L, H, D], fp32 per-channel scales [B, H, D]): v8 = e4m3(v * (2.25/amax)),
    v ~ v8 * v_scale with v_scale = amax/2.25, amax = max over the L tokens of |v|."""
    vf = v.astype(f32)
    amax = jnp.max(jnp.abs(vf), axis=1)  # [B, H, D]
    recip = jnp.where(amax > 0, V_SCALE_MAX / jnp.where(amax > 0, amax, 1.0), 0.0)
    return (vf * recip[:, None]).astype(FP8), amax * np.float32(1 / V_SCALE_MAX)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "smooth_k"))
def quantize(q, k, v, *, block_q: int, block_k: int, smooth_k: bool = True):
    """All of SageSLA's quantised operands: (q8, q_scale, k8, k_scale, v8, v_scale)."""
    return (*quantize_qk(q, k, block_q=block_q, block_k=block_k, smooth_k=smooth_k), *quantize_v(v))


def blocks_per_step(block_k: int) -> int:
    """LUT blocks per softmax step: 128 / block_k below 128 keys (block_k must divide 128), else 1."""
    if block_k < KEYS_PER_STEP and KEYS_PER_STEP % block_k:
        raise ValueError(f"SageSLA's key blocks below {KEYS_PER_STEP} tokens must divide {KEYS_PER_STEP}, got "
                         f"block_k={block_k}")
    return max(1, KEYS_PER_STEP // block_k)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "out_dtype"))
def sparse_attention(
    q8: jax.Array, q_scale: jax.Array, k8: jax.Array, k_scale: jax.Array, v8: jax.Array, v_scale: jax.Array,
    lut: jax.Array, *, block_q: int, block_k: int, out_dtype=jnp.bfloat16,
) -> jax.Array:
    """SageSLA's sparse branch from quantised operands (`quantize`) and the ascending LUT [B, H, Nq, k].

    q8, k8 int8 and v8 e4m3 [B, L, H, D]; q_scale [B, H, Nq], k_scale [B, H, Nk], v_scale [B, H, D] fp32.
    Returns [B, L, H, D] in out_dtype. One scan step per 128-key softmax step (`blocks_per_step` LUT columns, the
    last step what remains): every query block takes its step's columns."""
    b, l, h, d = q8.shape
    bf16 = jnp.bfloat16
    qb = _pad_blocks(_to_heads(q8).astype(bf16), block_q)  # [B, H, Nq, bq, D]
    kb = _pad_blocks(_to_heads(k8).astype(bf16), block_k)  # [B, H, Nk, bk, D]
    vb = _pad_blocks(_to_heads(v8).astype(bf16), block_k)
    nq, nk = qb.shape[2], kb.shape[2]
    key_valid = (jnp.arange(nk * block_k) < l).reshape(nk, block_k)

    def gather(x, idx):
        """x [B, H, N, ...] at idx [B, H, Nq] -> [B, H, Nq, ...]."""
        idx = idx.reshape(idx.shape + (1,) * (x.ndim - 3))
        return jnp.take_along_axis(x, idx, axis=2)

    def step(carry, js):
        """js [W, B, H, Nq]: the step's W key blocks of every query block, whose keys it concatenates."""
        acc, m, den = carry
        logits = []
        for j in js:
            s = _einsum("bhiqd,bhikd->bhiqk", qb, gather(kb, j))
            s = s * (base2_scale(d) * (q_scale * gather(k_scale, j)))[..., None, None]
            logits.append(jnp.where(key_valid[j][:, :, :, None, :], s, -jnp.inf))
        s = jnp.concatenate(logits, axis=-1)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[..., None] + P_EXP_OFFSET)
        values = jnp.concatenate([gather(vb, j) for j in js], axis=-2)
        block_acc = _einsum("bhiqk,bhikd->bhiqd", p.astype(FP8).astype(bf16), values)
        return (acc * alpha[..., None] + block_acc, m_new, den * alpha + jnp.sum(p, axis=-1)), None

    carry = (jnp.zeros((b, h, nq, block_q, d), f32), jnp.full((b, h, nq, block_q), -jnp.inf, f32),
             jnp.zeros((b, h, nq, block_q), f32))
    cols = jnp.moveaxis(lut.astype(jnp.int32), 3, 0)  # [k, B, H, Nq]
    g = blocks_per_step(block_k)
    full = cols.shape[0] // g * g
    carry, _ = jax.lax.scan(step, carry, cols[:full].reshape(full // g, g, *cols.shape[1:]))
    if full < cols.shape[0]:  # the last step's remaining blocks
        carry, _ = step(carry, cols[full:])
    acc, _, den = carry
    out = acc * (1.0 / den)[..., None] * v_scale[:, :, None, None, :]
    out = out.reshape(b, h, nq * block_q, d)[:, :, :l].astype(out_dtype)
    return jnp.swapaxes(out, 1, 2)


@functools.partial(jax.jit, static_argnames=("topk", "block_q", "block_k", "smooth_k"))
def sage_sla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, topk: float, block_q: int, block_k: int,
    proj_w: jax.Array | None = None, proj_b: jax.Array | None = None, smooth_k: bool = True,
) -> jax.Array:
    """SageSLA: the quantised sparse branch over SLA's block map plus proj_l of SLA's linear branch.
    q, k, v [B, L, H, D] -> [B, L, H, D] in q's dtype. smooth_k=False skips the K smoothing (for measurements)."""
    lut = block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    ops = quantize(q, k, v, block_q=block_q, block_k=block_k, smooth_k=smooth_k)
    o_sparse = sparse_attention(*ops, lut, block_q=block_q, block_k=block_k, out_dtype=q.dtype)
    return add_linear_branch(o_sparse, q, k, v, proj_w, proj_b)
