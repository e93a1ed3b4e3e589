"""SLA sparse-linear attention: the pure-jnp reference (the semantics), the Pallas kernels, and the dispatcher.

Every implementation shares the block map (mean-pool + top-k, XLA). The kernel paths replace the sparse branch
(where the time goes), compute the linear branch's per-head d x d state in one pass over k, v
(`triton.linear_state`), and fuse its output, proj_l and the final sum into one more (`triton.linear_epilogue`).
"""

from __future__ import annotations

import jax

from pallas_kernels.sla import mosaic, reference, triton
from pallas_kernels.sla.reference import block_map, linear_attention, num_selected_blocks, sparse_attention

IMPLEMENTATIONS = ("reference", "triton", "mosaic")


def triton_supports(q: jax.Array, block_q: int, block_k: int) -> bool:
    """The Triton kernel needs power-of-two tiles of at least 16 (tensor-core dots) and a power-of-two head dim."""
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0
    return pow2(block_q) and pow2(block_k) and pow2(q.shape[-1])


def default_implementation(q: jax.Array, block_q: int, block_k: int) -> str:
    """Mosaic GPU on Hopper where its tiles fit, else Pallas-Triton on any GPU, else the reference."""
    if jax.default_backend() != "gpu":
        return "reference"
    if mosaic.supports(q, block_q, block_k):
        return "mosaic"
    return "triton" if triton_supports(q, block_q, block_k) else "reference"


def sla_attention(
    q, k, v, *, topk, block_q=128, block_k=64, proj_w=None, proj_b=None, implementation=None, interpret=False
):
    """SLA over q, k, v [B, L, H, D] -> [B, L, H, D]; `reference.sla_attention` defines the semantics.

    implementation: None picks the fastest available for the device and shapes; "reference" is pure jnp;
    "triton" is the Pallas-Triton sparse kernel (interpret=True runs it on the CPU for tests); "mosaic" is the
    Mosaic GPU kernel for Hopper (no CPU interpreter)."""
    impl = implementation or default_implementation(q, block_q, block_k)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown SLA implementation {impl!r}; available: {', '.join(IMPLEMENTATIONS)}")
    lut = block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    if impl == "triton":
        if not triton_supports(q, block_q, block_k):
            raise ValueError(f"the Triton SLA kernel needs power-of-two block sizes >= 16 and head dim; got "
                             f"block_q={block_q}, block_k={block_k}, head_dim={q.shape[-1]}")
        o_sparse = triton.sparse_attention(q, k, v, lut, block_q=block_q, block_k=block_k, interpret=interpret)
    elif impl == "mosaic":
        if not mosaic.supports(q, block_q, block_k):
            raise ValueError(f"the Mosaic SLA kernel needs an sm90 GPU, bf16/fp16, head_dim 64 or 128, block_q 128 "
                             f"and block_k 64 or 128; got {q.dtype}, head_dim {q.shape[-1]}, blocks "
                             f"({block_q}, {block_k})")
        o_sparse = mosaic.sparse_attention(q, k, v, lut, block_q=block_q, block_k=block_k)
    else:
        return reference.add_linear_branch(sparse_attention(q, k, v, lut, block_q=block_q, block_k=block_k),
                                           q, k, v, proj_w, proj_b)
    if proj_w is None:
        return o_sparse
    kv, k_sum = triton.linear_state(k, v, interpret=interpret)
    return triton.linear_epilogue(q, o_sparse, kv, k_sum, proj_w, proj_b, interpret=interpret)


__all__ = [
    "IMPLEMENTATIONS",
    "block_map",
    "default_implementation",
    "linear_attention",
    "num_selected_blocks",
    "sla_attention",
    "sparse_attention",
]
