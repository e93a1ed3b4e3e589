"""Fused norm kernels (pallas_kernels/norms): every implementation against an independent NumPy transcription of
the spec, the kernels also against the reference, the reference against the DiT's op-by-op lines, the fused
quantiser against the W8A8 quantiser of the norm's output, the input checks and the benchmark's CPU run.

On CPU the Pallas-Triton kernels run in interpret mode; on a GPU the same cases run compiled
(`pytest -m "gpu or not gpu" tests/test_norm_kernels.py`), plus the `gpu`-marked test at a real shape.

Tolerance. Every implementation computes the spec's formula in the same order, but sums reduce in different trees
and a compiler may contract a multiply and an add (FMA), so fp32 values can differ in the last bits, and
a value next to a rounding boundary can round to the neighbouring bf16. So: every element within one unit in the
last place of the output dtype (plus fp32 noise of the largest value, for results that cancel to near zero), and at
most MISMATCH of the bf16 elements not equal. Measured on CPU: 0 to 4e-4 of them differ. A wrong rounding flow (a
rounding missing or added) changes 7-30% of them (`test_the_tolerance_rejects_wrong_rounding_flows`).
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int8_matmul, norms
from pallas_kernels.norms import reference, triton
from turbojax.models import layers

ON_GPU = jax.default_backend() == "gpu"
IMPLS = ["reference", "triton"]
MISMATCH = 2e-3
FP32_NOISE = 1e-6
EPS = 1e-6
bf16, f32 = jnp.bfloat16, jnp.float32
# (B, L, C): both Wan widths at a few tokens (ragged row blocks where block_rows > 1), and a narrow one with many.
SHAPES = [(2, 5, 1536), (2, 3, 5120), (3, 37, 96)]
# TurboDiffusion: bf16 residual, the norm rounded to bf16 before the modulation. Stock Wan: fp32 residual, the norm
# kept fp32. The head: bf16 residual, fp32 out.
LN_FLOWS = {"turbo": (bf16, bf16, bf16), "stock": (f32, None, bf16), "head": (bf16, bf16, f32)}  # x, normed, out
# q/k RMSNorm: (norm_dtype, round_before_weight); the result is bf16 either way.
RMS_FLOWS = {"turbo": (bf16, None), "stock": (f32, bf16)}


def _call(fn, impl, *args, **kw):
    return fn(*args, implementation=impl, interpret=not ON_GPU, **kw)


def _inputs(seed: int, b: int, l: int, c: int, dtype=bf16):
    """x with a per-row offset and spread (as a residual stream has), one modulation row per sample."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, l, c)) * rng.uniform(0.5, 4, size=(b, l, 1)) + rng.normal(size=(b, l, 1))
    shift, scale = (jnp.asarray(0.5 * rng.normal(size=(b, c)), f32) for _ in range(2))
    return jnp.asarray(x, dtype), shift, scale


def _channel_vectors(seed: int, c: int):
    rng = np.random.default_rng(seed)
    return jnp.asarray(1 + 0.2 * rng.normal(size=c), f32), jnp.asarray(0.1 * rng.normal(size=c), f32)


