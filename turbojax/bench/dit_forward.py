"""DiT forward latency at real shapes, random weights, every attention path timed in the same process.

    python -m turbojax.bench.dit_forward --preset wan2.1-t2v-1.3b --res 480p --attention dense_cudnn dense_xla
    python -m turbojax.bench.dit_forward --preset wan2.1-t2v-14b --attention sla --linears float w8a8   # W8A8 vs bf16

Prints a markdown table (median of --iters timed calls after one warm-up; compile time; the compiled program's
device memory) and the relative difference of each path's output to the first path's, as a sanity check. With
--linears float w8a8 the W8A8 model is the bf16 one with its block Linears quantised (same seed), so its difference
to the first row is the quantisation error and its params GiB the memory saved.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import turbojax
from turbojax.bench.timing import program_bytes, report, time_compiled, time_first_call
from turbojax.models.attention import as_spec

RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}


def latent_shape(cfg: turbojax.WanConfig, res: str, frames: int, batch: int = 1) -> tuple[int, ...]:
    h, w = RESOLUTIONS[res]
    return batch, cfg.in_dim, 1 + (frames - 1) // 4, h // 8, w // 8


def random_dit(cfg: turbojax.WanConfig, seed: int = 0, linears: str = "float") -> turbojax.WanDiT:
    """A bf16 DiT with random weights, initialised on the device in one compiled program."""
    return nnx.jit(lambda: turbojax.WanDiT(cfg, linears=linears, rngs=nnx.Rngs(seed)))()


def forward_inputs(cfg: turbojax.WanConfig, shape: tuple[int, ...], seed: int = 1) -> tuple:
    """Random inputs of one forward on the device: latents [B, 16, T, h, w] bf16, timestep [B] (988, the first rCM
    step's), context [B, 512, text_dim] bf16 and, for I2V configs, the condition [B, in_dim - 16, T, h, w] bf16.
    Drawn on the host: a few MB, where jax.random would compile a program per shape."""
    b, _, *thw = shape
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.standard_normal(s, np.float32).astype(jnp.bfloat16)
    inputs = (normal(b, cfg.out_dim, *thw), np.full((b,), 988.0, np.float32), normal(b, cfg.text_len, cfg.text_dim))
    if cfg.cond_dim:
        inputs += (normal(b, cfg.cond_dim, *thw),)
    return jax.device_put(inputs, jax.devices()[0])


def time_forward(dit: turbojax.WanDiT, inputs: tuple, iters: int) -> dict:
    graphdef, state = nnx.split(dit)
    fwd = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    timings, compiled, out = time_compiled(lambda: fwd.lower(state, *inputs), (state, *inputs), iters)
    mem = compiled.memory_analysis()
    return {
        **timings,
        "temp_gib": mem.temp_size_in_bytes / 2**30 if mem else None,
        "args_gib": mem.argument_size_in_bytes / 2**30 if mem else None,
        "program_bytes": program_bytes(compiled),
        "out": out,
    }


def time_sampler(sampler: turbojax.RCMSampler, context, shape, iters: int, cond=None) -> dict:
    """The whole jitted rCM loop (noise drawn inside), seeds varying between calls: the first call (tracing,
    compilation and one run) in seconds, then the timings of iters calls."""
    return time_first_call(lambda i: sampler(context, cond, latent_shape=shape, seed=i), iters)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", nargs="+", default=["wan2.1-t2v-1.3b"])
    p.add_argument("--res", default="480p", choices=sorted(RESOLUTIONS))
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--attention", nargs="+", default=["dense_cudnn", "dense_xla"])
    p.add_argument("--linears", nargs="+", default=["float"], choices=["float", "w8a8"],
                   help="block Linears: bf16, or W8A8 int8 (the Pallas int8 GEMM on GPUs)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--sampler-steps", type=int, default=0,
                   help="also time the whole jitted rCM sampler with this many steps (first attention path)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    rows = []
    for preset in args.preset:
        cfg = turbojax.get_preset(preset)
        shape = latent_shape(cfg, args.res, args.frames)
        inputs = forward_inputs(cfg, shape)
        n_tok = shape[2] * (shape[3] // 2) * (shape[4] // 2)
        first = None
        for linears in args.linears:
            dit = random_dit(cfg, linears=linears)
            for name in args.attention:
                dit.attention = as_spec(name)
                r = time_forward(dit, inputs, args.iters)
                out = np.asarray(r.pop("out"), np.float32)
                if first is None:
                    first, r["rel_diff_vs_first"] = out, 0.0
                else:
                    r["rel_diff_vs_first"] = float(np.abs(out - first).max() / np.abs(first).max())
                r.update(preset=preset, res=args.res, tokens=n_tok, attention=name, linears=linears)
                rows.append(r)
                print(json.dumps(r), flush=True)
        if args.sampler_steps:
            dit.attention = as_spec(args.attention[0])
            sampler = turbojax.RCMSampler(dit, schedule=turbojax.RCMSchedule(num_steps=args.sampler_steps))
            r = time_sampler(sampler, inputs[2], shape, args.iters, *inputs[3:])
            r.update(compile_s=r.pop("first_call_s"), temp_gib=float("nan"), args_gib=float("nan"),
                     rel_diff_vs_first=float("nan"))
            r.update(preset=preset, res=args.res, tokens=n_tok, linears=args.linears[-1],
                     attention=f"{args.attention[0]}, {args.sampler_steps}-step rCM sampler")
            rows.append(r)
            print(json.dumps(r), flush=True)
        del dit

    report(rows, {"preset": "{preset}", "res": "{res}", "tokens": "{tokens}", "attention": "{attention}",
                  "linears": "{linears}",
                  "forward median (ms)": "{median_ms:.1f}", "min (ms)": "{min_ms:.1f}",
                  "compile (s)": "{compile_s:.1f}", "temp GiB": "{temp_gib:.2f}", "params GiB": "{args_gib:.2f}",
                  "rel. diff vs first": "{rel_diff_vs_first:.2e}"}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
