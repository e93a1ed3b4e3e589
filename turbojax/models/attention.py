"""The one attention interface of the DiT's self-attention, and the dense attention used everywhere else.

`AttentionSpec.kind` picks the algorithm ("dense" softmax attention, TurboDiffusion's "sla", or "sagesla": SLA with
an int8 Q.K^T and an fp8 P.V); `implementation` picks how it runs (None: the fastest for the device).
Cross-attention is always dense, as in TurboDiffusion.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels import sla
from turbojax.models.layers import precision

KINDS = ("dense", "sla", "sagesla")
DENSE_IMPLEMENTATIONS = ("cudnn", "xla")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Self-attention algorithm and backend. topk/block_q/block_k only matter for SLA and SageSLA (acceleration.md
    3.6; SageSLA keeps SLA's portable (128, 64) blocks on every GPU unless told otherwise: upstream's H100 runs
    use (64, 128))."""

    kind: str = "dense"
    implementation: str | None = None
    topk: float = 0.1
    block_q: int = 128
    block_k: int = 64

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown attention kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        allowed = {"dense": DENSE_IMPLEMENTATIONS, "sla": sla.IMPLEMENTATIONS,
                   "sagesla": sla.SAGE_IMPLEMENTATIONS}[self.kind]
        if self.implementation not in (None, *allowed):
            raise ValueError(
                f"attention {self.kind!r} has no implementation {self.implementation!r}; choose from {allowed}"
            )
        if not 0.0 < self.topk <= 1.0:
            raise ValueError(f"SLA topk must be in (0, 1], got {self.topk}")


# Short names accepted wherever an AttentionSpec is.
NAMED = {
    "dense": AttentionSpec("dense"),
    "dense_xla": AttentionSpec("dense", "xla"),
    "dense_cudnn": AttentionSpec("dense", "cudnn"),
    "sla": AttentionSpec("sla"),
    "sla_reference": AttentionSpec("sla", "reference"),
    "sagesla": AttentionSpec("sagesla"),
    "sagesla_reference": AttentionSpec("sagesla", "reference"),
}


def as_spec(attention: str | AttentionSpec) -> AttentionSpec:
    if isinstance(attention, AttentionSpec):
        return attention
    try:
        return NAMED[attention]
    except KeyError:
        raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(NAMED)}") from None


def _cudnn_supports(q: jax.Array) -> bool:
    """cuDNN flash attention needs a GPU, fp16/bf16 and head_dim a multiple of 8 up to 128 (256 on Hopper only;
    every Wan model has 128)."""
    d = q.shape[-1]
    return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128


def dense_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, q_chunk: int = 2048) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v in plain XLA, q [B, Lq, N, d], k/v [B, Lk, N, d] -> [B, Lq, N, d].

    Queries go q_chunk at a time so the fp32 logits stay bounded ([B, N, q_chunk, Lk]) at 75k-token sequences."""
    b, lq, n, d = q.shape
    scale = 1.0 / math.sqrt(d)
    prec = precision(q.dtype)

    def chunk(qc):
        s = jnp.einsum("bqnd,bknd->bnqk", qc, k, preferred_element_type=jnp.float32, precision=prec) * scale
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bnqk,bknd->bqnd", p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=prec)
        return o.astype(q.dtype)

    if lq <= q_chunk:
        return chunk(q)
    n_chunks = -(-lq // q_chunk)
    qp = jnp.pad(q, ((0, 0), (0, n_chunks * q_chunk - lq), (0, 0), (0, 0)))
    qs = jnp.moveaxis(qp.reshape(b, n_chunks, q_chunk, n, d), 1, 0)
    out = jax.lax.map(chunk, qs)
    return jnp.moveaxis(out, 0, 1).reshape(b, n_chunks * q_chunk, n, d)[:, :lq]


def dense(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None = None) -> jax.Array:
    """Dense softmax attention, no mask. cuDNN flash attention on GPU for bf16/fp16, else query-chunked XLA."""
    if implementation is None:
        implementation = "cudnn" if _cudnn_supports(q) else "xla"
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return dense_xla(q, k, v)


def self_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, spec: AttentionSpec, proj_w=None, proj_b=None
) -> jax.Array:
    """Self-attention over q, k, v [B, L, N, d] (after RMSNorm and RoPE) -> [B, L, N, d].

    proj_w/proj_b are the layer's SLA proj_l; dense attention ignores them (the released SLA-tuned checkpoints
    carry them even when run dense, TurboDiffusion issues #67, #122)."""
    if spec.kind == "dense":
        return dense(q, k, v, spec.implementation)
    attention = sla.sage_sla_attention if spec.kind == "sagesla" else sla.sla_attention
    return attention(
        q, k, v, topk=spec.topk, block_q=spec.block_q, block_k=spec.block_k,
        proj_w=proj_w, proj_b=proj_b, implementation=spec.implementation,
    )
