"""A jitted rCM sampler bound to loaded DiTs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.sampling.rcm import RCMSchedule, draw_noise, sample


class RCMSampler:
    """The whole rCM loop as one jitted program over one DiT, or two experts (Wan2.2 A14B: high, low).

    Calling it with a new seed, prompt embedding or condition of the same shapes reuses the compiled program;
    the weights are arguments of that program, not constants baked into it.

        sampler = RCMSampler(dit, schedule=RCMSchedule(num_steps=4, sigma_max=80))
        latents = sampler(context, latent_shape=(1, 16, 21, 60, 104), seed=0)   # fp32 [B, 16, T, H, W]
    """

    def __init__(self, high: nnx.Module, low: nnx.Module | None = None, *, schedule: RCMSchedule = RCMSchedule()):
        self.schedule = schedule
        self._graphdefs, self._states = zip(*(nnx.split(m) for m in ((high,) if low is None else (high, low))))
        self._from_noise = jax.jit(self._program)
        self._from_key = jax.jit(self._program_key, static_argnums=(4,))

    def _program(self, states, noise, context, cond):
        models = [nnx.merge(g, s) for g, s in zip(self._graphdefs, states)]
        return sample(self.schedule, noise, context, cond, *models)

    def _program_key(self, states, key, context, cond, latent_shape):
        return self._program(states, draw_noise(key, self.schedule.num_steps, latent_shape), context, cond)

    def __call__(self, context, cond=None, *, seed: int | jax.Array = 0, noise=None, latent_shape=None):
        """context [B, 512, text_dim]; cond [B, 20, T, H, W] for I2V. Either noise [N+1, B, 16, T, H, W] (injected
        draws, e.g. to match a reference run) or latent_shape (B, 16, T, H, W) with a seed / jax.random key."""
        context = jnp.asarray(context)
        if noise is not None:
            return self._from_noise(self._states, jnp.asarray(noise), context, cond)
        if latent_shape is None:
            raise ValueError("pass latent_shape=(B, 16, T, H, W) (or noise=...) to sample")
        key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
        return self._from_key(self._states, key, context, cond, tuple(latent_shape))
