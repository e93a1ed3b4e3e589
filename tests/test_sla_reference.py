"""The pure-jnp SLA reference against a direct NumPy transcription of acceleration.md 3 (fp32, so no bf16 ties)."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sla
from turbojax.models.attention import dense_xla


def _qkv(rng, b=2, l=100, h=3, d=16):
    q, k, v = (rng.normal(size=(b, l, h, d)).astype(np.float32) for _ in range(3))
    k += 2.0 * rng.normal(size=(1, 1, h, d)).astype(np.float32)  # a large shared key mean, as in real models
    return q, k, v


def np_block_scores(q, k, bq, bk):
    """[B, H, Nq, Nk] pooled scores of the spec: mean-pooled q vs mean-pooled mean-centred k."""
    qh, kh = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
    kc = kh - kh.mean(axis=2, keepdims=True)
    l = q.shape[1]
    pq = np.stack([qh[:, :, i:i + bq].mean(axis=2) for i in range(0, l, bq)], axis=2)
    pk = np.stack([kc[:, :, j:j + bk].mean(axis=2) for j in range(0, l, bk)], axis=2)
    return pq @ pk.transpose(0, 1, 3, 2)


def np_sparse(q, k, v, lut, bq, bk):
    b, l, h, d = q.shape
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(lut.shape[2]):
                rows = slice(i * bq, min(l, (i + 1) * bq))
                cols = np.concatenate([np.arange(j * bk, min(l, (j + 1) * bk)) for j in lut[bi, hi, i]])
                s = q[bi, rows, hi] @ k[bi, cols, hi].T / np.sqrt(d)
                p = np.exp(s - s.max(-1, keepdims=True))
                out[bi, rows, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, cols, hi]
    return out


def np_linear(q, k, v):
    def phi(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    pq, pk = phi(q), phi(k)
    kv = np.einsum("blhd,blhe->bhde", pk, v)
    ksum = pk.sum(axis=1)
    return np.einsum("blhd,bhde->blhe", pq, kv) / (1e-5 + np.einsum("blhd,bhd->blh", pq, ksum)[..., None])


@pytest.mark.parametrize("bq, bk", [(16, 8), (8, 16)])
@pytest.mark.parametrize("topk", [0.1, 0.2, 0.5])
def test_block_map_selects_the_top_scored_blocks(bq, bk, topk):
    q, k, _ = _qkv(np.random.default_rng(0))
    lut = np.asarray(sla.block_map(jnp.asarray(q), jnp.asarray(k), topk=topk, block_q=bq, block_k=bk))
    nk = -(-100 // bk)
    n_sel = max(1, int(topk * nk))
    assert lut.shape == (2, 3, -(-100 // bq), n_sel) and lut.dtype == np.int32
    scores = np_block_scores(q, k, bq, bk)
    want = np.sort(np.argsort(-scores, axis=-1)[..., :n_sel], axis=-1)
    np.testing.assert_array_equal(np.sort(lut, axis=-1), want)


def test_selected_block_count_truncates_like_python_int():
    assert sla.num_selected_blocks(0.1, 512) == 51
    assert sla.num_selected_blocks(0.15, 512) == 76
    assert sla.num_selected_blocks(0.1, 1182) == 118
    assert sla.num_selected_blocks(0.1, 5) == 1  # int(0.5) = 0 would select nothing


def test_sparse_branch_with_ragged_blocks():
    q, k, v = _qkv(np.random.default_rng(1))
    rng = np.random.default_rng(2)
    lut = np.stack([rng.permutation(13)[:4] for _ in range(2 * 3 * 7)]).reshape(2, 3, 7, 4).astype(np.int32)
    out = sla.sparse_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lut), block_q=16,
                               block_k=8)
    np.testing.assert_allclose(np.asarray(out), np_sparse(q, k, v, lut, 16, 8), rtol=1e-5, atol=1e-5)


def test_linear_branch():
    q, k, v = _qkv(np.random.default_rng(3))
    out = sla.linear_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(out), np_linear(q, k, v), rtol=1e-5, atol=1e-6)


def test_sla_adds_projected_linear_branch():
    q, k, v = _qkv(np.random.default_rng(4))
    rng = np.random.default_rng(5)
    w, b = rng.normal(size=(16, 16)).astype(np.float32) * 0.3, rng.normal(size=16).astype(np.float32)
    out = sla.sla_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), topk=0.3, block_q=16, block_k=8,
                            proj_w=jnp.asarray(w), proj_b=jnp.asarray(b))
    lut = np.asarray(sla.block_map(jnp.asarray(q), jnp.asarray(k), topk=0.3, block_q=16, block_k=8))
    ref = np_sparse(q, k, v, lut, 16, 8) + np_linear(q, k, v) @ w.T + b
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_all_blocks_without_proj_is_dense_attention():
    q, k, v = _qkv(np.random.default_rng(6))
    out = sla.sla_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), topk=1.0, block_q=16, block_k=8)
    np.testing.assert_allclose(np.asarray(out), np.asarray(dense_xla(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))),
                               rtol=1e-5, atol=1e-5)


def test_bf16_inputs_stay_bf16():
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(np.random.default_rng(7)))
    out = sla.sla_attention(q, k, v, topk=0.2, block_q=16, block_k=8, proj_w=jnp.eye(16, dtype=jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape


def test_unknown_implementation():
    q = jnp.zeros((1, 8, 1, 4))
    with pytest.raises(ValueError, match="implementation"):
        sla.sla_attention(q, q, q, topk=0.5, block_q=4, block_k=4, implementation="cuda")
