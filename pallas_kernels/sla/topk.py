"""The block map's top-k as a Pallas-Triton kernel: the ascending indices of the n_sel largest scores of each row.

`reference.top_k_blocks` is how `reference.block_map` selects, `sort(lax.top_k(scores, n_sel).indices)`. XLA runs
that top_k on a GPU as a full sort of every row (1.44 ms for [1, 40, 591, 1182] scores on an H100), although only
the set of the n_sel largest is needed, in index order. `top_k_blocks` finds that set in one pass over each row,
with the whole row in registers:

1. keys: each float32 score becomes an int32 whose signed order is lax.top_k's order of the floats (a total
   order: 0.0 > -0.0, +NaN above +inf, -NaN below -inf), by flipping the non-sign bits of negative floats. Lanes
   past the row end get the smallest key; as they also have the highest indices, they are never selected.
2. threshold: t, the n_sel-th largest key, is built bit by bit from the top, 32 steps that each count the keys at
   or above a candidate: a count over the row in registers, not a sort. bf16 scores, widened to fp32, end in 16
   zero bits, which step 1 keeps zero: 16 steps decide t. The candidates are built in the unsigned
   order of key ^ INT32_MIN, so they are plain bit prefixes and no midpoint can overflow.
3. selection: every key > t, plus the first n_sel - count(key > t) keys == t in index order (an inclusive cumsum
   of the equality mask); this is lax.top_k's tie rule, where the lower index wins among equal scores.
4. compaction: the inclusive cumsum of the selection gives each selected index its output slot, in ascending
   index order; a masked scatter store writes the indices there.

The only memory traffic is one read of the scores and one write of the indices; XLA's sort makes several passes
over the scores and their index payload.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

INT32_MIN = jnp.iinfo(jnp.int32).min


def _order_keys(x: jax.Array, low_zeros: int) -> jax.Array:
    """float32 [...] -> int32 [...] in the same order as lax.top_k orders x: negative floats order backwards as
    sign-magnitude integers, so their magnitude bits are flipped; all but the `low_zeros` lowest, which are zero in
    every x (bf16 values widened to fp32) and stay zero in every key."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return bits ^ ((bits >> 31) & (0x7FFFFFFF ^ ((1 << low_zeros) - 1)))


def _kth_largest(keys: jax.Array, k: int, low_zeros: int) -> jax.Array:
    """int32 [R, W] -> int32 [R]: the k-th largest key of each row (1 <= k <= W), whose `low_zeros` lowest bits are
    zero in every key (so in the result too: only the bits above them are decided).

    Works in the unsigned order u = key ^ INT32_MIN: the result is the largest prefix p with count(u >= p) >= k,
    decided one bit at a time from the top. A signed compare of key against p ^ INT32_MIN is the unsigned compare
    of u against p, so everything stays int32."""

    def try_bit(i, prefix):
        candidate = prefix | (jnp.int32(1) << (31 - i))  # bit 31 gives INT32_MIN: two's complement, no overflow
        count = jnp.sum((keys >= (candidate ^ INT32_MIN)[:, None]).astype(jnp.int32), axis=1)
        return jnp.where(count >= k, candidate, prefix)

    prefix = jax.lax.fori_loop(0, 32 - low_zeros, try_bit, jnp.zeros(keys.shape[:1], jnp.int32))
    return prefix ^ INT32_MIN


def _select(keys: jax.Array, k: int, low_zeros: int) -> jax.Array:
    """int32 [R, W] -> bool [R, W]: the k largest keys of each row, ties at the threshold to the lowest indices."""
    t = _kth_largest(keys, k, low_zeros)[:, None]
    above = keys > t
    at = keys == t
    n_above = jnp.sum(above.astype(jnp.int32), axis=1, keepdims=True)
    return above | (at & (jnp.cumsum(at.astype(jnp.int32), axis=1) <= k - n_above))


