"""SLA sparse-linear attention and SageSLA (its int8/fp8 variant): the pure-jnp references (the semantics), the
Pallas kernels, and the dispatchers.

Every implementation shares the block map's semantics: mean-pooled scores, then the top-k. On GPUs the pooling is
one Pallas-Triton pass over q and k (`triton.pooled_blocks`) and the top-k a Pallas-Triton kernel
(`topk.top_k_blocks`: one pass per row instead of XLA's full sort, same indices). The kernel paths replace the
sparse branch (where the time goes), compute the linear branch's per-head d x d state and the block map's key mean
in one pass over k, v (`mosaic.key_statistics` by wgmma with the Mosaic kernels, else `triton.key_statistics`),
and fuse the linear output, proj_l and the final sum into one more
(`triton.linear_epilogue`), or, with the Mosaic kernels (SageSLA's where its ring keeps 3 slots beside the
epilogue's tiles: (128, 64) blocks), into the sparse kernel's own epilogue. SageSLA quantises q
and k to int8 per block in the block map's pooling pass (`sage_triton.pool_and_quantize`: the pooled keys are the
mean-smoothed ones it quantises) and v to e4m3 per channel: for the Mosaic kernel by one Pallas-Triton pass that
writes it K-major in P's key order (`sage_triton.quantize_values_transposed`), for the Triton kernel in XLA; its
sparse branch runs on those operands.
"""

from __future__ import annotations

import jax

from pallas_kernels.sla import mosaic, reference, sage_mosaic, sage_reference, sage_triton, triton
from pallas_kernels.sla import topk as _topk  # `topk` is sla_attention's argument
from pallas_kernels.sla.reference import linear_attention, num_selected_blocks, sparse_attention

IMPLEMENTATIONS = ("reference", "triton", "mosaic")
SAGE_IMPLEMENTATIONS = ("reference", "triton", "mosaic")


def triton_supports(q: jax.Array, block_q: int, block_k: int) -> bool:
    """The Triton kernel needs power-of-two tiles of at least 16 (tensor-core dots) and a power-of-two head dim."""
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0
    return pow2(block_q) and pow2(block_k) and pow2(q.shape[-1])


def block_map(q, k, *, topk: float, block_q: int, block_k: int, implementation=None, interpret=False, k_mean=None):
    """Selected key blocks per query block, ascending: int32 [B, H, Nq, k] for q, k [B, L, H, D]; the semantics are
    `reference.block_map`'s. implementation: None (the Triton kernels where new work lands on a GPU, else the
    reference: `jax.default_device(cpu)` on a GPU host picks the reference), "reference" (XLA, top_k a sort) or
    "triton": the block means by one pass over q and k (`triton.pooled_blocks`), their product in XLA, the top-k
    by `topk.top_k_blocks` (interpret=True runs both kernels on the CPU). k_mean: `reference.key_mean(k)` where the
    caller has it already (the key-statistics passes compute it with the linear branch's state); the reference
    computes its own."""
    reference.check_inputs("block_map", q, k, topk=topk, block_q=block_q, block_k=block_k)
    impl = implementation or ("reference" if reference.runs_on_cpu() else "triton")
    if impl == "reference":
        return reference.block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    if impl != "triton":
        raise ValueError(f"unknown block-map implementation {impl!r}; available: reference, triton")
    k_mean = reference.key_mean(k) if k_mean is None else k_mean
    pooled = triton.pooled_blocks(q, k, k_mean, block_q=block_q, block_k=block_k, interpret=interpret)
    return _top_k_of_pooled(*pooled, topk=topk, interpret=interpret)


