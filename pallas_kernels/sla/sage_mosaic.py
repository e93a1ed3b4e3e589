"""SageSLA's sparse branch as a Mosaic GPU (Hopper) kernel: `mosaic.py`'s FlashAttention-3 structure with 8-bit
tensor-core products, the semantics of `sage_reference.sparse_attention`.

One CTA per (head, 128 query rows, batch), with three warpgroups:
  two compute warpgroups, 64 query rows each, walk their rows' LUT row of key blocks (ascending): with
      block_q = 128 both walk the CTA's one row of the SLA block map; with block_q = 64 (upstream's sm90 blocks)
      each walks its own query block's row (the rows of a CTA select the same number of blocks, so the ping-pong
      below stays in step);
      each softmax step covers 128 keys (the reference's steps: two LUT blocks with block_k = 64, one with 128):
      per block S = Q8 K8^T by an s8 x s8 -> s32 wgmma from shared memory (Q and K both K-major: the K tile is the
      (bk, D) block, transposed as a ref), dequantised to base-2 logits with the q- and k-block scales; the online
      softmax with P~ = 2^(s - m + log2 448), m the running max after the step; e4m3(P~) is multiplied by the
      e4m3 V^T tiles in e4m3 wgmmas into a fresh fp32 accumulator, added to the rescaled running one by one fma
      per element (the fp8 wgmma accumulator keeps about 22 bits; upstream's sm90 kernel adds per 128-key block
      the same way); the fresh accumulators start from zeros ptxas folds into their first wgmma
      (`_unshared_zeros`: 21% fewer instructions a step, 9-11% faster with the fma, docs/PERF.md); P is
      that wgmma's register operand with 64-key blocks and goes through the warpgroup's shared-memory tile with
      128-key ones (`SageMosaicConfig.p_in_registers`); a "schedule" barrier ping-pongs the two warpgroups so
      one's softmax overlaps the other's products. Two 64-key blocks per step instead of one took 1.05 instead of
      1.27-1.30 ms at H = 12, L = 32,760 and 17.5 instead of 20.8-21.0 ms at H = 40, L = 75,600 (H100, topk 0.1,
      docs/PERF.md): half the steps' chains of waits;
  one memory warpgroup reads lut[b, h, i, t] and issues TMA copies of the K tiles (bk, D) and the V^T tiles
      (D, bk) of a step's key blocks into a ring of shared-memory slots (with block_q = 64 a slot holds both LUT
      rows' tiles).
8-bit wgmma operands must be K-major (no hardware transpose below 16 bits): V is therefore passed transposed,
[B, H, D, L_pad], so its (D, bk) tile is K-major for P.V: `sparse_attention_kmajor` takes it so (the dispatcher's V
quantiser, `sage_triton.quantize_values_transposed`, writes it in that layout), `sparse_attention` transposes and
pads token-major e4m3 values (`transpose_values`).
Mosaic GPU has no relayout from the accumulator layout to the 8-bit register-operand layout (it would move bytes
between threads); reading P's registers as the operand instead permutes its keys within each 16-key group
(`KEY_ORDER`), and V's tokens stored in that order (as upstream's kernel does) leave the product unchanged.
The epilogue applies 1/l and the per-channel V scales, and with `linear` adds the linear branch through proj_l
as the SLA kernel does (`mosaic.fused_linear_epilogue`; its kv, weight and vectors in their own shared memory, q's
bf16 tile in the output staging tile): at 128 x 64 blocks only, where the ring keeps 3 slots beside them and it
was measured (`fuses_linear`: 1.5% faster than the separate Triton pass with a 4-slot ring at H=40, L=75,600,
within the noise at H=12, L=32,760; docs/PERF.md). Needs sm90 to run compiled; on CPU the tests run it in the
Mosaic GPU interpreter (with its race detector) and lower it for an abstract H100 down to the PTX of its wgmmas.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import llvm, vector

from pallas_kernels.devices import default_is_hopper
from pallas_kernels.sla.mosaic import (COMPUTE_WGS, SMEM_BYTES, WG_ROWS, fill_kv_ring, fused_linear_epilogue,
                                      ping_pong_turn)
from pallas_kernels.sla.sage_reference import FP8, P_EXP_OFFSET, base2_scale, blocks_per_step


# KEY_ORDER[4c + e]: the key (within a 16-key group) at column 4c + e of P in registers as the 8-bit wgmma operand.
# A lane l (c = l % 4) holds accumulator columns 2c, 2c + 1, 2c + 8, 2c + 9 of its rows, and the operand layout
# reads that lane's four bytes as columns 4c, ..., 4c + 3.
KEY_ORDER = np.array([0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15])

BLOCK_QS = (WG_ROWS, COMPUTE_WGS * WG_ROWS)  # query block sizes: a LUT row per warpgroup, or one per CTA


@dataclasses.dataclass(frozen=True)
class SageMosaicConfig:
    max_concurrent_steps: int = 4  # K/V ring depth (shared-memory slots); capped by what fits in shared memory
    # P.V's A operand from registers (V's tokens in KEY_ORDER) or from a shared-memory tile; None: registers for
    # 64-key blocks, the tile for 128-key ones (H100, same outputs: with two 64-key blocks a step registers 1.05-1.07
    # vs 1.36 ms at H=12, L=32,760 and 17.5 vs 21.4 ms at H=40, L=75,600; the tile 8% faster with 128-key blocks
    # at H=12, one block a step).
    p_in_registers: bool | None = None

    def registers(self, block_k: int) -> bool:
        """Whether P.V reads P from registers at this key-block size."""
        return block_k == 64 if self.p_in_registers is None else self.p_in_registers


def shapes_supported(q: jax.Array, block_q: int, block_k: int) -> bool:
    """bf16/fp16 (the output dtype), head_dim 64 or 128 (one swizzle span of int8), L a multiple of 8 (TMA tiling
    of the token axis), query blocks of 64 or 128 rows (one or two compute warpgroups' rows), key blocks of 64 or
    128 tokens (one swizzle span of e4m3 for P.V)."""
    return (q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] in (64, 128) and q.shape[1] % 8 == 0
            and block_q in BLOCK_QS and block_k in (64, 128))


def supports(q: jax.Array, block_q: int, block_k: int) -> bool:
    """The shapes fit and the default device is an sm90 (Hopper) GPU."""
    return default_is_hopper() and shapes_supported(q, block_q, block_k)


def _tiles(row_bytes: int):
    """Shared-memory transforms of an 8-bit tile whose rows are row_bytes long: one swizzle span per row."""
    return plgpu.TilingTransform((8, row_bytes)), plgpu.SwizzleTransform(row_bytes)


def to_key_order(p: jax.Array) -> jax.Array:
    """[rows, cols] -> the same with the columns of each 16-column group in `KEY_ORDER`: column 16g + 8h + 2c + e
    moves to 16g + 4c + 2h + e (what the register regrouping does to P, spelled out)."""
    rows, cols = p.shape
    return p.reshape(rows, cols // 16, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(rows, cols)


def _p_operand(p8: jax.Array, p_smem, *, registers: bool, interpret: bool):
    """e4m3 P [64, bk] in the accumulator layout -> the A operand of the P.V wgmma. registers: its columns in
    `KEY_ORDER` within each 16-key group, compiled by regrouping the registers (each thread's two 2-byte vectors
    of a 16-column group become one 4-byte vector of the 8-bit operand layout; no byte moves). Otherwise, and in
    the interpreter (no register layouts; its wgmma reads A from shared memory only, so there the permutation is
    spelled out), P is written to the warpgroup's tile p_smem [64, bk]. The regrouping builds a FragmentedArray
    from its registers (private fields of jax 0.11.2's Mosaic GPU, which the project pins)."""
    if registers and not interpret:
        @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                           return_type=plgpu.ShapeDtypeStruct(p8.shape, p8.dtype, plgpu.Layout.WGMMA_8BIT))
        def regroup(_, p):
            new = np.empty(mgpu.WGMMA_LAYOUT_8BIT.registers_shape(p.shape), dtype=object)
            for idx in np.ndindex(new.shape):
                pair = [p.registers[(idx[0], 2 * idx[1] + i, *idx[2:])] for i in range(2)]
                new[idx] = mgpu.utils.vector_concat(pair)
            return mgpu.FragmentedArray(_registers=new, _layout=mgpu.WGMMA_LAYOUT_8BIT, _is_signed=None)

        return regroup(plgpu.layout_cast(p8, plgpu.Layout.WGMMA))
    if registers:
        p8 = to_key_order(p8)
    p_smem[...] = p8
    plgpu.commit_smem()  # the P tile is read by the async proxy (wgmma) next
    return p_smem


def _unshared_zeros(shape: tuple[int, int], dtype) -> jax.Array:
    """Zeros [64 * m, n] in the WGMMA layout whose registers are each set by their own `mov.b32 r, 0` (one
    side-effecting inline asm, so LLVM neither shares nor hoists them): ptxas folds such an accumulator into its
    first wgmma as a zero one (no register moves). A splat is one zero register that LLVM copies into every
    accumulator register; ptxas folded that into the step's first wgmma only, and the other two fresh accumulators
    cost 96 register copies a step (of ~770 instructions; H100 SASS, docs/PERF.md). Builds the FragmentedArray from
    its registers with jax 0.11.2's private MLIR dialects and FragmentedArray fields (the project pins jax)."""
    @plgpu.inline_mgpu(return_type=plgpu.ShapeDtypeStruct(shape, dtype, plgpu.Layout.WGMMA))
    def zeros(_):
        layout = mgpu.WGMMA_LAYOUT
        element = mgpu.utils.dtype_to_ir_type(dtype)
        reg_type = ir.VectorType(layout.registers_element_type(element))
        regs = np.empty(layout.registers_shape(shape), dtype=object)
        count = regs.size * reg_type.shape[0]
        integer = jnp.issubdtype(dtype, jnp.integer)
        out = llvm.inline_asm(llvm.StructType.get_literal([element] * count), [],
                              " ".join(f"mov.b32 ${i}, 0;" for i in range(count)),
                              ",".join(["=r" if integer else "=f"] * count), has_side_effects=True)
        values = iter(llvm.extractvalue(element, out, [i]) for i in range(count))
        for idx in np.ndindex(regs.shape):
            regs[idx] = vector.from_elements(reg_type, [next(values) for _ in range(reg_type.shape[0])])
        return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=True if integer else None)

    return zeros()


