"""turbojax: TurboDiffusion's accelerated Wan video diffusion in JAX.

    import turbojax
    dit = turbojax.load_dit("ckpt/TurboWan2.1-T2V-1.3B")          # a folder written by turbojax-convert
    sampler = turbojax.RCMSampler(dit, schedule=turbojax.RCMSchedule(num_steps=4, sigma_max=80))
    latents = sampler(context, latent_shape=(1, 16, 21, 60, 104), seed=0)
"""

from turbojax.checkpoint import CheckpointFormatError, load_dit
from turbojax.models.attention import AttentionSpec
from turbojax.models.config import PRESETS, WanConfig, get_preset, param_count
from turbojax.models.wan_dit import WanDiT
from turbojax.sampling import RCMSampler, RCMSchedule, draw_noise, sample

__all__ = [
    "AttentionSpec",
    "CheckpointFormatError",
    "PRESETS",
    "RCMSampler",
    "RCMSchedule",
    "WanConfig",
    "WanDiT",
    "draw_noise",
    "get_preset",
    "load_dit",
    "param_count",
    "sample",
]