def _top_k_of_pooled(pooled_q, pooled_k, *, topk: float, interpret: bool):
    """The block map from the pooled blocks (pooled_q [B, H, Nq, D], pooled centred keys [B, H, Nk, D]): their
    scores in XLA, the top-k by `topk.top_k_blocks`."""
    scores = reference.pooled_scores(pooled_q, pooled_k)
    return _topk.top_k_blocks(scores, num_selected_blocks(topk, scores.shape[-1]), interpret=interpret)


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
    reference.check_inputs("sla_attention", q, k, v, topk=topk, block_q=block_q, block_k=block_k, proj_w=proj_w,
                           proj_b=proj_b)
    impl = implementation or default_implementation(q, block_q, block_k)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown SLA implementation {impl!r}; available: {', '.join(IMPLEMENTATIONS)}")
    if impl == "reference":
        return reference.sla_attention(q, k, v, topk=topk, block_q=block_q, block_k=block_k, proj_w=proj_w,
                                       proj_b=proj_b)
    if impl == "triton" and not triton_supports(q, block_q, block_k):
        raise ValueError(f"the Triton SLA kernel needs power-of-two block sizes >= 16 and head dim; got "
                         f"block_q={block_q}, block_k={block_k}, head_dim={q.shape[-1]}")
    if impl == "mosaic" and not mosaic.supports(q, block_q, block_k):
        raise ValueError(f"the Mosaic SLA kernel needs an sm90 GPU, bf16/fp16, head_dim 64 or 128, block_q 128 "
                         f"and block_k 64 or 128; got {q.dtype}, head_dim {q.shape[-1]}, blocks "
                         f"({block_q}, {block_k})")
    stats = _key_statistics(impl, k, v, proj_w, interpret)
    lut = block_map(q, k, topk=topk, block_q=block_q, block_k=block_k, k_mean=None if stats is None else stats[2])
    if impl == "mosaic" and stats is not None and mosaic.fuses_linear(mosaic.MosaicConfig(), block_k, q.shape[-1]):
        return mosaic.sparse_attention(q, k, v, lut, block_q=block_q, block_k=block_k,
                                       linear=(stats[0], stats[1], proj_w, proj_b))
    if impl == "mosaic":
        o_sparse = mosaic.sparse_attention(q, k, v, lut, block_q=block_q, block_k=block_k)
    else:
        o_sparse = triton.sparse_attention(q, k, v, lut, block_q=block_q, block_k=block_k, interpret=interpret)
    return _add_linear_branch(o_sparse, q, stats, proj_w, proj_b, interpret)


def _key_statistics(impl, k, v, proj_w, interpret):
    """The kernel paths' one pass over all keys (kv, k_sum, k_mean) where there is a linear branch, else None (the
    block map then takes the key mean from XLA): by wgmma with the Mosaic kernels where its shapes fit
    (`mosaic.key_statistics`, Hopper), else by Pallas-Triton (`triton.key_statistics`; interpret=True runs it on
    the CPU)."""
    if proj_w is None:
        return None
    if impl == "mosaic" and not interpret and mosaic.state_supports(k):
        return mosaic.key_statistics(k, v)
    return triton.key_statistics(k, v, interpret=interpret)


def _add_linear_branch(o_sparse, q, stats, proj_w, proj_b, interpret):
    """The kernel paths' o_sparse + proj_l(linear branch) by the Triton epilogue, from `_key_statistics`' state."""
    if stats is None:
        return o_sparse
    return triton.linear_epilogue(q, o_sparse, stats[0], stats[1], proj_w, proj_b, interpret=interpret)


