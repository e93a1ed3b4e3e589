"""Norms of the Wan DiT block, fused with what follows them: the pure-jnp reference (the semantics), the Pallas-Triton
kernels, and the dispatcher. Each function is one call at its site in `turbojax.models.wan_dit.block_forward`:

    h = layer_norm_modulate(x, shift, scale, eps=eps, out_dtype=dt, normed_dtype=...)   # norm1 / norm2 / head
    q8, s8 = layer_norm_modulate_quantize(x, shift, scale, eps=eps, normed_dtype=...)  # same, for W8A8 Linears
    hc = layer_norm_affine(x, w, b, eps=eps, out_dtype=dt)                                # norm3
    q = rms_norm_rope(x_q, w, cos, sin, eps=eps, out_dtype=dt, head_dim=hd, ...)          # q/k norm + RoPE
    qc = rms_norm_rope(x_q, w, eps=eps, out_dtype=dt, ...)                                # q/k norm alone

and the Wan VAE's norm before each causal conv (`turbojax.models.vae.normed_causal_conv`):

    seq = vae_rms_norm_silu(x, gamma, out_dtype=dt, prefix=cached_frames, bias=pending_bias)

For the DiT's norms x is [B, L, C]; shift and scale [B, C] fp32 (a chunk of the block's modulation);
`reference.py` says which rounding arguments give TurboDiffusion's and stock Wan's dtype flows.

implementation: None picks the Pallas-Triton kernels on a GPU and the reference elsewhere; "reference" is pure jnp
(what XLA fuses by itself); "triton" the kernels (interpret=True runs them in the Pallas interpreter, for tests).
config: the kernels' launch parameters (`NormConfig`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.norms import reference, triton
from pallas_kernels.norms.triton import NormConfig

IMPLEMENTATIONS = ("reference", "triton")


def default_implementation() -> str:
    return "triton" if jax.default_backend() == "gpu" else "reference"


def _kernels(implementation: str | None) -> bool:
    """Whether the call goes to the Triton kernels."""
    impl = implementation or default_implementation()
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown norm implementation {impl!r}; available: {', '.join(IMPLEMENTATIONS)}")
    return impl == "triton"


def _launch(config: NormConfig | None, interpret: bool) -> dict:
    return dict(config=config or NormConfig(), interpret=interpret)


def layer_norm_modulate(
    x: jax.Array, shift: jax.Array, scale: jax.Array, *, eps: float, out_dtype, normed_dtype=None,
    round_normed: bool | jax.Array = True, implementation: str | None = None, config: NormConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x [B, L, C] -> out_dtype(LN(x) * (1 + scale) + shift) [B, L, C]; LN without affine, rounded to normed_dtype
    first where round_normed (a bool or a traced bool scalar) holds; shift, scale [B, C] fp32."""
    args = dict(eps=eps, out_dtype=out_dtype, normed_dtype=normed_dtype, round_normed=round_normed)
    if _kernels(implementation):
        return triton.layer_norm_modulate(x, shift, scale, **args, **_launch(config, interpret))
    return reference.layer_norm_modulate(x, shift, scale, **args)


def layer_norm_modulate_quantize(
    x: jax.Array, shift: jax.Array, scale: jax.Array, *, eps: float, out_dtype=jnp.bfloat16, normed_dtype=None,
    round_normed: bool | jax.Array = True, implementation: str | None = None, config: NormConfig | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`layer_norm_modulate` (out_dtype bf16/fp16) quantised for a W8A8 Linear: x [B, L, C] -> (q int8 [B * L, C],
    scale fp32 [ceil(B * L / 128), ceil(C / 128)]), bit for bit what `int8_matmul.quantize_blockwise` makes of
    the same implementation's layer_norm_modulate output."""
    args = dict(eps=eps, out_dtype=out_dtype, normed_dtype=normed_dtype, round_normed=round_normed)
    if _kernels(implementation):
        return triton.layer_norm_modulate_quantize(x, shift, scale, **args, **_launch(config, interpret))
    return reference.layer_norm_modulate_quantize(x, shift, scale, **args)


def layer_norm_affine(
    x: jax.Array, weight: jax.Array, bias: jax.Array, *, eps: float, out_dtype, implementation: str | None = None,
    config: NormConfig | None = None, interpret: bool = False,
) -> jax.Array:
    """norm3: x [B, L, C] -> out_dtype(LN(x) * weight + bias), weight and bias [C] fp32, one rounding."""
    if _kernels(implementation):
        return triton.layer_norm_affine(x, weight, bias, eps=eps, out_dtype=out_dtype, **_launch(config, interpret))
    return reference.layer_norm_affine(x, weight, bias, eps=eps, out_dtype=out_dtype)


def rms_norm_rope(
    x: jax.Array, weight: jax.Array, cos: jax.Array | None = None, sin: jax.Array | None = None, *, eps: float,
    out_dtype, head_dim: int | None = None, norm_dtype=None, round_before_weight=None,
    implementation: str | None = None, config: NormConfig | None = None, interpret: bool = False,
) -> jax.Array:
    """q/k RMSNorm over the full width of x [B, L, C] with weight [C] fp32 -> [B, L, C] out_dtype; with cos, sin
    [L, head_dim / 2] also RoPE per head -> [B, L, C / head_dim, head_dim]. norm_dtype: the norm's rounding before
    RoPE (default out_dtype); round_before_weight: stock WanRMSNorm's rounding (None: FastRMSNorm)."""
    args = dict(eps=eps, out_dtype=out_dtype, head_dim=head_dim, norm_dtype=norm_dtype,
                round_before_weight=round_before_weight)
    if implementation is None and cos is not None and head_dim and head_dim & (head_dim - 1):
        implementation = "reference"  # the kernel's [heads, head_dim] row blocks need a power-of-two head_dim
    if _kernels(implementation):
        return triton.rms_norm_rope(x, weight, cos, sin, **args, **_launch(config, interpret))
    return reference.rms_norm_rope(x, weight, cos, sin, **args)


def vae_rms_norm_silu(
    x: jax.Array, gamma: jax.Array, *, out_dtype, prefix: jax.Array | None = None, bias: jax.Array | None = None,
    implementation: str | None = None, config: NormConfig | None = None, interpret: bool = False,
) -> jax.Array:
    """SiLU(RMS_norm(concat([prefix, x + bias], time))) -> [B, P + T, ..., C] out_dtype: x [B, T, ..., C], prefix
    [B, P, ..., C] or None, gamma and bias [C] (bias: the previous conv's, not yet added to x; None: x is final).
    Past Pallas-Triton's int32 offsets (2^31 output elements) the call takes the reference."""
    reference.check_vae_norm(x, gamma, prefix, bias)
    frames = x.shape[1] + (0 if prefix is None else prefix.shape[1])
    big = x.shape[0] * frames * math.prod(x.shape[2:]) >= 2**31
    if _kernels(implementation) and not big:
        return triton.vae_rms_norm_silu(x, gamma, out_dtype=out_dtype, prefix=prefix, bias=bias,
                                        **_launch(config, interpret))
    return reference.vae_rms_norm_silu(x, gamma, out_dtype=out_dtype, prefix=prefix, bias=bias)


__all__ = [
    "IMPLEMENTATIONS",
    "NormConfig",
    "default_implementation",
    "layer_norm_affine",
    "layer_norm_modulate",
    "layer_norm_modulate_quantize",
    "rms_norm_rope",
    "vae_rms_norm_silu",
]
