"""W8A8 int8 linear (acceleration.md 5): the quantiser and the block-scaled GEMM of every implementation against an
independent NumPy transcription of the spec and the golden -quant fixture.

On CPU the Pallas-Triton kernels run in interpret mode; on a GPU the same cases run compiled
(`pytest -m "gpu or not gpu" tests/test_int8_matmul.py`), plus the `gpu`-marked tests at the benchmark's shapes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from convert.pth import load_pth
from pallas_kernels import int8_matmul
from pallas_kernels.int8_matmul import reference, triton

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


def test_quantizer_refuses_fp32_and_non_matrices():
    with pytest.raises(TypeError, match="bf16 or fp16"):
        int8_matmul.quantize_blockwise(jnp.zeros((4, 4), jnp.float32))
    with pytest.raises(ValueError, match="2-D"):
        int8_matmul.quantize_blockwise(jnp.zeros((2, 4, 4), jnp.bfloat16))


def test_round_half_even_helper_matches_rint():
    """The Triton kernel's floor-only rounding equals IEEE round-half-even on halves, near-halves and random values
    over the quantiser's range (|x * 128/amax| <= 128)."""
    f = np.float32
    edges = f([0.49999997, -0.49999997, 0.50000006, 1.4999999, 1.5000001, -2.5, 2.5, 0.0, -0.0, 127.5, -127.5,
               128.0, -128.0, 3e-8, -3e-8])
    values = np.concatenate([np.arange(-260, 261, dtype=f) / 2, edges,
                             np.random.default_rng(0).uniform(-130, 130, 100_000).astype(f)])
    out = np.asarray(jax.jit(triton._round_half_even)(jnp.asarray(values)))
    np.testing.assert_array_equal(out, np.rint(values))


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

def _check_block_sums_exact(impl, m, k, n):
    """With unit scales every per-block int32 sum (up to 128 * 128 * 128 = 2^21) and their fp32 total (up to 2^24)
    are exact integers: the result must equal the int64 product bit for bit, extremes (-128 * -128) included."""
    x_q, _, w_q, _ = _random_operands(m + k + n, m, k, n)
    x_q = x_q.at[0].set(-128)
    w_q = w_q.at[0].set(-128).at[1].set(127)
    ones = lambda r: jnp.ones((-(-r // 128), -(-k // 128)), jnp.float32)
    y = _gemm(impl, x_q, ones(m), w_q, ones(n), out_dtype=jnp.float32)
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
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)
    m, k, n = 32760, 13824, 5120
    with jax.sharding.use_abstract_mesh(mesh):
        quant = jax.jit(triton.quantize_blockwise).trace(jax.ShapeDtypeStruct((m, k), jnp.bfloat16))
        gemm = jax.jit(functools.partial(triton.int8_block_matmul, config=config)).trace(
            *_shapes_only(m, k, n), bias=jax.ShapeDtypeStruct((n,), jnp.bfloat16))
        for traced in (quant, gemm):
            text = traced.lower(lowering_platforms=("cuda",)).as_text()
            assert "__gpu$xla.gpu.triton" in text


# --- GPU: the compiled kernels at the benchmark's shapes -----------------------------------------------------------

BENCH_M = 32760


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1536, 5120, 8960, 13824])
def test_gpu_quantizer_is_bit_exact_at_bench_shapes(k):
    assert ON_GPU, "needs a GPU"
    x = _tiles_of_many_scales(k, BENCH_M, k)
    want_q, want_s = np_quantize(x)
    for impl in IMPLS:
        q, s = int8_matmul.quantize_blockwise(x, implementation=impl)
        np.testing.assert_array_equal(np.asarray(q), want_q, err_msg=impl)
        np.testing.assert_array_equal(np.asarray(s), want_s, err_msg=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("k, n", WAN_SIZES)
def test_gpu_gemm_matches_reference_at_bench_shapes(k, n):
    assert ON_GPU, "needs a GPU"
    ops = _random_operands(k * n, BENCH_M, k, n)
    y = int8_matmul.int8_block_matmul(*ops, out_dtype=jnp.float32, implementation="triton")
    ref = int8_matmul.int8_block_matmul(*ops, out_dtype=jnp.float32, implementation="reference")
    assert _rel(y, ref) <= 1e-5
    y16 = np.asarray(int8_matmul.int8_block_matmul(*ops, implementation="triton"), np.float32)
    ref16 = np.asarray(ref).astype(BF16).astype(np.float32)
    assert (np.abs(y16 - ref16) <= 2.0**-7 * np.abs(ref16)).all()  # at most one bf16 ulp apart


@pytest.mark.gpu
def test_gpu_block_sums_exact_at_bench_rows():
    assert ON_GPU, "needs a GPU"
    _check_block_sums_exact("triton", BENCH_M, 1024, 256)
