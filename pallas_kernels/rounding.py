"""Roundings the references must keep under jit.

XLA may keep an fp32 intermediate where a program rounds to bf16/fp16 (xla_allow_excess_precision, on by default),
for instance when a consumer upcasts the rounded value again. The references define roundings bit for bit, so they
pin them with reduce_precision, which XLA cannot drop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def exact_f32(x: jax.Array) -> jax.Array:
    """x (bf16/fp16/fp32) in fp32, holding exactly x's values: the rounding to x's dtype stays."""
    x32 = x.astype(f32)
    if x.dtype == f32:
        return x32
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x32, exponent_bits=info.nexp, mantissa_bits=info.nmant)
