"""The umT5-XXL text encoder (Wan's T5Encoder, transformers' UMT5EncoderModel) in Flax NNX, wan-model.md section 6.

Pre-norm T5 blocks without biases: x += o(attn(norm1(x))) with a relative-position bias table in every layer and no
1/sqrt(d) scaling; x += fc2(fc1(h) * gelu_tanh(gate(h))) with h = norm2(x); a final RMSNorm. Dtypes as in Wan's bf16
run: matmul weights, activations and the residual stream in `dtype`, fp32 accumulation, RMSNorm statistics and the
softmax in fp32, the normalised value rounded to `dtype` before the weight multiply. Norm weights and bias tables are
kept in fp32 (a bf16 file's values are exact there); the bias is added to the fp32 logits, where Wan's bf16 run adds
it to bf16 logits. Blocks are stacked on a leading layer axis and run with lax.scan, like the DiT.

`quantized=True` stores the block Linears as int8 weights with one fp32 scale per output channel (weight-only; the
activations stay in `dtype`): half the memory of bf16 for the 4.6B block parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.models import layers

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    vocab_size: int = 256384
    dim: int = 4096
    num_heads: int = 64
    head_dim: int = 64
    ffn_dim: int = 10240
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim


UMT5_PRESETS = {
    "umt5-xxl": UMT5Config(),
    # Tests: 32 buckets and max distance 128 kept so sequences longer than 8 reach the log buckets; the inner width
    # (4 x 12) differs from dim so a swapped projection shape cannot pass.
    "tiny": UMT5Config(vocab_size=1024, dim=32, num_heads=4, head_dim=12, ffn_dim=48, num_layers=2),
}


def umt5_param_count(cfg: UMT5Config) -> int:
    block = 4 * cfg.dim * cfg.inner_dim + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim + cfg.num_buckets * cfg.num_heads
    return cfg.vocab_size * cfg.dim + cfg.num_layers * block + cfg.dim


def position_bucket(rel: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of each relative position rel = k - q (any int array, same shape out, int32).

    Half the buckets for rel > 0; within a half, |rel| < n/2 exact, larger distances log-spaced up to max_distance.
    The log branch repeats the reference's float32 arithmetic (float32(ln(|rel| / e)) / float32(ln(max / e)) * (n - e),
    truncated), so bucket edges such as |rel| = 16, 32, 64 land where the reference puts them. The logarithm is
    taken in float64 and rounded once: a correctly rounded float32 log on every host."""
    half = num_buckets // 2
    exact = half // 2
    a = np.abs(rel)
    ratio = (np.maximum(a, exact).astype(np.float32) / np.float32(exact)).astype(np.float32)
    log_ratio = np.log(ratio.astype(np.float64)).astype(np.float32)
    scaled = (log_ratio / np.float32(math.log(max_distance / exact))).astype(np.float32) * np.float32(half - exact)
    large = np.minimum(exact + scaled.astype(np.int64), half - 1)
    return (half * (rel > 0) + np.where(a < exact, a, large)).astype(np.int32)


@functools.lru_cache(maxsize=16)
def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[L, L] int32 bucket of key k seen from query q, computed once per length on the host."""
    pos = np.arange(length)
    return position_bucket(pos[None, :] - pos[:, None], num_buckets, max_distance)


def _normal(rngs: nnx.Rngs, shape, std) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, f32)


class Linear(nnx.Module):
    """y = x W^T (no bias), W [out, in]; int8 W with per-output-channel fp32 scales when quantized."""

    def __init__(self, n_in: int, n_out: int, *, dtype, quantized: bool, rngs: nnx.Rngs):
        w = _normal(rngs, (n_out, n_in), n_in**-0.5)
        if quantized:
            q, s = quantize_int8(w)
            self.int8_weight, self.scale, self.weight = nnx.Param(q), nnx.Param(s), None
        else:
            self.weight, self.int8_weight, self.scale = nnx.Param(w.astype(dtype)), None, None

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        if self.weight is not None:
            return layers.linear(x, self.weight[...], None, dtype)
        # int8 values are exact in bf16, so the product is the bf16 matmul of the integer weights; the per-row
        # scale then multiplies the fp32 accumulator before the single rounding.
        y = layers.linear(x, self.int8_weight[...].astype(dtype), None, f32)
        return (y * self.scale[...]).astype(dtype)


def quantize_int8(w) -> tuple:
    """Symmetric per-output-channel int8: w [N, K] -> (q int8 [N, K], scale fp32 [N]) with w ~ q * scale[:, None].

    Works on numpy (host, at load) and jax arrays alike; rows of zeros get scale 1."""
    xp = jnp if isinstance(w, jax.Array) else np
    w32 = w.astype(xp.float32)
    amax = xp.max(xp.abs(w32), axis=-1)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    q = xp.clip(xp.round(w32 / scale[..., None]), -127, 127).astype(xp.int8)
    return q, scale


class RMSScale(nnx.Module):
    """An RMSNorm weight, kept in fp32 (a bf16 checkpoint's values are exact in it)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(1.0 + _normal(rngs, (dim,), 0.02))


class Attention(nnx.Module):
    def __init__(self, cfg: UMT5Config, *, dtype, quantized: bool, rngs: nnx.Rngs):
        d, inner = cfg.dim, cfg.inner_dim
        self.q, self.k, self.v = (Linear(d, inner, dtype=dtype, quantized=quantized, rngs=rngs) for _ in range(3))
        self.o = Linear(inner, d, dtype=dtype, quantized=quantized, rngs=rngs)


class FeedForward(nnx.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))): Wan's names; transformers calls gate/fc1/fc2 wi_0/wi_1/wo."""

    def __init__(self, cfg: UMT5Config, *, dtype, quantized: bool, rngs: nnx.Rngs):
        self.gate = Linear(cfg.dim, cfg.ffn_dim, dtype=dtype, quantized=quantized, rngs=rngs)
        self.fc1 = Linear(cfg.dim, cfg.ffn_dim, dtype=dtype, quantized=quantized, rngs=rngs)
        self.fc2 = Linear(cfg.ffn_dim, cfg.dim, dtype=dtype, quantized=quantized, rngs=rngs)