def _fresh_products(issue, specs, *, interpret: bool) -> list[jax.Array]:
    """issue(refs) on fresh (zero) wgmma accumulators of specs [(shape, dtype), ...], then their values. Compiled,
    the accumulators start from `_unshared_zeros`; the Mosaic GPU interpreter runs no `pl.run_state` over
    accumulators, so there they are scoped ones (a splat of zeros: the same values)."""
    if interpret:
        def scoped(*refs):
            issue(refs)
            return [ref[...] for ref in refs]

        return pl.run_scoped(scoped, *[plgpu.ACC(shape, dtype) for shape, dtype in specs])
    return list(pl.run_state(issue)(tuple(plgpu.ACC.init(_unshared_zeros(shape, dtype)) for shape, dtype in specs)))


def _kernel(lut_ref, q_ref, qs_ref, k_ref, ks_ref, vt_ref, vs_ref, lin_refs, o_ref, smem, loaded, consumed, schedule,
            *, seq_len, block_k, n_sel, slots, streams, per_step, c, p_in_registers, interpret):
    """lut_ref int32 [B, H, Nq, k]; q/k_ref int8 [B, L, H, D]; vt_ref e4m3 [B, H, D, L_pad]; qs/ks_ref fp32
    [B, H, Nq] / [B, H, Nk]; vs_ref fp32 [B, H, D]; o_ref [B, L, H, D]; all in global memory. streams: LUT rows
    per CTA (1: block_q = 128; 2: block_q = 64, Nq padded to a multiple of 2); per_step: key blocks per 128-key
    softmax step (2 with 64-key blocks, the last step taking what remains). A ring slot holds streams x per_step
    K tiles and as many V^T tiles, tile `stream * per_step + j` of the slot. lin_refs: None, or the linear
    branch's (q [B, L, H, D] in the output dtype, kv [B, H, D, D], k_sum [B, H, D], proj_w [D, D], proj_b [D]) for
    the fused epilogue (`mosaic.fused_linear_epilogue`), whose q tile is the output staging tile until it is read."""
    q_smem, k_smem, v_smem, vs_smem, o_smem, lin_smem, p_tiles = smem  # lin_smem, p_tiles None when unused
    k_loaded, v_loaded, q_loaded, vs_loaded, lin_loaded = loaded
    k_consumed, v_consumed = consumed
    bi, hi, ci = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_blocks")
    wg = lax.axis_index("wg")
    per_slot = streams * per_step
    n_steps = pl.cdiv(n_sel, per_step)

    take_turn = functools.partial(ping_pong_turn, schedule)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        rows = pl.ds(ci * (COMPUTE_WGS * WG_ROWS) + wg * WG_ROWS, WG_ROWS)
        plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem.at[wg], q_loaded.at[wg])
        plgpu.copy_gmem_to_smem(vs_ref.at[bi, hi], vs_smem.at[wg], vs_loaded.at[wg])
        if lin_refs is not None:  # q itself, for phi(q) in the epilogue
            plgpu.copy_gmem_to_smem(lin_refs[0].at[bi, rows, hi], o_smem.at[wg], lin_loaded[2].at[wg])
        d = q_smem.shape[-1]
        stream = wg if streams > 1 else 0  # its LUT row and K/V tiles in a slot (static when shared)
        lut_row = lut_ref.at[bi, hi, ci * streams + stream]
        q_scale = qs_ref[bi, hi, ci * streams + stream]
        acc = plgpu.layout_cast(jnp.zeros((WG_ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
        m = plgpu.layout_cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        # The LUT is ascending, so only its last block can be the partial one at the sequence end: keys at or past
        # `valid` of that block (the last step's last one) get -inf logits; every other step runs unmasked.
        valid = seq_len - lut_row[n_sel - 1] * block_k
        col = plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, block_k), 1, layout=plgpu.Layout.WGMMA)
        plgpu.barrier_wait(q_loaded.at[wg])
        plgpu.barrier_wait(k_loaded.at[0])
        pl.when(wg == 1)(take_turn)  # warpgroup 1 starts half a step behind: the ping-pong

        def step(t, carry, width=per_step, masked=False):
            """Softmax step t over LUT blocks per_step * t, ..., + width - 1: one 8-bit S product per block (each
            its own int32 accumulator and dequantisation scale), one row max for the step, then one fresh fp32
            P.V accumulator over all of them."""
            acc, m, l = carry
            slot = lax.rem(t, slots)
            tiles = [slot * per_slot + stream * per_step + j for j in range(width)]
            # The blocks' dequantisation scales, loaded before the products so the global-memory latency overlaps.
            scales = [c * (q_scale * ks_ref[bi, hi, lut_row[per_step * t + j]]) for j in range(width)]

            def qk_product(s_refs):
                for s_ref, tile in zip(s_refs, tiles):
                    plgpu.wgmma(s_ref, q_smem.at[wg], k_smem.at[tile].transpose((1, 0)))
                take_turn()

            logits = _fresh_products(qk_product, [((WG_ROWS, block_k), jnp.int32)] * width, interpret=interpret)
            plgpu.barrier_arrive(k_consumed.at[slot])
            logits = [s.astype(jnp.float32) for s in logits]
            if masked:
                logits[-1] = jnp.where(col < valid, logits[-1], -jnp.inf)
            # The scales (> 0) go on the row maxima and inside exp2's argument (one fma per logit), as in mosaic.py.
            row_max = functools.reduce(jnp.maximum, [s.max(axis=1) * sc for s, sc in zip(logits, scales)])
            m_new = jnp.maximum(m, row_max)
            alpha = jnp.exp2(m - m_new)
            shift = lax.broadcast_in_dim(m_new - P_EXP_OFFSET, logits[0].shape, [0])
            ps = [jnp.exp2(s * sc - shift) for s, sc in zip(logits, scales)]
            l = l * alpha + functools.reduce(jnp.add, [p.sum(axis=1) for p in ps])
            p_ops = [_p_operand(p.astype(FP8), None if p_tiles is None else p_tiles.at[wg * per_step + j],
                                registers=p_in_registers, interpret=interpret) for j, p in enumerate(ps)]
            if p_tiles is None:  # the regrouped registers (4-byte vectors; accumulator-shaped e4m3 cannot be one)
                alpha, l, m_new, *p_ops = lax.optimization_barrier((alpha, l, m_new, *p_ops))
            else:
                alpha, l, m_new = lax.optimization_barrier((alpha, l, m_new))
            plgpu.barrier_arrive(schedule)  # softmax done
            plgpu.barrier_wait(v_loaded.at[slot])
            plgpu.barrier_wait(schedule)  # the tensor cores are ours again

            def pv_product(pv_refs):
                [pv_ref] = pv_refs
                for p_op, tile in zip(p_ops, tiles):
                    plgpu.wgmma(pv_ref, p_op, v_smem.at[tile].transpose((1, 0)))

                @pl.when(t + 1 < n_steps)
                def _():
                    plgpu.barrier_wait(k_loaded.at[lax.rem(t + 1, slots)])

            [pv] = _fresh_products(pv_product, [((WG_ROWS, d), jnp.float32)], interpret=interpret)
            # The running accumulator is rescaled here rather than before P.V (it is not P.V's accumulator), so the
            # rescale and the add are one fma per element.
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l

        carry = lax.fori_loop(0, n_steps - 1, step, (acc, m, l))
        last = functools.partial(step, width=n_sel - per_step * (n_steps - 1), masked=True)
        acc, m, l = lax.fori_loop(n_steps - 1, n_steps, last, carry)
        pl.when(wg == 0)(take_turn)
        plgpu.barrier_wait(vs_loaded.at[wg])
        v_scale = plgpu.load(vs_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(0))
        out = acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0]) * lax.broadcast_in_dim(v_scale, acc.shape, [1])
        out = out.astype(o_smem.dtype)
        if lin_refs is not None:
            kv_smem, w_smem, ksum_smem, bias_smem = lin_smem
            plgpu.barrier_wait(lin_loaded[0])  # k_sum, bias
            plgpu.barrier_wait(lin_loaded[2].at[wg])  # q
            out = fused_linear_epilogue(out, o_smem.at[wg], kv_smem, w_smem, ksum_smem, bias_smem, lin_loaded[1])
        o_smem.at[wg][...] = out
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[bi, rows, hi])
        # Only until the shared memory is read: the writes land by the kernel's end, as in CUTLASS's
        # epilogues; waiting for them held each CTA's exit and the next CTA's start on this SM.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        lut_rows = [lut_ref.at[bi, hi, ci * streams + stream] for stream in range(streams)]
        if lin_refs is not None:  # the epilogue's own buffers: no slot to wait for, so copied at once
            _, kv_ref, ksum_ref, w_ref, bias_ref = lin_refs
            kv_smem, w_smem, ksum_smem, bias_smem = lin_smem
            plgpu.copy_gmem_to_smem(ksum_ref.at[bi, hi], ksum_smem, lin_loaded[0])
            plgpu.copy_gmem_to_smem(bias_ref, bias_smem, lin_loaded[0])
            plgpu.copy_gmem_to_smem(kv_ref.at[bi, hi], kv_smem, lin_loaded[1])
            plgpu.copy_gmem_to_smem(w_ref, w_smem, lin_loaded[1])

        def blocks(t):
            """(tile in the slot, key block) of step t's copies. A last step with fewer blocks copies its last one
            again into the unused tiles: every slot barrier then counts the same arrivals."""
            return [(stream * per_step + j, lut_row[jnp.minimum(per_step * t + j, n_sel - 1)])
                    for stream, lut_row in enumerate(lut_rows) for j in range(per_step)]

        def fetch_k(t, slot):
            for tile, block in blocks(t):
                plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(block * block_k, block_k), hi],
                                        k_smem.at[slot * per_slot + tile], k_loaded.at[slot])

        def fetch_v(t, slot):
            for tile, block in blocks(t):
                plgpu.copy_gmem_to_smem(vt_ref.at[bi, hi, :, pl.ds(block * block_k, block_k)],
                                        v_smem.at[slot * per_slot + tile], v_loaded.at[slot])

        fill_kv_ring(fetch_k, fetch_v, k_consumed, v_consumed, slots=slots, n_steps=n_steps)

        # Observe each slot's last release too: nothing is refilled, but every barrier phase is then waited for,
        # which the GPU interpreter's race detector checks when the barriers are freed.
        for slot in range(slots):
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])


