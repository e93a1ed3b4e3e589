"""W8A8 as Pallas-Triton kernels: the 128 x 128 tile quantiser and the block-scaled int8 GEMM.

`quantize_blockwise`: one program per 128 x 128 tile of x [M, K]: a masked load (a partial tile reads zeros), the
tile's amax, q = saturate(round_half_even(x * (128 / amax))) and scale = amax / 128. Triton has no round-to-nearest
primitive, so on the GPU the rounding is the fp32 add of 1.5 * 2^23 read back as an integer (`_to_codes`); its fp32
division is `div.full.f32` (approximate), so 128 / amax is the IEEE `div.rn.f32` through inline PTX on the GPU (the
interpreter's division is already IEEE).

`int8_block_matmul`: one program per [block_m, block_n] output tile, in grouped order (consecutive programs walk
group_m row tiles down one column tile, so they share its w_q tiles in L2). It walks K in 128-wide steps, one per
scale block: an int8 x int8 -> int32 tensor-core dot of x_q [block_m, 128] and w_q [block_n, 128] (both
K-contiguous, the layout 8-bit wgmma needs: kernels-landscape.md 1.2), then promotes that exact block sum to fp32
and adds it, times sx * sw, into the fp32 accumulator. block_m divides 128, so sx is one scalar per program and K
step; sw varies along N and is read as a [block_n] vector. Rows past M, columns past N and K past the last full
block are masked loads, so 32,760-token activations need no padding copies. The epilogue rounds to the output dtype
and adds the bias in that dtype, as `reference.round_and_add_bias` does.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.int8_matmul.reference import (AMAX_FLOOR, BLOCK, check_activation, check_gemm_operands,
                                                  check_quantize_input, num_blocks)
from pallas_kernels.rounding import divide, round_to

f32 = jnp.float32
# 1.5 * 2^23 as fp32 bits: for |v| < 2^22, the float with bits (MAGIC_BITS + v) is exactly 1.5 * 2^23 + v.
MAGIC_BITS = 0x4B400000
MAGIC = 12582912.0


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of the block-scaled GEMM. The K step is fixed at 128 (the scale block).

    int_to_float: how the int32 block sums become fp32, exactly either way. "bits": an integer add and an fp32
    subtract (`_to_f32`; exact because a block sum is at most 128 * 128 * 128 = 2^21 in magnitude), on the
    arithmetic pipes; "convert": cvt.rn.f32.s32, a lower-throughput conversion instruction. Which is faster next to
    the wgmma is for `bench.py --sweep` to measure."""

    block_m: int = 128
    block_n: int = 256
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    int_to_float: str = "bits"

    def __post_init__(self):
        if self.block_m not in (16, 32, 64, 128):
            raise ValueError(f"block_m must divide 128 (one activation scale per row block), got {self.block_m}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.int_to_float not in ("bits", "convert"):
            raise ValueError(f"int_to_float must be 'bits' or 'convert', got {self.int_to_float!r}")


def _and_masks(*masks):
    """The conjunction of the masks that are not None (None: nothing to mask)."""
    present = [mk for mk in masks if mk is not None]
    return functools.reduce(jnp.logical_and, present) if present else None


def _in_range(start, size: int, limit: int):
    """start + arange(size) < limit; None when limit is a multiple of size (no block runs past it)."""
    return None if limit % size == 0 else start + jnp.arange(size) < limit


def _check_offsets(**arrays: tuple[int, int]) -> None:
    """Pallas-Triton addresses elements with int32 offsets: every operand must have fewer than 2^31 elements."""
    for name, (r, c) in arrays.items():
        if r * c >= 2**31:
            raise ValueError(f"{name} has {r} x {c} >= 2^31 elements, past the Triton kernels' int32 offsets; "
                             "split the rows (tokens) into smaller calls")


def _load(ref, mask, other):
    """A load, masked where a mask is given (Triton takes no fill value for an unmasked load)."""
    return pltr.load(ref, mask=mask, other=other if mask is not None else None)


def _to_codes(v: jax.Array, interpret: bool) -> jax.Array:
    """int8 codes of v = x * (128 / amax) (|v| <= 128 up to one rounding): round half to even, saturated at 127 (no
    lower clamp is needed: v >= -128 rounds to -128 at most). On the GPU the rounding is one fp32 add of
    1.5 * 2^23, whose binade has an ulp of 1, so the sum is 1.5 * 2^23 + rne(v) exactly and its bits are
    MAGIC_BITS + rne(v): an add and an integer subtract where spelling round-half-even with floor took ~15 ALU
    operations per element (Nsight Compute had the quantiser ALU-bound at half the DRAM bandwidth). The add is
    inline PTX because add.rn is never contracted with the multiply before it into an FMA, which would round
    x * inv + 1.5 * 2^23 once instead of twice (XLA:CPU does contract it, so the interpreter rounds with jnp.round)."""
    if interpret:
        return jnp.clip(jnp.round(v), -128.0, 127.0).astype(jnp.int8)
    [bits] = pltr.elementwise_inline_asm("add.rn.f32 $0, $1, 0f4B400000;", args=[v], constraints="=r,r", pack=1,
                                         result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.int32)])
    return jnp.minimum(bits - MAGIC_BITS, 127).astype(jnp.int8)