class PositionBias(nnx.Module):
    """The layer's relative-position bias table [num_buckets, num_heads] (fp32)."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (cfg.num_buckets, cfg.num_heads), 1.0))


class UMT5Block(nnx.Module):
    def __init__(self, cfg: UMT5Config, *, dtype, quantized: bool, rngs: nnx.Rngs):
        self.norm1 = RMSScale(cfg.dim, rngs=rngs)
        self.attn = Attention(cfg, dtype=dtype, quantized=quantized, rngs=rngs)
        self.pos_embedding = PositionBias(cfg, rngs=rngs)
        self.norm2 = RMSScale(cfg.dim, rngs=rngs)
        self.ffn = FeedForward(cfg, dtype=dtype, quantized=quantized, rngs=rngs)


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (vocab, dim), 1.0).astype(dtype))


class UMT5Encoder(nnx.Module):
    """encoder(ids[B, L] int, mask[B, L]) -> hidden states [B, L, dim] in dtype.

    mask is the key-padding mask (1 = real token). Every row is computed, padded ones included: no zeroing here
    (turbojax.text.TextEncoder.encode zeroes the rows past each prompt, the DiT's input contract)."""

    def __init__(self, cfg: UMT5Config, *, dtype=jnp.bfloat16, quantized: bool = False, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.token_embedding = Embedding(cfg.vocab_size, cfg.dim, dtype=dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs):
            return UMT5Block(cfg, dtype=dtype, quantized=quantized, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.norm = RMSScale(cfg.dim, rngs=rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.cfg
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"ids and mask must both be [B, L]; got ids {ids.shape}, mask {mask.shape}")
        x = jnp.take(self.token_embedding.weight[...], ids, axis=0).astype(self.dtype)
        buckets = jnp.asarray(relative_buckets(ids.shape[1], cfg.num_buckets, cfg.max_distance))
        keep = mask.astype(bool)[:, None, None, :]  # [B, 1, 1, Lk]

        block_def, block_states = nnx.split(self.blocks)

        def body(x, block_state):
            return block_forward(nnx.merge(block_def, block_state), x, keep, buckets, cfg=cfg, dtype=self.dtype), None

        x = jax.lax.scan(body, x, block_states)[0]
        return _rms(x, self.norm, cfg, self.dtype)


def block_forward(blk: UMT5Block, x, keep, buckets, *, cfg: UMT5Config, dtype):
    """One block. x [B, L, dim] residual in dtype; keep [B, 1, 1, L] bool; buckets [L, L] int32."""
    b, l, _ = x.shape
    n, hd = cfg.num_heads, cfg.head_dim
    h = _rms(x, blk.norm1, cfg, dtype)
    q = blk.attn.q(h, dtype).reshape(b, l, n, hd)
    k = blk.attn.k(h, dtype).reshape(b, l, n, hd)
    v = blk.attn.v(h, dtype).reshape(b, l, n, hd)
    bias = jnp.take(blk.pos_embedding.weight[...], buckets, axis=0).transpose(2, 0, 1)  # [N, Lq, Lk] fp32
    a = biased_attention(q, k, v, bias, keep)
    x = x + blk.attn.o(a.reshape(b, l, cfg.inner_dim), dtype)

    h = _rms(x, blk.norm2, cfg, dtype)
    y = blk.ffn.fc1(h, dtype) * layers.gelu_tanh(blk.ffn.gate(h, dtype))
    return x + blk.ffn.fc2(y, dtype)


def biased_attention(q, k, v, bias, keep) -> jax.Array:
    """softmax(q k^T + bias, masked keys excluded) v without 1/sqrt(d) scaling (T5).

    q, k, v [B, L, N, d]; bias [N, Lq, Lk] fp32; keep [B, 1, 1, Lk] bool. Logits and softmax in fp32; the
    probabilities are rounded to v's dtype for the second matmul (the reference's type_as). Returns [B, L, N, d]."""
    prec = layers.precision(q.dtype)
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=f32, precision=prec) + bias[None]
    logits = jnp.where(keep, logits, jnp.finfo(f32).min)
    p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", p, v, preferred_element_type=f32, precision=prec).astype(v.dtype)


def _rms(x, scale: RMSScale, cfg: UMT5Config, dtype):
    return layers.rms_norm(x, scale.weight[...], cfg.eps, dtype, round_before_weight=dtype)
