"""Peak device memory of the pipelines per preset, ESTIMATED from abstract shapes and XLA compiles on the CPU.

    python -m turbojax.pipelines.memory            # markdown table, 81 frames, one sample

Nothing is allocated: weights are counted from eval_shape'd modules (bf16 as loaded; int8 block Linears for the
W8A8 rows, whose step is compiled with bf16 Linears: see estimate), and each stage's working
memory is XLA's buffer assignment (temporaries + outputs) of that stage's program compiled for the CPU from
ShapeDtypeStructs. The DiT's attention is compiled as a stand-in with a flash kernel's footprint (its output and
O(L) statistics): on the CPU the dense path materialises query-chunked logits (25 GB for 14B at 720p), which cuDNN's
flash attention on a GPU never does. XLA:CPU and XLA:GPU fuse differently, so treat the numbers as estimates; a
GPU run's `jax.devices()[0].memory_stats()["peak_bytes_in_use"]` is the measurement.

Peaks follow the pipelines' memory plan (pipeline.py, experts.py): the DiT(s) and the VAE stay on the device; for
`turbojax generate` the text encoder is loaded beside them for the prompt and freed, for `turbojax serve` it stays.
"offload" (`--offload`; A14B's own choice when both experts do not fit) has one expert on the device during the
steps and none in the other stages.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx

from turbojax.models import attention as attention_module
from turbojax.models import wan_dit
from turbojax.models.config import get_preset
from turbojax.models.umt5 import UMT5_PRESETS, UMT5Encoder
from turbojax.models.vae import VAEConfig, WanVAE, decode_latents, encode_video
from turbojax.pipelines import sizes
from turbojax.pipelines.experts import tree_bytes
from turbojax.pipelines.pipeline import MASK_CHANNELS, dit_step

GB = 1e9
TEXT_LEN = 512


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    dit: str
    resolution: str
    experts: int = 1
    i2v: bool = False
    linears: str = "float"  # "w8a8": the -quant checkpoints' int8 block Linears


PRESETS = (
    Preset("Wan2.1 T2V 1.3B, 480p", "wan2.1-t2v-1.3b", "480p"),
    Preset("Wan2.1 T2V 14B, 480p", "wan2.1-t2v-14b", "480p"),
    Preset("Wan2.1 T2V 14B, 720p", "wan2.1-t2v-14b", "720p"),
    Preset("Wan2.1 T2V 14B, 720p, W8A8", "wan2.1-t2v-14b", "720p", linears="w8a8"),
    Preset("Wan2.2 I2V A14B, 720p", "wan2.2-i2v-a14b", "720p", experts=2, i2v=True),
    Preset("Wan2.2 I2V A14B, 720p, W8A8", "wan2.2-i2v-a14b", "720p", experts=2, i2v=True, linears="w8a8"),
)


def flash_standin(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None = None) -> jax.Array:
    """Memory stand-in of flash attention for q [B, Lq, N, d], k/v [B, Lk, N, d]: an output [B, Lq, N, d] that
    depends on all three through O(L) reductions, as a fused kernel's footprint is its output and row statistics."""
    stats = jnp.mean(k.astype(jnp.float32), axis=1, keepdims=True) * jnp.mean(v.astype(jnp.float32), axis=1,
                                                                             keepdims=True)
    return (q.astype(jnp.float32) + stats).astype(q.dtype)


@contextlib.contextmanager
def flash_attention_footprint():
    """Compiles the DiT's dense attention (self and cross) as flash_standin while active."""
    with mock.patch.object(attention_module, "dense", flash_standin), mock.patch.object(wan_dit, "dense",
                                                                                          flash_standin):
        yield