def _quantize_kernel(x_ref, q_ref, s_ref, *, m, k, activation, interpret):
    """x_ref [M, K], q_ref [M, K] int8, s_ref [ceil(M/128), ceil(K/128)] fp32; this program's tile is (i, j).
    activation "gelu_tanh": the tile is activated first (`reference.activate`), so the activated tensor is never
    written; padding stays 0 (gelu(0) = 0)."""
    i, j = pl.program_id(0), pl.program_id(1)
    rows, cols = pl.ds(i * BLOCK, BLOCK), pl.ds(j * BLOCK, BLOCK)
    row_ok, col_ok = _in_range(i * BLOCK, BLOCK, m), _in_range(j * BLOCK, BLOCK, k)
    mask = _and_masks(None if row_ok is None else row_ok[:, None], None if col_ok is None else col_ok[None, :])
    x = _load(x_ref.at[rows, cols], mask, 0.0).astype(f32)
    if activation == "gelu_tanh":
        x = round_to(jax.nn.gelu(x, approximate=True), x_ref.dtype, interpret)
    amax = jnp.maximum(jnp.max(jnp.max(jnp.abs(x), axis=1, keepdims=True), axis=0, keepdims=True),
                       jnp.asarray(AMAX_FLOOR, f32))  # [1, 1]
    inv = divide(jnp.full_like(amax, 128.0), amax, interpret)
    pltr.store(q_ref.at[rows, cols], _to_codes(x * inv, interpret), mask=mask)
    pltr.store(s_ref.at[pl.ds(i, 1), pl.ds(j, 1)], amax / 128.0)