def mismatch(out, ref, noise: float = FP32_NOISE) -> tuple[float, float]:
    """(fraction of elements that differ, largest difference in units of the tolerance): one unit in the last place
    of ref's dtype at the element, plus FP32_NOISE of ref's largest value (cancellation in `+ shift` turns fp32
    noise of the terms into a large relative error of a result near zero)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    a, b = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    big = np.maximum(np.maximum(np.abs(a), np.abs(b)), np.finfo(np.float32).tiny)
    allowed = 2.0 ** (np.floor(np.log2(big)) - jnp.finfo(ref.dtype).nmant) + noise * np.abs(b).max()
    return float(np.mean(a != b)), float(np.max(np.abs(a - b) / allowed))


def assert_matches(out, ref, noise: float = FP32_NOISE):
    """Within the tolerance everywhere; a bf16/fp16 result also equal in all but MISMATCH of its elements (in fp32
    most elements may differ in their last bits)."""
    frac, units = mismatch(out, ref, noise)
    assert units <= 1, f"a difference of {units:.1f} x the tolerance"
    assert ref.dtype == f32 or frac <= MISMATCH, f"{frac:.2e} of elements differ"


# --- the reference is the DiT's arithmetic ---------------------------------------------------------------------

def test_reference_is_block_forwards_op_by_op_arithmetic():
    """The fused references equal the lines of wan_dit.block_forward they replace, evaluated op by op."""
    x, shift, scale = _inputs(0, 2, 6, 48)
    w, bias = _channel_vectors(1, 48)
    cos, sin = layers.rope_tables((1, 2, 3), 16)
    with jax.disable_jit():
        for x_dtype, normed, out in LN_FLOWS.values():
            xd = x.astype(x_dtype)
            want = layers.modulate(layers.layer_norm(xd, EPS).astype(normed or x_dtype), shift, scale, out)
            got = reference.layer_norm_modulate(xd, shift, scale, eps=EPS, out_dtype=out, normed_dtype=normed)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        want = layers.layer_norm(x, EPS, w, bias).astype(bf16)
        np.testing.assert_array_equal(np.asarray(reference.layer_norm_affine(x, w, bias, eps=EPS, out_dtype=bf16)),
                                      np.asarray(want))
        for norm_dtype, rbw in RMS_FLOWS.values():
            normed = layers.rms_norm(x, w, EPS, norm_dtype, rbw)
            want = layers.apply_rope(normed.reshape(2, 6, 3, 16), cos, sin).astype(bf16)
            got = reference.rms_norm_rope(x, w, cos, sin, eps=EPS, out_dtype=bf16, head_dim=16, norm_dtype=norm_dtype,
                                          round_before_weight=rbw)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_the_tolerance_rejects_wrong_rounding_flows():
    """Each wrong flow (a rounding dropped, or the other family's) is far outside MISMATCH: the kernel tests below
    can tell a right flow from a wrong one."""
    x, shift, scale = _inputs(2, 2, 5, 1536)
    w, _ = _channel_vectors(3, 1536)
    cos, sin = layers.rope_tables((1, 1, 5), 128)
    ln = functools.partial(reference.layer_norm_modulate, x, shift, scale, eps=EPS, out_dtype=bf16)
    rms = functools.partial(reference.rms_norm_rope, x, w, cos, sin, eps=EPS, out_dtype=bf16, head_dim=128)
    pairs = [
        (ln(normed_dtype=bf16), ln(normed_dtype=None)),
        (rms(norm_dtype=bf16), rms(norm_dtype=f32)),
        (rms(norm_dtype=f32, round_before_weight=bf16), rms(norm_dtype=f32)),
        (rms(norm_dtype=bf16), rms(norm_dtype=f32, round_before_weight=bf16)),
    ]
    for right, wrong in pairs:
        assert mismatch(wrong, right)[0] > 30 * MISMATCH


# --- every implementation against an independent NumPy transcription of the spec ------------------------------
# Each implementation must match the transcription within the tolerance; the kernels must also match the reference.

def _np(v) -> np.ndarray:
    return np.asarray(v, np.float32)


def _np_round(v: np.ndarray, dtype) -> np.ndarray:
    """fp32 -> dtype (round to nearest even) -> fp32; dtype None or fp32 leaves v as it is."""
    return v if dtype is None else v.astype(jnp.dtype(dtype)).astype(np.float32)


def np_layer_norm(x, eps: float) -> np.ndarray:
    """acceleration.md 6, op by op in fp32: (x - mean) * (1 / sqrt(var + eps)), biased variance."""
    x = _np(x)
    d = x - x.mean(-1, keepdims=True, dtype=np.float32)
    return d * (np.float32(1) / np.sqrt((d * d).mean(-1, keepdims=True, dtype=np.float32) + np.float32(eps)))


def np_layer_norm_modulate(x, shift, scale, *, eps, out_dtype, normed_dtype=None, round_normed=True):
    """wan-model.md 4.1: out_dtype(n * (1 + scale) + shift), n the norm, rounded to normed_dtype where asked."""
    n = np_layer_norm(x, eps)
    n = _np_round(n, normed_dtype if round_normed else None)
    return (n * (1 + _np(scale)[:, None]) + _np(shift)[:, None]).astype(jnp.dtype(out_dtype))


def np_rms_norm_rope(x, w, cos=None, sin=None, *, eps, out_dtype, head_dim=None, norm_dtype=None,
                     round_before_weight=None):
    """x * (1 / sqrt(mean(x^2) + eps)) * w (rounded before * w for stock Wan), then RoPE on interleaved pairs
    (wan-model.md 3) in fp32 on the norm's result rounded to norm_dtype."""
    x = _np(x)
    y = x * (np.float32(1) / np.sqrt((x * x).mean(-1, keepdims=True, dtype=np.float32) + np.float32(eps)))
    y = _np_round(y, round_before_weight) * _np(w)
    if cos is None:
        return y.astype(jnp.dtype(out_dtype))
    b, l, c = x.shape
    pairs = _np_round(y, norm_dtype or out_dtype).reshape(b, l, c // head_dim, head_dim // 2, 2)
    cs, sn = _np(cos)[None, :, None], _np(sin)[None, :, None]
    re, im = pairs[..., 0] * cs - pairs[..., 1] * sn, pairs[..., 0] * sn + pairs[..., 1] * cs
    return np.stack([re, im], -1).reshape(b, l, c // head_dim, head_dim).astype(jnp.dtype(out_dtype))


def _check(impl, out, reference_out, transcription):
    assert_matches(out, jnp.asarray(transcription))
    if impl != "reference":
        assert_matches(out, reference_out)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flow", list(LN_FLOWS))
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm_modulate(impl, flow, shape):
    x_dtype, normed, out = LN_FLOWS[flow]
    x, shift, scale = _inputs(4, *shape, dtype=x_dtype)
    kw = dict(eps=EPS, out_dtype=out, normed_dtype=normed)
    _check(impl, _call(norms.layer_norm_modulate, impl, x, shift, scale, **kw),
           reference.layer_norm_modulate(x, shift, scale, **kw), np_layer_norm_modulate(x, shift, scale, **kw))


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_round_normed_flag(impl):
    """Stock Wan's block 0 rounds the norm, the other blocks do not: a traced flag (the scan's block index) picks
    the rounding at run time, under jit."""
    x, shift, scale = _inputs(5, 2, 9, 256, f32)
    kw = dict(eps=EPS, out_dtype=bf16, normed_dtype=bf16)
    run = jax.jit(lambda flag: _call(norms.layer_norm_modulate, impl, x, shift, scale, round_normed=flag, **kw))
    for flag in (True, False):
        _check(impl, run(jnp.asarray(flag)), reference.layer_norm_modulate(x, shift, scale, round_normed=flag, **kw),
               np_layer_norm_modulate(x, shift, scale, round_normed=flag, **kw))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm_affine(impl, shape):
    x, _, _ = _inputs(6, *shape)
    w, bias = _channel_vectors(7, shape[2])
    out = _call(norms.layer_norm_affine, impl, x, w, bias, eps=EPS, out_dtype=bf16)
    _check(impl, out, reference.layer_norm_affine(x, w, bias, eps=EPS, out_dtype=bf16),
           (np_layer_norm(x, EPS) * _np(w) + _np(bias)).astype(jnp.dtype(bf16)))


def _rope(shape):
    """cos/sin for L tokens on a (1, 1, L) grid (every pair group rotates) and the head dim: 128 for the Wan
    widths, 16 for the narrow one."""
    head_dim = 128 if shape[2] % 128 == 0 else 16
    return (*layers.rope_tables((1, 1, shape[1]), head_dim), head_dim)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flow", list(RMS_FLOWS))
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm_rope(impl, rope, flow, shape):
    norm_dtype, rbw = RMS_FLOWS[flow]
    x, _, _ = _inputs(8, *shape)
    w, _ = _channel_vectors(9, shape[2])
    cos, sin, head_dim = _rope(shape) if rope else (None, None, None)
    kw = dict(eps=EPS, out_dtype=bf16, head_dim=head_dim, norm_dtype=norm_dtype, round_before_weight=rbw)
    _check(impl, _call(norms.rms_norm_rope, impl, x, w, cos, sin, **kw), reference.rms_norm_rope(x, w, cos, sin, **kw),
           np_rms_norm_rope(x, w, cos, sin, **kw))


@pytest.mark.parametrize("impl", IMPLS)
def test_row_blocks_past_the_last_token(impl):
    """block_rows 4 over L = 7: the last block of each sample is ragged (the default puts one row of 5120 in a
    program)."""
    x, shift, scale = _inputs(10, 2, 7, 5120)
    w, _ = _channel_vectors(11, 5120)
    cos, sin, hd = _rope(x.shape)
    cfg = dict(config=norms.NormConfig(block_rows=4, num_warps=8)) if impl == "triton" else {}
    ln = dict(eps=EPS, out_dtype=bf16, normed_dtype=bf16)
    rms = dict(eps=EPS, out_dtype=bf16, head_dim=hd)
    _check(impl, _call(norms.layer_norm_modulate, impl, x, shift, scale, **ln, **cfg),
           reference.layer_norm_modulate(x, shift, scale, **ln), np_layer_norm_modulate(x, shift, scale, **ln))
    _check(impl, _call(norms.rms_norm_rope, impl, x, w, cos, sin, **rms, **cfg),
           reference.rms_norm_rope(x, w, cos, sin, **rms), np_rms_norm_rope(x, w, cos, sin, **rms))


# --- the fused W8A8 quantiser ------------------------------------------------------------------------------------

# (B, L, C): a tile over 3 samples (L < 128), tiles over 2 samples with ragged rows, the 14B width.
QUANT_SHAPES = [(3, 37, 256), (2, 130, 1536), (1, 5, 5120)]


@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_quantize_is_the_quantiser_of_the_norms_output(impl, shape):
    """Bit for bit what the W8A8 quantiser makes of the same implementation's layer_norm_modulate output."""
    x, shift, scale = _inputs(12, *shape)
    kw = dict(eps=EPS, out_dtype=bf16, normed_dtype=bf16)
    q, s = _call(norms.layer_norm_modulate_quantize, impl, x, shift, scale, **kw)
    y = _call(norms.layer_norm_modulate, impl, x, shift, scale, **kw)
    # The same implementation's quantiser: on a GPU the reference's runs on XLA, whose fp32 division is not
    # correctly rounded, and moves near-tie codes against the Triton kernel's (tests/test_int8_matmul.py).
    want_q, want_s = int8_matmul.quantize_blockwise(y.reshape(-1, shape[2]),
                                                    implementation="reference" if impl == "reference" else None)
    assert q.dtype == jnp.int8 and q.shape == (shape[0] * shape[1], shape[2])
    np.testing.assert_array_equal(np.asarray(q), np.asarray(want_q))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(want_s))
    assert_quantized_close(q, s, np_layer_norm_modulate(x, shift, scale, **kw).reshape(-1, shape[2]))


def assert_quantized_close(q, s, y_expected):
    """(q, s) against the quantiser applied to an independently computed y: a bf16 value one ulp off moves its q,
    and as a tile's amax the tile's scale, by at most one step."""
    want_q, want_s = int8_matmul.quantize_blockwise(jnp.asarray(y_expected))
    assert np.abs(np.asarray(q, np.int32) - np.asarray(want_q, np.int32)).max() <= 1
    assert np.mean(np.asarray(q) != np.asarray(want_q)) <= MISMATCH
    np.testing.assert_allclose(np.asarray(s), np.asarray(want_s), rtol=2.0**-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_quantize_with_traced_flag_and_stock_rows(impl):
    """Stock Wan's fp32 residual with the block-0 flag, traced, against the NumPy transcription."""
    x, shift, scale = _inputs(13, 2, 130, 256, f32)
    kw = dict(eps=EPS, normed_dtype=bf16)
    for flag in (True, False):
        q, s = jax.jit(lambda f: _call(norms.layer_norm_modulate_quantize, impl, x, shift, scale, round_normed=f,
                                       **kw))(jnp.asarray(flag))
        y = np_layer_norm_modulate(x, shift, scale, out_dtype=bf16, round_normed=flag, **kw)
        assert_quantized_close(q, s, y.reshape(-1, 256))


# --- the Wan VAE's RMS_norm + SiLU over [cached frames, chunk] -------------------------------------------------

def np_vae_norm_silu(x, gamma, prefix=None, bias=None):
    """The spec's VAE norm in NumPy fp64 from the inputs as stored: x + bias rounded to x's dtype, the prefix
    before it in time, F.normalize over the channels * sqrt(C) * gamma, SiLU."""
    xs = np.asarray(x, np.float64)
    if bias is not None:
        xs = np.asarray(jnp.asarray(xs + np.asarray(bias, np.float64), f32).astype(x.dtype), np.float64)
    if prefix is not None:
        xs = np.concatenate([np.asarray(prefix, np.float64), xs], axis=1)
    norm = np.maximum(np.sqrt(np.sum(xs * xs, axis=-1, keepdims=True)), 1e-12)
    y = xs / norm * np.sqrt(xs.shape[-1]) * np.asarray(gamma, np.float64)
    return y / (1 + np.exp(-y))


# (B, T, H, W, C, P): the decoder's widths 96 (4 frames) and 384 (1 frame, 2 samples) after a 2-frame cache, and a
# width one short of 96 without a cache; H * W = 35 or 12 is ragged against the row blocks.
VAE_SHAPES = [(1, 4, 5, 7, 96, 2), (2, 1, 3, 4, 384, 2), (1, 2, 5, 7, 95, 0)]


@pytest.mark.parametrize("shape", VAE_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [bf16, f32])
@pytest.mark.parametrize("impl", IMPLS)
def test_vae_rms_norm_silu(impl, dtype, with_bias, shape):
    b, t, h, w, c, p = shape
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.normal(size=(b, t, h, w, c)) * rng.uniform(0.5, 4, size=(b, t, h, w, 1)) + 1, dtype)
    prefix = jnp.asarray(rng.normal(size=(b, p, h, w, c)), dtype) if p else None
    gamma, bias = _channel_vectors(sum(shape), c)
    bias = bias if with_bias else None
    out = _call(norms.vae_rms_norm_silu, impl, x, gamma, out_dtype=dtype, prefix=prefix, bias=bias)
    assert out.shape == (b, p + t, h, w, c)
    assert_matches(out, jnp.asarray(np_vae_norm_silu(x, gamma, prefix, bias), f32).astype(dtype))


def test_vae_norm_refuses_mismatched_operands():
    x = jnp.zeros((1, 2, 3, 4, 8), bf16)
    gamma = jnp.ones((8,), f32)
    for impl in IMPLS:
        with pytest.raises(ValueError, match=r"prefix must be x's frames before it"):
            _call(norms.vae_rms_norm_silu, impl, x, gamma, out_dtype=bf16, prefix=jnp.zeros((1, 2, 3, 5, 8), bf16))
        with pytest.raises(ValueError, match=r"bias must be \[C\] = \[8\]"):
            _call(norms.vae_rms_norm_silu, impl, x, gamma, out_dtype=bf16, bias=jnp.ones((4,), f32))


# --- input checks ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_are_refused_with_the_fix(impl):
    x, shift, scale = _inputs(14, 2, 4, 64)
    w, bias = _channel_vectors(15, 64)
    cos, sin = layers.rope_tables((1, 1, 4), 16)
    call = functools.partial(_call, impl=impl)
    with pytest.raises(ValueError, match=r"\[B, L, C\]"):
        call(norms.layer_norm_modulate, x=x[0], shift=shift, scale=scale, eps=EPS, out_dtype=bf16)
    with pytest.raises(ValueError, match=r"squeeze the \[B, 1, C\]"):
        call(norms.layer_norm_modulate, x=x, shift=shift[:, None], scale=scale, eps=EPS, out_dtype=bf16)
    with pytest.raises(ValueError, match=r"bias must be \[C\]"):
        call(norms.layer_norm_affine, x=x, weight=w, bias=bias[:8], eps=EPS, out_dtype=bf16)
    with pytest.raises(ValueError, match=r"cos must be \[L, head_dim / 2\]"):
        call(norms.rms_norm_rope, x=x, weight=w, cos=cos[:, :4], sin=sin, eps=EPS, out_dtype=bf16, head_dim=16)
    with pytest.raises(ValueError, match="head_dim must be even and divide"):
        call(norms.rms_norm_rope, x=x, weight=w, cos=cos, sin=sin, eps=EPS, out_dtype=bf16, head_dim=24)
    with pytest.raises(ValueError, match="cos, sin and head_dim together"):
        call(norms.rms_norm_rope, x=x, weight=w, cos=cos, eps=EPS, out_dtype=bf16, head_dim=16)
    with pytest.raises(TypeError, match="out_dtype must be one of them"):
        call(norms.layer_norm_modulate_quantize, x=x, shift=shift, scale=scale, eps=EPS, out_dtype=f32)


def test_dispatch_and_config_rules():
    x, shift, scale = _inputs(16, 1, 4, 96)
    with pytest.raises(ValueError, match="unknown norm implementation 'xla'"):
        norms.layer_norm_modulate(x, shift, scale, eps=EPS, out_dtype=bf16, implementation="xla")
    assert norms.default_implementation() == ("triton" if ON_GPU else "reference")
    with pytest.raises(ValueError, match="block_rows must be a power of two"):
        norms.NormConfig(block_rows=3)
    with pytest.raises(ValueError, match="num_warps must be"):
        norms.NormConfig(num_warps=3)
    assert norms.NormConfig().rows_and_warps(1536) == (2, 8) and norms.NormConfig().rows_and_warps(5120) == (1, 8)
    w, _ = _channel_vectors(17, 96)
    cos, sin = layers.rope_tables((1, 1, 4), 48)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        norms.rms_norm_rope(x, w, cos, sin, eps=EPS, out_dtype=bf16, head_dim=48, implementation="triton",
                            interpret=True)


def test_default_dispatch_falls_back_to_the_reference_for_rope_the_kernel_cannot_tile(monkeypatch):
    """Where the kernel is the default (GPUs) but head_dim is not a power of two (the tiny test DiTs' 12), the
    dispatcher runs the reference instead of refusing; asked for explicitly, the kernel still refuses (above)."""
    x, _, _ = _inputs(18, 1, 4, 96)
    w, _ = _channel_vectors(19, 96)
    cos, sin = layers.rope_tables((1, 1, 4), 48)
    monkeypatch.setattr(norms, "default_implementation", lambda: "triton")
    out = norms.rms_norm_rope(x, w, cos, sin, eps=EPS, out_dtype=bf16, head_dim=48)
    want = reference.rms_norm_rope(x, w, cos, sin, eps=EPS, out_dtype=bf16, head_dim=48)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


# --- the Triton kernels at the real shapes ---------------------------------------------------------------------

def _real_shape_calls(l: int, c: int, head_dim: int = 128):
    """(name, function, abstract operands) for every kernel at [1, l, c]."""
    spec = jax.ShapeDtypeStruct
    x, mod, vec, table = spec((1, l, c), bf16), spec((1, c), f32), spec((c,), f32), spec((l, head_dim // 2), f32)
    flag = spec((), jnp.bool_)
    ln = dict(eps=EPS, out_dtype=bf16, normed_dtype=bf16)
    return [
        ("layer_norm_modulate", functools.partial(triton.layer_norm_modulate, **ln), (x, mod, mod)),
        ("layer_norm_modulate, traced flag",
         lambda x, s, t, f: triton.layer_norm_modulate(x, s, t, round_normed=f, **ln), (x, mod, mod, flag)),
        ("layer_norm_affine", functools.partial(triton.layer_norm_affine, eps=EPS, out_dtype=bf16), (x, vec, vec)),
        ("rms_norm", functools.partial(triton.rms_norm_rope, eps=EPS, out_dtype=bf16), (x, vec)),
        ("rms_norm_rope", functools.partial(triton.rms_norm_rope, eps=EPS, out_dtype=bf16, head_dim=head_dim),
         (x, vec, table, table)),
        ("rms_norm_rope, stock", functools.partial(triton.rms_norm_rope, eps=EPS, out_dtype=bf16, head_dim=head_dim,
                                                   norm_dtype=f32, round_before_weight=bf16), (x, vec, table, table)),
        ("layer_norm_modulate_quantize", functools.partial(triton.layer_norm_modulate_quantize, **ln), (x, mod, mod)),
        ("layer_norm_modulate_quantize, traced flag",
         lambda x, s, t, f: triton.layer_norm_modulate_quantize(x, s, t, round_normed=f, **ln), (x, mod, mod, flag)),
        ("vae_rms_norm_silu", lambda x, g, b: triton.vae_rms_norm_silu(x.reshape(1, 1, l, c)[..., :96], g[:96],
                                                                        out_dtype=bf16, bias=b[:96]), (x, vec, vec)),
    ]


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("l, c", [(32760, 1536), (75600, 5120)])
def test_triton_kernels_lower_to_triton_ir_for_an_h100(l, c):
    """Every kernel lowers (Pallas -> Triton IR, every primitive supported) for an sm90 target at the real shapes,
    without a GPU: an abstract H100 stands in for the device. Compilation itself needs the GPU."""
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
    with jax.sharding.use_abstract_mesh(mesh):
        for name, fn, args in _real_shape_calls(l, c):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            assert "__gpu$xla.gpu.triton" in text, name


def _op_480p_1_3b(op: str):
    """(Triton output, jitted reference output) of one op at the 1.3B-480p shape: x [1, 32760, 1536], 12 heads of
    128, the 21 x 30 x 52 grid."""
    l, c = 32760, 1536
    x, shift, scale = _inputs(20, 1, l, c)
    w, bias = _channel_vectors(21, c)
    if op == "layer_norm_modulate":
        kw, args = dict(eps=EPS, out_dtype=bf16, normed_dtype=bf16), (x, shift, scale)
    elif op == "layer_norm_affine":
        kw, args = dict(eps=EPS, out_dtype=bf16), (x, w, bias)
    else:
        norm_dtype, rbw = RMS_FLOWS[op.split(":")[1]]
        cos, sin = layers.rope_tables((21, 30, 52), 128)
        kw = dict(eps=EPS, out_dtype=bf16, head_dim=128, norm_dtype=norm_dtype, round_before_weight=rbw)
        args, op = (x, w, cos, sin), "rms_norm_rope"
    return getattr(triton, op)(*args, **kw), jax.jit(functools.partial(getattr(reference, op), **kw))(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["layer_norm_modulate", "layer_norm_affine", "rms_norm_rope:turbo",
                                "rms_norm_rope:stock"])
def test_compiled_kernels_match_the_reference_at_480p_1_3b(op):
    assert ON_GPU, "run on a GPU: pytest -m gpu tests/test_norm_kernels.py"
    # Compiled, both sides contract multiply-adds into FMAs where they see fit, so an intermediate bf16 rounding
    # (the norm before modulation or RoPE) can land one bf16 ulp apart in a few elements; a near-zero result of
    # `(1 + scale) * n + shift` or of the rotation then carries that ulp of its terms, up to 2^-8 of the largest
    # value. So: within that everywhere, and (assert_matches) at most MISMATCH of the elements differ at all.
    # Measured on an H100 (2026-11-26): up to 4.2 x (1 ulp + 1e-4 of the largest value), in <= 7e-6 of elements.
    assert_matches(*_op_480p_1_3b(op), noise=2.0**-8)


@pytest.mark.gpu
def test_gpu_dit_with_fused_qk_norm_rope_matches_reference(monkeypatch):
    """A 2-block 1.3B DiT at 480p, bf16: the default kernels (the fused q/k RMSNorm + RoPE) against the pure-jnp
    norms, for both model families (stock Wan keeps the q/k norm in fp32 through RoPE)."""
    assert ON_GPU, "run on a GPU: pytest -m gpu tests/test_norm_kernels.py"
    import turbojax
    from flax import nnx

    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (1, 16, 21, 60, 104), jnp.bfloat16)
    ctx = jax.random.normal(keys[1], (1, 512, 4096), jnp.bfloat16)
    t = jnp.array([988.0])
    for family in ("turbodiffusion", "wan"):
        cfg = turbojax.get_preset("wan2.1-t2v-1.3b").replace(num_layers=2, family=family)
        dit = nnx.jit(lambda: turbojax.WanDiT(cfg, rngs=nnx.Rngs(0)))()
        out = np.asarray(nnx.jit(lambda m, *a: m(*a))(dit, x, t, ctx), np.float32)
        with monkeypatch.context() as mp:
            mp.setattr(norms, "default_implementation", lambda: "reference")
            ref = np.asarray(nnx.jit(lambda m, *a: m(*a))(dit, x, t, ctx), np.float32)
        assert np.abs(out - ref).max() <= 1e-2 * np.abs(ref).max(), family


@pytest.mark.gpu
def test_compiled_fused_quantiser_at_480p_1_3b():
    assert ON_GPU, "run on a GPU: pytest -m gpu tests/test_norm_kernels.py"
    l, c = 32760, 1536
    x, shift, scale = _inputs(20, 1, l, c)
    ln = dict(eps=EPS, out_dtype=bf16, normed_dtype=bf16)
    q, s = triton.layer_norm_modulate_quantize(x, shift, scale, **ln)
    want_q, want_s = int8_matmul.quantize_blockwise(triton.layer_norm_modulate(x, shift, scale, **ln).reshape(l, c),
                                                    implementation="triton")
    np.testing.assert_array_equal(np.asarray(q), np.asarray(want_q))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(want_s))


@pytest.mark.gpu
def test_compiled_vae_norm_at_720p():
    """The VAE decoder's full-resolution norm: 4 frames of 720 x 1280 x 96 after a 2-frame cache, with conv1's
    pending bias, compiled, against the jitted reference."""
    assert ON_GPU, "run on a GPU: pytest -m gpu tests/test_norm_kernels.py"
    rng = np.random.default_rng(30)
    x = jnp.asarray(rng.normal(size=(1, 4, 720, 1280, 96)), bf16)
    prefix = jnp.asarray(rng.normal(size=(1, 2, 720, 1280, 96)), bf16)
    gamma, bias = _channel_vectors(31, 96)
    kw = dict(out_dtype=bf16, prefix=prefix, bias=bias)
    ref = jax.jit(functools.partial(reference.vae_rms_norm_silu, **kw))(x, gamma)
    assert_matches(triton.vae_rms_norm_silu(x, gamma, **kw), ref, noise=1e-4)


def test_benchmark_runs_on_cpu_at_tiny_size(tmp_path, capsys):
    """The benchmark's CPU smoke run (interpreted kernels, times meaningless): every op gets a Triton row that
    agrees with the reference."""
    from pallas_kernels.norms.bench import main

    out = tmp_path / "bench.json"
    assert main(["--shapes", "1x9x128", "--interpret", "--calls", "1", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["table"]
    triton_rows = {r["op"]: r for r in rows if r["path"] == "Triton"}
    assert len(triton_rows) == 5 and all(r["frac_differ"] <= MISMATCH for r in triton_rows.values())
    assert "| 1 x 9 x 128 | copy |" in capsys.readouterr().out
