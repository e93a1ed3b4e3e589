"""Pure functions of the Wan DiT: linears, norms, modulation, RoPE, time embedding, patchify/unpatchify.

Linear weights are kept as [out, in] (K-contiguous rows): cuBLAS takes that layout as a plain TN product, and it is
the layout the int8 wgmma path needs, so checkpoints convert without transposes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

f32 = jnp.float32


def precision(dtype) -> jax.lax.Precision | None:
    """HIGHEST for fp32 operands: XLA's default on GPUs computes fp32 products in TF32 (10-bit mantissa), which is
    not the fp32 the spec keeps the time embedding and head in. None (the default) for bf16/fp16."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None, out_dtype) -> jax.Array:
    """y[..., N] = x[..., K] @ w[N, K]^T + b[N], accumulated in fp32 with the bias added before the single rounding
    (what a cuBLAS bias epilogue does). Operands are taken in w's dtype."""
    y = jax.lax.dot_general(
        x.astype(w.dtype), w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=f32,
        precision=precision(w.dtype),
    )
    if b is not None:
        y = y + b.astype(f32)
    return y.astype(out_dtype)


def exact_f32(x: jax.Array) -> jax.Array:
    """x in fp32, holding exactly x's (possibly bf16) values. Under jit XLA may keep an fp32 intermediate where the
    program rounds to bf16 (xla_allow_excess_precision, on by default); reduce_precision pins the rounding."""
    x32 = x.astype(f32)
    if x.dtype == f32:
        return x32
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x32, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def layer_norm(x: jax.Array, eps: float, weight: jax.Array | None = None, bias: jax.Array | None = None):
    """LayerNorm over the last axis with fp32 statistics and biased variance; affine in fp32; fp32 result.

    A bf16 x is read exactly as rounded (`exact_f32`): the bf16 residual of TurboDiffusion's network feeds every
    norm, and XLA fusing the preceding add into the norm must not skip that rounding."""
    x32 = exact_f32(x)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.astype(f32)
    if bias is not None:
        y = y + bias.astype(f32)
    return y


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, out_dtype, round_before_weight=None) -> jax.Array:
    """RMSNorm over the last axis, statistic and weight multiply in fp32, result in out_dtype.

    round_before_weight=None is TurboDiffusion's FastRMSNorm (one rounding, at the end); a dtype is stock Wan's
    WanRMSNorm, which rounds the normalised value to that dtype before the weight multiply."""
    x32 = x.astype(f32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if round_before_weight is not None:
        y = y.astype(round_before_weight).astype(f32)
    return (y * weight.astype(f32)).astype(out_dtype)


def modulate(normed: jax.Array, shift: jax.Array, scale: jax.Array, out_dtype) -> jax.Array:
    """out_dtype(normed * (1 + scale) + shift) in fp32. normed [B, L, D]; shift, scale [B, D] fp32."""
    return (normed.astype(f32) * (1.0 + scale[:, None, :]) + shift[:, None, :]).astype(out_dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation, computed in fp32 and returned in x's dtype."""
    return jax.nn.gelu(x.astype(f32), approximate=True).astype(x.dtype)


def timestep_sinusoid(t: jax.Array, dim: int) -> jax.Array:
    """[B] timesteps -> [B, dim] fp32 features [cos(t w), sin(t w)], w_i = 10000^(-i / (dim/2)).

    Computed in float64 like the reference (the net sees t up to 1000, where fp32 arguments would be off by 3e-5)."""
    half = dim // 2
    with jax.enable_x64(True):
        omega = jnp.asarray(np.power(10000.0, -np.arange(half, dtype=np.float64) / half))
        arg = t.astype(jnp.float64)[:, None] * omega[None, :]
        out = jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1).astype(f32)
    return out


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs given to the (t, h, w) axes: 22/21/21 for head_dim 128 (c - 2(c//3), c//3, c//3)."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_tables(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [L, head_dim/2] (fp32) for the token grid (F, H', W') in row-major (f, h, w) order.

    Angles are computed in float64 like stock Wan's table, inside the program (iota arithmetic, not an embedded
    constant of L x 64 entries); pair j of an axis with n pairs rotates by pos * theta^(-2 j / (2 n))."""
    parts = []
    with jax.enable_x64(True):
        for axis, (n_pos, n_pairs) in enumerate(zip(grid, rope_axis_pairs(head_dim))):
            freqs = jnp.power(theta, -jnp.arange(n_pairs, dtype=jnp.float64) * 2.0 / (2 * n_pairs))
            ang = jnp.arange(n_pos, dtype=jnp.float64)[:, None] * freqs[None, :]
            shape = [1, 1, 1, n_pairs]
            shape[axis] = n_pos
            parts.append(jnp.broadcast_to(ang.reshape(shape), (*grid, n_pairs)))
        ang = jnp.concatenate(parts, axis=-1).reshape(-1, head_dim // 2)
        return jnp.cos(ang).astype(f32), jnp.sin(ang).astype(f32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x [B, L, N, d] by the angles of cos/sin [L, d/2], in fp32."""
    b, l, n, d = x.shape
    xp = x.astype(f32).reshape(b, l, n, d // 2, 2)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    re = xp[..., 0] * c - xp[..., 1] * s
    im = xp[..., 0] * s + xp[..., 1] * c
    return jnp.stack([re, im], axis=-1).reshape(b, l, n, d).astype(x.dtype)


def patchify(x: jax.Array, patch: tuple[int, int, int]) -> jax.Array:
    """[B, C, T, H, W] -> [B, L, C*pt*ph*pw] tokens in (f, h, w) order, channel outermost in the patch vector."""
    b, c, t, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
    x = x.transpose(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpatchify(y: jax.Array, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int) -> jax.Array:
    """[B, L, pt*ph*pw*C] head output, channel innermost -> [B, C, T, H, W]."""
    b = y.shape[0]
    f, h, w = grid
    pt, ph, pw = patch
    y = y.reshape(b, f, h, w, pt, ph, pw, channels)
    y = y.transpose(0, 7, 1, 4, 2, 5, 3, 6)
    return y.reshape(b, channels, f * pt, h * ph, w * pw)
