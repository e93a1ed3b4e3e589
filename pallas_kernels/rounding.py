"""Roundings the references and the interpreted kernels must keep under jit.

XLA may keep an fp32 intermediate where a program rounds to bf16/fp16 (xla_allow_excess_precision, on by default),
for instance when a consumer upcasts the rounded value again. The references define roundings bit for bit, so they
pin them with reduce_precision, which XLA cannot drop. A Pallas kernel in the interpreter is run by XLA too.
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


def round_to(v: jax.Array, dtype, interpret: bool) -> jax.Array:
    """v (fp32) rounded to dtype (None: kept), back in fp32, inside a Pallas kernel. In the interpreter XLA runs the
    kernel and may drop an fp32 -> bf16 -> fp32 round trip; reduce_precision cannot be dropped. Triton keeps both
    casts (and has no reduce_precision)."""
    if dtype is None or jnp.dtype(dtype) == f32:
        return v
    if interpret:
        info = jnp.finfo(dtype)
        return jax.lax.reduce_precision(v, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return v.astype(dtype).astype(f32)
