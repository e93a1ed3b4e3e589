"""The pure-jnp SLA reference against direct NumPy transcriptions of acceleration.md 3: in fp32 (no bf16 ties), and
in bf16 with every rounding the torch module makes (second half of this file)."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import sla
from turbojax.models.attention import dense_xla


@pytest.fixture(autouse=True)
def on_cpu():
    """The reference is the semantics, checked here rounding for rounding on XLA:CPU whatever the default backend:
    under jit XLA:GPU fuses differently and can move a bf16 rounding by one ulp (the kernels are compared with this
    reference at bf16 tolerance, in tests/test_sla_kernels.py, on the GPU too)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


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


_Q = jnp.zeros((1, 32, 2, 16), jnp.bfloat16)


@pytest.mark.parametrize("call, match", [
    (lambda f: f(_Q[0], _Q[0], _Q[0], topk=0.5), r"as \[B, L, H, D\] arrays .* got q \(32, 2, 16\)"),
    (lambda f: f(_Q, _Q[:, :16], _Q, topk=0.5), r"self-attention: q, k, v must have one shape .* k \(1, 16, 2, 16\)"),
    (lambda f: f(_Q, _Q, _Q[..., :8], topk=0.5), "must have one shape"),
    (lambda f: f(_Q.astype(jnp.int8), _Q, _Q, topk=0.5), "floating-point q, k, v .* q int8"),
    (lambda f: f(_Q, _Q, _Q, topk=0.0), r"topk .* in \(0, 1\]; got 0.0"),
    (lambda f: f(_Q, _Q, _Q, topk=1.5), r"in \(0, 1\]; got 1.5"),
    (lambda f: f(_Q, _Q, _Q, topk=float("nan")), r"in \(0, 1\]; got nan"),
    (lambda f: f(_Q, _Q, _Q, topk=0.5, block_q=0), "block_q and block_k must be positive integers; got 0, 8"),
    (lambda f: f(_Q, _Q, _Q, topk=0.5, block_k=8.0), "positive integers; got 16, 8.0"),
    (lambda f: f(_Q, _Q, _Q, topk=0.5, proj_w=jnp.zeros((8, 8))),
     r"proj_w is proj_l's weight \[D, D\] = \(16, 16\); got \(8, 8\)"),
    (lambda f: f(_Q, _Q, _Q, topk=0.5, proj_w=jnp.zeros((16, 16)), proj_b=jnp.zeros(8)), r"proj_b .* got \(8,\)"),
    (lambda f: f(_Q, _Q, _Q, topk=0.5, proj_b=jnp.zeros(16)), "proj_b without proj_w"),
])
@pytest.mark.parametrize("name", ["sla_attention", "sage_sla_attention"])
def test_bad_inputs_get_one_clear_error(name, call, match):
    """The public SLA and SageSLA functions refuse what no path can take, naming the function, before any work
    (a wrong k length used to run, and a wrong proj_l failed inside XLA's dot)."""
    f = lambda *a, **kw: getattr(sla, name)(*a, **{"block_q": 16, "block_k": 8, **kw})
    with pytest.raises(ValueError, match=f"{name}.*{match}"):
        call(f)


def test_block_map_refuses_bad_inputs():
    with pytest.raises(ValueError, match="block_map is self-attention: q, k must have one shape"):
        sla.block_map(_Q, _Q[:, :16], topk=0.5, block_q=16, block_k=8)
    with pytest.raises(ValueError, match=r"block_map: topk .* got -0.1"):
        sla.block_map(_Q, _Q, topk=-0.1, block_q=16, block_k=8)
    lut = sla.block_map(_Q, _Q, topk=0.5, block_q=16, block_k=np.int64(8))  # NumPy integers are integers
    assert lut.shape == (1, 2, 2, 2)


# ---- bf16 -----------------------------------------------------------------------------------------------------
# acceleration.md 3 with the rounding points of the torch module TurboDiffusion runs (turbodiffusion/SLA/core.py,
# utils.get_block_map, the Triton sparse kernel) on bf16 q, k, v. Each torch op on bf16 tensors computes in fp32 and
# rounds its result once to bf16; matmuls and sums accumulate in fp32. `_bf` is that rounding (ml_dtypes, RNE).
#
# Tolerance: the reference reproduces every bf16 value of the transcription exactly, run op by op. The assertion
# allows 1 ulp on 0.1% of the elements (`assert_bf16_match`), room for fp32 summation-order ties between NumPy's
# BLAS and XLA. Each wrong rounding tried below moves 13-84% of the elements, 130x and more over that allowance.

BF16 = ml_dtypes.bfloat16
F32 = np.float32


def _bf(x) -> np.ndarray:
    """Round to bf16 (round to nearest even), kept as fp32."""
    return np.asarray(x, F32).astype(BF16).astype(F32)