def _ring_slots(config: SageMosaicConfig, d: int, block_q: int, block_k: int, out_dtype, linear: bool,
                interpret: bool, n_steps: int | None = None) -> int:
    """K/V ring slots: what the config asks, at most the steps and what shared memory holds beside q8, the V
    scales, the output (and, fused, q) staging tiles, P's tiles where P.V reads them, and the linear epilogue's
    kv, weight and vectors; 8 KB cover the barriers and the rounding of each allocation."""
    per_step, streams = blocks_per_step(block_k), COMPUTE_WGS * WG_ROWS // block_q
    out_bytes = jnp.dtype(out_dtype).itemsize
    p_tile = not config.registers(block_k) or interpret
    fixed = COMPUTE_WGS * WG_ROWS * (d + p_tile * per_step * block_k + d * out_bytes) + COMPUTE_WGS * d * 4 + 8192
    fixed += linear * (2 * d * d + 2 * d) * out_bytes
    fit = (SMEM_BYTES - fixed) // (2 * streams * per_step * block_k * d)
    return min(config.max_concurrent_steps, fit, *([] if n_steps is None else [n_steps]))


MIN_FUSED_SLOTS = 3  # ring slots the fused linear epilogue must leave (docs/PERF.md, twelfth session)
FUSED_BLOCKS = (128, 64)  # the blocks where fusing was measured faster