def quantize_blockwise(x: jax.Array, *, activation=None, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`reference.quantize_blockwise` as one pass over x [M, K]: (q int8 [M, K], scale fp32 [ceil(M/128),
    ceil(K/128)]) of activation(x).

    Under vmap (the DiT's init quantises each stacked block Linear, [layers, N, K]) the kernel runs once per batch
    element (lax.map), not as one pallas_call over the stacked array: Pallas-Triton picks 32-bit offsets for
    arrays up to 2^32 bytes, so a batched int8 output of 2^31 to 2^32 elements (14B's FFN: 40 x 13824 x 5120)
    would be addressed with wrapped-around negative offsets (an illegal or corrupting access), and
    `_check_offsets` sees only one element's shape."""
    check_activation(activation)
    return _per_element_under_vmap(activation, interpret)(x)


@functools.cache
def _per_element_under_vmap(activation, interpret: bool):
    @jax.custom_batching.custom_vmap
    def quantize(x):
        return _quantize(x, activation=activation, interpret=interpret)

    @quantize.def_vmap
    def _rule(axis_size, in_batched, x):
        del axis_size
        if not in_batched[0]:
            return quantize(x), (False, False)
        return jax.lax.map(quantize, x), (True, True)

    return quantize


@functools.partial(jax.jit, static_argnames=("activation", "interpret"))
def _quantize(x: jax.Array, *, activation, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """8 warps for the plain tile, 16 with the GELU, whose per-element work (tanhf) wants the most warps in
    flight. H100, one process (docs/PERF.md): plain 0.066 ms against 0.082 with 4 warps at 32,760 x 1536, equal
    at 32,760 x 8960; with the GELU 0.461 against 0.770 ms at 32,760 x 8960 (0.613 vs 0.988 ms at 75,600 x 5120);
    the codes do not depend on it."""
    check_quantize_input(x)
    m, k = x.shape
    _check_offsets(x=(m, k))
    grid = (num_blocks(m), num_blocks(k))
    num_warps = 16 if activation else 8
    return tuple(pl.pallas_call(
        functools.partial(_quantize_kernel, m=m, k=k, activation=activation, interpret=interpret),
        grid=grid,
        out_shape=[jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct(grid, f32)],
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="w8a8_quantize",
    )(x))


def _grouped_tile(pid, grid_m: int, grid_n: int, group_m: int):
    """Program id -> (row tile, column tile), walking group_m row tiles down each column before moving right."""
    div, rem = jax.lax.div, jax.lax.rem  # C semantics: no floor corrections for these non-negative ids
    per_group = group_m * grid_n
    first_m = div(pid, per_group) * group_m
    rows_here = jnp.minimum(grid_m - first_m, group_m)
    in_group = rem(pid, per_group)
    return first_m + rem(in_group, rows_here), div(in_group, rows_here)


def _to_f32(p: jax.Array, how: str) -> jax.Array:
    """int32 block sums (|p| <= 2^21) -> fp32, exactly."""
    if how == "convert":
        return p.astype(f32)
    return jax.lax.bitcast_convert_type(p + jnp.int32(MAGIC_BITS), f32) - jnp.asarray(MAGIC, f32)


def _gemm_kernel(x_ref, xs_ref, w_ref, ws_ref, b_ref, o_ref, *, m, n, k, cfg: GemmConfig, grid_m, grid_n):
    """x_ref [M, K] int8, xs_ref [ceil(M/128), kt] fp32, w_ref [N, K] int8, ws_ref [kt, N] fp32 (one scale per
    column and K block), b_ref [N] or None, o_ref [M, N]."""
    bm, bn = cfg.block_m, cfg.block_n
    i, j = _grouped_tile(pl.program_id(0), grid_m, grid_n, cfg.group_m)
    row_ok, col_ok = _in_range(i * bm, bm, m), _in_range(j * bn, bn, n)
    rows, cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)
    scale_row = jax.lax.div(i * bm, BLOCK)  # the activation-scale row of every row in this block

    def body(kb, acc):
        k_ok = _in_range(kb * BLOCK, BLOCK, k)
        ks = pl.ds(kb * BLOCK, BLOCK)
        a_mask = _and_masks(None if row_ok is None else row_ok[:, None], None if k_ok is None else k_ok[None, :])
        b_mask = _and_masks(None if col_ok is None else col_ok[:, None], None if k_ok is None else k_ok[None, :])
        a = _load(x_ref.at[rows, ks], a_mask, 0)
        b = _load(w_ref.at[cols, ks], b_mask, 0)
        part = pltr.dot(a, b, trans_b=True)  # exact int32 [bm, bn]
        sw = _load(ws_ref.at[kb, cols], col_ok, 0.0)
        return acc + _to_f32(part, cfg.int_to_float) * (xs_ref[scale_row, kb] * sw)[None, :]

    acc = jax.lax.fori_loop(0, num_blocks(k), body, jnp.zeros((bm, bn), f32))
    y = acc.astype(o_ref.dtype)
    if b_ref is not None:
        bias = _load(b_ref.at[cols], col_ok, 0.0)
        y = (y.astype(f32) + bias.astype(f32)).astype(o_ref.dtype)
    out_mask = _and_masks(None if row_ok is None else row_ok[:, None], None if col_ok is None else col_ok[None, :])
    pltr.store(o_ref.at[rows, cols], y, mask=out_mask)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def int8_block_matmul(
    x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, out_dtype=jnp.bfloat16,
    bias: jax.Array | None = None, config: GemmConfig = GemmConfig(), interpret: bool = False,
) -> jax.Array:
    """`reference.int8_block_matmul`: x_q [M, K], x_scale [ceil(M/128), kt], w_q [N, K], w_scale [ceil(N/128), kt]
    -> [M, N] out_dtype (+ bias [N] after the rounding, in out_dtype)."""
    check_gemm_operands(x_q, x_scale, w_q, w_scale, bias)
    (m, k), n = x_q.shape, w_q.shape[0]
    _check_offsets(x_q=(m, k), w_q=(n, k), output=(m, n))
    grid_m, grid_n = pl.cdiv(m, config.block_m), pl.cdiv(n, config.block_n)
    # One weight scale per column and K block, [kt, N]: each K step reads a contiguous [block_n] vector.
    ws_cols = jnp.repeat(w_scale, BLOCK, axis=0)[:n].T
    args = [x_q, x_scale, w_q, ws_cols] + ([] if bias is None else [bias.astype(out_dtype)])

    def kernel(*refs):
        ins, o_ref = refs[:-1], refs[-1]
        b_ref = ins[4] if bias is not None else None
        _gemm_kernel(*ins[:4], b_ref, o_ref, m=m, n=n, k=k, cfg=config, grid_m=grid_m, grid_n=grid_n)

    return pl.pallas_call(
        kernel,
        grid=(grid_m * grid_n,),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=pltr.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="w8a8_block_gemm",
    )(*args)
