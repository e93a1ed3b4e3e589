"""The block-scaled int8 GEMM as a Mosaic GPU (Hopper) kernel: wgmma s8 x s8 -> s32, promoted per 128-wide K block.

Why not Pallas-Triton on Hopper: its kernel must wait for each K block's int32 dot before promoting it into the fp32
accumulator, which serialises the tensor cores with the promotion (~450 TOP/s, slower than bf16 cuBLAS;
kernels-landscape.md 8.3). Here one CTA computes a 128 x tile_n output tile (tile_n 128 or 256) with three
warpgroups:
  two compute warpgroups, 64 rows each: per K block and 128 output columns, wgmma(x_q[64, 128], w_q[128, 128]^T)
      into an int32 accumulator, then acc_f32 += f32(block sum) * sx * sw. Each warpgroup waits only for its own
      wgmma, so one's promotion runs on the ALUs while the other's product runs on the tensor cores;
  one memory warpgroup streams the x and w K-tiles by TMA into a ring of `max_concurrent_steps` shared-memory slots.
Both operands stay K-contiguous ([M, K] and [N, K]): 8-bit wgmma takes only K-major operands.
Every 128 x 128 piece of the output is one scale block, so sx * sw is one scalar per K step and 128 columns.
int32 -> fp32 is exact either way (|block sum| <= 2^21): cvt.rn.f32.s32 (`int_to_float="convert"`, the default), or
"bits": add the bits of 1.5 * 2^23 (`MAGIC_BITS`) to the sum, read the result as the float 1.5 * 2^23 + sum and
subtract 1.5 * 2^23 (an integer add and an fp32 subtraction instead of the conversion; slower on an H100 in 11 of 12
comparisons, by 1-15%: docs/PERF.md).
The scales of a tile (one x row, n_sub w rows of K/128 each) and its bias are staged in shared memory by TMA.
Tiles are visited in groups of `group_m` row tiles per column tile, so the x rows of a group stay in L2.
The grid is persistent (`MosaicConfig.persistent`): one CTA (or CTA pair) per SM walks tiles i, i + grid, ... and
the ring runs on across them, so the next tile's first K blocks load while the compute warpgroups store the last
one; the scales and bias sit in two buffers (tile parity). On an H100 that gained 13-15% at K = 1536 and 6-8% at
K = 5120 over one tile per CTA, 2% at 8960 x 1536 and -2% at 13,824 x 5120 (within the spread), the same bytes
(docs/PERF.md).
With `cluster=2` two CTAs of a cluster compute vertically adjacent tiles (rows mi and mi + 1 of one column tile) and
share each w K-tile: both issue the same TMA copy with `collective_axes="cluster"`, each loads half and multicasts it
to both, so a CTA moves 16 KB of x + 16 KB of w per K step instead of 16 + 32 KB (128 x 256 tiles). A ring slot is
then refilled only when the compute warpgroups of both CTAs released it (a cluster barrier), and the memory
warpgroup waits for the last releases before exiting, so no arrival lands in a finished CTA.
The epilogue rounds to the output dtype, adds the bias in that dtype (`reference.round_and_add_bias`) and stores by
TMA, which drops the rows past M (32,760-token activations need no padding; a row count that is not a multiple of 8,
which TMA cannot describe, is padded to one). K and N must be multiples of 128.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.devices import default_is_hopper, num_sms
from pallas_kernels.int8_matmul.reference import BLOCK, check_gemm_operands, num_blocks
from pallas_kernels.int8_matmul.triton import MAGIC, MAGIC_BITS

f32 = jnp.float32
WG_ROWS = 64  # output rows per compute warpgroup (the wgmma M)
COMPUTE_WGS = 2
SMEM_BYTES = 227 * 1024  # sm90's per-block shared-memory limit
SWIZZLE = 128  # bytes: one 128-wide int8 K block per swizzled row


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """tile_n: output columns per CTA, 128 or 256 (256 halves the x traffic per operation; each warpgroup then
    holds two fp32 accumulators [64, 128] and runs the two 128-column products one after the other, so the int32
    accumulator stays one [64, 128]); max_concurrent_steps: depth of the x/w ring (capped by shared memory);
    group_m: row tiles per L2 group; int_to_float: "bits" (integer add of MAGIC_BITS, fp32 subtraction) or
    "convert" (cvt.rn.f32.s32); overlap (tile_n 128, an even number of K blocks):
    two int32 accumulators per warpgroup, so the next K block's wgmma runs during this one's promotion (with
    tile_n 256 the two fp32 accumulators leave no registers for a second int32 one).
    Defaults: the fastest of `bench.py --sweep` on an H100, int_to_float from separate A/B runs (docs/PERF.md);
    with the staged scales, tile_n 256 and a bf16 output, shared memory caps the ring at 3 slots. persistent: one
    CTA (pair) per SM walking several tiles, else one per tile (the same results)."""

    tile_n: int = 256
    max_concurrent_steps: int = 5
    group_m: int = 16
    int_to_float: str = "convert"
    overlap: bool = True
    cluster: int = 2
    persistent: bool = True

    def __post_init__(self):
        if self.cluster not in (1, 2):
            raise ValueError(f"cluster must be 1 or 2, got {self.cluster}")
        if self.tile_n not in (BLOCK, 2 * BLOCK):
            raise ValueError(f"tile_n must be {BLOCK} or {2 * BLOCK}, got {self.tile_n}")
        if self.int_to_float not in ("bits", "convert"):
            raise ValueError(f"int_to_float must be 'bits' or 'convert', got {self.int_to_float!r}")


def shapes_supported(m: int, k: int, n: int, tile_n: int = BLOCK) -> bool:
    """K a multiple of 128 (whole scale blocks), N of tile_n (whole CTA tiles); any M (TMA masks ragged rows)."""
    return k % BLOCK == 0 and n % tile_n == 0 and m > 0


def supports(m: int, k: int, n: int, tile_n: int = BLOCK) -> bool:
    """The shapes fit and the default device is an sm90 (Hopper) GPU."""
    return default_is_hopper() and shapes_supported(m, k, n, tile_n)


def default_config(k: int, n: int) -> MosaicConfig:
    """The tuned defaults, with 128-column CTA tiles where N is not a multiple of 256, and without the CTA pair where
    K is short: on an H100 at M = 32,760 the pair's shared w tile gained 3-8% at K = 5120 and 6% at K = 8960 but lost
    4% at K = 1536 (and 2% at K = 13,824, within the noise; docs/PERF.md)."""
    config = MosaicConfig()
    if n % config.tile_n:
        config = dataclasses.replace(config, tile_n=BLOCK)
    return config if k > 2048 else dataclasses.replace(config, cluster=1)


def _tiling(dtype) -> tuple:
    elems = SWIZZLE // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(SWIZZLE)


def _grouped_tile(pid, grid_m: int, grid_n: int, group_m: int):
    """Linear CTA id -> (row tile, column tile), walking group_m row tiles down each column before moving right."""
    per_group = group_m * grid_n
    first_m = lax.div(pid, per_group) * group_m
    rows_here = jnp.minimum(grid_m - first_m, group_m)
    in_group = lax.rem(pid, per_group)
    return first_m + lax.rem(in_group, rows_here), lax.div(in_group, rows_here)


def _kernel(xq_ref, xs_ref, wq_ref, ws_ref, bias_ref, o_ref, smem, loaded, consumed, scales_free,
            *, grid_m, grid_n, k_steps, slots, cluster, n_ctas, cfg: MosaicConfig):
    """xq_ref [M, K] int8, xs_ref [ceil(M/128), kt] fp32, wq_ref [N, K] int8, ws_ref [N/128, kt] fp32 (kt: the
    K/128 scale columns padded to a multiple of 4 for TMA), bias_ref [N] in the output dtype or None, o_ref [M, N];
    all in global memory. The CTA (or CTA pair) computes tiles (pairs) i, i + n_ctas, ... of the grouped order: the
    ring's K steps run on across its tiles (step g of the CTA: slot g % slots), so the memory warpgroup loads the
    next tile's first K blocks while the compute warpgroups finish the last one and store it. The tile's scale rows
    and bias sit in one of two shared-memory buffers (tile parity), refilled once both compute warpgroups are done
    with the tile two before (`scales_free`)."""
    x_smem, w_smem, out_smem, bias_smem, xs_smem, ws_smem = smem
    x_loaded, w_loaded, scales_loaded = loaded
    n_sub = cfg.tile_n // BLOCK  # 128-column products per K step
    pairs = grid_m // cluster * grid_n
    cta = lax.axis_index("tiles")
    my_tiles = lax.div(pairs - cta + n_ctas - 1, n_ctas)
    wg = lax.axis_index("wg")

    def tile_coords(j):
        """Row and column tile of this CTA's j-th tile."""
        pair_m, ni = _grouped_tile(cta + j * n_ctas, grid_m // cluster, grid_n, max(1, cfg.group_m // cluster))
        return pair_m * cluster + (lax.axis_index("cluster") if cluster > 1 else 0), ni

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        x_rows = pl.ds(wg * WG_ROWS, WG_ROWS)

        def to_f32(total):
            if cfg.int_to_float == "bits":
                return lax.bitcast_convert_type(total + MAGIC_BITS, f32) - MAGIC
            return total.astype(f32)

        def zeros_i32():
            return plgpu.layout_cast(jnp.zeros((WG_ROWS, BLOCK), jnp.int32), plgpu.Layout.WGMMA)

        def wait_loaded(slot):
            plgpu.barrier_wait(x_loaded.at[slot])
            plgpu.barrier_wait(w_loaded.at[slot])

        def multiply(acc_ref, slot, j=0):
            """acc_ref (int32 [64, 128]) += this warpgroup's x rows . (w's j-th 128 columns)^T over K block `slot`:
            one asynchronous wgmma."""
            w_cols = w_smem.at[slot, pl.ds(j * BLOCK, BLOCK)]
            plgpu.wgmma(acc_ref, x_smem.at[slot, x_rows], w_cols.transpose((1, 0)))

        def block_sum(slot, j):
            """The exact int32 dot of this warpgroup's x rows with w's j-th 128 columns over K block `slot`,
            as fp32 [64, 128]."""
            return to_f32(pl.run_state(lambda acc_ref: multiply(acc_ref, slot, j))(plgpu.ACC.init(zeros_i32())))

        def tile(jt, _):
            """This CTA's jt-th tile: its K loop from ring step jt * k_steps on, then its store."""
            mi, ni = tile_coords(jt)
            buf = lax.rem(jt, 2)
            first = jt * k_steps
            xs_tile, ws_tile = xs_smem.at[buf], ws_smem.at[buf]
            plgpu.barrier_wait(scales_loaded.at[buf])

            def scales(t):
                """sx * sw of K block t for each of the n_sub 128-column products."""
                return tuple(xs_tile[t] * ws_tile[j, t] for j in range(n_sub))

            def step(t, carry):
                """The scales of block t + 1 are read here, before the products: read after the wgmma wait, they
                kept block j's fp32 sum alive across block j + 1's product and ptxas spilled registers (2x slower
                at tile_n 256)."""
                accs, block_scales = carry
                slot = lax.rem(first + t, slots)
                upcoming = scales(jnp.minimum(t + 1, k_steps - 1))
                wait_loaded(slot)
                sums = [block_sum(slot, j) for j in range(n_sub)]
                plgpu.barrier_arrive(consumed.at[slot])
                return tuple(acc + part * s for acc, part, s in zip(accs, sums, block_scales)), upcoming

            def overlapped(acc):
                """n_sub == 1, k_steps even, >= 2 slots: two int32 accumulators, so K block t + 1's wgmma runs
                while block t is promoted (wait_n=1 leaves one product in flight)."""
                def issue(t, acc_ref):
                    slot = lax.rem(first + t, slots)
                    wait_loaded(slot)
                    acc_ref[...] = zeros_i32()
                    multiply(acc_ref, slot)

                def retire(t, acc_ref, acc, wait_n, scale):
                    total = plgpu.wgmma_accumulator_load(acc_ref, wait_n=wait_n)
                    plgpu.barrier_arrive(consumed.at[lax.rem(first + t, slots)])
                    return acc + to_f32(total) * scale

                def run(a_ref, b_ref):
                    def pair(p, acc):
                        t = 2 * p
                        (s0,), (s1,) = scales(t), scales(t + 1)  # read before the wgmmas (see `step`)
                        issue(t + 1, b_ref)
                        acc = retire(t, a_ref, acc, 1, s0)
                        issue(t + 2, a_ref)
                        return retire(t + 1, b_ref, acc, 1, s1)

                    issue(0, a_ref)
                    out = lax.fori_loop(0, k_steps // 2 - 1, pair, acc)
                    (s0,), (s1,) = scales(k_steps - 2), scales(k_steps - 1)
                    issue(k_steps - 1, b_ref)
                    out = retire(k_steps - 2, a_ref, out, 1, s0)
                    return retire(k_steps - 1, b_ref, out, 0, s1)

                acc_type = plgpu.ACC((WG_ROWS, BLOCK), jnp.int32)
                return pl.run_scoped(run, acc_type, acc_type)

            zeros = plgpu.layout_cast(jnp.zeros((WG_ROWS, BLOCK), f32), plgpu.Layout.WGMMA)
            # Two products in flight need two ring slots: with one, issuing block t + 1 would wait for the release
            # of block t, which comes only after it is retired.
            if cfg.overlap and n_sub == 1 and k_steps % 2 == 0 and slots >= 2:
                accs = (overlapped(zeros),)
            else:
                accs, _ = lax.fori_loop(0, k_steps, step, ((zeros,) * n_sub, scales(0)))
            rows = pl.ds(mi * BLOCK + wg * WG_ROWS, WG_ROWS)
            for j, acc in enumerate(accs):
                y = acc.astype(o_ref.dtype)
                if bias_ref is not None:
                    bias = plgpu.load(bias_smem.at[buf, pl.ds(j * BLOCK, BLOCK)], layout=plgpu.Layout.WGMMA.reduce(0))
                    y = (y.astype(f32) + lax.broadcast_in_dim(bias.astype(f32), y.shape, [1])).astype(o_ref.dtype)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the staging tile's previous store has been read
                out_smem.at[wg][...] = y
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem.at[wg], o_ref.at[rows, pl.ds(ni * cfg.tile_n + j * BLOCK, BLOCK)])
            plgpu.barrier_arrive(scales_free.at[buf])  # this tile's scales and bias are read

        lax.fori_loop(0, my_tiles, tile, None)
        # Only until the shared memory is read: the writes land by the kernel's end, as in CUTLASS's
        # epilogues; with one tile per CTA, waiting for them held each CTA's exit and the next CTA's start.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    @pl.when(wg == COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def fetch(g, slot):
            """Ring step g: K block g % k_steps of this CTA's tile g // k_steps."""
            mi, ni = tile_coords(lax.div(g, k_steps))
            ks = pl.ds(lax.rem(g, k_steps) * BLOCK, BLOCK)
            plgpu.copy_gmem_to_smem(xq_ref.at[pl.ds(mi * BLOCK, BLOCK), ks], x_smem.at[slot], x_loaded.at[slot])
            plgpu.copy_gmem_to_smem(wq_ref.at[pl.ds(ni * cfg.tile_n, cfg.tile_n), ks], w_smem.at[slot],
                                    w_loaded.at[slot], collective_axes="cluster" if cluster > 1 else None)

        def load_scales(jt):
            """Tile jt's scale rows and bias into buffer jt % 2, once the tile two before has released it. Staged in
            shared memory because, read from global memory in the K loop, they were its only global loads, and ncu
            put a third of the warps' stall cycles on waits for them (docs/PERF.md, seventh session)."""
            mi, ni = tile_coords(jt)
            buf = lax.rem(jt, 2)

            @pl.when(jt >= 2)
            def _():
                plgpu.barrier_wait(scales_free.at[buf])

            # One copy per scale row, each to the start of a 128-byte aligned shared-memory row (TMA destinations
            # must be): the rows in global memory stay padded to 4 columns only, so no call pads them further.
            kt = xs_ref.shape[1]
            plgpu.copy_gmem_to_smem(xs_ref.at[mi], xs_smem.at[buf, pl.ds(0, kt)], scales_loaded.at[buf])
            for j in range(n_sub):
                plgpu.copy_gmem_to_smem(ws_ref.at[ni * n_sub + j], ws_smem.at[buf, j, pl.ds(0, kt)],
                                        scales_loaded.at[buf])
            if bias_ref is not None:
                plgpu.copy_gmem_to_smem(bias_ref.at[pl.ds(ni * cfg.tile_n, cfg.tile_n)], bias_smem.at[buf],
                                        scales_loaded.at[buf])

        total = my_tiles * k_steps

        @pl.loop(0, total)
        def _ring(g):
            slot = lax.rem(g, slots)

            @pl.when(lax.rem(g, k_steps) == 0)
            def _():
                load_scales(lax.div(g, k_steps))

            @pl.when(g >= slots)
            def _():
                plgpu.barrier_wait(consumed.at[slot])

            fetch(g, slot)

        if cluster > 1:
            # The last `slots` releases, which also count the other CTA's compute warpgroups: after them no remote
            # arrival or multicast write can still target this CTA.
            @pl.loop(total - slots, total)  # total >= k_steps >= slots
            def _quiesce(g):
                plgpu.barrier_wait(consumed.at[lax.rem(g, slots)])


def _scale_cols(k_steps: int) -> int:
    """The K/128 scale columns padded to a multiple of 4: TMA copies rows of multiples of 16 bytes."""
    return -(-k_steps // 4) * 4


def _smem_scale_cols(k_steps: int) -> int:
    """Columns of a scale row in shared memory: a multiple of 32, so that every row of the two buffers starts
    128-byte aligned, as TMA destinations must (a row at 48 bytes faulted with a misaligned address)."""
    return -(-k_steps // 32) * 32


def _slots(out_dtype, k_steps: int, config: MosaicConfig) -> int:
    """Ring depth: what the config asks, at most the K steps and what fits next to the output staging tiles and the
    scale rows; the 4096-byte margin covers the barriers and the rounding of every allocation up to 1024 bytes."""
    scale_bytes = 2 * (1 + config.tile_n // BLOCK) * 4 * _smem_scale_cols(k_steps)  # two buffers
    out_bytes = COMPUTE_WGS * WG_ROWS * BLOCK * jnp.dtype(out_dtype).itemsize + 2 * config.tile_n * 4 + scale_bytes
    fit = (SMEM_BYTES - out_bytes - 4096) // (BLOCK * BLOCK + config.tile_n * BLOCK)
    return max(1, min(config.max_concurrent_steps, k_steps, fit))


@functools.partial(jax.jit, static_argnames=("out_dtype", "config"))
def int8_block_matmul(
    x_q: jax.Array, x_scale: jax.Array, w_q: jax.Array, w_scale: jax.Array, *, out_dtype=jnp.bfloat16,
    bias: jax.Array | None = None, config: MosaicConfig | None = None,
) -> jax.Array:
    """`reference.int8_block_matmul` on Hopper: x_q [M, K], x_scale [ceil(M/128), K/128], w_q [N, K], w_scale
    [N/128, K/128] -> [M, N] out_dtype (+ bias [N] after the rounding, in out_dtype). K, N multiples of 128;
    config None: `default_config(K, N)`."""
    check_gemm_operands(x_q, x_scale, w_q, w_scale, bias)
    (m, k), n = x_q.shape, w_q.shape[0]
    config = config or default_config(k, n)
    if not shapes_supported(m, k, n, config.tile_n):
        raise ValueError(f"the Mosaic W8A8 GEMM needs K a multiple of {BLOCK} and N of tile_n={config.tile_n}; got "
                         f"K={k}, N={n} (use implementation='triton')")
    grid_m, grid_n, k_steps = num_blocks(m), n // config.tile_n, k // BLOCK
    slots = _slots(out_dtype, k_steps, config)
    cluster = config.cluster if grid_m % config.cluster == 0 else 1
    int8_tile, out_tile = _tiling(jnp.int8), _tiling(out_dtype)
    has_bias = bias is not None
    kt = _scale_cols(k_steps)
    pairs = grid_m * grid_n // cluster
    n_ctas = min(pairs, num_sms() // cluster) if config.persistent else pairs
    x_scale, w_scale = (jnp.pad(s, ((0, 0), (0, kt - k_steps))) if kt != k_steps else s for s in (x_scale, w_scale))

    def entry(xq_ref, xs_ref, wq_ref, ws_ref, *rest):
        bias_ref, o_ref = (rest[0], rest[1]) if has_bias else (None, rest[0])
        smem = (
            plgpu.SMEM((slots, BLOCK, BLOCK), jnp.int8, transforms=int8_tile),
            plgpu.SMEM((slots, config.tile_n, BLOCK), jnp.int8, transforms=int8_tile),
            plgpu.SMEM((COMPUTE_WGS, WG_ROWS, BLOCK), out_dtype, transforms=out_tile),
            plgpu.SMEM((2, config.tile_n), out_dtype),  # [tile parity]: bias, scale rows
            plgpu.SMEM((2, _smem_scale_cols(k_steps)), jnp.float32),
            plgpu.SMEM((2, config.tile_n // BLOCK, _smem_scale_cols(k_steps)), jnp.float32),
        )
        # scales_loaded counts the copies of a tile's scale rows (one x row, tile_n / 128 w rows) and bias
        loaded = (plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_barriers=slots),
                  plgpu.Barrier(num_arrivals=1 + config.tile_n // BLOCK + has_bias, num_barriers=2))
        if cluster > 1:
            consumed = plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=COMPUTE_WGS,
                                            num_barriers=slots)
        else:
            consumed = plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots)
        kernel = functools.partial(_kernel, xq_ref, xs_ref, wq_ref, ws_ref, bias_ref, o_ref, grid_m=grid_m,
                                   grid_n=grid_n, k_steps=k_steps, slots=slots, cluster=cluster, n_ctas=n_ctas,
                                   cfg=config)
        pl.run_scoped(lambda *scratch: kernel(*scratch), smem, loaded, consumed,
                      plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=2), collective_axes="wg")

    # TMA needs the row count of a global array to be below 8 or a multiple of 8: pad x_q's rows (never across a
    # 128-row scale block, so x_scale stays) and slice the output.
    m_pad = m if m < 8 or m % 8 == 0 else m + 8 - m % 8
    x_rows = jnp.pad(x_q, ((0, m_pad - m), (0, 0))) if m_pad != m else x_q
    args = [x_rows, x_scale, w_q, w_scale] + ([bias.astype(out_dtype)] if has_bias else [])
    out = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((m_pad, n), out_dtype),
        grid=(n_ctas,),
        grid_names=("tiles",),
        **(dict(cluster=(cluster,), cluster_names=("cluster",)) if cluster > 1 else {}),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        kernel_name="w8a8_block_gemm_mosaic",  # how profiles (turbojax.bench.profile) tell it from other Mosaic kernels
    )(*args)
    return out[:m] if m_pad != m else out
