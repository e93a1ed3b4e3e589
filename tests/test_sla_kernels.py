"""One test suite for every SLA implementation: each must equal the pure-jnp reference.

On CPU the Pallas-Triton kernel runs in interpret mode; on a GPU (`pytest -m gpu`) the same cases run compiled.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sla
from pallas_kernels.sla import mosaic, reference, triton

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


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_full_sla_dispatch(impl):
    q, k, v = _inputs(11, 1, 300, 2, 64)
    w = (0.1 * jax.random.normal(jax.random.key(0), (64, 64))).astype(jnp.bfloat16)
    bias = jnp.full((64,), 0.05, jnp.bfloat16)
    out = sla.sla_attention(q, k, v, topk=0.2, block_q=32, block_k=16, proj_w=w, proj_b=bias, implementation=impl,
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


@pytest.mark.gpu
@pytest.mark.parametrize("l, h, bk, topk", [(1000, 2, 64, 0.15), (32760, 2, 64, 0.1), (4104, 3, 128, 0.2)])
def test_mosaic_sparse_branch_matches_reference(l, h, bk, topk):
    """The Hopper kernel cannot run in the CPU interpreter (8/16-bit transposed smem operands), so it is checked
    here, on the device, against the same reference."""
    q, k, v = _inputs(l, 2, l, h, 128)
    assert mosaic.supports(q, 128, bk), "needs an sm90 GPU"
    lut = sla.block_map(q, k, topk=topk, block_q=128, block_k=bk)
    out = mosaic.sparse_attention(q, k, v, lut, block_q=128, block_k=bk)
    ref = reference.sparse_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), lut,
                                     block_q=128, block_k=bk)
    assert _rel(out, ref) < 1e-2
    assert np.isfinite(np.asarray(out, np.float32)).all()


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


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_linear_state_matches_reference(dtype, tol):
    _, k, v = _inputs(17, 2, 333, 3, 64, dtype)
    kv, k_sum = triton.linear_state(k, v, splits=4, interpret=not ON_GPU)
    ref_kv, ref_sum = reference.linear_state(k, v)
    assert kv.dtype == dtype and _rel(kv, ref_kv) < tol and _rel(k_sum, ref_sum) < tol
