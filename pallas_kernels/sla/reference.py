"""Pure-jnp SLA (sparse-linear attention) as TurboDiffusion runs it: the semantics every SLA kernel must reproduce.

Spec: acceleration.md 3. Per (batch, head), with q, k, v [L, d] after the q/k RMSNorm and RoPE:
  block map   top-k key blocks per query block, scored by mean-pooled q against mean-pooled mean-centred k;
  sparse      softmax(q k^T / sqrt(d)) v restricted to (and normalised over) the selected key blocks;
  linear      phi(q) (phi(k)^T v) / (1e-5 + phi(q) . sum phi(k)), phi = softmax over d, over ALL tokens;
  output      cast(o_sparse + proj_l(o_linear)), proj_l a Linear(d, d) shared by the heads of a layer.
Arithmetic runs in the inputs' dtype (bf16 in the model) with fp32 accumulation, like the reference module.
Ragged lengths (L not a multiple of the block sizes) are handled by masking: pooled means divide by the real row
count of the last block, and padded keys get -inf logits.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.rounding import exact_f32

f32 = jnp.float32


def _precision(dtype):
    """fp32 inputs get true fp32 products (XLA's GPU default for fp32 is TF32); bf16 inputs the default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == f32 else None


def runs_on_cpu() -> bool:
    """Whether new computations land on the CPU: the default backend, unless jax.default_device says otherwise."""
    device = jax.config.jax_default_device
    if device is None:
        return jax.default_backend() == "cpu"
    return (device if isinstance(device, str) else device.platform) == "cpu"


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum accumulated in fp32. XLA:CPU has no batched bf16 x bf16 -> fp32 dot, so on the CPU the operands go
    up to fp32 first: products of bf16 values are exact in fp32, so the result is the same. exact_f32, not astype:
    under jit XLA would drop the rounding of an operand computed in fp32 and rounded just before (excess
    precision), e.g. the pooled means."""
    if runs_on_cpu():
        a, b = exact_f32(a), exact_f32(b)
    return jnp.einsum(spec, a, b, preferred_element_type=f32, precision=_precision(a.dtype))


def check_inputs(name: str, q, k, v=None, *, topk, block_q, block_k, proj_w=None, proj_b=None) -> None:
    """One clear error, before any work, for inputs no SLA path can take: q, k (and v) [B, L, H, D] floating-point
    arrays of one shape (SLA is self-attention), topk in (0, 1], positive block sizes, proj_l's weight [D, D] and
    bias [D]. name: the public function, for the message."""
    arrays = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    shapes = ", ".join(f"{n} {tuple(x.shape)}" for n, x in arrays.items())
    if any(x.ndim != 4 for x in arrays.values()):
        raise ValueError(f"{name} takes {', '.join(arrays)} as [B, L, H, D] arrays (heads split, after the q/k norm "
                         f"and RoPE); got {shapes}")
    if len({tuple(x.shape) for x in arrays.values()}) > 1:
        raise ValueError(f"{name} is self-attention: {', '.join(arrays)} must have one shape [B, L, H, D]; got "
                         f"{shapes}")
    if not all(jnp.issubdtype(x.dtype, jnp.floating) for x in arrays.values()):
        raise ValueError(f"{name} takes floating-point {', '.join(arrays)} (bf16 in the DiT); got "
                         f"{', '.join(f'{n} {x.dtype}' for n, x in arrays.items())}")
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"{name}: topk is the fraction of key blocks each query block attends to, in (0, 1]; got "
                         f"{topk}")
    if not all(isinstance(n, numbers.Integral) and n > 0 for n in (block_q, block_k)):
        raise ValueError(f"{name}: block_q and block_k must be positive integers; got {block_q!r}, {block_k!r}")
    d = q.shape[-1]
    if proj_b is not None and proj_w is None:
        raise ValueError(f"{name}: proj_b without proj_w; pass the layer's proj_l weight too (or neither)")
    if proj_w is not None and tuple(proj_w.shape) != (d, d):
        raise ValueError(f"{name}: proj_w is proj_l's weight [D, D] = {(d, d)}; got {tuple(proj_w.shape)}")
    if proj_b is not None and tuple(proj_b.shape) != (d,):
        raise ValueError(f"{name}: proj_b is proj_l's bias [D] = {(d,)}; got {tuple(proj_b.shape)}")


def num_selected_blocks(topk: float, num_k_blocks: int) -> int:
    """k = min(Nk, int(topk * Nk)) like the reference (int truncates), but at least 1: with k = 0 the reference's
    sparse softmax would be over an empty set; keeping one block is the only output that is still an average of v."""
    return max(1, min(num_k_blocks, int(topk * num_k_blocks)))


def _to_heads(x: jax.Array) -> jax.Array:
    """[B, L, H, D] -> [B, H, L, D]."""
    return jnp.swapaxes(x, 1, 2)


def _pad_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, H, L, D] -> [B, H, N, block, D], zero-padded at the end of L."""
    b, h, l, d = x.shape
    n = -(-l // block)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, n * block - l), (0, 0)))
    return x.reshape(b, h, n, block, d)


def _block_means(x: jax.Array, block: int) -> jax.Array:
    """Mean over each block of `block` rows of x [B, H, L, D] (fp32 sum / real row count), in x's dtype."""
    l = x.shape[2]
    sums = jnp.sum(_pad_blocks(x, block).astype(f32), axis=3)
    counts = jnp.minimum(block, l - block * jnp.arange(sums.shape[2]))
    return (sums / counts[:, None].astype(f32)).astype(x.dtype)


def key_mean(k: jax.Array) -> jax.Array:
    """The mean of k [B, L, H, D] over its L tokens, [B, H, D]: an fp32 mean rounded to k's dtype."""
    return jnp.mean(k.astype(f32), axis=1).astype(k.dtype)


def pooled_blocks(q: jax.Array, k: jax.Array, k_mean: jax.Array, *, block_q: int, block_k: int):
    """The block map's pooled operands for q, k [B, L, H, D] and k_mean = key_mean(k): the block means of q, [B, H,
    Nq, D], and of the mean-centred k - k_mean (rounded to k's dtype first), [B, H, Nk, D]."""
    kh = _to_heads(k) - k_mean[:, :, None].astype(k.dtype)
    return _block_means(_to_heads(q), block_q), _block_means(kh, block_k)


def pooled_scores(pooled_q: jax.Array, pooled_k: jax.Array) -> jax.Array:
    """[B, H, Nq, Nk] in pooled_q's dtype: pooled_q [B, H, Nq, D] . pooled_k [B, H, Nk, D] accumulated in fp32 and
    rounded once, with no 1/sqrt(d) scale."""
    return _einsum("bhqd,bhkd->bhqk", pooled_q, pooled_k).astype(pooled_q.dtype)


def block_scores(q: jax.Array, k: jax.Array, *, block_q: int, block_k: int) -> jax.Array:
    """The block map's scores, fp32 [B, H, Nq, Nk] for q, k [B, L, H, D] (acceleration.md 3.1): the product of
    pooled q and pooled mean-centred k, rounded to q's dtype, with no 1/sqrt(d) scale."""
    return pooled_scores(*pooled_blocks(q, k, key_mean(k), block_q=block_q, block_k=block_k)).astype(f32)


def block_map(q: jax.Array, k: jax.Array, *, topk: float, block_q: int, block_k: int) -> jax.Array:
    """Selected key blocks per query block, ascending: int32 [B, H, Nq, k] for q, k [B, L, H, D] (acceleration.md 3.1):
    the top-k of `block_scores` per query block. Among equal scores the lower block index wins (lax.top_k's rule; the
    reference's torch.topk leaves it unspecified)."""
    scores = block_scores(q, k, block_q=block_q, block_k=block_k)
    return top_k_blocks(scores, num_selected_blocks(topk, scores.shape[-1]))


def top_k_blocks(scores: jax.Array, n_sel: int) -> jax.Array:
    """float [..., Nk] -> int32 [..., n_sel]: the indices of the n_sel largest scores (lax.top_k: ties to the lower
    index), ascending: the set is what matters, and kernels then walk K/V front to back."""
    return jnp.sort(jax.lax.top_k(scores, n_sel)[1].astype(jnp.int32), axis=-1)


def sparse_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, lut: jax.Array, *, block_q: int, block_k: int, q_chunk: int = 16
) -> jax.Array:
    """Block-sparse softmax attention: each query block attends to the key blocks listed in lut [B, H, Nq, k].

    q, k, v [B, L, H, D] -> [B, L, H, D]. Query blocks are processed q_chunk at a time to bound memory."""
    b, l, h, d = q.shape
    qb = _pad_blocks(_to_heads(q), block_q)  # [B, H, Nq, bq, D]
    kb = _pad_blocks(_to_heads(k), block_k)  # [B, H, Nk, bk, D]
    vb = _pad_blocks(_to_heads(v), block_k)
    nq, nk = qb.shape[2], kb.shape[2]
    key_valid = (jnp.arange(nk * block_k) < l).reshape(nk, block_k)
    scale = 1.0 / math.sqrt(d)

    def one_head(q_blocks, k_blocks, v_blocks, lut_h):
        """q_blocks [Nq, bq, D], k/v_blocks [Nk, bk, D], lut_h [Nq, k] -> [Nq, bq, D]."""

        def one_q_block(args):
            qi, sel = args
            ks = k_blocks[sel].reshape(-1, d)  # [k * bk, D]
            vs = v_blocks[sel].reshape(-1, d)
            s = _einsum("qd,kd->qk", qi, ks) * scale
            s = jnp.where(key_valid[sel].reshape(1, -1), s, -jnp.inf)
            m = jnp.max(s, axis=-1, keepdims=True)
            p = jnp.exp(s - m)
            o = _einsum("qk,kd->qd", p.astype(v.dtype), vs)
            return (o / jnp.sum(p, axis=-1, keepdims=True)).astype(v.dtype)

        return jax.lax.map(one_q_block, (q_blocks, lut_h), batch_size=q_chunk)

    out = jax.vmap(jax.vmap(one_head))(qb, kb, vb, lut)  # [B, H, Nq, bq, D]
    out = out.reshape(b, h, nq * block_q, d)[:, :, :l]
    return jnp.swapaxes(out, 1, 2)


def linear_state(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The linear branch's per-head state over all tokens: kv = phi(k)^T v [B, H, D, D] and k_sum = sum phi(k)
    [B, H, D], phi = softmax over D; each rounded to the inputs' dtype like the bf16 torch module (3.3)."""
    dt = k.dtype
    phi_k = jax.nn.softmax(k.astype(f32), axis=-1).astype(dt)
    kv = _einsum("blhd,blhe->bhde", phi_k, v).astype(dt)
    return kv, jnp.sum(phi_k.astype(f32), axis=1).astype(dt)


def sum_key_statistics(kv, k_sum, k_col, seq_len: int, dtype):
    """The key-statistics kernels' fp32 partial sums over token chunks (kv [N, B, H, D, D], k_sum and k's column
    sums [N, B, H, D]) added and rounded once to dtype, like `linear_state`'s fp32-accumulated product and
    `key_mean`: (kv, k_sum, k_mean)."""
    return kv.sum(axis=0).astype(dtype), k_sum.sum(axis=0).astype(dtype), (k_col.sum(axis=0) / seq_len).astype(dtype)


def linear_output(q: jax.Array, kv: jax.Array, k_sum: jax.Array) -> jax.Array:
    """phi(q) kv / (1e-5 + phi(q) . k_sum) for q [B, L, H, D]; every product rounded to q's dtype."""
    dt = q.dtype
    phi_q = jax.nn.softmax(q.astype(f32), axis=-1).astype(dt)
    num = _einsum("blhd,bhde->blhe", phi_q, kv).astype(dt)
    prod = (phi_q * k_sum[:, None]).astype(f32)
    if dt != f32:  # the product is rounded to dt before the sum; stop XLA from fusing that rounding away
        prod = jax.lax.reduce_precision(prod, exponent_bits=jnp.finfo(dt).nexp, mantissa_bits=jnp.finfo(dt).nmant)
    den = jnp.sum(prod, axis=-1, keepdims=True).astype(dt)
    return (num / (den + jnp.asarray(1e-5, dt))).astype(dt)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """SLA's linear branch over all tokens with the softmax feature map; q, k, v [B, L, H, D] -> [B, L, H, D]."""
    return linear_output(q, *linear_state(k, v))


def project(o_lin: jax.Array, proj_w: jax.Array, proj_b: jax.Array | None) -> jax.Array:
    """proj_l: o_lin [..., D] @ proj_w[D, D]^T + proj_b, fp32 accumulation, rounded to o_lin's dtype."""
    y = jax.lax.dot_general(o_lin, proj_w.astype(o_lin.dtype), (((o_lin.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=f32, precision=_precision(o_lin.dtype))
    if proj_b is not None:
        y = y + proj_b.astype(f32)
    return y.astype(o_lin.dtype)


def add_linear_branch(
    o_sparse: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, proj_w: jax.Array | None, proj_b: jax.Array | None
) -> jax.Array:
    """cast(o_sparse + proj_l(linear_attention(q, k, v))); o_sparse alone when there is no proj_l."""
    if proj_w is None:
        return o_sparse
    return (o_sparse + project(linear_attention(q, k, v), proj_w, proj_b)).astype(q.dtype)


def sla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    topk: float,
    block_q: int,
    block_k: int,
    proj_w: jax.Array | None = None,
    proj_b: jax.Array | None = None,
) -> jax.Array:
    """SLA: sparse softmax over the top-k key blocks plus proj_l of the linear branch. [B, L, H, D] in and out.

    proj_w [D, D] ([out, in]) and proj_b [D] are the layer's proj_l; without them only the sparse branch is
    returned (proj_l is zero-initialised, so that is SLA before fine-tuning)."""
    lut = block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    o_sparse = sparse_attention(q, k, v, lut, block_q=block_q, block_k=block_k)
    return add_linear_branch(o_sparse, q, k, v, proj_w, proj_b)