def _top_k_kernel(scores_ref, out_ref, *, n_rows, n_cols, n_sel, rows, width):
    """scores_ref [M, Nk] fp32, or bf16 widened exactly to fp32 here; out_ref [M, n_sel] int32 (whole
    arrays); this program does `rows` rows of `width` = Nk rounded up to a power of two lanes."""
    r0 = pl.program_id(0) * rows
    row = r0 + jnp.arange(rows)
    col = jnp.arange(width)
    valid = (row < n_rows)[:, None] & (col < n_cols)[None, :]
    scores = pltr.load(scores_ref.at[pl.ds(r0, rows), pl.ds(0, width)], mask=valid, other=0.0).astype(jnp.float32)
    low_zeros = jnp.finfo(jnp.float32).nmant - jnp.finfo(scores_ref.dtype).nmant  # 16 for bf16, 0 for fp32
    keys = jnp.where(valid, _order_keys(scores, low_zeros), INT32_MIN)
    # Rows past the end select their first lanes (all keys tie): not stored.
    selected = _select(keys, n_sel, low_zeros) & valid
    slot = jnp.cumsum(selected.astype(jnp.int32), axis=1) - 1
    # Unselected lanes are masked off the store, but interpret mode writes masked lanes back with the old value:
    # pointed at slot n_sel, out of bounds (its scatter drops them), they cannot race a selected lane's slot.
    slot = jnp.where(selected, slot, n_sel)
    row_idx = jnp.broadcast_to(row[:, None], slot.shape)
    pltr.store(out_ref.at[row_idx, slot], jnp.broadcast_to(col[None, :], slot.shape), mask=selected)


@functools.partial(jax.jit, static_argnames=("n_sel", "rows_per_program", "num_warps", "interpret"))
def top_k_blocks(
    scores: jax.Array, n_sel: int, *, rows_per_program: int = 1, num_warps: int = 1, interpret: bool = False
) -> jax.Array:
    """float [..., Nk] -> int32 [..., n_sel]: ascending indices of the n_sel largest scores of each row, ties
    to the lower index; equal to `reference.top_k_blocks`. bf16 scores are read as they are (half the bytes of an
    fp32 copy, which XLA would otherwise write and this kernel read) and widened exactly in registers; fp16 scores
    are widened by XLA first.

    rows_per_program (a power of two) rows of Nk rounded up to a power of two sit in one program's registers.
    Defaults: one row per one-warp program (its counting steps reduce by warp shuffles alone), the fastest on an
    H100 at Nk = 1182 with fp32 scores (0.20 ms vs 0.27-0.63 ms for 2-8 warps or 2-4 rows, and 1.75 ms for XLA's
    sort; 0.14 ms for bf16 scores) and within 0.01 ms of the best at Nk = 512 (docs/PERF.md)."""
    *lead, n_cols = scores.shape
    if not 1 <= n_sel <= n_cols:
        raise ValueError(f"n_sel={n_sel} must be in [1, {n_cols}]")
    if rows_per_program < 1 or rows_per_program & (rows_per_program - 1):
        raise ValueError(f"rows_per_program={rows_per_program} must be a power of two")
    if scores.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"scores must be float32, bfloat16 or float16, got {scores.dtype}")
    if scores.dtype == jnp.float16:
        # Widened inside the kernel, fp16 rows of NaNs, infinities and subnormals were ordered unlike lax.top_k on
        # an H100 (bf16 rows were not: bf16 widens by a shift); XLA's conversion keeps the kernel on fp32 keys.
        scores = scores.astype(jnp.float32)
    flat = scores.reshape(-1, n_cols)
    n_rows = flat.shape[0]
    kernel = functools.partial(_top_k_kernel, n_rows=n_rows, n_cols=n_cols, n_sel=n_sel, rows=rows_per_program,
                               width=pl.next_power_of_2(n_cols))
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n_rows, rows_per_program),),
        out_shape=jax.ShapeDtypeStruct((n_rows, n_sel), jnp.int32),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="sla_top_k_blocks",
    )(flat)
    return out.reshape(*lead, n_sel)
