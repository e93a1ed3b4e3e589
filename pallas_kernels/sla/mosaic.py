"""SLA's Mosaic GPU (Hopper) kernels: the sparse branch (FlashAttention-3 structure walking the top-k index table)
and the key-statistics pass (`key_statistics`, at the end of this module: the linear branch's state and the key mean
by wgmma).

The sparse branch:

One CTA per (head, 128-row query block, batch) = one row of the SLA block map, with three warpgroups:
  two compute warpgroups, 64 query rows each, share that row's key blocks: S = Q K^T by wgmma from shared memory,
      an exp2 online softmax in fp32 registers, O += P V by wgmma with P (bf16) in registers. A "schedule" barrier
      ping-pongs them so one's softmax overlaps the other's matrix products;
  one memory warpgroup reads the block indices lut[b, h, i, t] and issues TMA copies of K/V into a ring of
      `max_concurrent_steps` shared-memory slots, refilling a slot once both compute warpgroups consumed it.
Pair steps (block_k=64, MosaicConfig.blocks_per_step=2): a softmax step covers two selected key blocks, 128 keys
like FlashAttention-3's key tiles, so the wgmmas are N=128 / K=128 and the barriers and the softmax's row
reductions run once per 128 keys instead of per 64. A ring slot then holds 2 * 64 rows of K and of V: step s
copies blocks lut[2s] and lut[2s + 1] into its two halves, both copies arriving on the slot's one barrier (which
counts two arrivals). An odd block count leaves the last step one block short: its second half re-loads the last
block, which the step leaves out: it is one block wide (N=64 wgmmas).
Ragged lengths: TMA zero-fills reads past L and drops writes past L; keys past L get -inf logits (in the last
step only: the LUT is ascending).
The linear branch's output side (`linear`: the per-head state kv, k_sum and proj_l) can be fused into the epilogue:
each warpgroup then also computes phi(q) from its Q tile, phi(q) kv and proj_l's product by two more wgmmas, and
writes o_sparse + proj_l(o_linear) (`triton.linear_epilogue`'s rounding), which saves that pass over q and o_sparse.
kv and proj_l's weight need no shared memory of their own: the memory warpgroup copies them into the ring slot of
the second-to-last step once it is released, so they arrive while the last step computes, and the epilogue computes
phi(q) and the denominator before it waits for them.
Launch order: Pallas-Mosaic GPU reverses the grid onto CUDA's (its last axis becomes blockIdx.x, the fastest), so
grid (heads, q_blocks, batch) runs the query blocks of one head together: the ~130 resident CTAs read one head's K/V
(16 MB at L=32,760), which stays in L2. The other order, heads fastest, measured 1.2x (H=12) to 1.6x (H=40) slower
on an H100; so did a persistent version of this kernel that walked its tiles heads first.
Tuning lives in MosaicConfig. Needs sm90 (wgmma, TMA); it cannot run in the CPU interpreter (see tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.devices import default_is_hopper, num_sms
from pallas_kernels.sla import reference

LOG2E = math.log2(math.e)
WG_ROWS = 64  # query rows per compute warpgroup (the wgmma M)
COMPUTE_WGS = 2


SMEM_BYTES = 227 * 1024  # sm90's per-block shared-memory limit


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    max_concurrent_steps: int = 4  # K/V ring depth (shared-memory slots); capped by what fits in shared memory
    blocks_per_step: int = 2  # key blocks per softmax step (and per ring slot) at block_k=64; 1 at block_k=128


def blocks_per_step(config: MosaicConfig, block_k: int) -> int:
    """Pairs of 64-row key blocks make 128-key steps; 128-row key blocks already are one."""
    if config.blocks_per_step not in (1, 2):
        raise ValueError(f"MosaicConfig.blocks_per_step must be 1 or 2, got {config.blocks_per_step}")
    return config.blocks_per_step if block_k == 64 else 1


def shapes_supported(q: jax.Array, block_q: int, block_k: int) -> bool:
    """bf16/fp16, head_dim 64 or 128, L a multiple of 8 (TMA tiling of the token axis); one CTA per 128-row
    query block; key blocks of 64 or 128 rows."""
    return (q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] in (64, 128) and q.shape[1] % 8 == 0
            and block_q == COMPUTE_WGS * WG_ROWS and block_k in (64, 128))


def supports(q: jax.Array, block_q: int, block_k: int) -> bool:
    """The shapes fit and the default device is an sm90 (Hopper) GPU."""
    return default_is_hopper() and shapes_supported(q, block_q, block_k)


def fuses_linear(config: MosaicConfig, block_k: int, d: int) -> bool:
    """Whether the linear branch's epilogue can be fused: a ring slot (step_k rows) holds a [d, d] tile."""
    return blocks_per_step(config, block_k) * block_k >= d


