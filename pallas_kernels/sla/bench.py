"""SLA and SageSLA benchmark at Wan's real attention shapes, every path timed in one process on one GPU.

    python -m pallas_kernels.sla.bench            # the table of the SLA / SageSLA issue
    python -m pallas_kernels.sla.bench --headline --no-reference   # only cuDNN, SLA and SageSLA (a few minutes)
    python -m pallas_kernels.sla.bench --sweep    # also a launch-config sweep at H=12, L=32760
    python -m pallas_kernels.sla.bench --prep-sweep    # launch configs of the key-statistics and pooling passes
    python -m pallas_kernels.sla.bench --mosaic-blocks-per-step 1 2    # the Mosaic kernel alone with each

Rows: cuDNN dense attention (the baseline); SLA as the DiT calls it (block map + sparse kernel + linear-branch
state + fused linear output/proj_l/sum) with each sparse kernel (Pallas-Triton, Mosaic GPU with MosaicConfig's
defaults), and its parts alone (the Mosaic kernel once per --mosaic-blocks-per-step value, with its relative
difference to the Triton kernel's output); SLA with the pure-XLA reference; SageSLA the same way (block map with q/k
quantisation + v quantisation + int8/fp8 sparse kernel + the same linear branch), its parts, and its pure-XLA
reference. "vs bf16 SLA" is the fastest bf16 SLA row's time over the SageSLA row's.
Times are per call in steady state (`pallas_kernels.timing.bench`: median of --iters rounds of back-to-back
calls, one synchronisation per round). Inputs: bf16 N(0,1) q, v and keys with a shared mean.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp

from pallas_kernels import sla
from pallas_kernels.sla import mosaic, reference, sage_mosaic, sage_reference, sage_triton, triton
from pallas_kernels.sla import topk as topk_mod
from pallas_kernels.timing import bench

SHAPES = [(12, 32760), (40, 32760), (40, 75600)]  # (heads, tokens): 1.3B-480p, 14B-480p, 14B-720p
TOPKS = [0.1, 0.15]
# The sparse kernels as the dispatcher calls them: the Mosaic one on V already K-major (quantize_values_transposed).
SAGE_KERNELS = {"triton": sage_triton.sparse_attention, "mosaic": sage_mosaic.sparse_attention_kmajor}


def inputs(h: int, l: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 6)
    q, k, v = (jax.random.normal(kk, (1, l, h, 128), jnp.bfloat16) for kk in keys[:3])
    k = (k + 2.0 * jax.random.normal(keys[3], (1, 1, h, 128))).astype(jnp.bfloat16)
    w = (0.05 * jax.random.normal(keys[4], (128, 128))).astype(jnp.bfloat16)
    b = (0.05 * jax.random.normal(keys[5], (128,))).astype(jnp.bfloat16)
    return q, k, v, w, b


def rel(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def bench_or_report(what: str, fn, *args, iters: int) -> float | None:
    """bench(fn, *args) in ms, or None after printing why `what` failed to build or run here: one kernel that does
    not lower must not stop the other rows."""
    try:
        return bench(fn, *args, iters=iters)
    except Exception as e:
        print(f"{what} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None


def sparse_variants(name: str, kernel, block_q: int, block_k: int, mosaic_blocks_per_step) -> dict:
    """The sparse kernel alone, by row label: the Mosaic one once per effective blocks_per_step (block_k=128 runs
    one block per step whatever is asked), the Triton one as configured by default."""
    if name != "mosaic":
        return {"": jax.jit(functools.partial(kernel, block_q=block_q, block_k=block_k))}
    configs = {mosaic.blocks_per_step(cfg, block_k): cfg
               for cfg in (mosaic.MosaicConfig(blocks_per_step=n) for n in mosaic_blocks_per_step)}
    return {f", {n} block(s) per step": jax.jit(functools.partial(kernel, block_q=block_q, block_k=block_k, config=cfg))
            for n, cfg in configs.items()}


def sparse_rows(name: str, variants: dict, operands, where, *, iters: int, compare_to):
    """A row per variant of the sparse kernel alone at `where` = (heads, tokens, topk), with its relative difference
    to `compare_to` (the Triton kernel's output) where given; also returns the last variant's output."""
    rows, out = [], None
    for label, sparse in variants.items():
        ms = bench_or_report(f"{name} sparse kernel{label} at H, L, topk = {where}", sparse, *operands, iters=iters)
        if ms is None:
            continue
        out = sparse(*operands)
        rows.append(dict(zip(("heads", "tokens", "topk"), where), path=f"  {name} sparse kernel alone{label}", ms=ms))
        if compare_to is not None:
            rows[-1]["rel_diff"] = {"vs triton": rel(out, compare_to)}
        print(json.dumps(rows[-1]), flush=True)
    return rows, out


DEFAULT_BLOCKS_PER_STEP = (mosaic.MosaicConfig().blocks_per_step,)


def shapes_with_cudnn(iters: int, rows: list):
    """Per benchmark shape: (heads, tokens, its inputs, cuDNN dense attention's ms), the cuDNN row appended to rows
    first."""
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    for h, l in SHAPES:
        operands = inputs(h, l)
        dense_ms = bench(cudnn, *operands[:3], iters=iters)
        rows.append(dict(heads=h, tokens=l, topk=None, path="cuDNN dense", ms=dense_ms))
        yield h, l, operands, dense_ms


def table(iters: int, block_q: int, block_k: int, with_reference: bool,
          mosaic_blocks_per_step=DEFAULT_BLOCKS_PER_STEP) -> list[dict]:
    rows = []
    for h, l, (q, k, v, w, b), dense_ms in shapes_with_cudnn(iters, rows):
        for topk in TOPKS:
            lut = jax.jit(functools.partial(sla.block_map, topk=topk, block_q=block_q, block_k=block_k))(q, k)
            results, sparse_outs = {}, {}
            for name, kernel in (("triton", triton.sparse_attention), ("mosaic", mosaic.sparse_attention)):
                full = jax.jit(functools.partial(sla.sla_attention, topk=topk, block_q=block_q, block_k=block_k,
                                                 implementation=name))
                ms = bench_or_report(f"{name} at H={h} L={l}", lambda q, k, v, w, b: full(q, k, v, proj_w=w, proj_b=b),
                                     q, k, v, w, b, iters=iters)
                if ms is None:
                    continue
                results[name] = full(q, k, v, proj_w=w, proj_b=b)
                rows.append(dict(heads=h, tokens=l, topk=topk, path=f"SLA, {name} sparse kernel ({block_q},{block_k})",
                                 ms=ms, vs_cudnn=dense_ms / ms))
                print(json.dumps(rows[-1]), flush=True)
                variants = sparse_variants(name, kernel, block_q, block_k, mosaic_blocks_per_step)
                variant_rows, sparse_outs[name] = sparse_rows(name, variants, (q, k, v, lut), (h, l, topk), iters=iters,
                                                              compare_to=sparse_outs.get("triton"))
                rows += variant_rows
            kv, k_sum = jax.jit(reference.linear_state)(k, v)
            k_mean = jax.jit(reference.key_mean)(k)
            scores = jax.jit(functools.partial(reference.block_scores, block_q=block_q, block_k=block_k))(q, k)
            n_sel = sla.num_selected_blocks(topk, scores.shape[-1])
            parts = {
                "block map (top-k kernel)": (jax.jit(functools.partial(sla.block_map, topk=topk, block_q=block_q,
                                                                       block_k=block_k)), (q, k)),
                "block map (XLA top-k)": (jax.jit(functools.partial(reference.block_map, topk=topk, block_q=block_q,
                                                                    block_k=block_k)), (q, k)),
                "  top-k alone (XLA: lax.top_k, then sort)": (
                    jax.jit(functools.partial(reference.top_k_blocks, n_sel=n_sel)), (scores,)),
                "  top-k alone (Triton kernel)": (jax.jit(functools.partial(topk_mod.top_k_blocks, n_sel=n_sel)),
                                                  (scores,)),
                "  pooled blocks alone (XLA, key mean included)": (jax.jit(functools.partial(
                    lambda q, k, **kw: reference.pooled_blocks(q, k, reference.key_mean(k), **kw),
                    block_q=block_q, block_k=block_k)), (q, k)),
                "  pooled blocks alone (Triton, given the key mean)": (jax.jit(functools.partial(
                    triton.pooled_blocks, block_q=block_q, block_k=block_k)), (q, k, k_mean)),
                "linear-branch state (XLA)": (jax.jit(reference.linear_state), (k, v)),
                "linear-branch state + key mean (Triton key_statistics)": (jax.jit(triton.key_statistics), (k, v)),
                "linear output + proj_l + sum (Triton epilogue, 64 rows)": (jax.jit(triton.linear_epilogue),
                                                                            (q, q, kv, k_sum, w, b)),
                "linear output + proj_l + sum (Triton epilogue, 128 rows)": (
                    jax.jit(functools.partial(triton.linear_epilogue, block=128)), (q, q, kv, k_sum, w, b)),
            }
            if mosaic.state_supports(k):
                parts["linear-branch state + key mean (Mosaic key_statistics)"] = (jax.jit(mosaic.key_statistics),
                                                                                  (k, v))
            for part, (fn, fn_args) in parts.items():
                rows.append(dict(heads=h, tokens=l, topk=topk, path=f"  {part}", ms=bench(fn, *fn_args, iters=iters)))
            if with_reference and h * l <= 40 * 32760:
                ref_fn = jax.jit(lambda q, k, v, w, b, topk=topk: reference.sla_attention(
                    q, k, v, topk=topk, block_q=block_q, block_k=block_k, proj_w=w, proj_b=b))
                ref_out = ref_fn(q, k, v, w, b)
                rows.append(dict(heads=h, tokens=l, topk=topk, path="SLA, pure-XLA reference",
                                 ms=bench(ref_fn, q, k, v, w, b, iters=max(2, iters // 3)),
                                 rel_diff={n: rel(o, ref_out) for n, o in results.items()}))
                print(json.dumps(rows[-1]), flush=True)
            sla_ms = min((r["ms"] for r in rows if r["path"].startswith("SLA, ") and "sparse kernel" in r["path"]
                          and (r["heads"], r["tokens"], r["topk"]) == (h, l, topk)), default=float("nan"))
            rows += sage_rows(h, l, topk, (q, k, v, w, b), lut, iters=iters, block_q=block_q, block_k=block_k,
                              dense_ms=dense_ms, sla_ms=sla_ms, sla_out=next(iter(results.values()), None),
                              with_reference=with_reference)
    return rows


def cos_sim(a, b) -> float:
    a, b = a.astype(jnp.float32).ravel(), b.astype(jnp.float32).ravel()
    return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def sage_rows(h, l, topk, qkvwb, lut, *, iters, block_q, block_k, dense_ms, sla_ms, sla_out, with_reference):
    """SageSLA as the DiT calls it with each sparse kernel (with its cos-sim to a bf16 SLA kernel's output), the
    kernel alone on quantised operands (V K-major for the Mosaic kernel, as the dispatcher passes it), the
    quantisation (the dispatcher's passes, the separate token-major passes, and all in XLA), and (at the two smaller
    shapes) the pure-XLA reference."""
    q, k, v, w, b = qkvwb
    rows, results = [], {}
    quantize = jax.jit(functools.partial(sage_triton.quantize, block_q=block_q, block_k=block_k))
    xla_quantize = jax.jit(functools.partial(sage_reference.quantize, block_q=block_q, block_k=block_k))
    values = jax.jit(functools.partial(sage_triton.quantize_values_transposed, block_k=block_k,
                                       key_order=sage_mosaic.SageMosaicConfig().registers(block_k)))
    k_mean = reference.key_mean(k)  # the dispatcher takes it from the key-statistics pass, outside the quantisation
    ops = quantize(q, k, v, k_mean=k_mean)
    kernel_ops = {"triton": ops, "mosaic": (*ops[:4], *values(v))}
    for name, kernel in SAGE_KERNELS.items():
        full = jax.jit(functools.partial(sla.sage_sla_attention, topk=topk, block_q=block_q, block_k=block_k,
                                         implementation=name))
        sparse = jax.jit(functools.partial(kernel, block_q=block_q, block_k=block_k))
        ms = bench_or_report(f"SageSLA {name} at H={h} L={l}", lambda q, k, v, w, b: full(q, k, v, proj_w=w, proj_b=b),
                             q, k, v, w, b, iters=iters)
        if ms is None:
            continue
        results[name] = full(q, k, v, proj_w=w, proj_b=b)
        rows.append(dict(heads=h, tokens=l, topk=topk, path=f"SageSLA, {name} sparse kernel ({block_q},{block_k})",
                         ms=ms, vs_cudnn=dense_ms / ms, vs_sla=sla_ms / ms,
                         cos_vs_sla=None if sla_out is None else cos_sim(results[name], sla_out)))
        rows.append(dict(heads=h, tokens=l, topk=topk, path=f"  {name} SageSLA sparse kernel alone",
                         ms=bench(sparse, *kernel_ops[name], lut, iters=iters)))
        print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
    rows.append(dict(heads=h, tokens=l, topk=topk, path="  SageSLA quantisation, separate passes (Triton q/k, XLA v)",
                     ms=bench(lambda q, k, v, m: quantize(q, k, v, k_mean=m), q, k, v, k_mean, iters=iters)))
    pool_quantize = jax.jit(functools.partial(sage_triton.pool_and_quantize, block_q=block_q, block_k=block_k))
    rows.append(dict(heads=h, tokens=l, topk=topk, path="  block-map pooling + q/k quantisation (one Triton pass)",
                     ms=bench(pool_quantize, q, k, k_mean, iters=iters)))
    rows.append(dict(heads=h, tokens=l, topk=topk, path="  v quantised K-major for the Mosaic kernel (XLA max, Triton)",
                     ms=bench(values, v, iters=iters)))
    rows.append(dict(heads=h, tokens=l, topk=topk, path="  SageSLA quantisation of q, k, v (all XLA)",
                     ms=bench(xla_quantize, q, k, v, iters=iters)))
    if with_reference and h * l <= 40 * 32760:
        ref_fn = jax.jit(lambda q, k, v, w, b: sage_reference.sage_sla_attention(
            q, k, v, topk=topk, block_q=block_q, block_k=block_k, proj_w=w, proj_b=b))
        ref_out = ref_fn(q, k, v, w, b)
        rows.append(dict(heads=h, tokens=l, topk=topk, path="SageSLA, pure-XLA reference",
                         ms=bench(ref_fn, q, k, v, w, b, iters=max(2, iters // 3)),
                         rel_diff={n: rel(o, ref_out) for n, o in results.items()}))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def headline(iters: int, block_q: int, block_k: int) -> list[dict]:
    """Only the rows the SLA issue's goals name, a few minutes on an H100: per shape cuDNN dense attention, and per
    topk SLA and SageSLA as the DiT calls them (each dispatcher's default implementation for the device)."""
    rows = []
    for h, l, (q, k, v, w, b), dense_ms in shapes_with_cudnn(iters, rows):
        for topk in TOPKS:
            kw = dict(topk=topk, block_q=block_q, block_k=block_k)
            full = jax.jit(lambda q, k, v, w, b, kw=kw: sla.sla_attention(q, k, v, proj_w=w, proj_b=b, **kw))
            sage = jax.jit(lambda q, k, v, w, b, kw=kw: sla.sage_sla_attention(q, k, v, proj_w=w, proj_b=b, **kw))
            sla_ms, sage_ms = bench(full, q, k, v, w, b, iters=iters), bench(sage, q, k, v, w, b, iters=iters)
            impl = sla.default_implementation(q, block_q, block_k)
            sage_impl = sla.default_sage_implementation(q, block_q, block_k)
            rows.append(dict(heads=h, tokens=l, topk=topk, path=f"SLA, {impl} sparse kernel ({block_q},{block_k})",
                             ms=sla_ms, vs_cudnn=dense_ms / sla_ms))
            rows.append(dict(heads=h, tokens=l, topk=topk, ms=sage_ms, vs_cudnn=dense_ms / sage_ms,
                             path=f"SageSLA, {sage_impl} sparse kernel ({block_q},{block_k})", vs_sla=sla_ms / sage_ms,
                             cos_vs_sla=cos_sim(sage(q, k, v, w, b), full(q, k, v, w, b))))
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
    return rows


def sweep(iters: int, mosaic_blocks_per_step=DEFAULT_BLOCKS_PER_STEP) -> list[dict]:
    """Launch configurations of the SLA and SageSLA sparse kernels at H=12, L=32760, topk 0.1 (the Mosaic SLA
    kernel's ring depths with each blocks_per_step at block_k=64; its slots are capped by shared memory)."""
    q, k, v, _, _ = inputs(12, 32760)
    candidates = [(bq, bk, "triton", triton.TritonConfig(num_warps=w, num_stages=st))
                  for bq, bk in ((128, 64), (64, 128)) for w in (4, 8) for st in (2, 3)]
    candidates += [(128, bk, "mosaic", mosaic.MosaicConfig(max_concurrent_steps=n, blocks_per_step=bps))
                   for bk in (64, 128) for n in (2, 3, 4) for bps in (mosaic_blocks_per_step if bk == 64 else (1,))]
    candidates += [(bq, bk, "sage triton", triton.TritonConfig(num_warps=w, num_stages=st))
                   for bq, bk in ((128, 64), (64, 128)) for w in (4, 8) for st in (2, 3)]
    candidates += [(128, bk, "sage mosaic", sage_mosaic.SageMosaicConfig(max_concurrent_steps=n))
                   for bk in (64, 128) for n in (2, 3, 4)]
    kernels = {"triton": triton.sparse_attention, "mosaic": mosaic.sparse_attention,
               "sage triton": sage_triton.sparse_attention, "sage mosaic": sage_mosaic.sparse_attention}
    rows = []
    for block_q, block_k, name, cfg in candidates:
        lut = sla.block_map(q, k, topk=0.1, block_q=block_q, block_k=block_k)
        fn = jax.jit(functools.partial(kernels[name], block_q=block_q, block_k=block_k, config=cfg))
        operands = sage_reference.quantize(q, k, v, block_q=block_q, block_k=block_k) if "sage" in name else (q, k, v)
        # A config the compiler rejects (e.g. shared memory) is reported and kept as a NaN row.
        ms = bench_or_report(f"{name} ({block_q},{block_k}) {cfg}", fn, *operands, lut, iters=iters)
        rows.append(dict(kernel=name, block_q=block_q, block_k=block_k, config=str(cfg),
                         ms=float("nan") if ms is None else ms))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def prep_sweep(iters: int) -> list[dict]:
    """Launch configurations of the passes before the sparse kernel: `triton.key_statistics` (rows per step and per
    program, warps, pipeline stages) and `triton.pooled_blocks` (rows per program, warps) at each benchmark shape."""
    rows = []
    for h, l in SHAPES:
        q, k, v, _, _ = inputs(h, l)
        k_mean = reference.key_mean(k)
        candidates = [("key_statistics", dict(block=bl, rows=r, num_warps=w, num_stages=st), (k, v))
                      for bl in (32, 64) for r in (768, 1536, 3072) for w in (4, 8) for st in (2, 3)]
        candidates += [("pooled_blocks", dict(block_q=128, block_k=64, rows=r, num_warps=w), (q, k, k_mean))
                       for r in (128, 256, 512, 1024) for w in (2, 4, 8)]
        for name, kw, args in candidates:
            ms = bench_or_report(f"{name} {kw}", jax.jit(functools.partial(getattr(triton, name), **kw)), *args,
                                 iters=iters)
            rows.append(dict(heads=h, tokens=l, kernel=name, config=kw, ms=float("nan") if ms is None else ms))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--prep-sweep", action="store_true", help="sweep the key-statistics and pooling passes' launches "
                                                             "instead of printing the table")
    p.add_argument("--no-reference", action="store_true", help="skip the slow pure-XLA SLA and SageSLA rows (the "
                                                               "--headline table has none)")
    p.add_argument("--headline", action="store_true", help="only cuDNN, SLA and SageSLA as the DiT calls them (the "
                                                           "rows of the issue's goals), no parts or other kernels")
    p.add_argument("--mosaic-blocks-per-step", type=int, nargs="+", choices=(1, 2),
                   default=list(DEFAULT_BLOCKS_PER_STEP),
                   help="key blocks per softmax step of the Mosaic SLA kernel (block_k=64): a kernel-alone row and "
                        "sweep candidates per value")
    p.add_argument("--json")
    args = p.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    if args.prep_sweep:
        rows = prep_sweep(args.iters)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"prep_sweep": rows}, f, indent=2)
        return 0
    out = {"sweep": sweep(args.iters, args.mosaic_blocks_per_step)} if args.sweep else {}
    out["table"] = (headline(args.iters, args.block_q, args.block_k) if args.headline else
                    table(args.iters, args.block_q, args.block_k, not args.no_reference, args.mosaic_blocks_per_step))
    print("\n| heads | tokens | topk | path | ms | vs cuDNN | vs bf16 SLA | rel. diff vs reference or cos-sim vs SLA |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out["table"]:
        vs = f"{r['vs_cudnn']:.2f}x" if "vs_cudnn" in r else ""
        vs_sla = f"{r['vs_sla']:.2f}x" if "vs_sla" in r else ""
        rd = ", ".join(f"{n} {x:.1e}" for n, x in r.get("rel_diff", {}).items())
        rd += f"cos {r['cos_vs_sla']:.5f}" if r.get("cos_vs_sla") is not None else ""
        print(f"| {r['heads']} | {r['tokens']} | {r['topk'] or ''} | {r['path']} | {r['ms']:.3f} | {vs} | {vs_sla} "
              f"| {rd} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
