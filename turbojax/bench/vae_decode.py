"""Wan2.1 VAE decode latency and device memory at real shapes, random weights, each conv path in the same process.

    python -m turbojax.bench.vae_decode                 # 81 frames at 480p and 720p, bf16, load_vae's default path
                                                        # (ndhwc on GPUs, fold elsewhere) and the xla3d baseline
    python -m turbojax.bench.vae_decode --tiny          # CPU smoke test: tiny config, 9 frames at 64x96

Every path decodes the same latents with the production code (one first latent frame, then a lax.scan over the
rest). "ndhwc" (load_vae's default on GPUs) is the 3-D convolutions compiled with xla_gpu_force_conv_nhwc; "fold"
(the default elsewhere) folds the temporal taps into 2-D NHWC convolutions; "xla3d" is the plain
lax.conv_general_dilated 3-D port, the XLA-default baseline. Prints the device, one JSON line per run and a markdown
table: median and min of --iters timed decodes after a warm-up, compile time, the compiled program's device memory
(arguments = weights + latents, temp, output; peak = their sum, what XLA reserves for the call) and each path's max
relative difference to the first path's video.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.bench.timing import program_bytes, report, time_compiled
from turbojax.models import vae as vae_mod

RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280), "tiny": (64, 96)}
TINY = vae_mod.VAEConfig(base_dim=8, z_dim=4)


def random_vae(cfg: vae_mod.VAEConfig, dtype, seed: int = 0) -> vae_mod.WanVAE:
    """A VAE with random weights: kernels N(0, 1/fan_in), zero biases, unit gains. Drawn on the host with numpy,
    which takes a second for the real 127M parameters where jax.random would compile a kernel per shape."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: vae_mod.WanVAE(cfg, dtype=dtype, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1] == "weight":
            v = rng.standard_normal(leaf.shape, np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            v = np.full(leaf.shape, 1.0 if path[-1] == "gamma" else 0.0, np.float32)
        return leaf.replace(jax.device_put(v.astype(leaf.dtype)))

    return nnx.merge(graphdef, nnx.from_flat_state([(k, draw(k, v)) for k, v in nnx.to_flat_state(state)]))


def latent_shape(cfg: vae_mod.VAEConfig, res: str, frames: int) -> tuple[int, ...]:
    h, w = RESOLUTIONS[res]
    return 1, cfg.z_dim, 1 + (frames - 1) // cfg.temporal_factor, h // cfg.spatial_factor, w // cfg.spatial_factor


def time_decode(vae: vae_mod.WanVAE, z: jax.Array, iters: int) -> dict:
    graphdef, state = nnx.split(vae)
    timings, compiled, out = time_compiled(
        lambda: vae_mod.jitted(vae_mod.decode_latents, vae.conv).lower(graphdef, state, z, True), (state, z), iters)
    mem = compiled.memory_analysis()
    gib = lambda n: n / 2**30
    return {**timings, "args_gib": gib(mem.argument_size_in_bytes), "temp_gib": gib(mem.temp_size_in_bytes),
            "out_gib": gib(mem.output_size_in_bytes), "peak_gib": gib(program_bytes(compiled)), "out": out}


@jax.jit
def rel_diff(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--res", nargs="+", default=["480p", "720p"], choices=sorted(RESOLUTIONS))
    p.add_argument("--frames", type=int, default=81)
    default_conv = "ndhwc" if jax.default_backend() == "gpu" else "fold"
    p.add_argument("--conv", nargs="+", default=[default_conv, "xla3d"], choices=vae_mod.CONV_IMPLS,
                   help="paths to time; the first is the reference of the rel. diff column")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny config, 9 frames at 64x96, 1 iteration (CPU smoke test)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    cfg = vae_mod.VAEConfig()
    if args.tiny:
        cfg, args.res, args.frames, args.iters = TINY, ["tiny"], 9, 1

    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, dtype {args.dtype}")
    vae = random_vae(cfg, jnp.dtype(args.dtype))
    rows = []
    for res in args.res:
        shape = latent_shape(cfg, res, args.frames)
        z = jax.random.normal(jax.random.key(1), shape, jnp.float32)
        first = None
        for name in args.conv:
            vae.conv = name
            r = time_decode(vae, z, args.iters)
            out = r.pop("out")
            r["rel_diff_vs_first"] = 0.0 if first is None else float(rel_diff(out, first))
            first = out if first is None else first
            h, w = RESOLUTIONS[res]
            r.update(res=f"{h}x{w}", frames=out.shape[2], latent_shape=list(shape), conv=name)
            rows.append(r)
            print(json.dumps(r), flush=True)
            del out

    report(rows, {"res": "{res}", "frames": "{frames}", "conv": "{conv}", "decode median (ms)": "{median_ms:.1f}",
                  "min (ms)": "{min_ms:.1f}", "compile (s)": "{compile_s:.1f}",
                  "weights+latents GiB": "{args_gib:.2f}", "temp GiB": "{temp_gib:.2f}", "output GiB": "{out_gib:.2f}",
                  "peak GiB": "{peak_gib:.2f}", "rel. diff vs first": "{rel_diff_vs_first:.2e}"}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
