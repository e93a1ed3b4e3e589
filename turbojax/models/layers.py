"""Pure functions of the Wan DiT: linears, norms, modulation, RoPE, time embedding, patchify/unpatchify.

The norms, modulation and RoPE rotation live in `pallas_kernels.norms.reference` (the semantics of the norm kernels)
and are re-exported here.

Linear weights are kept as [out, in] (K-contiguous rows): cuBLAS takes that layout as a plain TN product, and it is
the layout the int8 wgmma path needs, so checkpoints convert without transposes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.norms.reference import apply_rope, exact_f32, layer_norm, modulate, rms_norm  # noqa: F401

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
