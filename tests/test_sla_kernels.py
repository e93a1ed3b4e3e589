"""One test suite for every SLA implementation: each must equal the pure-jnp reference.

On CPU the Pallas-Triton kernel runs in interpret mode; on a GPU (`pytest -m gpu`) the same cases run compiled.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sla
from pallas_kernels.sla import mosaic, reference, topk, triton

ON_GPU = jax.default_backend() == "gpu"


def _inputs(seed, b, l, h, d, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, (b, l, h, d), jnp.float32) for kk in keys[:3])
    k = k + 3.0 * jax.random.normal(keys[3], (1, 1, h, d))  # large shared key mean, like real layers
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _sparse(impl, q, k, v, lut, bq, bk):
    if impl == "reference":
        return reference.sparse_attention(q, k, v, lut, block_q=bq, block_k=bk)
    return triton.sparse_attention(q, k, v, lut, block_q=bq, block_k=bk, interpret=not ON_GPU)


CASES = [  # (L, block_q, block_k, topk): ragged lengths, both block orientations
    (200, 32, 16, 0.2),
    (200, 16, 32, 0.1),
    (333, 32, 16, 0.05),
    (1000, 128, 64, 0.15),
    (1000, 64, 128, 0.2),
]


@pytest.mark.parametrize("l, bq, bk, topk", CASES)
@pytest.mark.parametrize("impl", ["triton"])
def test_sparse_branch_matches_reference(impl, l, bq, bk, topk):
    q, k, v = _inputs(l, 2, l, 2, 64)
    lut = sla.block_map(q, k, topk=topk, block_q=bq, block_k=bk)
    out = _sparse(impl, q, k, v, lut, bq, bk)
    ref = reference.sparse_attention(q, k, v, lut, block_q=bq, block_k=bk)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref) < 1e-2  # both bf16 outputs of fp32-accumulated softmax attention


def test_sparse_branch_fp32_is_exact():
    """In fp32 the kernel's online softmax equals the reference's one-pass softmax to rounding."""
    q, k, v = _inputs(7, 1, 150, 2, 32, jnp.float32)
    lut = sla.block_map(q, k, topk=0.3, block_q=16, block_k=16)
    out = _sparse("triton", q, k, v, lut, 16, 16)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference.sparse_attention(q, k, v, lut, block_q=16,
                                                                                      block_k=16)), atol=2e-5)


def test_every_row_is_written():
    """Output rows of the ragged last query block and all heads are written (poisoned output would show)."""
    q, k, v = _inputs(3, 1, 77, 3, 16)
    lut = sla.block_map(q, k, topk=0.5, block_q=16, block_k=16)
    out = np.asarray(_sparse("triton", q, k, v, lut, 16, 16), np.float32)
    assert np.isfinite(out).all() and (np.abs(out).sum(-1) > 0).all()


def test_full_sla_dispatch():
    q, k, v = _inputs(11, 1, 300, 2, 64)
    w = (0.1 * jax.random.normal(jax.random.key(0), (64, 64))).astype(jnp.bfloat16)
    bias = jnp.full((64,), 0.05, jnp.bfloat16)
    out = sla.sla_attention(q, k, v, topk=0.2, block_q=32, block_k=16, proj_w=w, proj_b=bias, implementation="triton",
                            interpret=not ON_GPU)
    ref = reference.sla_attention(q, k, v, topk=0.2, block_q=32, block_k=16, proj_w=w, proj_b=bias)
    assert _rel(out, ref) < 1e-2


def test_triton_refuses_unsupported_tiles():
    q = jnp.zeros((1, 24, 2, 12), jnp.bfloat16)
    with pytest.raises(ValueError, match="power-of-two"):
        sla.sla_attention(q, q, q, topk=0.5, block_q=4, block_k=4, implementation="triton")
    assert sla.default_implementation(q, 4, 4) == "reference"


def test_lut_is_ascending():
    q, k, _ = _inputs(5, 1, 256, 2, 32)
    lut = np.asarray(sla.block_map(q, k, topk=0.3, block_q=16, block_k=16))
    assert (np.diff(lut, axis=-1) > 0).all()


def test_mosaic_shape_rules():
    q = jnp.zeros((1, 4104, 2, 128), jnp.bfloat16)
    assert mosaic.shapes_supported(q, 128, 64) and mosaic.shapes_supported(q, 128, 128)
    assert not mosaic.shapes_supported(q[:, :4100], 128, 64)  # TMA tiles the token axis by 8
    assert not mosaic.shapes_supported(q, 64, 128) and not mosaic.shapes_supported(q.astype(jnp.float32), 128, 64)
    assert not mosaic.shapes_supported(q[..., :96], 128, 64)


def test_mosaic_is_refused_where_it_cannot_run():
    q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    if not ON_GPU:
        with pytest.raises(ValueError, match="sm90"):
            sla.sla_attention(q, q, q, topk=0.5, block_q=128, block_k=64, implementation="mosaic")
    with pytest.raises(ValueError, match="sm90"):
        sla.sla_attention(q, q, q, topk=0.5, block_q=64, block_k=64, implementation="mosaic")


def _check_mosaic(q, k, v, lut, bk, blocks_per_step):
    """The Mosaic kernel's output for lut equals the fp32 reference's and is finite everywhere."""
    assert mosaic.supports(q, 128, bk), "needs an sm90 GPU"
    config = mosaic.MosaicConfig(blocks_per_step=blocks_per_step)
    out = mosaic.sparse_attention(q, k, v, lut, block_q=128, block_k=bk, config=config)
    ref = reference.sparse_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), lut,
                                     block_q=128, block_k=bk)
    assert _rel(out, ref) < 1e-2
    assert np.isfinite(np.asarray(out, np.float32)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("blocks_per_step", [1, 2])
@pytest.mark.parametrize("l, h, bk, topk", [(1000, 2, 64, 0.15), (32760, 2, 64, 0.1), (4104, 3, 128, 0.2)])
def test_mosaic_sparse_branch_matches_reference(l, h, bk, topk, blocks_per_step):
    """The Hopper kernel cannot run in the CPU interpreter (its P.V accumulates in place through pl.run_state, which
    the Mosaic GPU interpreter cannot evaluate), so it is checked here, on the device, against the same reference.
    L=32760 selects 51 of 512 blocks: an odd count, so the last pair step is one block short."""
    q, k, v = _inputs(l, 2, l, h, 128)
    _check_mosaic(q, k, v, sla.block_map(q, k, topk=topk, block_q=128, block_k=bk), bk, blocks_per_step)


def _lut_with_last_block(seed, b, h, nq, nk, n_sel):
    """Ascending random LUTs int32 [B, H, Nq, n_sel] that all select the last key block (the partial one at a ragged
    L), so every CTA runs the masked last step on it."""
    rng = np.random.default_rng(seed)
    rows = [np.sort(np.r_[rng.choice(nk - 1, n_sel - 1, replace=False), nk - 1]) for _ in range(b * h * nq)]
    return jnp.asarray(np.stack(rows).reshape(b, h, nq, n_sel), jnp.int32)


@pytest.mark.gpu
@pytest.mark.parametrize("blocks_per_step", [1, 2])
@pytest.mark.parametrize("l, d, n_sel", [(1000, 128, 1), (1000, 128, 4), (1000, 128, 9), (1000, 64, 9),
                                         (4104, 128, 7)])
def test_mosaic_masks_the_partial_last_block(l, d, n_sel, blocks_per_step):
    """block_k=64 with the ragged last block (40 of 64 real keys at L=1000, 8 at L=4104) in every LUT row, odd and
    even counts: a pair step masks each column by its own block, an odd count's last step holds one real block (its
    re-loaded second half never read), and n_sel=9 and 7 refill the two-slot ring of the pair steps at head_dim 128."""
    q, k, v = _inputs(n_sel, 2, l, 2, d)
    lut = _lut_with_last_block(n_sel, 2, 2, -(-l // 128), -(-l // 64), n_sel)
    _check_mosaic(q, k, v, lut, 64, blocks_per_step)


@pytest.mark.gpu
@pytest.mark.parametrize("blocks_per_step", [1, 2])
@pytest.mark.parametrize("n_sel", [1, 5])
def test_mosaic_odd_count_without_the_partial_block(n_sel, blocks_per_step):
    """LUT rows that end before the sequence's last block: an odd count's last step is its one whole block (the
    case where the masked step's limit comes from block_k, not from L)."""
    l = 1000
    q, k, v = _inputs(n_sel + 40, 1, l, 2, 128)
    rng = np.random.default_rng(n_sel)
    rows = [np.sort(rng.choice(-(-l // 64) - 1, n_sel, replace=False)) for _ in range(2 * -(-l // 128))]
    lut = jnp.asarray(np.stack(rows).reshape(1, 2, -(-l // 128), n_sel), jnp.int32)
    _check_mosaic(q, k, v, lut, 64, blocks_per_step)


def _abstract_h100_lowering(fn, *operands) -> str:
    """fn lowered for an sm90 target without a GPU (an abstract H100 stands in for the device); compiling it needs
    the GPU."""
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        return jax.jit(fn).trace(*operands).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("blocks_per_step", [1, 2])
@pytest.mark.parametrize("n_sel", [5, 6])
def test_mosaic_kernel_lowers_for_an_h100(blocks_per_step, n_sel):
    """Pallas -> Mosaic GPU -> LLVM/NVVM at a ragged L: pair steps make every wgmma N=128 (S = QK^T over 128 keys,
    P.V over K=128) but an odd count's last step, which holds one block (N=64); single blocks keep the N=64
    S = QK^T."""
    l, h, d = 1000, 2, 128
    spec = jax.ShapeDtypeStruct
    operands = (spec((1, l, h, d), jnp.bfloat16),) * 3 + (spec((1, h, -(-l // 128), n_sel), jnp.int32),)
    fn = functools.partial(mosaic.sparse_attention, block_q=128, block_k=64,
                           config=mosaic.MosaicConfig(blocks_per_step=blocks_per_step))
    text = _abstract_h100_lowering(fn, *operands)
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in text
    has_n64 = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16" in text
    assert has_n64 == (blocks_per_step == 1 or n_sel % 2 == 1)


def test_mosaic_blocks_per_step_rules():
    assert mosaic.blocks_per_step(mosaic.MosaicConfig(), 64) == 2
    assert mosaic.blocks_per_step(mosaic.MosaicConfig(blocks_per_step=1), 64) == 1
    assert mosaic.blocks_per_step(mosaic.MosaicConfig(), 128) == 1  # 128-row key blocks already make 128-key steps
    with pytest.raises(ValueError, match="1 or 2"):
        mosaic.blocks_per_step(mosaic.MosaicConfig(blocks_per_step=4), 64)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_epilogue_matches_reference(dtype, tol, with_bias):
    """o_sparse + proj_l(linear branch) in one pass equals the reference's separate XLA ops (ragged L)."""
    q, k, v = _inputs(13, 2, 150, 3, 64, dtype)
    o_sparse = _inputs(14, 2, 150, 3, 64, dtype)[0]
    w = (0.1 * jax.random.normal(jax.random.key(1), (64, 64))).astype(dtype)
    bias = (0.1 * jax.random.normal(jax.random.key(2), (64,))).astype(dtype) if with_bias else None
    kv, k_sum = reference.linear_state(k, v)
    out = triton.linear_epilogue(q, o_sparse, kv, k_sum, w, bias, interpret=not ON_GPU)
    ref = reference.add_linear_branch(o_sparse, q, k, v, w, bias)
    assert out.dtype == dtype and _rel(out, ref) < tol


@pytest.mark.gpu
def test_mosaic_full_sla_matches_reference():
    q, k, v = _inputs(21, 1, 32760, 2, 128)
    w = (0.05 * jax.random.normal(jax.random.key(3), (128, 128))).astype(jnp.bfloat16)
    bias = jnp.full((128,), 0.01, jnp.bfloat16)
    out = sla.sla_attention(q, k, v, topk=0.1, proj_w=w, proj_b=bias, implementation="mosaic")
    ref = reference.sla_attention(q, k, v, topk=0.1, block_q=128, block_k=64, proj_w=w, proj_b=bias)
    assert _rel(out, ref) < 1e-2


def _races_found() -> bool:
    """The Mosaic GPU interpreter's race detector verdict for the last interpreted kernel (private API; jax is
    pinned to 0.11.2). Its wgmma is synchronous and untracked: races on wgmma operands are not seen."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

    return get_races().races_found


def _key_statistics(impl, k, v, chunk=256):
    """The key-statistics pass of `impl` with small chunks, so a (batch, head) takes several programs, the last one
    short (its rows end past the sequence): the Triton kernel, or the Mosaic one in the Mosaic GPU interpreter on
    the CPU (compiled on a GPU)."""
    if impl == "triton":
        return triton.key_statistics(k, v, rows=96, interpret=not ON_GPU)
    out = mosaic.key_statistics(k, v, chunk=chunk, interpret=not ON_GPU)
    if not ON_GPU:
        assert not _races_found(), "the Mosaic GPU interpreter found a data race"
    return out


@pytest.mark.parametrize("impl, dtype, tol, shape, chunk", [
    ("triton", jnp.float32, 1e-6, (2, 333, 3, 64), None),
    ("triton", jnp.bfloat16, 1e-2, (2, 333, 3, 64), None),
    ("mosaic", jnp.bfloat16, 1e-2, (2, 1000, 2, 128), 256),  # 4 chunks of 256 tokens, the last 232 (a ragged step)
    ("mosaic", jnp.float16, 1e-2, (1, 520, 3, 128), 256),
    ("mosaic", jnp.bfloat16, 1e-2, (1, 1000, 2, 128), 1024),  # one chunk of 8 steps: the three-slot ring refills
])
def test_key_statistics_match_reference(impl, dtype, tol, shape, chunk):
    """The one pass over k, v gives the linear branch's state and the block map's key mean: an fp32 sum of the
    rows in another order than XLA's, rounded to k's dtype: in bf16 equal to `reference.key_mean` up to one ulp
    where the two sums straddle a rounding boundary, in fp32 up to the summation order. The Mosaic pass sums by
    wgmma (k_sum and the key mean as products with an all-ones tile) and zeroes phi(k) past the sequence end."""
    _, k, v = _inputs(17, *shape, dtype)
    kv, k_sum, k_mean = _key_statistics(impl, k, v, chunk)
    ref_kv, ref_sum = reference.linear_state(k, v)
    assert kv.dtype == dtype and _rel(kv, ref_kv) < tol and _rel(k_sum, ref_sum) < tol
    want = np.asarray(reference.key_mean(k), np.float32)
    ulp = np.spacing(np.abs(want)) * 2.0 ** (23 - (7 if dtype == jnp.bfloat16 else 10))  # fp32's spacing, scaled
    tol = 1e-6 * np.abs(want) if dtype == jnp.float32 else ulp
    assert k_mean.dtype == dtype and (np.abs(np.asarray(k_mean, np.float32) - want) <= tol).all()
    if impl == "triton":
        np.testing.assert_array_equal(triton.linear_state(k, v, rows=96, interpret=not ON_GPU)[0], kv)


@pytest.mark.parametrize("slots", [1, 2])
def test_mosaic_key_statistics_ring_depth_changes_nothing(slots):
    """Shallower rings than the default's three slots refill every slot more often (phi written over each K tile
    before the slot is released and refilled): the same sums, bit for bit."""
    _, k, v = _inputs(5, 1, 1000, 2, 128, jnp.bfloat16)
    want = mosaic.key_statistics(k, v, chunk=1024, interpret=not ON_GPU)
    got = mosaic.key_statistics(k, v, chunk=1024, slots=slots, interpret=not ON_GPU)
    if not ON_GPU:
        assert not _races_found(), "the Mosaic GPU interpreter found a data race"
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_mosaic_key_statistics_refuses_other_shapes():
    k = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    k128 = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    assert not mosaic.state_shapes_supported(k) and mosaic.state_shapes_supported(k128)
    assert not mosaic.state_shapes_supported(k128.astype(jnp.float32))
    with pytest.raises(ValueError, match="head_dim 128"):
        mosaic.key_statistics(k, k, interpret=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        mosaic.key_statistics(k128, k128, chunk=200, interpret=True)
    with pytest.raises(ValueError, match="same shape and dtype"):
        mosaic.key_statistics(k128, k128.astype(jnp.float16), interpret=True)
    with pytest.raises(ValueError, match="slots must be 1 to 3"):
        mosaic.key_statistics(k128, k128, slots=4, interpret=True)


def test_mosaic_key_statistics_chunks_fill_the_sms():
    """12 heads at L=32,760 (the 1.3B model at 480p): 11 chunks of 3,072 tokens per head, 132 CTAs, one wave of an
    H100's 132 SMs; every chunk a whole number of 128-token steps, and at least 16 of them where L allows: many
    (batch, head) pairs do not buy wave balance with tiny chunks (their fp32 partial sums would cost traffic)."""
    assert mosaic.state_chunk(1, 32760, 12, 132) == 3072
    for b, l, h in [(1, 32760, 40), (1, 75600, 40), (2, 32760, 40), (1, 32760, 133), (2, 1000, 3)]:
        chunk = mosaic.state_chunk(b, l, h, 132)
        assert chunk % mosaic.STATE_STEP == 0
        assert chunk >= min(mosaic.MIN_STATE_STEPS * mosaic.STATE_STEP, -(-l // 128) * 128)


def test_mosaic_key_statistics_lowers_for_an_h100():
    """phi(k)^T v and the two column sums are wgmmas with a transposed shared-memory A (phi(k) and k stored token-
    major): m64n128 for kv, m64n64 against the all-ones tile."""
    spec = jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16)
    text = _abstract_h100_lowering(functools.partial(mosaic.key_statistics, chunk=256), spec, spec)
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in text
    assert "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16" in text


@pytest.mark.parametrize("l, bq, bk, rows", [(1000, 128, 64, 512), (4104, 64, 128, 512), (150, 16, 16, 64)])
def test_pooled_blocks_equal_the_reference(l, bq, bk, rows):
    """The block means of q and of the centred k: bit for bit the reference's, the ragged last blocks included
    (their means divide by the real row count), whether a program's rows end inside or past the sequence."""
    q, k, _ = _inputs(33, 2, l, 3, 64)
    k_mean = reference.key_mean(k)
    pq, pk = triton.pooled_blocks(q, k, k_mean, block_q=bq, block_k=bk, rows=rows, interpret=not ON_GPU)
    ref_q, ref_k = reference.pooled_blocks(q, k, k_mean, block_q=bq, block_k=bk)
    assert pq.shape == (2, 3, -(-l // bq), 64) and pk.shape == (2, 3, -(-l // bk), 64)
    np.testing.assert_array_equal(np.asarray(pq, np.float32), np.asarray(ref_q, np.float32))
    np.testing.assert_array_equal(np.asarray(pk, np.float32), np.asarray(ref_k, np.float32))


def test_block_map_kernels_take_the_callers_key_mean():
    """sla_attention hands the block map the key mean of its state pass: with the kernels (interpreted here) the
    map equals the reference's, and the mean is really used (a mean off by a lot changes the map)."""
    q, k, v = _inputs(35, 1, 1000, 2, 64)
    k_mean = triton.key_statistics(k, v, interpret=not ON_GPU)[2]
    kw = dict(topk=0.15, block_q=128, block_k=64, implementation="triton", interpret=not ON_GPU)
    np.testing.assert_array_equal(sla.block_map(q, k, k_mean=k_mean, **kw),
                                  reference.block_map(q, k, topk=0.15, block_q=128, block_k=64))
    assert (np.asarray(sla.block_map(q, k, k_mean=k_mean - 3.0, **kw)) != np.asarray(
        sla.block_map(q, k, k_mean=k_mean, **kw))).any()


def test_pooled_blocks_need_a_mean_to_centre_on():
    """The centring is the kernel's: pooling with a zero mean gives the uncentred means, which differ."""
    q, k, _ = _inputs(34, 1, 256, 2, 64)
    zero = jnp.zeros((1, 2, 64), k.dtype)
    _, pk = triton.pooled_blocks(q, k, reference.key_mean(k), block_q=128, block_k=64, interpret=not ON_GPU)
    _, raw = triton.pooled_blocks(q, k, zero, block_q=128, block_k=64, interpret=not ON_GPU)
    assert np.abs(np.asarray(pk, np.float32) - np.asarray(raw, np.float32)).max() > 1.0


def test_mosaic_kernel_with_the_linear_epilogue_lowers_for_an_h100():
    """The fused linear epilogue (phi(q) kv and proj_l by two more wgmmas per warpgroup, proj_l's weight transposed
    in shared memory, kv and the weight copied into a released ring slot) lowers to the kernel's PTX, which takes
    the four linear-branch arrays."""
    l, h, d, n_sel = 1000, 2, 128, 5
    spec = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    operands = (spec((1, l, h, d), bf16),) * 3 + (spec((1, h, -(-l // 128), n_sel), jnp.int32),
                                                  spec((1, h, d, d), bf16), spec((1, h, d), bf16), spec((d, d), bf16),
                                                  spec((d,), bf16))
    fn = lambda q, k, v, lut, kv, k_sum, w, b: mosaic.sparse_attention(q, k, v, lut, block_q=128, block_k=64,
                                                                       linear=(kv, k_sum, w, b))
    text = _abstract_h100_lowering(fn, *operands)
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in text
    call = next(line for line in text.splitlines() if "stablehlo.custom_call" in line)
    assert "tensor<1x2x128x128xbf16>, tensor<1x2x128xbf16>, tensor<128x128xbf16>, tensor<128xbf16>" in call


def test_mosaic_linear_epilogue_needs_slots_of_head_dim_rows():
    assert mosaic.fuses_linear(mosaic.MosaicConfig(), 64, 128)
    assert not mosaic.fuses_linear(mosaic.MosaicConfig(blocks_per_step=1), 64, 128)
    assert mosaic.fuses_linear(mosaic.MosaicConfig(blocks_per_step=1), 64, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("l, d, n_sel, with_bias", [(1000, 128, 1, True), (1000, 128, 4, False), (1000, 64, 9, True),
                                                    (4104, 128, 7, True)])
def test_mosaic_fused_linear_epilogue_matches_the_separate_one(l, d, n_sel, with_bias):
    """Fused into the Mosaic kernel, the linear branch's epilogue gives the Triton epilogue's output on the kernel's
    o_sparse: n_sel 1 puts kv and proj_l into the only step's slot, 4 and 7 into the second-to-last step's."""
    q, k, v = _inputs(n_sel + 7, 2, l, 2, d)
    lut = _lut_with_last_block(n_sel, 2, 2, -(-l // 128), -(-l // 64), n_sel)
    # proj_l large enough that the linear branch is as large as the sparse one: dropping or mangling it cannot pass.
    w = (0.5 * jax.random.normal(jax.random.key(3), (d, d))).astype(jnp.bfloat16)
    bias = jnp.linspace(-1.0, 1.0, d).astype(jnp.bfloat16) if with_bias else None
    kv, k_sum = triton.linear_state(k, v)
    fused = mosaic.sparse_attention(q, k, v, lut, block_q=128, block_k=64, linear=(kv, k_sum, w, bias))
    o_sparse = mosaic.sparse_attention(q, k, v, lut, block_q=128, block_k=64)
    separate = triton.linear_epilogue(q, o_sparse, kv, k_sum, w, bias)
    assert _rel(fused, separate) < 1e-2
    assert np.isfinite(np.asarray(fused, np.float32)).all()


def _check_top_k(scores, n_sel, rows_per_program=1):
    """The Triton top-k equals sort(lax.top_k) on scores [..., Nk] (widened to fp32) exactly: same indices, same tie
    winners."""
    out = topk.top_k_blocks(scores, n_sel, rows_per_program=rows_per_program, interpret=not ON_GPU)
    ref = reference.top_k_blocks(scores.astype(jnp.float32), n_sel)
    assert out.dtype == jnp.int32 and out.shape == ref.shape
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


@pytest.mark.parametrize("shape, n_sel, rows_per_program", [
    ((2, 3, 37), 3, 1),  # Nk not a power of two: 27 padded lanes
    ((1, 3, 512), 51, 4),  # 3 rows in a 4-row program: one masked row
    ((2, 1182), 118, 1),  # the 14B model's Nk
])
def test_top_k_blocks_matches_lax_top_k(shape, n_sel, rows_per_program):
    _check_top_k(jax.random.normal(jax.random.key(n_sel), shape), n_sel, rows_per_program)


@pytest.mark.parametrize("n_sel", [7, 40])
def test_top_k_blocks_breaks_ties_like_lax_top_k(n_sel):
    """lax.top_k keeps the lowest indices among equal scores. Rows of four distinct values make the threshold a big
    tie group; bf16-rounded normal scores (as the block map makes them) have ties all over."""
    keys = jax.random.split(jax.random.key(n_sel))
    few = jax.random.choice(keys[0], jnp.array([-1.0, 0.0, 0.5, 2.0]), (2, 200))
    rounded = jax.random.normal(keys[1], (2, 200)).astype(jnp.bfloat16).astype(jnp.float32)
    _check_top_k(jnp.concatenate([few, rounded]), n_sel, rows_per_program=2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_top_k_blocks_reads_half_precision_scores(dtype):
    """The block map hands the kernel its scores in q's dtype (no fp32 copy of bf16 scores; fp16 ones are widened by
    XLA): the kernel selects what lax.top_k selects from the same values in fp32, ties (frequent at 8 or 11
    mantissa bits) included. Other dtypes are refused rather than rounded to fp32."""
    scores = jax.random.normal(jax.random.key(2), (3, 2, 512)).astype(dtype)
    out = topk.top_k_blocks(scores, 51, interpret=not ON_GPU)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(reference.top_k_blocks(scores.astype(jnp.float32), 51)))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        topk.top_k_blocks(scores.astype(jnp.int32), 51, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_top_k_blocks_orders_signed_zeros_infinities_and_nans_like_lax_top_k(dtype):
    """lax.top_k's order is total: -nan < -inf < negatives < -0.0 < 0.0 < positives < inf < nan, so 0.0 beats an
    earlier -0.0. Rows permute the same specials; n_sel 1, 6 and 11 cut between nan and inf, 0.0 and -0.0, -inf
    and -nan; 7 cuts through the tied -0.0s. In bf16 the kernel decides only the 16 bits above the zeros that
    widening leaves (the keys of negative scores keep those zeros); fp16's tiny values are subnormals."""
    tiny = 1e-6 if dtype == jnp.float16 else 1e-30
    specials = jnp.array([-jnp.nan, -jnp.inf, -3.0, -tiny, -0.0, 0.0, tiny, 3.0, jnp.inf, jnp.nan, 0.0, -0.0], dtype)
    rows = jnp.stack([jax.random.permutation(jax.random.key(i), specials) for i in range(4)] + [specials])
    assert jnp.signbit(rows[-1, 0]) and not jnp.signbit(rows[-1, 9])
    for n_sel in (1, 6, 7, 11):
        _check_top_k(rows, n_sel, rows_per_program=4)


@pytest.mark.parametrize("n_sel", [1, 37])
def test_top_k_blocks_keeps_one_or_all(n_sel):
    """n_sel = 1 (the top score, the lowest index of a tied maximum) and n_sel = Nk (every index)."""
    scores = jnp.round(jax.random.normal(jax.random.key(5), (3, 37)))  # integers: the maximum is often tied
    _check_top_k(scores, n_sel)
    with pytest.raises(ValueError, match="n_sel"):
        topk.top_k_blocks(scores, 38, interpret=True)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
def test_top_k_blocks_lowers_for_an_h100():
    """Pallas -> Triton IR for the 14B model's block map ([1, 40, 591, 1182] scores, 118 selected): the scan, the
    scatter store and the 32-step loop all have Triton lowerings. Compiling the IR to PTX needs the GPU."""
    text = _abstract_h100_lowering(functools.partial(topk.top_k_blocks, n_sel=118),
                                   jax.ShapeDtypeStruct((1, 40, 591, 1182), jnp.float32))
    call = next(line for line in text.splitlines() if "stablehlo.custom_call" in line)
    assert "xla.gpu.triton" in call and "sla_top_k_blocks" in call and "grid_x = 23640" in call


@pytest.mark.parametrize("l, bk, top", [(1000, 64, 0.15), (4104, 128, 0.2)])
def test_block_map_with_the_top_k_kernel_equals_the_reference(l, bk, top):
    """The dispatcher's block map with the Triton top-k (compiled on a GPU, interpreted here) selects exactly the
    reference's blocks; the default implementation on a GPU is the kernel."""
    q, k, _ = _inputs(31, 2, l, 3, 64)
    kernel = sla.block_map(q, k, topk=top, block_q=128, block_k=bk, implementation="triton", interpret=not ON_GPU)
    np.testing.assert_array_equal(kernel, reference.block_map(q, k, topk=top, block_q=128, block_k=bk))
    with pytest.raises(ValueError, match="block-map implementation"):
        sla.block_map(q, k, topk=top, block_q=128, block_k=bk, implementation="mosaic")


def test_mosaic_key_statistics_default_chunks_match_reference():
    """The default chunking (`state_chunk` for this device's SM count): at L=1,000 one chunk of 8 steps."""
    _, k, v = _inputs(41, 1, 1000, 2, 128)
    kv, k_sum, k_mean = mosaic.key_statistics(k, v, interpret=not ON_GPU)
    ref_kv, ref_sum = reference.linear_state(k, v)
    assert _rel(kv, ref_kv) < 1e-2 and _rel(k_sum, ref_sum) < 1e-2 and _rel(k_mean, reference.key_mean(k)) < 1e-2


def test_headline_benchmark_runs_on_cpu_at_tiny_size(monkeypatch):
    """`bench --headline`'s rows at one tiny shape: cuDNN (XLA's attention on a CPU), then SLA and SageSLA with each
    dispatcher's default (the references here), their ratios and SageSLA's cos-sim to SLA."""
    from pallas_kernels.sla import bench

    dense = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, implementation=None, **kw: dense(*a, **kw))
    monkeypatch.setattr(bench, "SHAPES", [(2, 256)])
    monkeypatch.setattr(bench, "TOPKS", [0.5])
    rows = bench.headline(1, 128, 64)
    assert [r["path"] for r in rows] == ["cuDNN dense", "SLA, reference sparse kernel (128,64)",
                                         "SageSLA, reference sparse kernel (128,64)"]
    assert rows[1]["vs_cudnn"] == pytest.approx(rows[0]["ms"] / rows[1]["ms"])
    assert rows[2]["vs_sla"] == pytest.approx(rows[1]["ms"] / rows[2]["ms"]) and rows[2]["cos_vs_sla"] > 0.99
