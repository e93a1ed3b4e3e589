"""Pure-jnp W8A8 int8 linear as TurboDiffusion runs it: the semantics every int8 kernel must reproduce.

Spec: acceleration.md 5.
  quantiser   one for weights and activations: the 2-D input [M, K] is cut into 128 x 128 tiles (rows x cols; a
              partial tile reads zeros). Per tile amax = max(1e-8, max |x|) in fp32,
              q = saturate[-128, 127](round_half_even(x * (128 / amax))), scale = amax / 128. The divisor is 128,
              so +amax saturates to 127 while -amax maps to -128. Inputs are bf16 or fp16 (fp32 is refused, as in
              TurboDiffusion).
  GEMM        Y[m, n] = sum over 128-wide K blocks kb, in order, of fp32(exact int32 dot of the block) *
              (sx[m // 128, kb] * sw[n // 128, kb]), accumulated in fp32 and rounded once to the output dtype.
  linear      out = dtype(Y) + bias: the bias is added after the rounding, in the output dtype.
Activations are quantised on every call, in 128-token x 128-channel tiles of x.reshape(-1, K) (not per token).
  activation  optionally applied to x first, as the model does before the Linear: "gelu_tanh" (the Wan FFN's
              GELU between its two Linears) = GELU with the tanh approximation in fp32 of x, rounded to x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.rounding import exact_f32

f32 = jnp.float32
BLOCK = 128
INPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
AMAX_FLOOR = 1e-8
ACTIVATIONS = (None, "gelu_tanh")


def num_blocks(n: int) -> int:
    """Number of 128-wide tiles covering n."""
    return -(-n // BLOCK)


def check_quantize_input(x: jax.Array) -> None:
    if x.ndim != 2:
        raise ValueError(f"quantize_blockwise takes a 2-D [M, K] array, got shape {x.shape}")
    if jnp.dtype(x.dtype) not in INPUT_DTYPES:
        raise TypeError(f"the W8A8 quantiser takes bf16 or fp16 input (TurboDiffusion refuses fp32), got {x.dtype}")


def check_gemm_operands(x_q, x_scale, w_q, w_scale, bias=None) -> None:
    """Shapes and dtypes of int8_block_matmul's operands, with messages that name the mismatch."""
    if x_q.ndim != 2 or w_q.ndim != 2:
        raise ValueError(f"x_q and w_q must be 2-D ([M, K] and [N, K]), got {x_q.shape} and {w_q.shape}")
    if x_q.dtype != jnp.int8 or w_q.dtype != jnp.int8:
        raise TypeError(f"x_q and w_q must be int8, got {x_q.dtype} and {w_q.dtype}")
    (m, k), (n, kw) = x_q.shape, w_q.shape
    if k != kw:
        raise ValueError(f"x_q [M, K] = {x_q.shape} and w_q [N, K] = {w_q.shape} disagree on K")
    for name, scale, rows in (("x_scale", x_scale, m), ("w_scale", w_scale, n)):
        want = (num_blocks(rows), num_blocks(k))
        if tuple(scale.shape) != want or scale.dtype != f32:
            raise ValueError(f"{name} must be fp32 {want} (one scale per 128x128 tile), got {scale.dtype} "
                             f"{tuple(scale.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [N] = [{n}], got {tuple(bias.shape)}")


def check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r} before a Linear; available: "
                         f"{', '.join(map(repr, ACTIVATIONS))}")


def activate(x: jax.Array, activation) -> jax.Array:
    """activation(x) in x's dtype (see the module doc); None: x. The rounding to x's dtype is behind an
    optimization barrier: XLA would otherwise drop it where the consumer upcasts again (excess precision), and
    reduce_precision would flush fp16 subnormals."""
    check_activation(activation)
    if activation is None:
        return x
    return jax.lax.optimization_barrier(jax.nn.gelu(x.astype(f32), approximate=True).astype(x.dtype))