def ping_pong_turn(schedule) -> None:
    """Hands the tensor cores to the other compute warpgroup and waits for them back (the FA3 ping-pong): both
    warpgroups arrive on and wait at the `schedule` barrier, which counts one arrival per compute warpgroup."""
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(schedule)


def fused_linear_epilogue(o_sparse, q_smem, kv_smem, w_smem, ksum_smem, bias_smem, tiles_loaded):
    """o_sparse + proj_l(phi(q) kv / (1e-5 + phi(q) . k_sum)) for this warpgroup's rows, rounded like
    `triton.linear_epilogue`. o_sparse [64, D] in the output dtype (registers); q_smem [64, D]; kv_smem [D, D]
    (in, out); w_smem [D, D] (proj_l's [out, in]); ksum/bias_smem [D]; all in shared memory. tiles_loaded: the
    barrier of the kv and weight copies (which land during the last step in the SLA kernel's ring): phi(q) and the
    denominator are computed before waiting for them."""
    dt, f32 = o_sparse.dtype, jnp.float32
    rows = lambda x: lax.broadcast_in_dim(x, o_sparse.shape, [0])
    cols = lambda x: lax.broadcast_in_dim(x, o_sparse.shape, [1])

    def product(a, b_smem):
        """a [64, D] (registers) @ b_smem [D, D] by one wgmma, fp32."""
        def run(acc_ref):
            plgpu.wgmma(acc_ref, a, b_smem)
            return acc_ref[...]
        return pl.run_scoped(run, plgpu.ACC(o_sparse.shape, f32))

    q = plgpu.load(q_smem, layout=plgpu.Layout.WGMMA).astype(f32)
    e = jnp.exp(q - rows(q.max(axis=1)))
    # Reciprocals per row, multiplied in, not a division per element (div.full.f32: 192 per thread in the kernel's
    # tail with the normalisation of acc).
    phi = (e * rows(1.0 / e.sum(axis=1))).astype(dt)
    k_sum = plgpu.load(ksum_smem, layout=plgpu.Layout.WGMMA.reduce(0)).astype(f32)
    den = (phi.astype(f32) * cols(k_sum)).astype(dt).astype(f32).sum(axis=1).astype(dt)
    den = (den.astype(f32) + float(np.asarray(1e-5, dt))).astype(dt).astype(f32)  # + 1e-5 in dt, as in Triton
    plgpu.barrier_wait(tiles_loaded)
    o_linear = (product(phi, kv_smem).astype(dt).astype(f32) * rows(1.0 / den)).astype(dt)
    bias = plgpu.load(bias_smem, layout=plgpu.Layout.WGMMA.reduce(0)).astype(f32)
    proj = (product(o_linear, w_smem.transpose((1, 0))) + cols(bias)).astype(dt)
    return (o_sparse.astype(f32) + proj.astype(f32)).astype(dt)


