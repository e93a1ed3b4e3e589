"""The DiT's building blocks against direct transcriptions of the spec's formulas (wan-model.md 2-3)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from turbojax.models import layers


def test_patchify_is_channel_outermost_row_major_tokens():
    rng = np.random.default_rng(0)
    b, c, t, h, w = 2, 3, 2, 4, 6
    x = rng.normal(size=(b, c, t, h, w)).astype(np.float32)
    tok = np.asarray(layers.patchify(jnp.asarray(x), (1, 2, 2)))
    hp, wp = h // 2, w // 2
    for f in range(t):
        for i in range(hp):
            for j in range(wp):
                ell = (f * hp + i) * wp + j
                for ch in range(c):
                    for kh in range(2):
                        for kw in range(2):
                            assert tok[1, ell, ch * 4 + kh * 2 + kw] == x[1, ch, f, 2 * i + kh, 2 * j + kw]


def test_unpatchify_is_channel_innermost():
    rng = np.random.default_rng(1)
    grid, c = (2, 2, 3), 5
    y = rng.normal(size=(1, 12, 4 * c)).astype(np.float32)
    out = np.asarray(layers.unpatchify(jnp.asarray(y), grid, (1, 2, 2), c))
    assert out.shape == (1, c, 2, 4, 6)
    for f in range(2):
        for i in range(2):
            for j in range(3):
                ell = (f * 2 + i) * 3 + j
                for kh in range(2):
                    for kw in range(2):
                        for ch in range(c):
                            assert out[0, ch, f, 2 * i + kh, 2 * j + kw] == y[0, ell, (kh * 2 + kw) * c + ch]


def test_rope_pairs_split_22_21_21():
    assert layers.rope_axis_pairs(128) == (22, 21, 21)
    assert layers.rope_axis_pairs(12) == (2, 2, 2)


def test_rope_tables_match_formula():
    grid = (3, 4, 5)
    cos, sin = (np.asarray(t) for t in layers.rope_tables(grid, 128))
    assert cos.shape == (60, 64) and cos.dtype == np.float32
    f, h, w = 2, 3, 1
    ell = (f * 4 + h) * 5 + w
    expect = np.concatenate([
        f * 10000.0 ** (-2 * np.arange(22) / 44),
        h * 10000.0 ** (-2 * np.arange(21) / 42),
        w * 10000.0 ** (-2 * np.arange(21) / 42),
    ])
    np.testing.assert_allclose(cos[ell], np.cos(expect).astype(np.float32), rtol=0, atol=1e-7)
    np.testing.assert_allclose(sin[ell], np.sin(expect).astype(np.float32), rtol=0, atol=1e-7)


def test_apply_rope_rotates_interleaved_pairs():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 6, 2, 12)).astype(np.float32)
    cos, sin = layers.rope_tables((1, 2, 3), 12)
    out = np.asarray(layers.apply_rope(jnp.asarray(x), cos, sin))
    cos, sin = np.asarray(cos), np.asarray(sin)
    xr, xi = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None], sin[None, :, None]
    np.testing.assert_allclose(out[..., 0::2], xr * c - xi * s, atol=1e-6)
    np.testing.assert_allclose(out[..., 1::2], xr * s + xi * c, atol=1e-6)


def test_timestep_sinusoid_is_float64_cos_first():
    t = np.array([988.0, 0.5], np.float32)
    out = np.asarray(layers.timestep_sinusoid(jnp.asarray(t), 256))
    arg = t.astype(np.float64)[:, None] * np.power(10000.0, -np.arange(128) / 128)[None]
    np.testing.assert_array_equal(out, np.concatenate([np.cos(arg), np.sin(arg)], 1).astype(np.float32))


def test_layer_norm_affine_and_plain():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 16)).astype(np.float32) * 3 + 1
    w, b = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(layers.layer_norm(jnp.asarray(x), 1e-6)), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layers.layer_norm(jnp.asarray(x), 1e-6, w, b)), ref * w + b, atol=1e-5)


@pytest.mark.parametrize("stock", [False, True])
def test_rms_norm_rounding(stock):
    """TurboDiffusion: bf16(norm(x) * w), one rounding. Stock Wan: bf16(norm(x)) * w, kept fp32."""
    rng = np.random.default_rng(4)
    bf16 = ml_dtypes.bfloat16
    x = rng.normal(size=(3, 64)).astype(bf16).astype(np.float32)
    w = (1 + 0.3 * rng.normal(size=64)).astype(np.float32)
    normed = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    if stock:
        ref = normed.astype(bf16).astype(np.float32) * w
        out = layers.rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w), 1e-6, jnp.float32, jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6)
    else:
        ref = (normed * w).astype(bf16)
        out = layers.rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w), 1e-6, jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(out).astype(np.float32), ref.astype(np.float32))


def test_linear_rounds_once_after_bias():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 32)).astype(ml_dtypes.bfloat16)
    w = rng.normal(size=(8, 32)).astype(ml_dtypes.bfloat16)
    b = rng.normal(size=8).astype(ml_dtypes.bfloat16)
    out = layers.linear(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), jnp.bfloat16)
    ref = (x.astype(np.float64) @ w.astype(np.float64).T + b.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out), ref.astype(ml_dtypes.bfloat16))
