"""rCM few-step sampler (acceleration.md 2): TrigFlow schedule mapped to rectified-flow time, SDE or ODE updates.

The schedule is fixed by (num_steps, sigma_max), so it is static; the noise, the text context and the condition are
traced, so a new seed or prompt reuses the compiled program. The network sees bf16(fp32(t) * 1000) exactly like the
reference; the update rule uses the exact t. The sampler state is fp32 (the reference keeps float64; the difference
is a few fp32 ulps of a bf16 network's output).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

MID_TIMES = (1.5, 1.4, 1.0)  # TrigFlow times after the first, as shipped ("for better visual quality")
MODES = ("sde", "ode")


@dataclasses.dataclass(frozen=True)
class RCMSchedule:
    """num_steps in 1..4; sigma_max sets the first time t0 = sigma_max / (1 + sigma_max); boundary is the RF time
    below which a two-expert model (Wan2.2 A14B) switches to its low-noise expert."""

    num_steps: int = 4
    sigma_max: float = 80.0
    mode: str = "sde"
    boundary: float = 0.9

    def __post_init__(self):
        if self.num_steps not in (1, 2, 3, 4):
            raise ValueError(f"num_steps must be 1, 2, 3 or 4 (rCM is distilled for 1-4 steps), got {self.num_steps}")
        if not self.sigma_max >= 0.1:
            raise ValueError(f"sigma_max must be >= 0.1, got {self.sigma_max}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'sde' or 'ode', got {self.mode!r}")

    def rf_times(self) -> np.ndarray:
        """float64 [N+1]: t_i = sin s_i / (sin s_i + cos s_i) for s = [atan(sigma_max), *MID_TIMES[:N-1], 0]."""
        s = np.array([np.arctan(self.sigma_max), *MID_TIMES[: self.num_steps - 1], 0.0], dtype=np.float64)
        return np.sin(s) / (np.sin(s) + np.cos(s))

    def net_timesteps(self) -> np.ndarray:
        """fp32 [N]: the timestep the network sees at each step, bf16(fp32(t_i) * 1000) (988, 932, 852, 608 at 80)."""
        scaled = self.rf_times()[:-1].astype(np.float32) * np.float32(1000.0)
        return scaled.astype(ml_dtypes.bfloat16).astype(np.float32)

    def experts(self) -> list[str]:
        """Expert per step for two-expert models: 'high' until the first t_i < boundary, then 'low' for good."""
        t = self.rf_times()[:-1]
        low = np.cumsum(t < self.boundary) > 0
        return ["low" if x else "high" for x in low]


Denoiser = Callable[..., jax.Array]  # (x[B,C,T,H,W] bf16, timestep[B], context, cond) -> velocity fp32


def rcm_step(mode: str, denoiser: Denoiser, x, t_cur, t_next, net_t, eps, context, cond) -> jax.Array:
    """One rCM update of the state x [B, C, T, H, W] fp32 from RF time t_cur to t_next (fp32 scalars, traced or
    not): the net sees bf16(x) at timestep net_t; SDE re-noises x0 = x - t_cur v with eps [B, C, T, H, W], ODE
    takes an Euler step."""
    v = denoiser(x.astype(jnp.bfloat16), jnp.full((x.shape[0],), net_t), context, cond).astype(jnp.float32)
    if mode == "ode":
        return x - (t_cur - t_next) * v
    x0 = x - t_cur * v
    return (1.0 - t_next) * x0 + t_next * eps


def _steps(schedule: RCMSchedule, noise, context, cond, x, denoiser: Denoiser, step_ids: np.ndarray):
    """Runs the steps step_ids (static) of the schedule on state x [B, C, T, H, W] fp32 with one denoiser."""
    t = schedule.rf_times()
    t_cur = jnp.asarray(t[step_ids], jnp.float32)
    t_next = jnp.asarray(t[step_ids + 1], jnp.float32)
    net_t = jnp.asarray(schedule.net_timesteps()[step_ids])
    eps_next = noise[step_ids + 1]

    def step(x, per_step):
        return rcm_step(schedule.mode, denoiser, x, *per_step, context, cond), None

    return jax.lax.scan(step, x, (t_cur, t_next, net_t, eps_next))[0]


def sample(
    schedule: RCMSchedule,
    noise: jax.Array,
    context: jax.Array,
    cond: jax.Array | None,
    high: Denoiser,
    low: Denoiser | None = None,
) -> jax.Array:
    """The whole rCM loop; meant to run under jit.

    noise [N+1, B, 16, T, H, W]: noise[0] is the initial draw, noise[i+1] the re-noise of step i (the last is
    multiplied by t_N = 0, as in the reference). high is the only denoiser of one-expert models; with low given, the
    steps from the first t_i < boundary on use low. Returns fp32 latents [B, 16, T, H, W]."""
    n = schedule.num_steps
    if noise.shape[0] != n + 1:
        raise ValueError(f"noise must hold num_steps + 1 = {n + 1} draws on its first axis, got {noise.shape[0]}")
    t0 = float(schedule.rf_times()[0])
    x = t0 * noise[0].astype(jnp.float32)
    experts = np.array(schedule.experts()) if low is not None else np.array(["high"] * n)
    for name, denoiser in (("high", high), ("low", low)):
        ids = np.nonzero(experts == name)[0]
        if ids.size:
            x = _steps(schedule, noise, context, cond, x, denoiser, ids)
    return x


def draw_noise(key: jax.Array, num_steps: int, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal fp32 noise [num_steps + 1, *shape] from a jax.random key."""
    return jax.random.normal(key, (num_steps + 1, *shape), jnp.float32)
