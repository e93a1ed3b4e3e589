"""The `turbojax` command line: `turbojax generate` (rCM sampling of latents)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

SMOKE_NOTE = (
    "no --checkpoint given: ran the embedded `tiny` preset with random weights and a random text embedding. "
    "The output is a smoke test of the pipeline, not a video of anything."
)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_array(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"turbojax generate: cannot read {what} {path}: {e}") from None


def generate(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import turbojax

    schedule = turbojax.RCMSchedule(
        num_steps=args.steps, sigma_max=args.sigma_max, mode="ode" if args.ode else "sde"
    )
    t_start = time.perf_counter()
    if args.checkpoint is None:
        cfg = turbojax.get_preset("tiny")
        dit = turbojax.WanDiT(cfg, dtype=jnp.float32, attention=turbojax.AttentionSpec(args.attention),
                              rngs=nnx.Rngs(args.seed))
        low = None
        context = jax.random.normal(jax.random.key(args.seed + 1), (1, cfg.text_len, cfg.text_dim))
        latent_shape = (1, cfg.out_dim, 3, 4, 6)
        cond = None
        print(SMOKE_NOTE)
    else:
        # Everything that can be checked is checked before the (possibly 2 x 28 GB) load.
        if args.context is None:
            raise SystemExit("turbojax generate: --context EMB.npy (umT5 embeddings [B, 512, 4096]) is needed with a "
                             "checkpoint until the text encoder lands")
        if (args.frames - 1) % 4:
            raise SystemExit(f"turbojax generate: --frames must be 4k+1 (e.g. 81), got {args.frames}")
        if args.height % 16 or args.width % 16:
            raise SystemExit(f"turbojax generate: --height and --width must be multiples of 16, got "
                             f"{args.height}x{args.width}")
        context = _load_array(args.context, "--context")
        cond = _load_array(args.cond, "--cond") if args.cond else None
        cfg = turbojax.checkpoint.config_from_meta(turbojax.checkpoint.read_meta(args.checkpoint))
        if cfg.cond_dim and cond is None:
            raise SystemExit(f"turbojax generate: this is an I2V model; pass --cond COND.npy [B, {cfg.cond_dim}, T, H, W]")
        latent_shape = (context.shape[0], cfg.out_dim, 1 + (args.frames - 1) // 4, args.height // 8, args.width // 8)
        dit = turbojax.load_dit(args.checkpoint, attention=args.attention)
        low = turbojax.load_dit(args.low_checkpoint, attention=args.attention) if args.low_checkpoint else None
    t_load = time.perf_counter()

    sampler = turbojax.RCMSampler(dit, low, schedule=schedule)
    latents = np.asarray(jax.block_until_ready(sampler(context, cond, seed=args.seed, latent_shape=latent_shape)))
    t_sample = time.perf_counter()

    out = Path(args.out)
    out = out if out.suffix == ".npy" else out.with_suffix(".npy")
    _save_npy_atomic(out, latents)
    print(f"wrote {out}: latents {latents.shape} {latents.dtype} "
          f"(t = {', '.join(f'{t:.5f}' for t in schedule.rf_times()[:-1])}; net timesteps "
          f"{', '.join(str(int(t)) for t in schedule.net_timesteps())})")
    print(f"timings: load {t_load - t_start:.2f} s, sampling (incl. compile) {t_sample - t_load:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="turbojax", description="TurboDiffusion's Wan video diffusion in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="rCM sampling of video latents (mp4 once the VAE lands)")
    gen.add_argument("--checkpoint", help="converted DiT folder (turbojax-convert); omitted: tiny smoke test")
    gen.add_argument("--low-checkpoint", help="low-noise expert folder of a two-expert model (Wan2.2 A14B)")
    gen.add_argument("--context", help="umT5 embeddings .npy [B, 512, 4096] (needed with --checkpoint)")
    gen.add_argument("--cond", help="I2V condition .npy [B, 20, T, H, W] (mask + image latent)")
    gen.add_argument("--frames", type=int, default=81, help="pixel frames, 4k+1 (default 81)")
    gen.add_argument("--height", type=int, default=480)
    gen.add_argument("--width", type=int, default=832)
    gen.add_argument("--steps", type=int, default=4, help="rCM steps, 1-4 (default 4)")
    gen.add_argument("--sigma-max", type=float, default=80.0, help="initial sigma (T2V 80, I2V 200)")
    gen.add_argument("--ode", action="store_true", help="deterministic ODE updates instead of SDE")
    gen.add_argument("--attention", default="dense", choices=["dense", "sla"], help="self-attention kind")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", default="out/latents.npy", help="output .npy path (written atomically)")
    gen.set_defaults(func=generate)

    args = parser.parse_args(argv)
    from turbojax.checkpoint import CheckpointFormatError

    try:
        return args.func(args)
    except (ValueError, CheckpointFormatError, OSError) as e:
        print(f"turbojax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