def quantize_blockwise(x: jax.Array, activation=None) -> tuple[jax.Array, jax.Array]:
    """x [M, K] bf16/fp16 -> (q int8 [M, K], scale fp32 [ceil(M/128), ceil(K/128)]) with activation(x) ~ q * scale
    per tile."""
    check_quantize_input(x)
    m, k = x.shape
    mt, kt = num_blocks(m), num_blocks(k)
    x = activate(x, activation).astype(f32)
    tiles = jnp.pad(x, ((0, mt * BLOCK - m), (0, kt * BLOCK - k))).reshape(mt, BLOCK, kt, BLOCK)
    amax = jnp.maximum(jnp.max(jnp.abs(tiles), axis=(1, 3)), jnp.asarray(AMAX_FLOOR, f32))  # [mt, kt]
    inv = jnp.asarray(128.0, f32) / amax
    q = jnp.clip(jnp.round(tiles * inv[:, None, :, None]), -128, 127).astype(jnp.int8)  # round: half to even
    return q.reshape(mt * BLOCK, kt * BLOCK)[:m, :k], amax / jnp.asarray(128.0, f32)


def _k_blocks(q: jax.Array) -> jax.Array:
    """int8 [R, K] -> [ceil(K/128), R, 128], K zero-padded (zeros add nothing to the integer dots)."""
    r, k = q.shape
    kt = num_blocks(k)
    return jnp.pad(q, ((0, 0), (0, kt * BLOCK - k))).reshape(r, kt, BLOCK).transpose(1, 0, 2)


def _row_scales(scale: jax.Array, rows: int) -> jax.Array:
    """Tile scales [ceil(R/128), kt] -> one per row and K block, [kt, R]."""
    return jnp.repeat(scale, BLOCK, axis=0)[:rows].T


def round_and_add_bias(acc: jax.Array, out_dtype, bias: jax.Array | None) -> jax.Array:
    """out_dtype(acc), then + bias as an add in out_dtype (fp32 arithmetic on the two rounded values, rounded once:
    the same as a native bf16/fp16 add)."""
    y = acc.astype(out_dtype)
    if bias is None:
        return y
    return (exact_f32(y) + exact_f32(bias.astype(out_dtype))).astype(out_dtype)


def int8_block_matmul(
    x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, out_dtype=jnp.bfloat16,
    bias: jax.Array | None = None,
) -> jax.Array:
    """Block-scaled int8 GEMM: x_q [M, K] with x_scale [ceil(M/128), ceil(K/128)], w_q [N, K] with w_scale
    [ceil(N/128), ceil(K/128)] -> [M, N] out_dtype (+ bias [N] after the rounding).

    One K block at a time (a scan), so memory stays at one [M, N] fp32 accumulator."""
    check_gemm_operands(x_q, x_scale, w_q, w_scale, bias)
    (m, _), n = x_q.shape, w_q.shape[0]

    def step(acc, blk):
        xb, wb, sx, sw = blk  # [M, 128], [N, 128] int8; [M], [N] fp32
        part = jax.lax.dot_general(xb, wb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        return acc + part.astype(f32) * (sx[:, None] * sw[None, :]), None

    blocks = (_k_blocks(x_q), _k_blocks(w_q), _row_scales(x_scale, m), _row_scales(w_scale, n))
    acc = jax.lax.scan(step, jnp.zeros((m, n), f32), blocks)[0]
    return round_and_add_bias(acc, out_dtype, bias)


def int8_linear(x: jax.Array, w_q: jax.Array, w_scale: jax.Array, bias: jax.Array | None = None,
                activation=None) -> jax.Array:
    """W8A8 linear of activation(x): x [..., K] bf16/fp16, w_q [N, K] int8, w_scale [ceil(N/128), ceil(K/128)],
    bias [N] -> [..., N] in x's dtype. activation(x) is quantised in 128 x 128 tiles of its [-1, K] reshape."""
    x2 = x.reshape(-1, x.shape[-1])
    q, s = quantize_blockwise(x2, activation)
    y = int8_block_matmul(q, s, w_q, w_scale, out_dtype=x.dtype, bias=bias)
    return y.reshape(*x.shape[:-1], w_q.shape[0])