def fuses_linear(block_q: int, block_k: int, d: int, out_dtype=jnp.bfloat16,
                 config: SageMosaicConfig = SageMosaicConfig()) -> bool:
    """Whether the linear epilogue is fused at these blocks: FUSED_BLOCKS, where its tiles leave a ring of at least
    MIN_FUSED_SLOTS slots (3 of 32 KB at head_dim 128). With (64, 128) blocks, whose slots hold two LUT rows'
    128-key tiles (64 KB), 1 would be left."""
    fits = _ring_slots(config, d, block_q, block_k, out_dtype, True, False) >= MIN_FUSED_SLOTS
    return (block_q, block_k) == FUSED_BLOCKS and fits


def transpose_values(v8: jax.Array, block_k: int, key_order: bool) -> jax.Array:
    """e4m3 v8 [B, L, H, D] -> [B, H, D, L_pad], L_pad = L rounded up to block_k, zero-padded: the K-major layout
    of V for the 8-bit P.V (and 16-byte aligned rows for TMA); key_order: the tokens of each 16-token group in
    `KEY_ORDER`, the key order of P in registers."""
    l = v8.shape[1]
    vt = jnp.transpose(v8, (0, 2, 3, 1))
    vt = jnp.pad(vt, ((0, 0), (0, 0), (0, 0), (0, pl.cdiv(l, block_k) * block_k - l)))
    return to_key_order(vt.reshape(-1, vt.shape[-1])).reshape(vt.shape) if key_order else vt


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "out_dtype", "config", "interpret"))
def sparse_attention(
    q8: jax.Array, q_scale: jax.Array, k8: jax.Array, k_scale: jax.Array, v8: jax.Array, v_scale: jax.Array,
    lut: jax.Array, *, block_q: int, block_k: int, out_dtype=jnp.bfloat16,
    config: SageMosaicConfig = SageMosaicConfig(), interpret: bool = False, linear: tuple | None = None,
) -> jax.Array:
    """`sage_reference.sparse_attention` as a Mosaic GPU kernel; same operands (`sage_reference.quantize`) and
    result: `sparse_attention_kmajor` after transposing v8 (`transpose_values`), linear included."""
    vt = transpose_values(v8, block_k, config.registers(block_k))
    return sparse_attention_kmajor(q8, q_scale, k8, k_scale, vt, v_scale, lut, block_q=block_q, block_k=block_k,
                                   out_dtype=out_dtype, config=config, interpret=interpret, linear=linear)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "out_dtype", "config", "interpret"))