def _ulps(a, b) -> np.ndarray:
    """Distance in bf16 ulps (both rounded to bf16 first)."""
    def ordered(x):
        i = np.asarray(x, F32).astype(BF16).view(np.int16).astype(np.int32)
        return np.where(i < 0, -32768 - i, i)  # sign-magnitude -> monotone integers (+0 and -0 both 0)
    return np.abs(ordered(a) - ordered(b))


def assert_bf16_match(got, want, what=""):
    u = _ulps(got, want)
    frac = float((u > 0).mean())
    assert u.max() <= 1 and frac <= 1e-3, f"{what}: {frac:.2%} of elements differ, by up to {u.max()} bf16 ulp"


def _mm(a, b) -> np.ndarray:
    """fp32 matmul (products of bf16 values are exact in fp32; fp32 accumulation)."""
    return np.matmul(np.asarray(a, F32), np.asarray(b, F32))


def _softmax(x) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True, dtype=F32)


def _bf16_qkv(seed, **kw):
    """bf16-valued q, k, v (as fp32 arrays), L = 100 so both block sizes leave a partial last block."""
    return tuple(_bf(x) for x in _qkv(np.random.default_rng(seed), **kw))


def np_bf16_block_scores(q, k, bq, bk, rounded=True):
    """get_block_map's pooled scores [B, H, Nq, Nk] on bf16 q, k [B, L, H, D] (3.1):
    k_mean = bf16(fp32 sum / L); kc = bf16(k - k_mean); pooled = bf16(fp32 block sum / real row count);
    scores = bf16(pooled_q pooled_k^T), fp32 accumulation. rounded=False keeps every intermediate in fp32 (a wrong
    reading, used to show the test can tell)."""
    rnd = _bf if rounded else (lambda x: np.asarray(x, F32))
    qh, kh = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
    l = q.shape[1]
    kc = rnd(kh - rnd(kh.sum(axis=2, keepdims=True, dtype=F32) / F32(l)))

    def pool(x, blk):
        return np.stack([rnd(x[:, :, i:i + blk].sum(axis=2, dtype=F32) / F32(min(blk, l - i)))
                         for i in range(0, l, blk)], axis=2)

    return _bf(_mm(pool(qh, bq), pool(kc, bk).transpose(0, 1, 3, 2)))


def np_bf16_sparse(q, k, v, lut, bq, bk, p_rounding="unnormalised"):
    """The sparse branch as the Triton kernel computes it (3.2): fp32 logits q k^T / sqrt(d) over the LUT's key blocks
    (partial last block masked), p = exp(s - max) in fp32, P V with P rounded to bf16 (p.to(v.dtype)) and fp32
    accumulation, divided by the fp32 sum of p, output rounded to bf16. p_rounding: "unnormalised" (the kernel),
    "none" or "normalised" (wrong readings)."""
    b, l, h, d = q.shape
    out = np.zeros_like(q)
    scale = F32(1.0 / math.sqrt(d))
    for bi in range(b):
        for hi in range(h):
            for i in range(lut.shape[2]):
                rows = slice(i * bq, min(l, (i + 1) * bq))
                cols = np.concatenate([np.arange(j * bk, min(l, (j + 1) * bk)) for j in lut[bi, hi, i]])
                s = _mm(q[bi, rows, hi], k[bi, cols, hi].T) * scale
                p = np.exp(s - s.max(-1, keepdims=True))
                total = p.sum(-1, keepdims=True, dtype=F32)
                if p_rounding == "normalised":
                    o = _mm(_bf(p / total), v[bi, cols, hi])
                else:
                    o = _mm(_bf(p) if p_rounding == "unnormalised" else p, v[bi, cols, hi]) / total
                out[bi, rows, hi] = _bf(o)
    return out


def np_bf16_linear(q, k, v, round_den_product=True):
    """calc_linear of the torch module on bf16 tensors (3.3), q, k, v [B, L, H, D]:
    phi = bf16(softmax_fp32 over d); kv = bf16(phi_k^T v); k_sum = bf16(sum_L phi_k); num = bf16(phi_q kv);
    den = bf16(sum_d bf16(phi_q * k_sum)) (the elementwise product is a bf16 op, so it rounds); den_eps =
    bf16(den + 1e-5) (the Python scalar stays fp32); o_l = bf16(num / den_eps)."""
    pq, pk = _bf(_softmax(q)), _bf(_softmax(k))
    kv = _bf(np.einsum("blhd,blhe->bhde", pk, v, dtype=F32))
    k_sum = _bf(pk.sum(axis=1, dtype=F32))  # [B, H, D]
    num = _bf(np.einsum("blhd,bhde->blhe", pq, kv, dtype=F32))
    prod = pq * k_sum[:, None]
    den = _bf((_bf(prod) if round_den_product else prod).sum(axis=-1, keepdims=True, dtype=F32))
    return _bf(num / _bf(den + F32(1e-5)))


