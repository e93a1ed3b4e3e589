"""W8A8 int8 linear with 128 x 128 block scales (TurboDiffusion's `-quant` Int8Linear): the pure-jnp reference (the
semantics, acceleration.md 5), the Pallas kernels, and the dispatcher.

    q, s = quantize_blockwise(x)                              # x [M, K] bf16 -> int8 [M, K], fp32 [M/128, K/128]
    y = int8_block_matmul(q, s, w_q, w_scale)                 # w_q [N, K] int8 -> [M, N] bf16
    y = int8_linear(x, w_q, w_scale, bias)                    # both, x [..., K] -> [..., N] in x's dtype
    y = int8_linear(h, w_q, w_scale, bias, activation="gelu_tanh")  # of gelu(h), fused into the quantiser

implementation: None picks the fastest for the device and shapes (the Mosaic GPU GEMM on Hopper when K and N are
multiples of 128, else the Pallas-Triton kernels on a GPU, else the reference); "reference" is pure jnp; "triton"
the Pallas-Triton quantiser and GEMM (interpret=True runs them in the Pallas interpreter on the CPU, for tests);
"mosaic" the Hopper GEMM (no CPU interpreter; its quantiser is the Triton one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.int8_matmul import mosaic, reference, triton
from pallas_kernels.int8_matmul.mosaic import MosaicConfig
from pallas_kernels.int8_matmul.reference import BLOCK, num_blocks
from pallas_kernels.int8_matmul.triton import GemmConfig

IMPLEMENTATIONS = ("reference", "triton", "mosaic")


def default_implementation(m: int | None = None, k: int | None = None, n: int | None = None) -> str:
    """The implementation picked for a [M, K] x [N, K] product (None: shapes unknown, as for the quantiser)."""
    if jax.default_backend() != "gpu":
        return "reference"
    if None not in (m, k, n) and mosaic.supports(m, k, n):
        return "mosaic"
    return "triton"


def _pick(implementation: str | None, *shape) -> str:
    impl = implementation or default_implementation(*shape)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown W8A8 implementation {impl!r}; available: {', '.join(IMPLEMENTATIONS)}")
    return impl


def _check_config(impl: str, config) -> None:
    """A launch config belongs to one kernel; with implementation=None the kernel depends on the device."""
    if config is None or isinstance(config, {"mosaic": MosaicConfig, "triton": GemmConfig}.get(impl, ())):
        return
    raise ValueError(f"a {type(config).__name__} does not apply to the {impl!r} implementation (the reference takes "
                     "none); pass implementation= with its kernel's config: GemmConfig for 'triton', MosaicConfig "
                     "for 'mosaic'")


def quantize_blockwise(x: jax.Array, *, activation=None, implementation: str | None = None, interpret: bool = False):
    """x [M, K] bf16/fp16 -> (q int8 [M, K], scale fp32 [ceil(M/128), ceil(K/128)]): TurboDiffusion's quantiser,
    of activation(x) where an activation ("gelu_tanh") precedes the Linear: one pass, the activated x never
    written."""
    if _pick(implementation) in ("triton", "mosaic"):
        return triton.quantize_blockwise(x, activation=activation, interpret=interpret)
    return reference.quantize_blockwise(x, activation)


def int8_block_matmul(
    x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, out_dtype=jnp.bfloat16,
    bias: jax.Array | None = None, implementation: str | None = None,
    config: GemmConfig | MosaicConfig | None = None, interpret: bool = False,
) -> jax.Array:
    """Block-scaled int8 GEMM: x_q [M, K] with x_scale [ceil(M/128), ceil(K/128)] times w_q [N, K] with w_scale
    [ceil(N/128), ceil(K/128)] -> [M, N] out_dtype, exact int32 per 128-wide K block, fp32 across blocks; bias [N]
    is added after the rounding to out_dtype. config: the chosen kernel's launch parameters."""
    impl = _pick(implementation, x_q.shape[0], x_q.shape[1], w_q.shape[0])
    _check_config(impl, config)
    if impl == "mosaic":
        return mosaic.int8_block_matmul(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype, bias=bias, config=config)
    if impl == "triton":
        return triton.int8_block_matmul(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype, bias=bias,
                                        config=config or GemmConfig(), interpret=interpret)
    return reference.int8_block_matmul(x_q, x_scale, w_q, w_scale, out_dtype=out_dtype, bias=bias)


def int8_linear(
    x: jax.Array, w_q: jax.Array, w_scale: jax.Array, bias: jax.Array | None = None, *, activation=None,
    implementation: str | None = None, config: GemmConfig | MosaicConfig | None = None, interpret: bool = False,
) -> jax.Array:
    """W8A8 linear: activation(x) (x [..., K] bf16/fp16; activation None or "gelu_tanh", applied in the quantiser's
    pass) quantised per call in 128 x 128 tiles, times w_q [N, K] int8 with w_scale [ceil(N/128), ceil(K/128)],
    rounded to x's dtype, + bias [N] in x's dtype -> [..., N]."""
    impl = _pick(implementation, x.size // x.shape[-1], x.shape[-1], w_q.shape[0])
    if impl == "reference":
        return reference.int8_linear(x, w_q, w_scale, bias, activation)
    q, s = quantize_blockwise(x.reshape(-1, x.shape[-1]), activation=activation, implementation="triton",
                              interpret=interpret)
    y = int8_block_matmul(q, s, w_q, w_scale, out_dtype=x.dtype, bias=bias, implementation=impl, config=config,
                          interpret=interpret)
    return y.reshape(*x.shape[:-1], w_q.shape[0])


__all__ = [
    "BLOCK",
    "GemmConfig",
    "IMPLEMENTATIONS",
    "MosaicConfig",
    "default_implementation",
    "int8_block_matmul",
    "int8_linear",
    "num_blocks",
    "quantize_blockwise",
]
