"""turbojax: TurboDiffusion's accelerated Wan video diffusion in JAX.

    import turbojax
    pipe = turbojax.T2VPipeline.load(dit="ckpt/turbowan-1.3b", text_encoder="ckpt/umt5", vae="ckpt/wan21-vae")
    pipe("A cat walks along a neon-lit street at night.", seed=0).save("out/cat.mp4")

The parts, for finer control:
    dit = turbojax.load_dit("ckpt/TurboWan2.1-T2V-1.3B")          # a folder written by turbojax-convert
    sampler = turbojax.RCMSampler(dit, schedule=turbojax.RCMSchedule(num_steps=4, sigma_max=80))
    latents = sampler(context, latent_shape=(1, 16, 21, 60, 104), seed=0)
    context = turbojax.load_text_encoder("ckpt/umt5").encode(["A cat ..."])   # [B, 512, 4096] bf16
    video = turbojax.load_vae("ckpt/wan21-vae").decode(turbojax.denormalize_latents(latents))
    turbojax.save_video("out.mp4", video)
"""

from turbojax.checkpoint import CheckpointFormatError, load_dit, load_vae
from turbojax.models.attention import AttentionSpec
from turbojax.models.config import PRESETS, WanConfig, get_preset, param_count
from turbojax.models.wan_dit import WanDiT
from turbojax.models.umt5 import UMT5Config, UMT5Encoder
from turbojax.models.vae import VAEConfig, WanVAE, denormalize_latents, normalize_latents
from turbojax.pipelines import I2VPipeline, T2VPipeline, Video
from turbojax.sampling import RCMSampler, RCMSchedule, draw_noise, sample
from turbojax.text import TextEncoder, UMT5Tokenizer, load_text_encoder
from turbojax.video import image_to_video, load_image, save_video, to_uint8

__all__ = [
    "AttentionSpec",
    "CheckpointFormatError",
    "I2VPipeline",
    "PRESETS",
    "RCMSampler",
    "RCMSchedule",
    "T2VPipeline",
    "TextEncoder",
    "UMT5Config",
    "UMT5Encoder",
    "UMT5Tokenizer",
    "VAEConfig",
    "Video",
    "WanConfig",
    "WanDiT",
    "WanVAE",
    "denormalize_latents",
    "draw_noise",
    "get_preset",
    "image_to_video",
    "load_dit",
    "load_image",
    "load_text_encoder",
    "load_vae",
    "normalize_latents",
    "param_count",
    "sample",
    "save_video",
    "to_uint8",
]