def np_bf16_output(o_s, o_l, w, b, round_proj=True):
    """proj_l under bf16 autocast (bf16 operands and bias, fp32 accumulation, one rounding), then the bf16 sum (3.4)."""
    proj = _mm(o_l, w.T) + b
    return _bf(o_s + (_bf(proj) if round_proj else proj))


def _maybe_jit(fn, mode):
    return jax.jit(fn) if mode == "jit" else fn


def _j(x):
    return jnp.asarray(x, jnp.bfloat16)


def _f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


def _fixed_lut(seed, b, h, nq, nk, n_sel):
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.permutation(nk)[:n_sel]) for _ in range(b * h * nq)]).reshape(b, h, nq, n_sel)




@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("bq, bk, topk", [(16, 8, 0.3), (8, 16, 0.2)])
def test_bf16_block_scores_and_map(monkeypatch, mode, bq, bk, topk):
    """The pooled scores (captured where block_map hands them to top_k) equal the bf16 transcription; the selected
    blocks then agree wherever the k-th and (k+1)-th scores of a row differ (elsewhere the choice is unspecified)."""
    q, k, _ = _bf16_qkv(10)
    orig_top_k = jax.lax.top_k

    def run(q, k):
        seen = []
        monkeypatch.setattr(jax.lax, "top_k", lambda x, n: (seen.append(x), orig_top_k(x, n))[1])
        lut = sla.block_map(q, k, topk=topk, block_q=bq, block_k=bk)
        monkeypatch.setattr(jax.lax, "top_k", orig_top_k)
        return lut, seen[0]

    lut, scores = _maybe_jit(run, mode)(_j(q), _j(k))
    want = np_bf16_block_scores(q, k, bq, bk)
    assert_bf16_match(_f32(scores), want, "pooled scores")
    # the rounding points matter: with fp32 intermediates 50-90% of the scores come out different
    assert (_ulps(np_bf16_block_scores(q, k, bq, bk, rounded=False), want) > 0).mean() > 0.3

    n_sel = sla.num_selected_blocks(topk, want.shape[-1])
    ordered = -np.sort(-want, axis=-1)
    tie_free = ordered[..., n_sel - 1] > ordered[..., n_sel]
    assert tie_free.mean() > 0.5
    want_sets = np.sort(np.argsort(-want, axis=-1, kind="stable")[..., :n_sel], axis=-1)
    np.testing.assert_array_equal(np.asarray(lut)[tie_free], want_sets[tie_free])


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_bf16_sparse_branch_with_fixed_lut(mode):
    q, k, v = _bf16_qkv(11)
    lut = _fixed_lut(12, 2, 3, 7, 13, 4)
    fn = _maybe_jit(lambda q, k, v, lut: sla.sparse_attention(q, k, v, lut, block_q=16, block_k=8), mode)
    got = _f32(fn(_j(q), _j(k), _j(v), jnp.asarray(lut, jnp.int32)))
    want = np_bf16_sparse(q, k, v, lut, 16, 8)
    assert_bf16_match(got, want, "sparse branch")
    for wrong in ("none", "normalised"):  # P kept fp32, or normalised before its rounding: 35-50% differ
        assert (_ulps(np_bf16_sparse(q, k, v, lut, 16, 8, p_rounding=wrong), want) > 0).mean() > 0.1


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_bf16_linear_branch(mode):
    q, k, v = _bf16_qkv(13)
    got = _f32(_maybe_jit(sla.linear_attention, mode)(_j(q), _j(k), _j(v)))
    want = np_bf16_linear(q, k, v)
    assert_bf16_match(got, want, "linear branch")
    assert (_ulps(np_bf16_linear(q, k, v, round_den_product=False), want) > 0).mean() > 0.05


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_bf16_sla_output(mode):
    """Fixed-LUT sparse branch + proj_l(linear branch), summed in bf16: the whole reference output."""
    q, k, v = _bf16_qkv(14)
    rng = np.random.default_rng(15)
    w, b = _bf(0.3 * rng.normal(size=(16, 16))), _bf(rng.normal(size=16))
    lut = _fixed_lut(16, 2, 3, 7, 13, 4)

    def run(q, k, v, lut, w, b):
        return sla.reference.add_linear_branch(sla.sparse_attention(q, k, v, lut, block_q=16, block_k=8),
                                               q, k, v, w, b)

    got = _f32(_maybe_jit(run, mode)(_j(q), _j(k), _j(v), jnp.asarray(lut, jnp.int32), _j(w), _j(b)))
    o_s, o_l = np_bf16_sparse(q, k, v, lut, 16, 8), np_bf16_linear(q, k, v)
    want = np_bf16_output(o_s, o_l, w, b)
    assert_bf16_match(got, want, "SLA output")
    assert (_ulps(np_bf16_output(o_s, o_l, w, b, round_proj=False), want) > 0).mean() > 0.05
