"""W8A8 int8 linear (acceleration.md 5): the quantiser and the block-scaled GEMM of every implementation against an
independent NumPy transcription of the spec, the golden -quant fixture, the DiT with W8A8 block Linears,
`load_dit(linears=...)` and `turbojax-quantize`.

On CPU the Pallas-Triton kernels run in interpret mode; on a GPU the same cases run compiled
(`pytest -m "gpu or not gpu" tests/test_int8_matmul.py`), plus the `gpu`-marked tests at the benchmark's shapes.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import turbojax
from convert.cli import convert
from convert.pth import load_pth
from pallas_kernels import int8_matmul
from pallas_kernels.int8_matmul import mosaic, reference, triton
from turbojax import checkpoint
from turbojax.models import wan_dit
from turbojax.quantize import main as quantize_main
from turbojax.quantize import quantize_checkpoint

ON_GPU = jax.default_backend() == "gpu"
IMPLS = ["reference", "triton"]
FIXTURES = Path(__file__).parent / "fixtures" / "dit"
TURBO_PTH = FIXTURES / "turbo_t2v" / "turbo_t2v.pth"
QUANT_PTH = FIXTURES / "turbo_t2v_quant" / "turbo_t2v_quant.pth"
WAN_SIZES = [(1536, 1536), (1536, 8960), (8960, 1536), (5120, 5120), (5120, 13824), (13824, 5120)]  # (K, N)
BF16 = ml_dtypes.bfloat16


# --- independent NumPy transcription of acceleration.md 5.2 / 5.3 ------------------------------------------------

def np_quantize(x) -> tuple[np.ndarray, np.ndarray]:
    """Tile by tile in float32: amax = max(1e-8, max |x|) (a partial tile's missing elements would read 0, which
    never raises the max), q = clip(rint(x * (128 / amax)), -128, 127) (rint: half to even), scale = amax / 128."""
    x = np.asarray(x).astype(np.float32)
    m, k = x.shape
    q = np.empty((m, k), np.int8)
    s = np.empty((-(-m // 128), -(-k // 128)), np.float32)
    for i in range(0, m, 128):
        for j in range(0, k, 128):
            t = x[i:i + 128, j:j + 128]
            amax = np.maximum(np.float32(1e-8), np.abs(t).max())
            q[i:i + 128, j:j + 128] = np.clip(np.rint(t * (np.float32(128) / amax)), -128, 127)
            s[i // 128, j // 128] = amax / np.float32(128)
    return q, s


def np_dequantized_product(x_q, x_scale, w_q, w_scale) -> np.ndarray:
    """(x_q * sx) @ (w_q * sw)^T in float64: the GEMM without any rounding."""
    def deq(q, s):
        r, c = q.shape
        return np.asarray(q, np.float64) * np.repeat(np.repeat(np.asarray(s, np.float64), 128, 0), 128, 1)[:r, :c]
    return deq(x_q, x_scale) @ deq(w_q, w_scale).T


def _tiles_of_many_scales(seed: int, m: int, k: int, dtype=jnp.bfloat16) -> jax.Array:
    """N(0,1) values times one magnitude per 128 x 128 tile, from 2^-20 to 2^8, so tiles have distinct scales."""
    rng = np.random.default_rng(seed)
    mags = 2.0 ** rng.uniform(-20, 8, size=(-(-m // 128), -(-k // 128)))
    x = rng.standard_normal((m, k)) * np.repeat(np.repeat(mags, 128, 0), 128, 1)[:m, :k]
    return jnp.asarray(x, dtype)


def _quantize(impl, x):
    return int8_matmul.quantize_blockwise(x, implementation=impl, interpret=not ON_GPU)


def _gemm(impl, *args, **kw):
    return int8_matmul.int8_block_matmul(*args, implementation=impl, interpret=not ON_GPU, **kw)


def _random_operands(seed: int, m: int, k: int, n: int):
    rng = np.random.default_rng(seed)
    x_q = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    w_q = jnp.asarray(rng.integers(-128, 128, (n, k)), jnp.int8)
    x_scale = jnp.asarray(2.0 ** rng.uniform(-12, 2, (-(-m // 128), -(-k // 128))), jnp.float32)
    w_scale = jnp.asarray(2.0 ** rng.uniform(-12, 2, (-(-n // 128), -(-k // 128))), jnp.float32)
    return x_q, x_scale, w_q, w_scale


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- quantiser -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m, k", [(300, 260), (128, 256), (36, 24), (1, 1), (257, 129)])
@pytest.mark.parametrize("impl", IMPLS)
def test_quantizer_is_bit_exact(impl, m, k):
    x = _tiles_of_many_scales(m * 1000 + k, m, k)
    q, s = _quantize(impl, x)
    want_q, want_s = np_quantize(x)
    assert q.dtype == jnp.int8 and s.dtype == jnp.float32 and s.shape == want_s.shape
    np.testing.assert_array_equal(np.asarray(q), want_q)
    np.testing.assert_array_equal(np.asarray(s), want_s)


def np_gelu_tanh(x) -> np.ndarray:
    """GELU with the tanh approximation in float32, rounded to x's dtype (the FFN's activation)."""
    x32 = np.asarray(x).astype(np.float32)
    c = np.float32(np.sqrt(2.0 / np.pi))
    y = np.float32(0.5) * x32 * (np.float32(1.0) + np.tanh(c * (x32 + np.float32(0.044715) * x32 ** 3)))
    return np.asarray(jnp.asarray(y).astype(x.dtype))


def _check_near_codes(q, s, want_q, want_s):
    """Codes from two tanh implementations (ulp apart): a bf16 GELU value may round the other way, moving its code
    or its tile's amax by one step; everything else is equal."""
    q, want_q = np.asarray(q, np.int32), np.asarray(want_q, np.int32)
    assert np.abs(q - want_q).max() <= 1 and (q != want_q).mean() < 1e-3
    np.testing.assert_allclose(np.asarray(s), want_s, rtol=1e-2)
    assert (np.asarray(s) != want_s).mean() < 0.05