def sparse_attention_kmajor(
    q8: jax.Array, q_scale: jax.Array, k8: jax.Array, k_scale: jax.Array, vt: jax.Array, v_scale: jax.Array,
    lut: jax.Array, *, block_q: int, block_k: int, out_dtype=jnp.bfloat16,
    config: SageMosaicConfig = SageMosaicConfig(), interpret: bool = False, linear: tuple | None = None,
) -> jax.Array:
    """`sparse_attention` with V already K-major: vt e4m3 [B, H, D, L_pad] as `transpose_values` lays it out (in
    `KEY_ORDER` where `config.registers(block_k)`), which `sage_triton.quantize_values_transposed` writes in its
    quantisation pass. block_q 64 or 128, block_k 64 or 128. q_scale and k_scale must be positive, as the
    quantiser's are (>= 1e-7): the masked logits are -inf before the scale multiplies them.
    linear: None, or (q [B, L, H, D], kv [B, H, D, D], k_sum [B, H, D], proj_w [D, D], proj_b [D] or None) to
    return `triton.linear_epilogue(q, o_sparse, kv, k_sum, proj_w, proj_b)` instead, computed in the kernel's
    epilogue as the SLA kernel does (needs `fuses_linear`; compiled only: the interpreter's wgmma takes no
    register operand).

    interpret=True runs it in the Mosaic GPU interpreter on the CPU (warpgroups, barriers and TMA simulated) with
    its race detector on: a test of the numerics and of the synchronisation, not of the hardware lowering. The
    interpreter's barrier waits block inside XLA callbacks; on a 2-core CPU it was seen to hang inside a larger
    jitted program (SageSLA with its linear branch: docs/PERF.md) whenever a ring slot takes several tiles
    (block_q = 64, or block_k = 64's two-block steps), so the tests interpret this kernel on its own."""
    b, l, h, d = q8.shape
    nq, n_sel = lut.shape[2], lut.shape[3]
    if block_q not in BLOCK_QS or block_k not in (64, 128) or d not in (64, 128):
        raise ValueError(f"the Mosaic SageSLA kernel takes block_q 64 or 128, block_k 64 or 128 and head_dim 64 or "
                         f"128; got ({block_q}, {block_k}), head_dim {d}")
    if nq != pl.cdiv(l, block_q):
        raise ValueError(f"lut has {nq} query blocks; L={l} with block_q={block_q} needs {pl.cdiv(l, block_q)}")
    if vt.shape != (b, h, d, pl.cdiv(l, block_k) * block_k):
        raise ValueError(f"vt must be [B, H, D, L rounded up to block_k] = {(b, h, d, pl.cdiv(l, block_k) * block_k)} "
                         f"(transpose_values), got {vt.shape}")
    if linear is not None and interpret:
        raise ValueError("the Mosaic SageSLA kernel's fused linear epilogue runs compiled only: the Mosaic GPU "
                         "interpreter's wgmma takes no register operand (pass linear=None and add the linear branch "
                         "with triton.linear_epilogue)")
    if linear is not None and not fuses_linear(block_q, block_k, d, out_dtype, config):
        raise ValueError(f"the Mosaic SageSLA kernel fuses the linear epilogue at blocks {FUSED_BLOCKS} only, where "
                         f"the ring keeps {MIN_FUSED_SLOTS} slots beside its tiles; got ({block_q}, {block_k})")
    streams = COMPUTE_WGS * WG_ROWS // block_q
    per_step = blocks_per_step(block_k)
    ctas = pl.cdiv(l, COMPUTE_WGS * WG_ROWS)
    # An odd count of 64-row blocks leaves the last CTA's second warpgroup rows past L (TMA reads them as zeros
    # and drops their writes): it walks a copy of the last LUT row with a unit q scale, to stay in the ping-pong.
    lut = lut.astype(jnp.int32)
    if ctas * streams != nq:
        pad = ((0, 0), (0, 0), (0, ctas * streams - nq))
        lut = jnp.pad(lut, pad + ((0, 0),), mode="edge")
        q_scale = jnp.pad(q_scale, pad, constant_values=1.0)
    p_in_registers = config.registers(block_k)
    slots = _ring_slots(config, d, block_q, block_k, out_dtype, linear is not None, interpret,
                        pl.cdiv(n_sel, per_step))
    out_tiles = (plgpu.TilingTransform((8, 128 // jnp.dtype(out_dtype).itemsize)), plgpu.SwizzleTransform(128))
    if linear is not None:
        q, kv, k_sum, proj_w, proj_b = linear
        proj_b = jnp.zeros((d,), out_dtype) if proj_b is None else proj_b
        linear = tuple(x.astype(out_dtype) for x in (q, kv, k_sum, proj_w, proj_b))

    def entry(lut_ref, q_ref, qs_ref, k_ref, ks_ref, vt_ref, vs_ref, *rest):
        lin_refs, o_ref = (rest[:5], rest[5]) if linear is not None else (None, rest[0])
        lin_smem = None
        if linear is not None:  # kv, proj_l's weight [out, in], k_sum, bias
            lin_smem = (plgpu.SMEM((d, d), out_dtype, transforms=out_tiles),
                        plgpu.SMEM((d, d), out_dtype, transforms=out_tiles),
                        plgpu.SMEM((d,), out_dtype), plgpu.SMEM((d,), out_dtype))
        p_tiles = None
        if not p_in_registers or interpret:
            p_tiles = plgpu.SMEM((COMPUTE_WGS * per_step, WG_ROWS, block_k), FP8, transforms=_tiles(block_k))
        smem = (
            plgpu.SMEM((COMPUTE_WGS, WG_ROWS, d), jnp.int8, transforms=_tiles(d)),
            plgpu.SMEM((slots * streams * per_step, block_k, d), jnp.int8, transforms=_tiles(d)),  # see _kernel
            plgpu.SMEM((slots * streams * per_step, d, block_k), FP8, transforms=_tiles(block_k)),
            plgpu.SMEM((COMPUTE_WGS, d), jnp.float32),
            plgpu.SMEM((COMPUTE_WGS, WG_ROWS, d), out_dtype, transforms=out_tiles),
            lin_smem,
            p_tiles,
        )
        # the epilogue's k_sum and bias; kv and proj_l's weight; each warpgroup's q tile
        lin_loaded = None if linear is None else (
            plgpu.Barrier(num_arrivals=2), plgpu.Barrier(num_arrivals=2), plgpu.Barrier(num_barriers=COMPUTE_WGS))
        loaded = (plgpu.Barrier(num_arrivals=streams * per_step, num_barriers=slots),
                  plgpu.Barrier(num_arrivals=streams * per_step, num_barriers=slots),
                  plgpu.Barrier(num_barriers=COMPUTE_WGS), plgpu.Barrier(num_barriers=COMPUTE_WGS), lin_loaded)
        consumed = (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),) * 2
        kernel = functools.partial(_kernel, lut_ref, q_ref, qs_ref, k_ref, ks_ref, vt_ref, vs_ref, lin_refs, o_ref,
                                   seq_len=l, block_k=block_k, n_sel=n_sel, slots=slots, streams=streams,
                                   per_step=per_step, c=float(base2_scale(d)), p_in_registers=p_in_registers,
                                   interpret=interpret)
        pl.run_scoped(lambda *scratch: kernel(*scratch), smem, loaded, consumed,
                      plgpu.Barrier(num_arrivals=COMPUTE_WGS), collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((b, l, h, d), out_dtype),
        grid=(h, ctas, b),
        grid_names=("heads", "q_blocks", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        kernel_name="sagesla_sparse_fwd_mosaic",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams(detect_races=True) if interpret else None,
    )(lut, q8, q_scale, k8, k_scale, vt, v_scale, *(linear or ()))
