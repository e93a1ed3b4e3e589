"""Pure-jnp norms of the Wan DiT block and their fusions: the semantics every norm kernel must reproduce.

Spec: acceleration.md 6 and wan-model.md 2 and 4.1. Statistics, the weight multiply and the modulation run in fp32;
roundings happen exactly where the model family puts them:
  layer_norm_modulate   norm1/norm2 (and the head): out_dtype(n * (1 + scale) + shift), n = LN(x) without affine.
                        TurboDiffusion's FastLayerNorm returns bf16, so n is rounded to bf16 before the modulation
                        (normed_dtype=bf16); stock Wan keeps n in fp32 except at block 0, whose residual is still
                        the bf16 patch embedding (normed_dtype=bf16, round_normed=that block's flag).
  layer_norm_affine     norm3: out_dtype(LN(x) * w + b), rounded once.
  rms_norm(_rope)       q/k RMSNorm over the full width, then optionally the 3-axis RoPE of each head.
                        TurboDiffusion's FastRMSNorm rounds once after the weight multiply (norm_dtype=bf16), then
                        RoPE runs in fp32 on that bf16 value; stock WanRMSNorm rounds the normalised value before
                        the fp32 weight multiply (round_before_weight=bf16) and stays fp32 (norm_dtype=fp32)
                        through RoPE. The result is rounded to out_dtype last.
  layer_norm_modulate_quantize
                        layer_norm_modulate's bf16/fp16 result, quantised in 128 x 128 tiles of [B * L, C] with
                        the W8A8 activation quantiser (acceleration.md 5.2).
  vae_rms_norm(_silu)   the Wan VAE's RMS_norm (wan-model.md 7): F.normalize over the channels (the L2 norm clamped
                        at 1e-12) * sqrt(C) * gamma, in fp32; the _silu form is the input of the VAE's causal convs:
                        SiLU of the norm of [cached frames, this chunk (+ the previous conv's pending bias)],
                        concatenated in time, rounded once.
turbojax.models.layers takes its norm, modulation and RoPE functions from here, so the model and the kernels share
one definition.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.int8_matmul.reference import INPUT_DTYPES, quantize_blockwise
from pallas_kernels.rounding import exact_f32

f32 = jnp.float32


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
    WanRMSNorm, which rounds the normalised value to that dtype before the weight multiply (pinned: under jit XLA
    may otherwise skip it)."""
    x32 = x.astype(f32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if round_before_weight is not None:
        y = exact_f32(y.astype(round_before_weight))
    return (y * weight.astype(f32)).astype(out_dtype)


def modulate(normed: jax.Array, shift: jax.Array, scale: jax.Array, out_dtype) -> jax.Array:
    """out_dtype(normed * (1 + scale) + shift) in fp32. normed [B, L, D]; shift, scale [B, D] fp32."""
    return (normed.astype(f32) * (1.0 + scale[:, None, :]) + shift[:, None, :]).astype(out_dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x [B, L, N, d] by the angles of cos/sin [L, d/2], in fp32."""
    b, l, n, d = x.shape
    xp = x.astype(f32).reshape(b, l, n, d // 2, 2)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    re = xp[..., 0] * c - xp[..., 1] * s
    im = xp[..., 0] * s + xp[..., 1] * c
    return jnp.stack([re, im], axis=-1).reshape(b, l, n, d).astype(x.dtype)


VAE_NORM_EPS = 1e-12  # F.normalize's clamp of the L2 norm


def vae_rms_norm(x: jax.Array, gamma: jax.Array) -> jax.Array:
    """The VAE's RMS_norm over the last axis, fp32: x / max(|x|_2, 1e-12) * sqrt(C) * gamma."""
    x32 = x.astype(f32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    return x32 / jnp.maximum(norm, VAE_NORM_EPS) * math.sqrt(x.shape[-1]) * gamma.astype(f32)


def add_bias(y: jax.Array, bias: jax.Array, dtype) -> jax.Array:
    """A conv output plus its bias [C], added in fp32 and rounded once to dtype."""
    return (y.astype(f32) + bias.astype(f32)).astype(dtype)


# --- input checks shared by every implementation ---------------------------------------------------------------

def check_rows(x: jax.Array) -> None:
    if x.ndim != 3:
        raise ValueError(f"the norm kernels take x as [B, L, C], got shape {x.shape}; reshape tokens to [B, L, C]")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a float array (bf16, fp16 or fp32), got {x.dtype}")


def check_modulation(x: jax.Array, shift: jax.Array, scale: jax.Array) -> None:
    """shift and scale are one fp32 row per sample, [B, C] (the [B, 1, C] chunks of the modulation, squeezed)."""
    check_rows(x)
    want = (x.shape[0], x.shape[2])
    for name, v in (("shift", shift), ("scale", scale)):
        if tuple(v.shape) != want:
            raise ValueError(f"{name} must be [B, C] = {list(want)} (one row per sample; squeeze the [B, 1, C] "
                             f"modulation chunk), got {tuple(v.shape)}")


def check_channel_vector(x: jax.Array, **vectors: jax.Array | None) -> None:
    for name, v in vectors.items():
        if v is not None and tuple(v.shape) != (x.shape[2],):
            raise ValueError(f"{name} must be [C] = [{x.shape[2]}] for x of shape {x.shape}, got {tuple(v.shape)}")


def check_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, head_dim: int) -> None:
    c, l = x.shape[2], x.shape[1]
    if head_dim % 2 or c % head_dim:
        raise ValueError(f"head_dim must be even and divide C = {c}, got head_dim {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (l, head_dim // 2):
            raise ValueError(f"{name} must be [L, head_dim / 2] = [{l}, {head_dim // 2}] (layers.rope_tables of the "
                             f"token grid), got {tuple(t.shape)}")


def check_vae_norm(x: jax.Array, gamma: jax.Array, prefix: jax.Array | None, bias: jax.Array | None) -> None:
    """x [B, T, ..., C]; prefix [B, P, ..., C] like x but in time; gamma and bias [C]."""
    if x.ndim < 3:
        raise ValueError(f"x must be [B, T, ..., C] (frames, then channels last), got shape {x.shape}")
    c = x.shape[-1]
    for name, v in (("gamma", gamma), ("bias", bias)):
        if v is not None and tuple(v.shape) != (c,):
            raise ValueError(f"{name} must be [C] = [{c}] for x of shape {x.shape}, got {tuple(v.shape)}")
    if prefix is not None and (prefix.ndim != x.ndim or prefix.shape[0] != x.shape[0]
                               or prefix.shape[2:] != x.shape[2:] or prefix.dtype != x.dtype):
        raise ValueError(f"prefix must be x's frames before it, [B, P, ...] = [{x.shape[0]}, P, "
                         f"{', '.join(map(str, x.shape[2:]))}] in {x.dtype}, got {tuple(prefix.shape)} {prefix.dtype}")


def check_quantized_dtype(out_dtype) -> None:
    if jnp.dtype(out_dtype) not in INPUT_DTYPES:
        raise TypeError(f"the W8A8 quantiser takes bf16 or fp16 activations, so out_dtype must be one of them, got "
                        f"{jnp.dtype(out_dtype).name}")


# --- the fused ops ---------------------------------------------------------------------------------------------

def layer_norm_modulate(
    x: jax.Array, shift: jax.Array, scale: jax.Array, *, eps: float, out_dtype, normed_dtype=None,
    round_normed: bool | jax.Array = True,
) -> jax.Array:
    """x [B, L, C] -> out_dtype(n * (1 + scale) + shift) [B, L, C], n = LN(x) (no affine) rounded to normed_dtype
    where round_normed holds (a bool or a traced bool scalar); shift, scale [B, C] fp32."""
    check_modulation(x, shift, scale)
    normed = layer_norm(x, eps)
    if normed_dtype is not None:
        normed = jnp.where(round_normed, exact_f32(normed.astype(normed_dtype)), normed)
    return modulate(normed, shift.astype(f32), scale.astype(f32), out_dtype)


def layer_norm_affine(x: jax.Array, weight: jax.Array, bias: jax.Array, *, eps: float, out_dtype) -> jax.Array:
    """norm3: x [B, L, C] -> out_dtype(LN(x) * weight + bias), weight and bias [C] in fp32, one rounding."""
    check_rows(x)
    check_channel_vector(x, weight=weight, bias=bias)
    return layer_norm(x, eps, weight, bias).astype(out_dtype)


def rms_norm_rope(
    x: jax.Array, weight: jax.Array, cos: jax.Array | None = None, sin: jax.Array | None = None, *, eps: float,
    out_dtype, head_dim: int | None = None, norm_dtype=None, round_before_weight=None,
) -> jax.Array:
    """q/k RMSNorm over the full width C of x [B, L, C], weight [C] fp32.

    Without cos/sin: `rms_norm` -> [B, L, C] out_dtype. With cos, sin [L, head_dim/2] fp32: the norm's result in
    norm_dtype (default out_dtype), then RoPE on each head in fp32, rounded to out_dtype -> [B, L, C/head_dim,
    head_dim]."""
    check_rows(x)
    check_channel_vector(x, weight=weight)
    if cos is None and sin is None:
        return rms_norm(x, weight, eps, out_dtype, round_before_weight)
    if cos is None or sin is None or head_dim is None:
        raise ValueError("RoPE needs cos, sin and head_dim together; pass all three, or none for the plain norm")
    check_rope(x, cos, sin, head_dim)
    b, l, c = x.shape
    y = exact_f32(rms_norm(x, weight, eps, norm_dtype or out_dtype, round_before_weight))
    return apply_rope(y.reshape(b, l, c // head_dim, head_dim), cos, sin).astype(out_dtype)


def layer_norm_modulate_quantize(
    x: jax.Array, shift: jax.Array, scale: jax.Array, *, eps: float, out_dtype=jnp.bfloat16, normed_dtype=None,
    round_normed: bool | jax.Array = True,
) -> tuple[jax.Array, jax.Array]:
    """`layer_norm_modulate` (out_dtype bf16 or fp16) quantised for a W8A8 Linear: x [B, L, C] -> (q int8 [B * L, C],
    scale fp32 [ceil(B * L / 128), ceil(C / 128)]), the 128 x 128 tiles running over the flattened rows."""
    check_quantized_dtype(out_dtype)
    y = layer_norm_modulate(x, shift, scale, eps=eps, out_dtype=out_dtype, normed_dtype=normed_dtype,
                            round_normed=round_normed)
    # The quantiser reads the rounded activations: pinned, so XLA cannot feed it the fp32 modulation instead.
    return quantize_blockwise(exact_f32(y).astype(out_dtype).reshape(-1, x.shape[2]))


def vae_rms_norm_silu(
    x: jax.Array, gamma: jax.Array, *, out_dtype, prefix: jax.Array | None = None, bias: jax.Array | None = None,
) -> jax.Array:
    """SiLU(vae_rms_norm(concat([prefix, x'], axis=1))) rounded to out_dtype, x' = add_bias(x, bias, x.dtype) (x
    itself without a bias): x [B, T, ..., C], prefix [B, P, ..., C] (None: P = 0), gamma and bias [C] ->
    [B, P + T, ..., C]."""
    check_vae_norm(x, gamma, prefix, bias)
    if bias is not None:
        x = add_bias(x, bias, x.dtype)
    if prefix is not None:
        x = jnp.concatenate([prefix, x], axis=1)
    return jax.nn.silu(vae_rms_norm(x, gamma)).astype(out_dtype)