@pytest.mark.parametrize("m, k", [(300, 260), (128, 1536)])
@pytest.mark.parametrize("impl", IMPLS)
def test_quantizer_with_gelu_quantises_the_activated_input(impl, m, k):
    """activation="gelu_tanh" quantises GELU(x) rounded to x's dtype, in the quantiser's one pass: on the CPU bit
    for bit the quantiser of the materialised activation (the reference's and the interpreted kernel's), and near
    a numpy GELU's (another tanh); the activation is not a no-op."""
    x = (jnp.asarray(np.random.default_rng(m + k).standard_normal((m, k)) * 3.0)).astype(jnp.bfloat16)
    q, s = int8_matmul.quantize_blockwise(x, activation="gelu_tanh", implementation=impl, interpret=not ON_GPU)
    want_q, want_s = reference.quantize_blockwise(reference.activate(x, "gelu_tanh"))
    if ON_GPU:
        _check_near_codes(q, s, want_q, want_s)
    else:
        np.testing.assert_array_equal(np.asarray(q), np.asarray(want_q))
        np.testing.assert_array_equal(np.asarray(s), np.asarray(want_s))
    _check_near_codes(q, s, *np_quantize(np_gelu_tanh(x)))
    assert (np.asarray(q) != np_quantize(x)[0]).mean() > 0.3
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        int8_matmul.quantize_blockwise(x, activation="relu", implementation=impl, interpret=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_quantizer_fp16_input(impl):
    x = _tiles_of_many_scales(5, 200, 130, jnp.float16)
    q, s = _quantize(impl, x)
    want_q, want_s = np_quantize(x)
    np.testing.assert_array_equal(np.asarray(q), want_q)
    np.testing.assert_array_equal(np.asarray(s), want_s)


@pytest.mark.parametrize("impl", IMPLS)
def test_quantizer_saturates_plus_amax_to_127_and_maps_minus_amax_to_minus_128(impl):
    x = np.zeros((130, 256), np.float32)
    x[0, 0], x[5, 7], x[9, 9] = 3.0, -3.0, 1.5       # tile (0, 0): +amax and -amax
    x[0, 128], x[1, 129] = -6.0, 2.0                  # tile (0, 1): only -amax
    x[129, 200], x[128, 130] = 5.0, -1.25             # tile (1, 1), partial rows: only +amax
    q, s = _quantize(impl, jnp.asarray(x, jnp.bfloat16))
    q = np.asarray(q)
    assert (q[0, 0], q[5, 7], q[9, 9]) == (127, -128, 64)
    assert (q[0, 128], q[1, 129]) == (-128, 43)      # 2 * 128 / 6 = 42.67
    assert (q[129, 200], q[128, 130]) == (127, -32)
    np.testing.assert_array_equal(np.asarray(s), np.float32([[3 / 128, 6 / 128], [1e-8 / 128, 5 / 128]]))


@pytest.mark.parametrize("impl", IMPLS)
def test_quantizer_rounds_ties_to_even(impl):
    """Tile 0 has amax 128 (x * 128/amax = x), tile 1 amax 16 (x * 8): every x * (128/amax) is a half-integer."""
    halves = np.arange(-128, 128) + 0.5                                  # -127.5 ... 127.5
    x = np.zeros((128, 256), np.float32)
    x[:2, :128] = halves.reshape(2, 128)
    x[2, 0] = 128.0                                                       # the tile's amax
    x[0, 128:] = (np.arange(-64, 64) + 0.5) / 8                          # halves / 8
    x[1, 128] = 16.0
    q = np.asarray(_quantize(impl, jnp.asarray(x, jnp.bfloat16))[0])
    even = np.clip(np.rint(halves), -128, 127)
    np.testing.assert_array_equal(q[:2, :128].ravel(), even)
    assert q[2, 0] == 127
    np.testing.assert_array_equal(q[0, 128:], np.rint(np.arange(-64, 64) + 0.5))
    assert np.any(np.rint(halves) != np.floor(halves + 0.5))              # ties-away would differ


@pytest.mark.parametrize("impl", IMPLS)
def test_quantizer_amax_floor(impl):
    """max |x| below 1e-8 uses amax = 1e-8 (fp32): an all-zero tile gives q = 0; 1e-10 gives rne(1.28...) = 1."""
    x = np.zeros((128, 384), np.float32)
    x[3, 130] = 1e-10
    x[4, 300] = 0.5
    q, s = _quantize(impl, jnp.asarray(x, jnp.bfloat16))
    floor = np.float32(1e-8) / np.float32(128)
    np.testing.assert_array_equal(np.asarray(s), np.float32([[floor, floor, 0.5 / 128]]))
    q = np.asarray(q)
    assert q[3, 130] == 1 and q[4, 300] == 127 and np.count_nonzero(q) == 2


def _pallas_calls(jaxpr) -> list:
    """Every pallas_call equation of a jaxpr, looking inside jit, scan, custom_vmap and the other sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _pallas_calls(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _pallas_calls(sub)
    return found


@pytest.mark.parametrize("in_axes", [0, 1])
def test_triton_quantizer_under_vmap_is_bit_exact_per_element(in_axes):
    """vmap (the DiT's init over the stacked block Linears) quantises each element as its own matrix."""
    xs = jnp.stack([_tiles_of_many_scales(i, 130, 260) for i in range(3)], axis=in_axes)
    q, s = jax.vmap(functools.partial(triton.quantize_blockwise, interpret=not ON_GPU), in_axes=in_axes)(xs)
    for i in range(3):
        want_q, want_s = np_quantize(jnp.take(xs, i, axis=in_axes))
        np.testing.assert_array_equal(np.asarray(q[i]), want_q)
        np.testing.assert_array_equal(np.asarray(s[i]), want_s)


def test_w8a8_dit_init_quantises_one_layer_per_triton_call(monkeypatch):
    """On a GPU the 14B W8A8 DiT's init quantises the stacked FFN weights [40, 13824, 5120] under nnx.vmap. Batched
    into one pallas_call, the int8 output (2.8e9 elements, under 2^32 bytes) got Pallas-Triton's 32-bit offsets,
    wrapped negative from layer 30 on: CUDA_ERROR_ILLEGAL_ADDRESS (or silent corruption) on an H200. Every Triton
    call must see one layer's [N, K], within `_check_offsets`. Traced with the GPU dispatch, nothing allocated."""
    monkeypatch.setattr(int8_matmul, "default_implementation", lambda *shape: "triton")
    cfg = turbojax.get_preset("wan2.1-t2v-14b")
    jaxpr = jax.make_jaxpr(lambda: nnx.state(turbojax.WanDiT(cfg, linears="w8a8", rngs=nnx.Rngs(0))))()
    calls = _pallas_calls(jaxpr.jaxpr)
    assert len(calls) == len(wan_dit.QUANT_LINEARS)
    for eqn in calls:
        for var in (*eqn.invars, *eqn.outvars):
            assert var.aval.ndim == 2 and var.aval.size < 2**31, var.aval


def test_quantizer_refuses_fp32_and_non_matrices():
    with pytest.raises(TypeError, match="bf16 or fp16"):
        int8_matmul.quantize_blockwise(jnp.zeros((4, 4), jnp.float32))
    with pytest.raises(ValueError, match="2-D"):
        int8_matmul.quantize_blockwise(jnp.zeros((2, 4, 4), jnp.bfloat16))


@pytest.mark.parametrize("impl", IMPLS)
def test_quantizer_reproduces_the_quant_fixture(impl):
    """TurboDiffusion's -quant int8 weights and scales (a torch transcription of its quantiser, applied to
    turbo_t2v's bf16 weights) are exactly what ours makes from the same weights."""
    bf16, quant = load_pth(TURBO_PTH), load_pth(QUANT_PTH)
    names = [k[: -len(".int8_weight")] for k in quant if k.endswith(".int8_weight")]
    assert len(names) == 20  # 10 Linears x 2 blocks
    for name in names:
        q, s = _quantize(impl, jnp.asarray(bf16[name + ".weight"]))
        np.testing.assert_array_equal(np.asarray(q), quant[name + ".int8_weight"], err_msg=name)
        np.testing.assert_array_equal(np.asarray(s), quant[name + ".scale"], err_msg=name)


# --- GEMM ----------------------------------------------------------------------------------------------------------

def _check_block_sums_exact(impl, m, k, n, gemm=None):
    """With unit scales every per-block int32 sum (up to 128 * 128 * 128 = 2^21) and their fp32 total (up to 2^24)
    are exact integers: the result must equal the int64 product bit for bit, extremes (-128 * -128) included.
    gemm: a GEMM to call instead of implementation `impl`'s."""
    x_q, _, w_q, _ = _random_operands(m + k + n, m, k, n)
    x_q = x_q.at[0].set(-128)
    w_q = w_q.at[0].set(-128).at[1].set(127)
    ones = lambda r: jnp.ones((-(-r // 128), -(-k // 128)), jnp.float32)
    gemm = gemm or functools.partial(_gemm, impl)
    y = gemm(x_q, ones(m), w_q, ones(n), out_dtype=jnp.float32)
    want = np.asarray(x_q, np.int64) @ np.asarray(w_q, np.int64).T
    assert want[0, 0] == k * 128 * 128
    np.testing.assert_array_equal(np.asarray(y), want.astype(np.float32))
    assert np.abs(want).max() <= 2**24  # so that the fp32 comparison above is exact


@pytest.mark.parametrize("m, k, n", [(200, 1000, 136), (128, 1024, 256), (1, 128, 16)])
@pytest.mark.parametrize("impl", IMPLS)
def test_gemm_block_sums_are_exact_int32(impl, m, k, n):
    _check_block_sums_exact(impl, m, k, n)


@pytest.mark.parametrize("m, k, n", [(300, 260, 200), (1, 128, 16), (129, 384, 257), (64, 1000, 512)])
@pytest.mark.parametrize("impl", IMPLS)
def test_gemm_matches_the_dequantised_product(impl, m, k, n):
    """Per-tile scales are applied to the right rows, columns and K blocks: fp32 result within 1e-5 relative of
    the float64 dequantised product; M, N, K not multiples of the tiles."""
    ops = _random_operands(7 * m + k, m, k, n)
    y = _gemm(impl, *ops, out_dtype=jnp.float32)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    assert _rel(y, np_dequantized_product(*ops)) <= 1e-5


@pytest.mark.parametrize("k, n", WAN_SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_gemm_at_wan_sizes(impl, k, n):
    """The DiT's K/N (1.3B and 14B attention and FFN) at a small, ragged M."""
    ops = _random_operands(k + n, 40, k, n)
    y = _gemm(impl, *ops, out_dtype=jnp.float32)
    assert _rel(y, np_dequantized_product(*ops)) <= 1e-5
    y_bf16 = _gemm(impl, *ops)
    assert y_bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y_bf16), np.asarray(y).astype(BF16))


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_is_added_after_rounding(impl):
    """out = bf16(bf16(Y) + bias), not bf16(Y + bias): checked against the implementation's own fp32 Y, on data
    where the two orders differ."""
    m, k, n = 150, 256, 300
    ops = _random_operands(3, m, k, n)
    bias = jnp.asarray(np.random.default_rng(4).standard_normal(n) * 50, jnp.bfloat16)
    acc = np.asarray(_gemm(impl, *ops, out_dtype=jnp.float32))
    out = np.asarray(_gemm(impl, *ops, bias=bias))
    b32 = np.asarray(bias).astype(np.float32)
    after = (acc.astype(BF16).astype(np.float32) + b32).astype(BF16)
    before = (acc + b32).astype(BF16)
    assert np.count_nonzero(after != before) > 100
    np.testing.assert_array_equal(out, after)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("impl", IMPLS)
def test_int8_linear_is_quantise_then_gemm(impl, dtype):
    """x [B, L, K] is quantised as x.reshape(-1, K) (128-token tiles across the batch), output in x's dtype."""
    x = _tiles_of_many_scales(9, 2 * 77, 384, dtype).reshape(2, 77, 384)
    w_q, w_scale = reference.quantize_blockwise(_tiles_of_many_scales(10, 200, 384))
    bias = jnp.linspace(-1, 1, 200).astype(dtype)
    y = int8_matmul.int8_linear(x, w_q, w_scale, bias, implementation=impl, interpret=not ON_GPU)
    x_q, x_scale = np_quantize(x.reshape(-1, 384))
    acc = reference.int8_block_matmul(jnp.asarray(x_q), jnp.asarray(x_scale), w_q, w_scale, out_dtype=jnp.float32)
    want = reference.round_and_add_bias(acc, dtype, bias).reshape(2, 77, 200)
    assert y.shape == (2, 77, 200) and y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


def test_gemm_refuses_mismatched_operands():
    x_q, x_scale, w_q, w_scale = _random_operands(0, 8, 256, 16)
    with pytest.raises(ValueError, match="disagree on K"):
        int8_matmul.int8_block_matmul(x_q, x_scale, w_q[:, :128], w_scale)
    with pytest.raises(ValueError, match=r"w_scale must be fp32 \(1, 2\)"):
        int8_matmul.int8_block_matmul(x_q, x_scale, w_q, w_scale[:, :1])
    with pytest.raises(TypeError, match="int8"):
        int8_matmul.int8_block_matmul(x_q.astype(jnp.int32), x_scale, w_q, w_scale)
    with pytest.raises(ValueError, match=r"bias must have shape \[N\] = \[16\]"):
        int8_matmul.int8_block_matmul(x_q, x_scale, w_q, w_scale, bias=jnp.zeros(8, jnp.bfloat16))


def test_dispatch_and_triton_config_rules():
    assert int8_matmul.default_implementation() == ("triton" if ON_GPU else "reference")
    hopper = mosaic.supports(256, 1536, 1536)
    assert int8_matmul.default_implementation(256, 1536, 1536) == (
        "mosaic" if hopper else "triton" if ON_GPU else "reference")
    assert int8_matmul.default_implementation(256, 200, 128) == ("triton" if ON_GPU else "reference")
    with pytest.raises(ValueError, match="a MosaicConfig does not apply to the 'triton' implementation"):
        int8_matmul.int8_block_matmul(*_random_operands(0, 8, 128, 128), implementation="triton",
                                      config=mosaic.MosaicConfig())
    with pytest.raises(ValueError, match="a GemmConfig does not apply to the 'reference' implementation"):
        int8_matmul.int8_block_matmul(*_random_operands(0, 8, 128, 128), implementation="reference",
                                      config=int8_matmul.GemmConfig())
    with pytest.raises(ValueError, match="unknown W8A8 implementation 'pallas'"):
        int8_matmul.quantize_blockwise(jnp.zeros((4, 4), jnp.bfloat16), implementation="pallas")
    with pytest.raises(ValueError, match="block_m must divide 128"):
        int8_matmul.GemmConfig(block_m=256)
    with pytest.raises(ValueError, match="power of two"):
        int8_matmul.GemmConfig(block_n=96)
    with pytest.raises(ValueError, match="int32 offsets"):
        jax.eval_shape(functools.partial(triton.int8_block_matmul, interpret=True), *_shapes_only(2**17, 2**14, 128))


def _shapes_only(m, k, n):
    """Abstract operands of those sizes (traced, never materialised)."""
    spec = jax.ShapeDtypeStruct
    return (spec((m, k), jnp.int8), spec((-(-m // 128), -(-k // 128)), jnp.float32), spec((n, k), jnp.int8),
            spec((-(-n // 128), -(-k // 128)), jnp.float32))


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("config", [triton.GemmConfig(), triton.GemmConfig(block_m=64, block_n=128,
                                                                           int_to_float="convert")])
def test_triton_kernels_lower_to_triton_ir_for_an_h100(config):
    """Both kernels lower (Pallas -> Triton IR, every primitive supported) for an sm90 target at the benchmark's
    largest shapes, without a GPU: an abstract H100 stands in for the device. Compilation itself needs the GPU."""
    m, k, n = 32760, 13824, 5120
    quant = _lowered_for_an_h100(triton.quantize_blockwise, jax.ShapeDtypeStruct((m, k), jnp.bfloat16))
    gelu_quant = _lowered_for_an_h100(functools.partial(triton.quantize_blockwise, activation="gelu_tanh"),
                                      jax.ShapeDtypeStruct((m, k), jnp.bfloat16))
    gemm = _lowered_for_an_h100(lambda *ops, bias: triton.int8_block_matmul(*ops, bias=bias, config=config),
                                *_shapes_only(m, k, n), bias=jax.ShapeDtypeStruct((n,), jnp.bfloat16))
    for text in (quant, gelu_quant, gemm):
        assert "__gpu$xla.gpu.triton" in text


def _lowered_for_an_h100(fn, *operands, **kw_operands) -> str:
    """fn jitted and lowered for an sm90 target without a GPU (an abstract H100 stands in for the device)."""
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        return jax.jit(fn).trace(*operands, **kw_operands).lower(lowering_platforms=("cuda",)).as_text()


# --- the DiT with W8A8 block Linears -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8_converted")
    return {name: convert([str(src)], str(root / name), progress=False)
            for name, src in (("bf16", TURBO_PTH), ("quant", QUANT_PTH))}


def _io():
    return np.load(FIXTURES / "turbo_t2v_quant" / "io.npz")


def _forward(path, **kw) -> np.ndarray:
    io = _io()
    dit = turbojax.load_dit(path, progress=False, **kw)
    args = (jnp.asarray(io["latents"]), jnp.asarray(io["timestep"]), jnp.asarray(io["context"]))
    return np.asarray(jax.jit(dit.__call__)(*args))


def _tile_ids(m: int, k: int) -> jax.Array:
    return (jnp.arange(m)[:, None] // 128) * (-(-k // 128)) + jnp.arange(k)[None, :] // 128


def _fake_quant_linear(x, w_q, w_scale, bias, *, activation=None, round_fn=jnp.round, divisor=128.0, per="tile",
                       wrap=False):
    """W8A8 written as fake quantisation, independently of the implementation: x's 128 x 128 tile amax by segment
    max over element tile ids, dequantised x and w multiplied in fp32, then bf16 rounding and the bf16 bias add.
    The keyword arguments make the wrong variants the DiT test must tell apart."""
    if activation == "gelu_tanh":
        x32 = x.astype(jnp.float32)
        c = jnp.float32(np.sqrt(2.0 / np.pi))
        x = (0.5 * x32 * (1.0 + jnp.tanh(c * (x32 + jnp.float32(0.044715) * x32 * x32 * x32)))).astype(x.dtype)
    k, n = x.shape[-1], w_q.shape[0]
    x2 = reference.exact_f32(x.reshape(-1, k))  # keeps the activation's rounding to x's dtype under jit
    ids = _tile_ids(*x2.shape) if per == "tile" else jnp.zeros(x2.shape, jnp.int32)
    if per == "token":
        ids = jnp.broadcast_to(jnp.arange(x2.shape[0])[:, None], x2.shape)
    amax = jax.ops.segment_max(jnp.abs(x2).ravel(), ids.ravel(), num_segments=x2.size)[ids]
    amax = jnp.maximum(amax, jnp.float32(1e-8))
    v = round_fn(x2 * (jnp.float32(divisor) / amax))
    xq = (v + 128) % 256 - 128 if wrap else jnp.clip(v, -128, 127)
    ws = jnp.repeat(jnp.repeat(w_scale, 128, 0), 128, 1)[:n, :k]
    y = jnp.dot(xq * (amax / 128), (w_q.astype(jnp.float32) * ws).T, precision=jax.lax.Precision.HIGHEST)
    y = reference.exact_f32(y.astype(x.dtype)) + bias.astype(x.dtype).astype(jnp.float32)
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)


WRONG_VARIANTS = {  # measured distance from the correct output: 7.6e-3 (half away) to 0.5 (wraparound)
    "per-tensor scale": dict(per="tensor"),
    "per-token scale": dict(per="token"),
    "round half away from zero": dict(round_fn=lambda v: jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)),
    "truncation": dict(round_fn=jnp.trunc),
    "divisor 127": dict(divisor=127.0),
    "int8 wraparound instead of saturation": dict(wrap=True),
}
TRANSCRIPTION_TOL = 1e-3  # measured 0.0 on CPU (every K here is one block); the wrong variants start at 7.6e-3


def test_w8a8_dit_matches_an_independent_transcription(converted, monkeypatch):
    """The -quant DiT with W8A8 block Linears equals the same network with the test's fake-quantisation linear
    patched in, and each wrong variant of the quantiser lands outside the tolerance."""
    out = _forward(converted["quant"])
    monkeypatch.setattr(wan_dit, "_shared_input_linears", _one_quantisation_per_linear)
    monkeypatch.setattr(wan_dit.int8_matmul, "int8_linear", _fake_quant_linear)
    want = _forward(converted["quant"])
    assert _rel(out, want) <= TRANSCRIPTION_TOL
    for name, kw in WRONG_VARIANTS.items():
        monkeypatch.setattr(wan_dit.int8_matmul, "int8_linear", functools.partial(_fake_quant_linear, **kw))
        assert _rel(_forward(converted["quant"]), out) > 5 * TRANSCRIPTION_TOL, name


def _one_quantisation_per_linear(linears, x, out_dtype):
    return [lin(x, out_dtype) for lin in linears]


def test_w8a8_dit_quantises_the_shared_qkv_input_once(converted, monkeypatch):
    """q, k and v take one set of activation codes: the same output, bit for bit, as quantising per Linear (as
    TurboDiffusion does), with two thirds of those quantiser calls gone."""
    calls = []
    quantize_input = wan_dit.Linear.quantize_input
    monkeypatch.setattr(wan_dit.Linear, "quantize_input", lambda *a: calls.append(1) or quantize_input(*a))
    out = _forward(converted["quant"])
    assert len(calls) == 1  # traced once inside the scan over blocks: one call for the three Linears
    monkeypatch.setattr(wan_dit, "_shared_input_linears", _one_quantisation_per_linear)
    np.testing.assert_array_equal(out, _forward(converted["quant"]))


def test_w8a8_dit_is_near_the_dequantised_network_and_the_oracle(converted):
    """Activation quantisation moves the tiny network's output by ~1.2e-2 (measured) from the same network with
    dequantised weights in bf16, and by ~1.0e-2 from the fp32 oracle (dequantised weights, fp32): inside the 3e-2
    bf16 budget of the float path, and clearly nonzero (activations really are quantised)."""
    io = _io()
    w8a8 = _forward(converted["quant"])
    dequantised = _forward(converted["quant"], linears="float")
    assert 3e-3 < _rel(w8a8, dequantised) < 3e-2
    assert _rel(w8a8, io["velocity"]) < 3e-2
    assert _rel(dequantised, io["velocity"]) < 1e-2


def test_load_dit_linears(converted, tmp_path):
    quant = load_pth(QUANT_PTH)
    dit = turbojax.load_dit(converted["quant"], progress=False)
    assert dit.linears == "w8a8" and dit.blocks.ffn.fc1.weight is None
    np.testing.assert_array_equal(np.asarray(dit.blocks.ffn.fc1.int8_weight[...])[1],
                                  quant["blocks.1.ffn.0.int8_weight"])
    np.testing.assert_array_equal(np.asarray(dit.blocks.cross_attn.o.scale[...])[0],
                                  quant["blocks.0.cross_attn.o.scale"])
    assert dit.blocks.self_attn.proj_l.weight[...].dtype == jnp.bfloat16  # never quantised
    assert dit.patch_embedding.weight[...].dtype == jnp.bfloat16

    fp = turbojax.load_dit(converted["quant"], linears="float", dtype=jnp.float32, progress=False)
    np.testing.assert_array_equal(np.asarray(fp.blocks.self_attn.k.weight[...])[0], checkpoint.dequantize(
        quant["blocks.0.self_attn.k.int8_weight"], quant["blocks.0.self_attn.k.scale"]))
    with pytest.raises(ValueError, match="W8A8 linears quantise bf16 or fp16 activations"):
        turbojax.load_dit(converted["quant"], dtype=jnp.float32, progress=False)
    with pytest.raises(ValueError, match="linears must be one of"):
        turbojax.load_dit(converted["quant"], linears="int4", progress=False)

    at_load = turbojax.load_dit(converted["bf16"], linears="w8a8", progress=False)
    for group, name in wan_dit.QUANT_LINEARS:
        a, b = getattr(getattr(at_load.blocks, group), name), getattr(getattr(dit.blocks, group), name)
        for param in ("int8_weight", "scale", "bias"):
            np.testing.assert_array_equal(np.asarray(getattr(a, param)[...]), np.asarray(getattr(b, param)[...]))
    np.testing.assert_array_equal(_forward(converted["bf16"], linears="w8a8"), _forward(converted["quant"]))

    odd = tmp_path / "odd"
    shutil.copytree(converted["quant"], odd)
    meta = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**meta, "quantization": {"scheme": "nf4", "block": [64, 64]}}))
    with pytest.raises(checkpoint.CheckpointFormatError, match="quantization"):
        turbojax.load_dit(odd, progress=False)


def test_random_w8a8_dit_runs():
    cfg = turbojax.get_preset("tiny")
    dit = nnx.jit(lambda: turbojax.WanDiT(cfg, linears="w8a8", rngs=nnx.Rngs(0)))()
    out = nnx.jit(lambda m, *a: m(*a))(dit, jnp.zeros((1, 16, 1, 4, 4)), jnp.array([500.0]),
                                       jnp.ones((1, 8, cfg.text_dim)))
    assert out.shape == (1, 16, 1, 4, 4) and np.isfinite(np.asarray(out)).all()
    assert dit.blocks.self_attn.q.int8_weight[...].dtype == jnp.int8
    with pytest.raises(ValueError, match="bf16 or fp16"):
        turbojax.WanDiT(cfg, dtype=jnp.float32, linears="w8a8", rngs=nnx.Rngs(0))


# --- turbojax-quantize ---------------------------------------------------------------------------------------------

def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_folder(a: Path, b: Path) -> None:
    for rel in ["params/embeddings"] + [f"params/blocks/{p.name}" for p in sorted((b / "params/blocks").iterdir())]:
        la, lb = _leaves(checkpoint._restore_tree(a / rel)), _leaves(checkpoint._restore_tree(b / rel))
        assert la.keys() == lb.keys(), rel
        for key in la:
            assert la[key].dtype == lb[key].dtype, (rel, key)
            np.testing.assert_array_equal(la[key], lb[key], err_msg=f"{rel} {key}")


def test_quantize_cli_output_equals_the_converted_quant_fixture(converted, tmp_path, capsys):
    out = tmp_path / "w8a8"
    assert quantize_main([str(converted["bf16"]), "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (W8A8 int8, 10 Linears per block")
    _assert_same_folder(out, converted["quant"])
    meta, want = checkpoint.read_meta(out), checkpoint.read_meta(converted["quant"])
    assert meta["model"] == want["model"] and meta["quantization"] == want["quantization"] == checkpoint.QUANTIZATION
    assert meta["quantized_from"] == {"path": str(converted["bf16"]), "tool": "turbojax-quantize"}
    assert meta["source"] == checkpoint.read_meta(converted["bf16"])["source"]


def test_quantize_streams_a_block_at_a_time(converted, tmp_path, monkeypatch):
    import turbojax.quantize as tq

    events = []
    read, save = tq._quantized_block, checkpoint._save_tree
    monkeypatch.setattr(tq, "_quantized_block", lambda src, i: events.append(f"read {i}") or read(src, i))
    monkeypatch.setattr(checkpoint, "_save_tree", lambda path, tree: events.append(f"save {path.name}") or
                        save(path, tree))
    quantize_checkpoint(converted["bf16"], tmp_path / "out", progress=False)
    assert events == ["save embeddings", "read 0", "save 000", "read 1", "save 001"]


def test_quantize_cli_errors_are_one_line_and_write_nothing(converted, tmp_path, capsys):
    def run(src, out) -> str:
        assert quantize_main([str(src), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("turbojax-quantize: error: ")
        return err[0]

    assert "already W8A8" in run(converted["quant"], tmp_path / "a")
    assert "not a converted turbojax checkpoint" in run(tmp_path / "nowhere", tmp_path / "b")
    exists = tmp_path / "exists"
    exists.mkdir()
    assert "already exists" in run(converted["bf16"], exists)
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"format": checkpoint.VAE_FORMAT}))
    assert "turbojax-dit/1" in run(vae, tmp_path / "c")
    holed = tmp_path / "holed"
    shutil.copytree(converted["bf16"], holed)
    shutil.rmtree(holed / "params" / "blocks" / "001")
    assert "block 1 is missing" in run(holed, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "holed", "vae"]


def test_quantize_module_runs_as_a_script():
    out = subprocess.run([sys.executable, "-m", "turbojax.quantize", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0 and "turbojax-quantize" in out.stdout


# --- GPU: the compiled kernels at the benchmark's shapes -----------------------------------------------------------

BENCH_M = 32760


GPU_KERNELS = ["triton", "mosaic"]


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1536, 5120, 8960, 13824])
def test_gpu_quantizer_is_bit_exact_at_bench_shapes(k):
    assert ON_GPU, "needs a GPU"
    x = _tiles_of_many_scales(k, BENCH_M, k)
    want_q, want_s = np_quantize(x)
    q, s = int8_matmul.quantize_blockwise(x, implementation="triton")
    np.testing.assert_array_equal(np.asarray(s), want_s)
    bad = np.argwhere(np.asarray(q) != want_q)
    assert bad.size == 0, (f"{len(bad)} codes differ, first at {bad[0]}: got {np.asarray(q)[tuple(bad[0])]}, "
                           f"want {want_q[tuple(bad[0])]}, x = {float(x[tuple(bad[0])])!r}")


@pytest.mark.gpu
@pytest.mark.parametrize("k", [8960, 13824])
def test_gpu_gelu_quantiser_matches_the_unfused_pair_at_bench_shapes(k):
    """The FFN's fc2 input at the bench shapes: GELU fused into the Triton quantiser against XLA's GELU (the DiT's
    previous path) then the same quantiser; they differ only where the two tanh implementations round a GELU value
    to the other bf16."""
    assert ON_GPU, "needs a GPU"
    x = (3.0 * jax.random.normal(jax.random.key(k), (BENCH_M, k))).astype(jnp.bfloat16)
    q, s = int8_matmul.quantize_blockwise(x, activation="gelu_tanh", implementation="triton")
    h = jax.jit(lambda x: jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype))(x)
    _check_near_codes(q, s, *int8_matmul.quantize_blockwise(h, implementation="triton"))


@pytest.mark.gpu
def test_gpu_xla_reference_quantiser_differs_only_at_ties():
    """Measured on an H100: XLA's fp32 division on the GPU is not correctly rounded, so the pure-jnp reference run
    there moves a few codes sitting within a few ulps of a .5 tie by one (the Triton kernel divides with div.rn and
    is bit-exact, above). This pins that the difference stays that small; on the CPU the reference is exact."""
    assert ON_GPU, "needs a GPU"
    x = _tiles_of_many_scales(5120, BENCH_M, 5120)
    want_q, _ = np_quantize(x)
    q = np.asarray(int8_matmul.quantize_blockwise(x, implementation="reference")[0]).astype(np.int32)
    diff = np.abs(q - want_q.astype(np.int32))
    assert diff.max() <= 1 and diff.mean() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_KERNELS)
@pytest.mark.parametrize("k, n", WAN_SIZES)
def test_gpu_gemm_matches_reference_at_bench_shapes(k, n, impl):
    assert ON_GPU, "needs a GPU"
    ops = _random_operands(k * n, BENCH_M, k, n)
    y = int8_matmul.int8_block_matmul(*ops, out_dtype=jnp.float32, implementation=impl)
    ref = int8_matmul.int8_block_matmul(*ops, out_dtype=jnp.float32, implementation="reference")
    assert _rel(y, ref) <= 1e-5
    # The bf16 output is the kernel's own fp32 result rounded once (kernels may contract a * s + acc into an FMA,
    # so near-zero outputs need not round like the reference's; the fp32 check above bounds that).
    y16 = np.asarray(int8_matmul.int8_block_matmul(*ops, implementation=impl))
    np.testing.assert_array_equal(y16, np.asarray(y).astype(BF16))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_KERNELS)
def test_gpu_block_sums_exact_at_bench_rows(impl):
    assert ON_GPU, "needs a GPU"
    _check_block_sums_exact(impl, BENCH_M, 1024, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True])
def test_gpu_mosaic_bits_promotion_exact_at_extreme_sums(overlap):
    """int_to_float="bits" (MAGIC_BITS + sum read as a float) at block sums of +-2^21, serial and overlapped loops,
    at a K whose scale rows are padded for TMA (6 blocks: even, so overlap=True takes the overlapped loop)."""
    assert ON_GPU, "needs a GPU"
    cfg = mosaic.MosaicConfig(tile_n=128, overlap=overlap, int_to_float="bits")
    _check_block_sums_exact("mosaic", 1000, 768, 256, gemm=functools.partial(mosaic.int8_block_matmul, config=cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("tile_n, overlap, int_to_float", [(128, False, "bits"), (128, True, "bits"),
                                                            (256, False, "bits"), (256, False, "convert"),
                                                            (128, True, "convert")])
@pytest.mark.parametrize("m, k", [(1, 1536), (100, 1536), (1000, 1536), (1000, 640)])
def test_gpu_mosaic_ragged_rows_and_bias_epilogue(m, k, tile_n, overlap, int_to_float):
    """Rows that fill no whole 128-row tile (TMA drops the stores past M), both CTA widths, the serial and the
    overlapped K loops, both int32 -> fp32 promotions, and the bias epilogue: the bf16 output with bias is exactly
    the kernel's fp32 output rounded, then + bias in bf16; K = 640 pads the scale rows for TMA (5 -> 32 columns)."""
    assert ON_GPU, "needs a GPU"
    cfg = mosaic.MosaicConfig(tile_n=tile_n, overlap=overlap, int_to_float=int_to_float)
    x_q, x_scale, w_q, w_scale = _random_operands(m, m, k, 512)
    bias = jnp.asarray(np.random.default_rng(m).standard_normal(512) * 100, jnp.bfloat16)
    y32 = mosaic.int8_block_matmul(x_q, x_scale, w_q, w_scale, out_dtype=jnp.float32, config=cfg)
    ref = reference.int8_block_matmul(x_q, x_scale, w_q, w_scale, out_dtype=jnp.float32)
    assert y32.shape == (m, 512) and _rel(y32, ref) <= 1e-5
    y = mosaic.int8_block_matmul(x_q, x_scale, w_q, w_scale, bias=bias, config=cfg)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(reference.round_and_add_bias(y32, jnp.bfloat16, bias)))


@pytest.mark.gpu
@pytest.mark.parametrize("tile_n, overlap, cluster, k, slots", [(256, False, 1, 640, 5), (128, True, 1, 1536, 5),
                                                              (256, False, 2, 640, 5), (256, False, 1, 1664, 4)])
def test_gpu_mosaic_persistent_ctas_match_one_tile_per_cta(tile_n, overlap, cluster, k, slots):
    """The persistent grid (one CTA, or CTA pair, per SM walking several tiles: the ring and the double-buffered
    scale rows and bias run on across tiles) gives the same bytes as one tile per CTA, at 256 row tiles (several
    tiles per CTA, a ragged last row tile): K = 640 (5 K steps, an odd count; scale rows padded for TMA), 1536 (12,
    even: the overlapped loop, whose ring of 5 slots then wraps at another slot in each tile) and 1664 (13 steps
    through 4 slots, 13 scale columns)."""
    assert ON_GPU, "needs a GPU"
    x_q, x_scale, w_q, w_scale = _random_operands(7, BENCH_M, k, 1024)
    bias = jnp.asarray(np.random.default_rng(7).standard_normal(1024) * 100, jnp.bfloat16)
    outs = []
    for persistent in (True, False):
        cfg = mosaic.MosaicConfig(tile_n=tile_n, overlap=overlap, cluster=cluster, persistent=persistent,
                                  max_concurrent_steps=slots)
        outs.append(np.asarray(mosaic.int8_block_matmul(x_q, x_scale, w_q, w_scale, bias=bias, config=cfg)))
    np.testing.assert_array_equal(outs[0], outs[1])
    y32 = reference.int8_block_matmul(x_q, x_scale, w_q, w_scale, out_dtype=jnp.float32)
    assert _rel(outs[0].astype(np.float32), reference.round_and_add_bias(y32, jnp.bfloat16, bias)) <= 1e-2


def test_mosaic_refuses_shapes_it_cannot_tile():
    with pytest.raises(ValueError, match="K a multiple of 128 and N of tile_n=128"):
        jax.eval_shape(mosaic.int8_block_matmul, *_shapes_only(256, 200, 128))
    with pytest.raises(ValueError, match="N of tile_n=256"):
        jax.eval_shape(functools.partial(mosaic.int8_block_matmul, config=mosaic.MosaicConfig(tile_n=256)),
                       *_shapes_only(256, 256, 384))
    with pytest.raises(ValueError, match="tile_n must be 128 or 256"):
        mosaic.MosaicConfig(tile_n=64)


@pytest.mark.gpu
def test_gpu_w8a8_dit_kernels_match_reference_at_real_width(monkeypatch):
    """A 2-block 1.3B DiT at 480p with W8A8 block Linears: the GPU default kernels (Mosaic GEMM on Hopper) against
    the reference implementation of the same semantics."""
    assert ON_GPU, "needs a GPU"
    cfg = turbojax.get_preset("wan2.1-t2v-1.3b").replace(num_layers=2)
    dit = nnx.jit(lambda: turbojax.WanDiT(cfg, linears="w8a8", rngs=nnx.Rngs(0)))()
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (1, 16, 21, 60, 104), jnp.bfloat16)
    ctx = jax.random.normal(keys[1], (1, 512, 4096), jnp.bfloat16)
    t = jnp.array([988.0])
    out = np.asarray(nnx.jit(lambda m, *a: m(*a))(dit, x, t, ctx))
    monkeypatch.setattr(int8_matmul, "default_implementation", lambda *shape: "reference")
    ref = np.asarray(nnx.jit(lambda m, *a: m(*a))(dit, x, t, ctx))
    assert np.isfinite(out).all()
    assert _rel(out, ref) < 3e-2


@pytest.mark.parametrize("cluster", [1, 2])
def test_mosaic_gemm_lowers_for_an_h100(cluster):
    """Pallas -> Mosaic GPU -> LLVM/NVVM without a GPU (an abstract H100 stands in): with a 2-CTA cluster the ring
    releases arrive on both CTAs' barriers (mapa + a shared::cluster arrive); an odd row-tile count (M = 300: 3 tiles)
    falls back to single CTAs; K = 640 pads the scale rows staged by TMA."""
    gemm = functools.partial(mosaic.int8_block_matmul, config=mosaic.MosaicConfig(cluster=cluster))
    texts = [_lowered_for_an_h100(gemm, *_shapes_only(m, k, 512)) for m, k in ((32760, 1536), (300, 640))]
    assert all("wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8" in t for t in texts)
    remote_arrive = "mbarrier.arrive.shared::cluster.b64"
    assert (remote_arrive in texts[0]) == (cluster == 2) == ("mapa.shared::cluster" in texts[0])
    assert remote_arrive not in texts[1]
