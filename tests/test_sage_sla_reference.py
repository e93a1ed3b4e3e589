"""The pure-jnp SageSLA reference against NumPy transcriptions of upstream's quantisers and sm90 kernel loop
(sage_reference's docstring). Its quality against bf16 SLA is checked with the kernels, in test_sage_sla_kernels.py."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.sla import reference, sage_reference

E4M3 = ml_dtypes.float8_e4m3fn


@pytest.fixture(autouse=True)
def on_cpu():
    """Rounding-for-rounding checks run on XLA:CPU whatever the default backend (as tests/test_sla_reference.py)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def np_quantize_blocks(x, block):
    """upstream qk_quantize per (batch, head, block): scale = max|x|/127 + 1e-7, x/scale + 0.5 sign, truncated."""
    b, l, h, d = x.shape
    n = -(-l // block)
    x8, scales = np.zeros(x.shape, np.int8), np.zeros((b, h, n), np.float32)
    for bi in range(b):
        for hi in range(h):
            for j in range(n):
                blk = x[bi, j * block:(j + 1) * block, hi].astype(np.float32)
                scale = np.float32(np.abs(blk).max() / np.float32(127.0)) + np.float32(1e-7)
                y = blk / scale
                x8[bi, j * block:(j + 1) * block, hi] = np.trunc(y + np.where(y >= 0, 0.5, -0.5)).astype(np.int8)
                scales[bi, hi, j] = scale
    return x8, scales


def np_sparse(q8, qs, k8, ks, v8, vs, lut, bq, bk, blocks_per_step=None):
    """upstream's sm90 loop for each (batch, head, query block), which steps over 128-key blocks: here
    `blocks_per_step` LUT blocks a step (128 // bk, at least 1, unless given), the last step what remains: int32
    logits, online base-2 softmax with the log2(448) offset (P~ against the running max after the step), e4m3 P~
    times e4m3 V into a fresh step product, denominator from fp32 P~."""
    b, l, h, d = q8.shape
    c = np.float32(np.float32(1 / math.sqrt(d)) * np.float32(math.log2(math.e)))
    per_step = blocks_per_step or max(1, 128 // bk)
    out = np.zeros((b, l, h, d), np.float32)
    v8 = v8.astype(np.float32)
    for bi, hi, i in np.ndindex(b, h, lut.shape[2]):
        rows = slice(i * bq, min(l, (i + 1) * bq))
        qi = q8[bi, rows, hi].astype(np.int64)
        acc = np.zeros((qi.shape[0], d), np.float32)
        m = np.full((qi.shape[0], 1), -np.inf, np.float32)
        den = np.zeros((qi.shape[0], 1), np.float32)
        for t in range(0, lut.shape[3], per_step):
            logits, values = [], []
            for j in lut[bi, hi, i, t:t + per_step]:
                cols = slice(j * bk, min(l, (j + 1) * bk))
                s = (qi @ k8[bi, cols, hi].astype(np.int64).T).astype(np.float32)
                logits.append(s * (c * (qs[bi, hi, i] * ks[bi, hi, j])))
                values.append(v8[bi, cols, hi])
            s = np.concatenate(logits, axis=-1)
            m_new = np.maximum(m, s.max(-1, keepdims=True))
            alpha = np.exp2(m - m_new)
            p = np.exp2(s - m_new + np.float32(8.807))
            acc = acc * alpha + p.astype(E4M3).astype(np.float32) @ np.concatenate(values)
            den = den * alpha + p.sum(-1, keepdims=True)
            m = m_new
        out[bi, rows, hi] = acc * (1 / den) * vs[bi, hi]
    return out


def _bf16(rng, *shape, scale=1.0):
    return jnp.asarray((scale * rng.normal(size=shape)).astype(np.float32)).astype(jnp.bfloat16)


@pytest.mark.parametrize("l, block", [(100, 32), (64, 16), (5, 8)])
def test_qk_quantizer_matches_upstream_rounding(l, block):
    rng = np.random.default_rng(l)
    x = _bf16(rng, 2, l, 3, 16, scale=3.0)
    x8, scale = sage_reference.quantize_blocks(x, block)
    ref8, ref_scale = np_quantize_blocks(np.asarray(x, np.float32), block)
    assert x8.dtype == jnp.int8 and scale.shape == (2, 3, -(-l // block))
    np.testing.assert_array_equal(np.asarray(x8), ref8)
    np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1.2e-7, atol=0)  # 1/127 as a product: an ulp
    assert np.abs(np.asarray(x8)).max() == 127  # the block maximum maps to +-127: the full int8 range is used


def test_qk_rounds_half_away_from_zero():
    """Block max 127 gives scale f32(1 + 1e-7) = 1 + 2^-23, and t = 0.5 + 2^-24 = 0.5 scale exactly: +-t are exact
    ties and go to +-1 (half to even would give 0, floor(y + 0.5) would give -t -> 0). The zero padding of the
    partial block does not enter the maximum."""
    t = 0.5 + 2.0**-24
    x = jnp.asarray([127.0, t, -t, 0.4, -126.4], jnp.float32).reshape(1, 5, 1, 1)
    x8, scale = sage_reference.quantize_blocks(x, 8)
    assert np.asarray(scale).item() == 1 + 2.0**-23
    assert np.asarray(x8).ravel().tolist() == [127, 1, -1, 0, -126]


def test_keys_are_smoothed_with_their_bf16_mean():
    rng = np.random.default_rng(1)
    k = _bf16(rng, 1, 40, 2, 16) + _bf16(rng, 1, 1, 2, 16, scale=8.0)
    km = np.asarray(jnp.mean(k.astype(jnp.float32), axis=1, keepdims=True).astype(jnp.bfloat16), np.float32)
    expected = np.asarray(jnp.asarray(np.asarray(k, np.float32) - km).astype(jnp.bfloat16), np.float32)
    ref8, ref_scale = np_quantize_blocks(expected, 16)
    # Eagerly and under jit, where XLA may keep k - km in fp32 for the quantiser that reads it unless it is pinned.
    for smooth, quantize_qk in ((sage_reference.smooth_keys, sage_reference.quantize_qk),
                                (jax.jit(sage_reference.smooth_keys),
                                 jax.jit(sage_reference.quantize_qk, static_argnames=("block_q", "block_k")))):
        smoothed = smooth(k)
        assert smoothed.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(smoothed, np.float32), expected)
        _, _, k8, k_scale = quantize_qk(k, k, block_q=16, block_k=16)
        np.testing.assert_array_equal(np.asarray(k8), ref8)
        np.testing.assert_allclose(np.asarray(k_scale), ref_scale, rtol=1.2e-7, atol=0)


def test_v_quantizer_per_channel_e4m3():
    rng = np.random.default_rng(2)
    v = np.asarray(_bf16(rng, 2, 50, 3, 16, scale=2.0), np.float32)
    v[:, :, 1, 5] = 0.0  # an all-zero channel: scale 0 and zeros, not NaN
    v8, v_scale = sage_reference.quantize_v(jnp.asarray(v).astype(jnp.bfloat16))
    amax = np.abs(v).max(axis=1)
    recip = np.where(amax > 0, np.float32(2.25) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    assert v8.dtype == jnp.float8_e4m3fn and v_scale.shape == (2, 3, 16)
    np.testing.assert_array_equal(np.asarray(v8).astype(np.float32),
                                  (v * recip[:, None]).astype(E4M3).astype(np.float32))
    np.testing.assert_allclose(np.asarray(v_scale), amax / np.float32(2.25), rtol=1.2e-7, atol=0)
    assert np.abs(np.asarray(v8, np.float32)).max(axis=1)[amax > 0].min() == 2.25  # each channel spans +-2.25
    assert np.all(np.asarray(v8, np.float32)[:, :, 1, 5] == 0) and np.asarray(v_scale)[:, 1, 5].tolist() == [0, 0]


@pytest.mark.parametrize("l, bq, bk, topk", [(100, 16, 32, 0.5), (77, 32, 16, 0.3), (456, 128, 64, 0.4),
                                            (456, 64, 128, 0.5), (456, 64, 32, 0.5), (600, 64, 256, 0.7)])
def test_sparse_branch_matches_upstream_loop(l, bq, bk, topk):
    """Softmax steps of 128 keys: one step (the remainder only) at 100 and 77 tokens; a two-block step and a
    one-block remainder at (128, 64) (3 of 8 blocks); one block a step at (64, 128) and (64, 256); four-block
    steps and a three-block remainder at (64, 32) (7 of 15 blocks)."""
    rng = np.random.default_rng(3)
    q, k, v = _bf16(rng, 2, l, 2, 32), _bf16(rng, 2, l, 2, 32) + 2.0, _bf16(rng, 2, l, 2, 32)
    lut = reference.block_map(q, k, topk=topk, block_q=bq, block_k=bk)
    assert lut.shape[-1] == {(128, 64): 3, (64, 32): 7}.get((bq, bk), lut.shape[-1])
    ops = sage_reference.quantize(q, k, v, block_q=bq, block_k=bk)
    out = sage_reference.sparse_attention(*ops, lut, block_q=bq, block_k=bk, out_dtype=jnp.float32)
    ref = np_sparse(*(np.asarray(x) for x in ops), np.asarray(lut), bq, bk)
    # A P~ within an ulp of an e4m3 rounding boundary may round the other way under a different exp2: one P
    # element moves by 1/16, far below what a wrong block, scale or offset would do.
    assert np.abs(np.asarray(out) - ref).max() < 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("bq, bk", [(128, 64), (64, 32)])
def test_p_is_rounded_per_128_key_step_not_per_block(bq, bk):
    """With key blocks under 128 tokens the blocks of a step share one max for P~'s e4m3 rounding: the reference
    equals the step-wise loop to fp32 rounding and differs from a block-wise one by e4m3 roundings (measured
    1.4-1.7e-2 of the largest output on these inputs)."""
    rng = np.random.default_rng(5)
    q, k, v = _bf16(rng, 1, 456, 2, 64), _bf16(rng, 1, 456, 2, 64) + 2.0, _bf16(rng, 1, 456, 2, 64)
    lut = reference.block_map(q, k, topk=0.5, block_q=bq, block_k=bk)
    ops = sage_reference.quantize(q, k, v, block_q=bq, block_k=bk)
    out = np.asarray(sage_reference.sparse_attention(*ops, lut, block_q=bq, block_k=bk, out_dtype=jnp.float32))
    args = (*(np.asarray(x) for x in ops), np.asarray(lut), bq, bk)
    stepwise, blockwise = np_sparse(*args), np_sparse(*args, blocks_per_step=1)
    scale = np.abs(stepwise).max()
    assert np.abs(out - stepwise).max() < 1e-5 * scale
    assert np.abs(out - blockwise).max() > 1e-3 * scale


def test_sage_sla_is_slas_block_map_plus_linear_branch():
    """Same block map as SLA (the LUT is computed from the unquantised q, k), then the quantised sparse branch, then
    SLA's projected linear branch; another LUT gives another result (the LUT is really used)."""
    rng = np.random.default_rng(4)
    q, k, v = _bf16(rng, 1, 96, 2, 32), _bf16(rng, 1, 96, 2, 32), _bf16(rng, 1, 96, 2, 32)
    w, bias = _bf16(rng, 32, 32, scale=0.1), _bf16(rng, 32, scale=0.1)
    out = sage_reference.sage_sla_attention(q, k, v, topk=0.25, block_q=16, block_k=16, proj_w=w, proj_b=bias)

    @jax.jit
    def composed(lut):
        ops = sage_reference.quantize(q, k, v, block_q=16, block_k=16)
        sparse = sage_reference.sparse_attention(*ops, lut, block_q=16, block_k=16)
        return reference.add_linear_branch(sparse, q, k, v, w, bias)

    lut = reference.block_map(q, k, topk=0.25, block_q=16, block_k=16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(composed(lut), np.float32))
    assert not np.array_equal(np.asarray(out, np.float32), np.asarray(composed(jnp.roll(lut, 1, axis=2)), np.float32))
