"""Roundings the references and the kernels must keep: under jit, in the Pallas interpreter, and in Triton.

XLA may keep an fp32 intermediate where a program rounds to bf16/fp16 (xla_allow_excess_precision, on by default),
for instance when a consumer upcasts the rounded value again. The references define roundings bit for bit, so they
pin them with reduce_precision, which XLA cannot drop. A Pallas kernel in the interpreter is run by XLA too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltr

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
    casts (and has no reduce_precision). One difference: reduce_precision flushes fp16 subnormals (|v| < 6.1e-5) to
    zero, which the GPU's cast keeps; bf16's subnormals are below fp32's normal range and never arise here."""
    if dtype is None or jnp.dtype(dtype) == f32:
        return v
    if interpret:
        info = jnp.finfo(dtype)
        return jax.lax.reduce_precision(v, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return v.astype(dtype).astype(f32)


def divide(a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
    """a / b correctly rounded (IEEE) in fp32, inside a Pallas-Triton kernel. On the GPU Triton lowers fp32 `/` to
    the approximate div.full.f32, so the division is inline PTX there; the interpreter's `/` is IEEE already."""
    if interpret:
        return a / b
    [out] = pltr.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=r,r,r", pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, f32)])
    return out


def divide_by_reciprocal(a: jax.Array, b: jax.Array, b_recip: jax.Array, interpret: bool) -> jax.Array:
    """a / b in fp32 inside a Pallas-Triton kernel from b_recip = 1/b (IEEE, computed once for many a): y = a *
    b_recip, then the classic correction (Markstein's) y + (a - b y) * b_recip, the residual and the sum each one
    fma. It equals the IEEE quotient unless the residual underflows (quotients below ~1e-26 here), at four
    instructions against div.rn.f32's subroutine. `sage_triton`'s q/k quantiser uses it where its int8 codes are
    checked equal to the IEEE quotient's on every input (tests/test_sage_sla_kernels.py enumerates all bf16 and
    fp16 values and block maxima). The interpreter's `/` is the IEEE quotient, which the kernel's stands for."""
    if interpret:
        return a / b
    asm = ("{ .reg .b32 y, e, nb; mul.rn.f32 y, $1, $3; neg.f32 nb, $2; fma.rn.f32 e, nb, y, $1; "
           "fma.rn.f32 $0, e, $3, y; }")
    [out] = pltr.elementwise_inline_asm(asm, args=[a, b, b_recip], constraints="=r,r,r,r", pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, f32)])
    return out