def _kernel(lut_ref, q_ref, k_ref, v_ref, lin_refs, o_ref, smem, loaded, consumed, schedule,
            *, seq_len, block_k, n_sel, per_step, slots, scale):
    """lut_ref int32 [B, H, Nq, k]; q/k/v/o_ref [B, L, H, D] in global memory; lin_refs None or (kv [B, H, D, D],
    k_sum [B, H, D], proj_w [D, D], proj_b [D]) in global memory. Step s covers `per_step` selected key blocks:
    rows [j * block_k, (j + 1) * block_k) of its ring slot hold block lut[per_step * s + j]."""
    qo_smem, k_smem, v_smem, ksum_smem, bias_smem = smem
    k_loaded, v_loaded, q_loaded, vec_loaded, lin_loaded = loaded
    k_consumed, v_consumed = consumed
    bi, hi, qi = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_blocks")
    wg = lax.axis_index("wg")
    lut_row = lut_ref.at[bi, hi, qi]
    n_steps = pl.cdiv(n_sel, per_step)
    step_k = per_step * block_k
    half_last = n_sel % per_step != 0  # an odd count of 64-key blocks in pair steps: a one-block last step
    d = qo_smem.shape[-1]
    # The slot that takes kv and proj_l's weight: the second-to-last step's, free while the last step computes.
    lin_slot = max(n_steps - 2, 0) % slots
    lin_tile = lambda ring: ring.at[lin_slot, pl.ds(0, d)]

    take_turn = functools.partial(ping_pong_turn, schedule)
    c = scale * LOG2E  # logits to exp2's base

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem = qo_smem.at[wg]
        rows = pl.ds(qi * (COMPUTE_WGS * WG_ROWS) + wg * WG_ROWS, WG_ROWS)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem, q_loaded.at[wg])
        plgpu.barrier_wait(q_loaded.at[wg])
        acc = plgpu.layout_cast(jnp.zeros((WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
        m = plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        plgpu.barrier_wait(k_loaded.at[0])
        pl.when(wg == 1)(take_turn)  # warpgroup 1 starts half a step behind: the ping-pong

        def step(t, carry, masked=False):
            """Step t over its slot's keys. The last step (masked) masks its columns from `valid` on: the LUT is
            ascending, so only its last block can be the partial one at the sequence end, the blocks before it
            are whole, and an odd count's re-loaded half is no keys. That half is not even multiplied: with
            half_last the step is one block wide (N=64 wgmmas over the slot's first half)."""
            acc, m, l = carry
            slot = lax.rem(t, slots)
            width = block_k if masked and half_last else step_k
            keys = lambda ring: ring.at[slot, pl.ds(0, width)]

            def qk_product(s_ref):
                plgpu.wgmma(s_ref, q_smem, keys(k_smem).transpose((1, 0)))
                take_turn()
                return s_ref[...]

            s = pl.run_scoped(qk_product, plgpu.ACC((WG_ROWS, width), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            if masked:
                last_block_col = (n_sel - 1 - (n_steps - 1) * per_step) * block_k
                valid = last_block_col + jnp.minimum(block_k, seq_len - lut_row[n_sel - 1] * block_k)
                col = plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, width), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(col < valid, s, -jnp.inf)
            # The scale is applied to the row max and inside exp2's argument (one fma per logit), not to s: the max
            # of the scaled logits is the scaled max (c > 0), and the multiply per logit cost time (docs/PERF.md,
            # eighth session: with the tail's reciprocals, 11.6% fewer instructions, 1.32-1.34 vs 1.38-1.39 ms at
            # locked clocks with the fused epilogue at H=12, L=32,760).
            m_new = jnp.maximum(m, s.max(axis=1) * c)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + p.sum(axis=1)
            p16 = p.astype(v_smem.dtype)
            acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
            plgpu.barrier_arrive(schedule)  # softmax done
            plgpu.barrier_wait(v_loaded.at[slot])
            plgpu.barrier_wait(schedule)  # the tensor cores are ours again

            def pv_product(acc_ref):
                plgpu.wgmma(acc_ref, p16, keys(v_smem))

                @pl.when(t + 1 < n_steps)
                def _():
                    plgpu.barrier_wait(k_loaded.at[lax.rem(t + 1, slots)])

            acc = pl.run_state(pv_product)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l

        carry = lax.fori_loop(0, n_steps - 1, step, (acc, m, l))
        acc, m, l = lax.fori_loop(n_steps - 1, n_steps, functools.partial(step, masked=True), carry)
        pl.when(wg == 0)(take_turn)
        out = (acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])).astype(q_smem.dtype)
        if lin_refs is not None:
            plgpu.barrier_wait(vec_loaded)
            out = fused_linear_epilogue(out, q_smem, lin_tile(k_smem), lin_tile(v_smem), ksum_smem, bias_smem,
                                        lin_loaded)
        q_smem[...] = out
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[bi, rows, hi])
        # Only until the shared memory is read: the writes land by the kernel's end, as in CUTLASS's
        # epilogues; waiting for them held each CTA's exit and the next CTA's start on this SM.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def block(t, j):
            """The LUT position of slot half j at step t. An odd count's last step re-loads the last block into its
            missing half, which that (one block wide) step never reads: the copy keeps the slot's barrier at its
            per_step arrivals."""
            i = t * per_step + j
            return jnp.minimum(i, n_sel - 1) if half_last else i

        def fetch(src_ref, dst_smem, barriers):
            def fetch_step(t, slot):
                for j in range(per_step):
                    rows = pl.ds(lut_row[block(t, j)] * block_k, block_k)
                    plgpu.copy_gmem_to_smem(src_ref.at[bi, rows, hi], dst_smem.at[slot, pl.ds(j * block_k, block_k)],
                                            barriers.at[slot])
            return fetch_step

        if lin_refs is not None:
            kv_ref, ksum_ref, w_ref, bias_ref = lin_refs
            plgpu.copy_gmem_to_smem(ksum_ref.at[bi, hi], ksum_smem, vec_loaded)
            plgpu.copy_gmem_to_smem(bias_ref, bias_smem, vec_loaded)
        fill_kv_ring(fetch(k_ref, k_smem, k_loaded), fetch(v_ref, v_smem, v_loaded), k_consumed, v_consumed,
                     slots=slots, n_steps=n_steps)
        if lin_refs is not None:
            # The ring loop has seen every release of lin_slot but that of its last step (the second-to-last step
            # with two or more slots; the last one with a single slot, which then overlaps nothing): one more wait
            # each, then the slot is free for good.
            plgpu.barrier_wait(k_consumed.at[lin_slot])
            plgpu.copy_gmem_to_smem(kv_ref.at[bi, hi], lin_tile(k_smem), lin_loaded)
            plgpu.barrier_wait(v_consumed.at[lin_slot])
            plgpu.copy_gmem_to_smem(w_ref, lin_tile(v_smem), lin_loaded)


def fill_kv_ring(fetch_k, fetch_v, k_consumed, v_consumed, *, slots: int, n_steps: int | jax.Array) -> None:
    """The memory warpgroup's loop over the n_steps steps (one selected key block each, or two in this module's
    pair steps; 128 tokens in the key-statistics pass): fill the `slots` ring, then refill slot t % slots with step
    t once the compute warpgroups released it. fetch_k/fetch_v(t, slot) issue the TMA copies of step t.
    K and V of a slot are released separately (S = QK^T finishes before P.V), so they are refilled separately.
    n_steps is static in the sparse kernels (their rings never have more slots than steps) and traced in the
    key-statistics pass, whose last chunk may have fewer steps than slots."""
    for t in range(slots):
        def fill(t=t):
            fetch_k(t, t)
            fetch_v(t, t)

        if isinstance(n_steps, int):
            fill()
        else:
            pl.when(t < n_steps)(fill)

    @pl.loop(slots, n_steps)
    def _refill(t):
        slot = lax.rem(t, slots)
        plgpu.barrier_wait(k_consumed.at[slot])
        fetch_k(t, slot)
        plgpu.barrier_wait(v_consumed.at[slot])
        fetch_v(t, slot)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "config"))
