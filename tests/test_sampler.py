"""rCM sampler: schedule values of the spec, the SDE/ODE algebra against a float64 transcription, seeds, experts."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import turbojax
from turbojax.sampling.rcm import RCMSchedule, sample


def test_rf_times_and_net_timesteps_sigma_80():
    s = RCMSchedule(num_steps=4, sigma_max=80)
    np.testing.assert_allclose(s.rf_times(), [0.98765432, 0.93378106, 0.85289539, 0.60897905, 0.0], atol=5e-9)
    np.testing.assert_array_equal(s.net_timesteps(), [988, 932, 852, 608])


@pytest.mark.parametrize("sigma_max, first", [(200, 996), (1600, 1000), (120, 992)])
def test_first_net_timestep(sigma_max, first):
    assert RCMSchedule(sigma_max=sigma_max).net_timesteps()[0] == first


@pytest.mark.parametrize("n, experts", [(4, "HHLL"), (3, "HHL"), (2, "HH"), (1, "H")])
def test_expert_switch_sigma_200(n, experts):
    got = RCMSchedule(num_steps=n, sigma_max=200).experts()
    assert "".join(e[0].upper() for e in got) == experts


@pytest.mark.parametrize("bad", [dict(num_steps=0), dict(num_steps=5), dict(sigma_max=0.05), dict(mode="euler")])
def test_invalid_schedule(bad):
    with pytest.raises(ValueError):
        RCMSchedule(**bad)


class Recorder:
    """A fake denoiser v = a * x + offset + 1e-3 t + mean(context), evaluated in NumPy on exactly the arrays the
    sampler hands it (a host callback, so XLA cannot fold away the bf16 rounding of x), recording each call."""

    def __init__(self, a, offset):
        self.a, self.offset, self.calls = a, offset, []

    def _numpy(self, x, timestep, context):
        x, timestep, context = np.asarray(x), np.asarray(timestep), np.asarray(context)
        self.calls.append((x.dtype, np.asarray(timestep)))
        v = self.a * x.astype(np.float64) + self.offset + 1e-3 * timestep[:, None, None, None, None]
        return (v + context.astype(np.float64).mean()).astype(np.float32)

    def __call__(self, x, timestep, context, cond):
        out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
        return jax.pure_callback(self._numpy, out, x, timestep, context)


def reference_sample(schedule, noise, high, low, context_mean):
    """Float64 transcription of acceleration.md 2.3 with the fake denoisers' closed form."""
    t = schedule.rf_times()
    net_t = schedule.net_timesteps().astype(np.float64)
    experts = schedule.experts() if low is not None else ["high"] * schedule.num_steps
    x = t[0] * noise[0].astype(np.float64)
    for i in range(schedule.num_steps):
        den = high if experts[i] == "high" else low
        xb = x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
        v = den.a * xb + den.offset + 1e-3 * net_t[i] + context_mean
        if schedule.mode == "ode":
            x = x - (t[i] - t[i + 1]) * v
        else:
            x = (1 - t[i + 1]) * (x - t[i] * v) + t[i + 1] * noise[i + 1]
    return x


@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize("two_experts", [False, True])
def test_update_algebra(mode, two_experts):
    schedule = RCMSchedule(num_steps=4, sigma_max=200, mode=mode)
    noise = np.random.default_rng(0).normal(size=(5, 2, 3, 2, 4, 4)).astype(np.float32)
    context = jnp.full((2, 8, 4), 0.25)
    high, low = Recorder(-0.5, 0.1), (Recorder(0.3, -0.2) if two_experts else None)
    out = jax.jit(lambda n, c: sample(schedule, n, c, None, high, low))(jnp.asarray(noise), context)
    ref = reference_sample(schedule, noise, high, low, 0.25)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5, atol=2e-5)
    assert out.dtype == jnp.float32
    calls = high.calls + (low.calls if low else [])
    assert all(dt == jnp.bfloat16 for dt, _ in calls)  # the net sees bf16(x)
    seen = sorted(float(t[0]) for _, t in calls)
    assert seen == sorted([996.0, 932.0, 852.0, 608.0])
    if two_experts:
        assert sorted(float(t[0]) for _, t in high.calls) == [932.0, 996.0]
        assert sorted(float(t[0]) for _, t in low.calls) == [608.0, 852.0]


def test_sde_last_noise_is_multiplied_away():
    schedule = RCMSchedule(num_steps=2)
    noise = np.random.default_rng(1).normal(size=(3, 1, 2, 1, 2, 2)).astype(np.float32)
    den = Recorder(0.2, 0.0)
    run = jax.jit(lambda n: sample(schedule, n, jnp.zeros((1, 4, 4)), None, den))
    a = run(jnp.asarray(noise))
    noise[2] = 1e3
    np.testing.assert_array_equal(np.asarray(run(jnp.asarray(noise))), np.asarray(a))


@pytest.fixture(scope="module")
def tiny_sampler():
    cfg = turbojax.get_preset("tiny")
    dit = turbojax.WanDiT(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    return turbojax.RCMSampler(dit, schedule=RCMSchedule(num_steps=4)), cfg


def test_seeds_and_no_recompile(tiny_sampler):
    sampler, cfg = tiny_sampler
    shape = (1, 16, 3, 4, 6)
    ctx = jax.random.normal(jax.random.key(0), (1, cfg.text_len, cfg.text_dim))
    a = sampler(ctx, seed=3, latent_shape=shape)
    b = sampler(ctx, seed=3, latent_shape=shape)
    c = sampler(ctx, seed=4, latent_shape=shape)
    d = sampler(ctx * 0.5, seed=3, latent_shape=shape)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(d))
    e = sampler(ctx, seed=np.int64(3), latent_shape=shape)  # numpy integers are seeds too
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    assert sampler._from_key._cache_size() == 1  # new seeds and prompts reuse the compiled program
    assert np.isfinite(np.asarray(a)).all() and a.shape == shape


def test_injected_noise_equals_seeded_noise(tiny_sampler):
    sampler, cfg = tiny_sampler
    shape = (1, 16, 3, 4, 6)
    ctx = jnp.ones((1, cfg.text_len, cfg.text_dim))
    noise = turbojax.draw_noise(jax.random.key(7), 4, shape)
    np.testing.assert_array_equal(np.asarray(sampler(ctx, noise=noise)),
                                  np.asarray(sampler(ctx, seed=jax.random.key(7), latent_shape=shape)))


def test_wrong_noise_count_is_an_error(tiny_sampler):
    sampler, cfg = tiny_sampler
    with pytest.raises(ValueError, match="num_steps"):
        sampler(jnp.ones((1, cfg.text_len, cfg.text_dim)), noise=jnp.zeros((3, 1, 16, 3, 4, 6)))