def working(fn, *args) -> int:
    """Temporaries + outputs of fn compiled for the CPU on abstract args."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return stats.temp_size_in_bytes + stats.output_size_in_bytes


def estimate(preset: Preset, num_frames: int = 81, num_samples: int = 1, aspect_ratio: str = "16:9") -> dict:
    """Bytes per component and stage, and the peaks of one-shot generation and of serve, for one preset."""
    height, width = sizes.table_size(preset.resolution, aspect_ratio)
    shape = sizes.latent_shape(num_samples, num_frames, height, width)
    cfg = get_preset(preset.dit)
    def abstract_dit(linears: str):
        return nnx.split(nnx.eval_shape(lambda: wan_dit.WanDiT(cfg, linears=linears, rngs=nnx.Rngs(0))))

    # The step compiles with bf16 Linears even for W8A8: XLA:CPU's reference int8 GEMM materialises the int32 block
    # sums of every product, which the Pallas kernel keeps on chip; its outputs are the same bf16 activations.
    dit_def, dit_state = abstract_dit("float")
    weights = dit_state if preset.linears == "float" else abstract_dit(preset.linears)[1]
    text_def, text_state = nnx.split(nnx.eval_shape(lambda: UMT5Encoder(UMT5_PRESETS["umt5-xxl"],
                                                                        rngs=nnx.Rngs(0))))
    vae_def, vae_state = nnx.split(nnx.eval_shape(lambda: WanVAE(VAEConfig(), conv="xla3d", rngs=nnx.Rngs(0))))
    sds = jax.ShapeDtypeStruct
    x = sds(shape, jnp.float32)
    context = sds((num_samples, TEXT_LEN, cfg.text_dim), jnp.bfloat16)
    cond = sds((num_samples, MASK_CHANNELS + cfg.out_dim, *shape[2:]), jnp.bfloat16) if preset.i2v else None
    scalar = sds((), jnp.float32)
    ids = sds((1, TEXT_LEN), jnp.int32)

    with flash_attention_footprint():
        step = working(lambda s, *a: dit_step(dit_def, "sde", s, *a), dit_state, x, scalar, scalar, scalar, x, context,
                       cond)
    text = working(lambda s, i, m: nnx.merge(text_def, s)(i, m), text_state, ids, ids)
    decode = working(lambda s, z: decode_latents(nnx.merge(vae_def, s), z), vae_state, x)
    video = sds((1, 3, num_frames, height, width), jnp.float32)
    encode = working(lambda s, v: encode_video(nnx.merge(vae_def, s), v), vae_state, video) if preset.i2v else 0

    b = {"dit": tree_bytes(weights) * preset.experts, "expert": tree_bytes(weights),
         "text": tree_bytes(text_state), "vae": tree_bytes(vae_state)}
    inputs = 2 * x.size * 4 + context.size * 2 + (cond.size * 2 if cond is not None else 0)  # x, eps, context, cond
    work = {"text_encode": text, "image_encode": encode, "diffusion": step + inputs, "vae_decode": decode}

    def peak(keep_text: bool, offload: bool) -> int:
        """Resident weights + the largest stage; offloaded, one expert is on the device during the steps only."""
        resident = b["vae"] + (b["text"] if keep_text else 0)
        dit = {k: (b["expert"] if k == "diffusion" else 0) if offload else b["dit"] for k in work}
        text_stage = resident + dit["text_encode"] + (0 if keep_text else b["text"]) + work["text_encode"]
        return max(text_stage, *(resident + dit[k] + w for k, w in work.items() if k != "text_encode"))

    rows = {"generate": peak(False, False), "serve": peak(True, False),
            "generate, offload": peak(False, True), "serve, offload": peak(True, True)}
    return {"preset": preset, "size": (height, width), "bytes": b, "working": work, "peak": rows}


def markdown(results: list[dict]) -> str:
    lines = ["| preset | DiT weights | umT5 / VAE weights | working: umT5, image encode, DiT step, VAE decode | "
             "peak, generate | peak, serve |", "|---|---|---|---|---|---|"]
    for r in results:
        b, w, p = r["bytes"], r["working"], r["peak"]
        dit = f"{b['dit'] / GB:.1f}" + (f" (2 x {b['expert'] / GB:.1f})" if r["preset"].experts == 2 else "")
        work = ", ".join(f"{w[k] / GB:.1f}" if w[k] else "-" for k in ("text_encode", "image_encode", "diffusion",
                                                                         "vae_decode"))
        gen = f"{p['generate'] / GB:.1f} (offload: {p['generate, offload'] / GB:.1f})"
        serve = f"{p['serve'] / GB:.1f} (offload: {p['serve, offload'] / GB:.1f})"
        lines.append(f"| {r['preset'].name} ({r['size'][1]}x{r['size'][0]}) | {dit} | {b['text'] / GB:.1f} / "
                     f"{b['vae'] / GB:.2f} | {work} | {gen} | {serve} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--samples", type=int, default=1)
    args = parser.parse_args(argv)
    with jax.default_device(jax.devices("cpu")[0]):
        results = [estimate(p, args.frames, args.samples) for p in PRESETS]
    print(f"GB = 1e9 bytes; {args.frames} frames, {args.samples} sample(s); estimated from CPU compiles")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