def _gpu_has_fp8() -> bool:
    """Whether the default device is a GPU that converts to e4m3 (compute capability 8.9 and up)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and float(getattr(device, "compute_capability", "0")) >= 8.9


def default_sage_implementation(q: jax.Array, block_q: int, block_k: int) -> str:
    """The Mosaic GPU SageSLA kernel on Hopper where its tiles fit, else the Pallas-Triton one on GPUs with fp8
    (sm89+), else the reference."""
    if sage_mosaic.supports(q, block_q, block_k):
        return "mosaic"
    if _gpu_has_fp8() and sage_triton.supports(q, block_q, block_k):
        return "triton"
    return "reference"


def sage_sla_attention(
    q, k, v, *, topk, block_q=128, block_k=64, proj_w=None, proj_b=None, implementation=None, interpret=False
):
    """SageSLA over q, k, v [B, L, H, D] -> [B, L, H, D]; `sage_reference.sage_sla_attention` defines the semantics.

    Same block map, linear branch and proj_l as `sla_attention`; the sparse branch runs on int8 q, k and e4m3 v.
    implementation: None picks the fastest available for the device and shapes; "reference" is pure jnp;
    "triton" is the Pallas-Triton kernel (GPUs with fp8 conversions, sm89+); "mosaic" the Mosaic GPU kernel for
    Hopper (fp8 tensor cores). interpret=True runs either kernel on the CPU (tests)."""
    reference.check_inputs("sage_sla_attention", q, k, v, topk=topk, block_q=block_q, block_k=block_k,
                           proj_w=proj_w, proj_b=proj_b)
    impl = implementation or default_sage_implementation(q, block_q, block_k)
    _check_sage_implementation(impl, q, block_q, block_k, interpret)
    if impl == "reference":
        return sage_reference.sage_sla_attention(q, k, v, topk=topk, block_q=block_q, block_k=block_k, proj_w=proj_w,
                                                 proj_b=proj_b)
    stats = _key_statistics(impl, k, v, proj_w, interpret)
    k_mean = reference.key_mean(k) if stats is None else stats[2]  # one key mean for the block map and the smoothing
    pooled, qk_ops = sage_triton.pool_and_quantize(q, k, k_mean, block_q=block_q, block_k=block_k,
                                                   interpret=interpret)
    lut = _top_k_of_pooled(*pooled, topk=topk, interpret=interpret)
    blocks = dict(block_q=block_q, block_k=block_k, out_dtype=q.dtype, interpret=interpret)
    if impl == "triton":
        o_sparse = sage_triton.sparse_attention(*qk_ops, *sage_reference.quantize_v(v), lut, **blocks)
    else:
        key_order = sage_mosaic.SageMosaicConfig().registers(block_k)
        v_ops = sage_triton.quantize_values_transposed(v, block_k=block_k, key_order=key_order, interpret=interpret)
        if stats is not None and not interpret and sage_mosaic.fuses_linear(block_q, block_k, q.shape[-1], q.dtype):
            return sage_mosaic.sparse_attention_kmajor(*qk_ops, *v_ops, lut, **blocks,
                                                       linear=(q, stats[0], stats[1], proj_w, proj_b))
        o_sparse = sage_mosaic.sparse_attention_kmajor(*qk_ops, *v_ops, lut, **blocks)
    return _add_linear_branch(o_sparse, q, stats, proj_w, proj_b, interpret)


def _check_sage_implementation(impl: str, q: jax.Array, block_q: int, block_k: int, interpret: bool) -> None:
    """One clear error, before any work, when `impl` cannot run these shapes on this device."""
    if impl not in SAGE_IMPLEMENTATIONS:
        raise ValueError(f"unknown SageSLA implementation {impl!r}; available: {', '.join(SAGE_IMPLEMENTATIONS)}")
    if impl == "triton" and not sage_triton.supports(q, block_q, block_k):
        raise ValueError(f"the Triton SageSLA kernel needs power-of-two block_q >= 16, block_k >= 32 and head dim "
                         f">= 32; got block_q={block_q}, block_k={block_k}, head_dim={q.shape[-1]}")
    if impl == "triton" and not interpret and not _gpu_has_fp8():
        raise ValueError("the Triton SageSLA kernel needs a GPU with fp8 conversions (compute capability 8.9+: Ada, "
                         "Hopper, Blackwell); use implementation='reference' here, or attention 'sla'")
    if impl == "mosaic" and not (sage_mosaic.supports(q, block_q, block_k)
                                 or interpret and sage_mosaic.shapes_supported(q, block_q, block_k)):
        raise ValueError(f"the Mosaic SageSLA kernel needs an sm90 GPU, bf16/fp16, head_dim 64 or 128, L a multiple "
                         f"of 8, block_q and block_k 64 or 128; got {q.dtype}, head_dim {q.shape[-1]}, L "
                         f"{q.shape[1]}, blocks ({block_q}, {block_k})")


__all__ = [
    "IMPLEMENTATIONS",
    "SAGE_IMPLEMENTATIONS",
    "block_map",
    "default_implementation",
    "default_sage_implementation",
    "linear_attention",
    "num_selected_blocks",
    "sage_sla_attention",
    "sla_attention",
    "sparse_attention",
]
