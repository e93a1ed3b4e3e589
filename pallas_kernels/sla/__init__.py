"""SLA sparse-linear attention: the pure-jnp reference (the semantics) and its dispatcher.

The Pallas kernels of the SLA issue plug in here as further `implementation` values; until they exist every call
runs the reference, on every device.
"""

from __future__ import annotations

from pallas_kernels.sla import reference
from pallas_kernels.sla.reference import block_map, linear_attention, num_selected_blocks, sparse_attention

IMPLEMENTATIONS = ("reference",)


def sla_attention(q, k, v, *, topk, block_q=128, block_k=64, proj_w=None, proj_b=None, implementation=None):
    """SLA over q, k, v [B, L, H, D] -> [B, L, H, D]; see `reference.sla_attention` for the exact semantics.

    implementation: None picks the fastest available for the device; "reference" forces the pure-jnp version."""
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"unknown SLA implementation {implementation!r}; available: {', '.join(IMPLEMENTATIONS)}")
    return reference.sla_attention(
        q, k, v, topk=topk, block_q=block_q, block_k=block_k, proj_w=proj_w, proj_b=proj_b
    )


__all__ = [
    "IMPLEMENTATIONS",
    "block_map",
    "linear_attention",
    "num_selected_blocks",
    "sla_attention",
    "sparse_attention",
]