def sparse_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, lut: jax.Array, *, block_q: int, block_k: int,
    config: MosaicConfig = MosaicConfig(), linear: tuple | None = None,
) -> jax.Array:
    """Block-sparse softmax attention over the key blocks in lut [B, H, Nq, k]; q, k, v [B, L, H, D] -> same.

    Same semantics as `reference.sparse_attention`; block_q must be 128 (two 64-row warpgroups).
    linear: None, or (kv [B, H, D, D], k_sum [B, H, D], proj_w [D, D], proj_b [D] or None) to return
    `triton.linear_epilogue(q, o_sparse, kv, k_sum, proj_w, proj_b)` instead (needs `fuses_linear`)."""
    b, l, h, d = q.shape
    nq, n_sel = lut.shape[2], lut.shape[3]
    if block_q != COMPUTE_WGS * WG_ROWS:
        raise ValueError(f"the Mosaic SLA kernel takes block_q={COMPUTE_WGS * WG_ROWS}, got {block_q}")
    if nq != pl.cdiv(l, block_q):
        raise ValueError(f"lut has {nq} query blocks; L={l} with block_q={block_q} needs {pl.cdiv(l, block_q)}")
    per_step = blocks_per_step(config, block_k)
    if linear is not None and not fuses_linear(config, block_k, d):
        raise ValueError(f"the linear epilogue needs ring slots of at least head_dim={d} rows; got {per_step} "
                         f"block(s) of {block_k} per step")
    n_steps, step_k = pl.cdiv(n_sel, per_step), per_step * block_k
    itemsize = jnp.dtype(q.dtype).itemsize
    fit = (SMEM_BYTES - COMPUTE_WGS * WG_ROWS * d * itemsize - 2 * d * itemsize - 8192) // (2 * step_k * d * itemsize)
    slots = min(config.max_concurrent_steps, n_steps, fit)
    tile = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    if linear is not None:
        kv, k_sum, proj_w, proj_b = linear
        proj_b = jnp.zeros((d,), q.dtype) if proj_b is None else proj_b
        linear = (kv.astype(q.dtype), k_sum.astype(q.dtype), proj_w.astype(q.dtype), proj_b.astype(q.dtype))

    def entry(lut_ref, q_ref, k_ref, v_ref, *rest):
        lin_refs, o_ref = (rest[:4], rest[4]) if linear is not None else (None, rest[0])
        smem = (
            plgpu.SMEM((COMPUTE_WGS, WG_ROWS, d), q.dtype, transforms=tile),
            plgpu.SMEM((slots, step_k, d), k.dtype, transforms=tile),
            plgpu.SMEM((slots, step_k, d), v.dtype, transforms=tile),
            plgpu.SMEM((d,), q.dtype),
            plgpu.SMEM((d,), q.dtype),
        )
        # A slot's K (and V) barrier counts one arrival per copy into it: each copy arrives with its expect-tx, so
        # with one arrival for two copies the phase could complete when the first half's bytes land, before the
        # second copy's bytes are expected.
        loaded = (plgpu.Barrier(num_arrivals=per_step, num_barriers=slots),
                  plgpu.Barrier(num_arrivals=per_step, num_barriers=slots), plgpu.Barrier(num_barriers=COMPUTE_WGS),
                  plgpu.Barrier(num_arrivals=2), plgpu.Barrier(num_arrivals=2))  # the epilogue's k_sum, bias; kv, w
        consumed = (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),) * 2
        kernel = functools.partial(_kernel, lut_ref, q_ref, k_ref, v_ref, lin_refs, o_ref, seq_len=l,
                                   block_k=block_k, n_sel=n_sel, per_step=per_step, slots=slots,
                                   scale=1.0 / math.sqrt(d))
        pl.run_scoped(lambda *scratch: kernel(*scratch), smem, loaded, consumed,
                      plgpu.Barrier(num_arrivals=COMPUTE_WGS), collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(h, nq, b),  # the last axis is the fastest: see "Launch order" above
        grid_names=("heads", "q_blocks", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        kernel_name="sla_sparse_fwd_mosaic",  # how profiles (turbojax.bench.profile) tell it from other Mosaic kernels
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(lut.astype(jnp.int32), q, k, v, *(linear or ()))


STATE_STEP = COMPUTE_WGS * WG_ROWS  # tokens per key-statistics step: 64 rows of phi(k) per compute warpgroup
ONES_COLS = 64  # columns of the all-ones B operand whose products sum phi(k) and k over tokens
MIN_STATE_STEPS = 16  # steps per key-statistics chunk at least (state_chunk)
MAX_STATE_SLOTS = 3  # K/V ring depth of the key-statistics pass: a fourth slot exceeds shared memory


def state_shapes_supported(k: jax.Array) -> bool:
    """bf16/fp16, head_dim 128 (two 64-row halves of kv, one per compute warpgroup), L a multiple of 8 (TMA)."""
    return k.dtype in (jnp.bfloat16, jnp.float16) and k.shape[-1] == 2 * WG_ROWS and k.shape[1] % 8 == 0


def state_supports(k: jax.Array) -> bool:
    """The shapes fit and the default device is an sm90 (Hopper) GPU."""
    return default_is_hopper() and state_shapes_supported(k)


def state_chunk(b: int, l: int, h: int, num_sms: int) -> int:
    """Tokens per key-statistics CTA (a multiple of STATE_STEP): the chunk count per (batch, head) whose CTAs fill
    whole waves of the SMs best (one CTA per SM fits in shared memory), the fewest such chunks on ties, at least
    MIN_STATE_STEPS steps a chunk (each chunk writes a [D, D] fp32 partial kv, 64 KB, against 512 bytes of K and
    V read per token: 16 steps keep those writes and their re-read under 7% of the pass's traffic, where many
    heads would otherwise pick tiny chunks for a sliver of wave balance). 12 heads at L = 32,760: 11 chunks of
    3,072, 132 CTAs."""
    steps = pl.cdiv(l, STATE_STEP)

    def waste(n):
        chunk = pl.cdiv(steps, n) * STATE_STEP
        ctas = b * h * pl.cdiv(l, chunk)
        return pl.cdiv(ctas, num_sms) * num_sms / ctas, n

    best = min(range(1, max(1, steps // MIN_STATE_STEPS) + 1), key=waste)
    return pl.cdiv(steps, best) * STATE_STEP


def _state_kernel(k_ref, v_ref, kv_ref, ksum_ref, kcol_ref, smem, barriers, *, seq_len, chunk, slots):
    """Partial sums over tokens [c * chunk, (c + 1) * chunk) of one (batch, head), c = the CTA's chunk: kv_ref
    [D, D] block of phi(k)^T v, ksum_ref [D] of phi(k)'s columns, kcol_ref [D] of k's, fp32 (outputs [N, B, H, ...]).

    Per 128-token step, compute warpgroup w takes the D-rows [64w, 64w + 64) of all three sums by wgmma over the
    step's 128 tokens (the column sums as products with an all-ones tile: the accumulators stay on the tensor cores'
    side, where a column reduction of a register tile would cross warps every step). First k^T 1 from the K tile
    as loaded; meanwhile w turns its 64 rows of the tile into phi(k) (a row softmax in fp32, rounded to k's dtype,
    zero past L) in registers. Once both warpgroups' k^T 1 products are done (kc_done), each writes its phi rows
    over its K rows, and once both halves are written (phi_ready), phi^T v and phi^T 1 read the slot. phi needs no
    shared memory of its own, which leaves room for a third ring slot: the memory warpgroup streams K and V by TMA
    into a ring of `slots`, and this pass reads k and v at close to what the card streams them at."""
    k_smem, v_smem, ones_smem = smem
    k_loaded, v_loaded, k_consumed, v_consumed, kc_done, phi_ready = barriers
    wg = lax.axis_index("wg")
    ci, bi, hi = lax.axis_index("chunks"), lax.axis_index("batch"), lax.axis_index("heads")
    start = ci * chunk
    n_steps = jnp.minimum(chunk // STATE_STEP, pl.cdiv(seq_len - start, STATE_STEP))
    d = k_smem.shape[-1]
    f32 = jnp.float32

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")  # three accumulators (128 registers) and the K tile
        mine = pl.ds(wg * WG_ROWS, WG_ROWS)
        ones_smem.at[mine][...] = plgpu.layout_cast(jnp.ones((WG_ROWS, ONES_COLS), ones_smem.dtype),
                                                    plgpu.Layout.WGMMA)
        plgpu.commit_smem()
        plgpu.barrier_arrive(kc_done)
        plgpu.barrier_wait(kc_done)  # both halves of the ones tile are written before the first product reads it

        def sums(acc_refs):
            kv_acc, ks_acc, kc_acc = acc_refs

            @pl.loop(0, n_steps)
            def _step(t):
                slot = lax.rem(t, slots)
                tile = k_smem.at[slot]
                plgpu.barrier_wait(k_loaded.at[slot])
                plgpu.wgmma(kc_acc, tile.at[:, mine].transpose((1, 0)), ones_smem)
                x = plgpu.load(tile.at[mine], layout=plgpu.Layout.WGMMA).astype(f32)
                row = plgpu.broadcasted_iota(jnp.int32, x.shape, 0, layout=plgpu.Layout.WGMMA)
                e = jnp.exp(x - lax.broadcast_in_dim(x.max(axis=1), x.shape, [0]))
                # One reciprocal per row, like the Triton pass (whose bf16 phi matched the division's on an H100).
                phi = e * lax.broadcast_in_dim(1.0 / e.sum(axis=1), x.shape, [0])
                phi = jnp.where(start + t * STATE_STEP + wg * WG_ROWS + row < seq_len, phi, 0.0)
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(kc_done)
                plgpu.barrier_wait(kc_done)  # neither warpgroup's k^T 1 reads the K rows any more
                tile.at[mine][...] = phi.astype(tile.dtype)
                plgpu.commit_smem()
                plgpu.barrier_arrive(phi_ready)
                plgpu.barrier_wait(phi_ready)
                plgpu.barrier_wait(v_loaded.at[slot])
                phi_t = tile.at[:, mine].transpose((1, 0))
                plgpu.wgmma(kv_acc, phi_t, v_smem.at[slot])
                plgpu.wgmma(ks_acc, phi_t, ones_smem)
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(k_consumed.at[slot])
                plgpu.barrier_arrive(v_consumed.at[slot])

            return kv_acc[...], ks_acc[...], kc_acc[...]

        kv, ks, kc = pl.run_scoped(sums, (plgpu.ACC((WG_ROWS, d), f32), plgpu.ACC((WG_ROWS, ONES_COLS), f32),
                                          plgpu.ACC((WG_ROWS, ONES_COLS), f32)))
        kv_ref.at[ci, bi, hi, mine][...] = kv
        ksum_ref.at[ci, bi, hi, mine][...] = ks.max(axis=1)  # every column holds the sum
        kcol_ref.at[ci, bi, hi, mine][...] = kc.max(axis=1)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def fetch(src_ref, dst_smem, loaded):
            def fetch_step(t, slot):
                rows = pl.ds(start + t * STATE_STEP, STATE_STEP)
                plgpu.copy_gmem_to_smem(src_ref.at[bi, rows, hi], dst_smem.at[slot], loaded.at[slot])
            return fetch_step

        fill_kv_ring(fetch(k_ref, k_smem, k_loaded), fetch(v_ref, v_smem, v_loaded), k_consumed, v_consumed,
                     slots=slots, n_steps=n_steps)
        for slot in range(slots):  # the releases the loop did not wait for, observed (the interpreter checks)
            @pl.when(slot < n_steps)
            def _():
                plgpu.barrier_wait(k_consumed.at[slot])
                plgpu.barrier_wait(v_consumed.at[slot])


@functools.partial(jax.jit, static_argnames=("chunk", "slots", "interpret"))
def key_statistics(k: jax.Array, v: jax.Array, *, chunk: int | None = None, slots: int = MAX_STATE_SLOTS,
                   interpret: bool = False):
    """`triton.key_statistics` by wgmma: (kv [B, H, D, D], k_sum [B, H, D], k_mean [B, H, D]) in k's dtype, from
    k, v [B, L, H, D] (`state_shapes_supported`: each compute warpgroup takes 64 of the 128 rows of kv).

    Each CTA sums `chunk` tokens of one (batch, head) (default `state_chunk`); the fp32 partial sums are added in
    XLA and rounded once. interpret=True runs it in the Mosaic GPU interpreter on the CPU (tests), which checks the
    values and the TMA/barrier protocol but not the wgmma operand reads (its wgmma is synchronous): phi written over
    the K rows while the other warpgroup's k^T 1 may still read them (kc_done) is exercised on the GPU only."""
    b, l, h, d = k.shape
    if not state_shapes_supported(k):
        raise ValueError(f"the Mosaic key-statistics pass takes bf16/fp16, head_dim 128 and L a multiple of 8; got "
                         f"{k.dtype}, head_dim {d}, L {l} (triton.key_statistics takes the others)")
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"k and v must have the same shape and dtype; got {k.shape} {k.dtype} and {v.shape} {v.dtype}")
    if not 1 <= slots <= MAX_STATE_SLOTS:
        raise ValueError(f"slots must be 1 to {MAX_STATE_SLOTS} (shared memory), got {slots}")
    chunk = chunk or state_chunk(b, l, h, num_sms())
    if chunk % STATE_STEP:
        raise ValueError(f"chunk must be a multiple of {STATE_STEP} tokens, got {chunk}")
    n = pl.cdiv(l, chunk)
    tile = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def entry(k_ref, v_ref, kv_ref, ksum_ref, kcol_ref):
        smem = (plgpu.SMEM((slots, STATE_STEP, d), k.dtype, transforms=tile),
                plgpu.SMEM((slots, STATE_STEP, d), v.dtype, transforms=tile),
                plgpu.SMEM((STATE_STEP, ONES_COLS), k.dtype, transforms=tile))
        barriers = (plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
                    plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
                    plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
                    plgpu.Barrier(num_arrivals=COMPUTE_WGS), plgpu.Barrier(num_arrivals=COMPUTE_WGS))
        pl.run_scoped(functools.partial(_state_kernel, k_ref, v_ref, kv_ref, ksum_ref, kcol_ref, seq_len=l,
                                        chunk=chunk, slots=slots),
                      smem, barriers, collective_axes="wg")

    f32 = jnp.float32
    kv, ksum, kcol = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct((n, b, h, d, d), f32), jax.ShapeDtypeStruct((n, b, h, d), f32),
                  jax.ShapeDtypeStruct((n, b, h, d), f32)),
        grid=(n, b, h),
        grid_names=("chunks", "batch", "heads"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        kernel_name="sla_key_statistics_mosaic",
        interpret=plgpu.InterpretGPUParams(detect_races=True) if interpret else None,
    )(k, v)
    return reference.sum_key_statistics(kv, ksum, kcol, l, k.dtype)
