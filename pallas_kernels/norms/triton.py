"""The norms of the Wan DiT block as Pallas-Triton kernels: fp32 statistics, one program per block of whole rows,
one pass over x (two for the quantising one).

Rows are read at a power-of-two width W >= C (Triton blocks are powers of two; C = 1536 or 5120 in Wan) with a
masked load, so padded columns read zero: they add nothing to the sums, are zeroed before the variance, and are never
stored. Sums divide by the real C with the IEEE division (`rounding.divide`: Triton's own fp32 `/` is
approximate on the GPU). Where the reference rounds an intermediate (`reference.py`), the kernel rounds it too
(`rounding.round_to`), and everything else stays fp32 until the single store.

  layer_norm        norm1/norm2 + modulation (per-sample rows of shift and scale) or norm3 (per-channel affine);
                    grid (B, L / rows), so a program's rows share one sample's modulation row.
  rms_norm          q/k RMSNorm, optionally with RoPE: the row is viewed as [heads, head_dim / 2, 2] pairs,
                    split into (re, im), rotated by the row's [head_dim / 2] cos/sin, and joined back.
  layer_norm_modulate_quantize
                    two kernels. The quantiser's amax spans 128 rows x 128 columns and each row's statistics span
                    all C columns, so no single pass over x fits on chip: `row_stats` writes mean and rstd per row
                    (8 bytes a row), then one program per 128 x 128 tile normalises, modulates, rounds to bf16 and
                    quantises it like `int8_matmul.triton.quantize_blockwise`. row_stats is the layer_norm kernel's
                    own statistics code at the same block shape and warps, so the result is bit-identical to
                    quantising this module's layer_norm_modulate output.
  vae_rms_norm_silu the Wan VAE's norm + SiLU before a causal conv, over [cached frames, chunk] in time: grid
                    (B, frames, pixels / rows); each program reads its rows from the prefix or from x (a lax.cond),
                    adds the previous conv's pending bias to x's rows, and writes the conv's input in one pass.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from pallas_kernels.int8_matmul.reference import AMAX_FLOOR, BLOCK, num_blocks
from pallas_kernels.int8_matmul.triton import _and_masks, _check_offsets, _in_range, _load, _to_codes
from pallas_kernels.norms import reference
from pallas_kernels.rounding import divide, round_to

f32 = jnp.float32


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """Launch parameters. block_rows (a power of two) and num_warps: the row kernels (None: `rows_and_warps` picks
    from C); tile_warps: the quantising tile kernel."""

    block_rows: int | None = None
    num_warps: int | None = None
    tile_warps: int = 8

    def __post_init__(self):
        if self.block_rows is not None and (self.block_rows < 1 or self.block_rows & (self.block_rows - 1)):
            raise ValueError(f"block_rows must be a power of two, got {self.block_rows}")
        for name in ("num_warps", "tile_warps"):
            w = getattr(self, name)
            if w is not None and w not in (1, 2, 4, 8, 16):
                raise ValueError(f"{name} must be 1, 2, 4, 8 or 16, got {w}")

    def rows_and_warps(self, c: int) -> tuple[int, int]:
        """Default: about 4096 elements of the padded row block per program (one row for C > 2048), 8 warps from
        4096 elements up (16 fp32 values a thread)."""
        width = _pow2_at_least(c)
        rows = self.block_rows or max(1, 4096 // width)
        return rows, self.num_warps or (8 if rows * width >= 4096 else 4)


def _mean(total: jax.Array, c: int, interpret: bool) -> jax.Array:
    """total / c with the IEEE division, as jnp.mean divides."""
    return divide(total, jnp.full_like(total, float(c)), interpret)


def _ln_stats(x: jax.Array, col_ok, c: int, eps: float, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """x [R, W] fp32, zero past column c -> mean, rstd [R] as `reference.layer_norm` computes them: biased variance
    of the centred values (two passes over the registers, no E[x^2] - E[x]^2 cancellation)."""
    mean = _mean(jnp.sum(x, axis=1), c, interpret)
    d = x - mean[:, None]
    if col_ok is not None:
        d = jnp.where(col_ok[None, :], d, 0.0)
    var = _mean(jnp.sum(d * d, axis=1), c, interpret)
    return mean, jax.lax.rsqrt(var + eps)


def _row_block(x_ref, b, i, *, rows: int, width: int, l: int, c: int):
    """Rows i * rows ... of sample b, x_ref [B, L, C] -> (x [rows, width] fp32 with zeros outside, row_ok, col_ok,
    the 2-D mask, the ref view for the store)."""
    row_ok, col_ok = _in_range(i * rows, rows, l), _in_range(0, width, c)
    mask = _and_masks(None if row_ok is None else row_ok[:, None], None if col_ok is None else col_ok[None, :])
    view = (b, pl.ds(i * rows, rows), pl.ds(0, width))
    return _load(x_ref.at[view], mask, 0.0).astype(f32), row_ok, col_ok, mask, view


def _read_flag(flag_ref, round_normed: bool | None) -> jax.Array | bool:
    """round_normed as the kernel sees it: compiled in (a bool), or None: read from the [1] int32 flag operand."""
    return round_normed if flag_ref is None else flag_ref[0] != 0


def _round_normed(y, normed_dtype, flag, interpret: bool):
    """The normalised y [rows, cols] rounded to normed_dtype where flag (a bool or a traced bool) holds."""
    if normed_dtype is None or flag is False:
        return y
    rounded = round_to(y, normed_dtype, interpret)
    return rounded if flag is True else jnp.where(flag, rounded, y)


def _ln_kernel(x_ref, mul_ref, add_ref, flag_ref, o_ref, *, c, width, rows, l, eps, modulation, normed_dtype,
               round_normed, interpret):
    """x_ref, o_ref [B, L, C]; mul_ref, add_ref [B, C] (modulation: scale, shift) or [C] (affine: weight, bias);
    flag_ref [1] int32 or None."""
    b, i = pl.program_id(0), pl.program_id(1)
    x, _, col_ok, mask, view = _row_block(x_ref, b, i, rows=rows, width=width, l=l, c=c)
    mean, rstd = _ln_stats(x, col_ok, c, eps, interpret)
    y = (x - mean[:, None]) * rstd[:, None]
    y = _round_normed(y, normed_dtype, _read_flag(flag_ref, round_normed), interpret)
    vec = (b, pl.ds(0, width)) if modulation else (pl.ds(0, width),)
    mul = _load(mul_ref.at[vec], col_ok, 0.0).astype(f32)[None, :]
    add = _load(add_ref.at[vec], col_ok, 0.0).astype(f32)[None, :]
    if modulation:
        mul = 1.0 + mul
    pltr.store(o_ref.at[view], (y * mul + add).astype(o_ref.dtype), mask=mask)


def _stats_kernel(x_ref, mean_ref, rstd_ref, *, c, width, rows, l, eps, interpret):
    """x_ref [B, L, C] -> mean_ref, rstd_ref [B, L] fp32, with `_ln_kernel`'s block shape and statistics."""
    b, i = pl.program_id(0), pl.program_id(1)
    x, row_ok, col_ok, _, _ = _row_block(x_ref, b, i, rows=rows, width=width, l=l, c=c)
    mean, rstd = _ln_stats(x, col_ok, c, eps, interpret)
    pltr.store(mean_ref.at[b, pl.ds(i * rows, rows)], mean, mask=row_ok)
    pltr.store(rstd_ref.at[b, pl.ds(i * rows, rows)], rstd, mask=row_ok)


def _split_flag(round_normed) -> tuple[bool | None, jax.Array | None]:
    """A Python bool is compiled into the kernel; a traced one (stock Wan's block-0 flag) travels as a [1] int32
    operand, marked by a static None."""
    if isinstance(round_normed, bool):
        return round_normed, None
    return None, jnp.asarray(round_normed, jnp.int32).reshape(1)


def _row_call(kernel, x, operands, out_shape, config: NormConfig, interpret: bool, name: str, **static):
    """pallas_call over grid (B, L / rows) with the row kernels' static parameters."""
    b, l, c = x.shape
    _check_offsets(x=(b * l, c))
    rows, warps = config.rows_and_warps(c)
    return pl.pallas_call(
        functools.partial(kernel, c=c, width=_pow2_at_least(c), rows=rows, l=l, interpret=interpret, **static),
        grid=(b, pl.cdiv(l, rows)),
        out_shape=out_shape,
        compiler_params=pltr.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(x, *operands)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "modulation", "normed_dtype", "round_normed",
                                             "config", "interpret"))
def _layer_norm(x, mul, add, flag, *, eps, out_dtype, modulation, normed_dtype, round_normed, config, interpret):
    def kernel(x_ref, mul_ref, add_ref, *rest, **kw):
        _ln_kernel(x_ref, mul_ref, add_ref, rest[0] if flag is not None else None, rest[-1], **kw)

    operands = [mul, add] + ([] if flag is None else [flag])
    return _row_call(kernel, x, operands, jax.ShapeDtypeStruct(x.shape, out_dtype), config, interpret,
                     "layer_norm_modulate" if modulation else "layer_norm_affine", eps=eps, modulation=modulation,
                     normed_dtype=normed_dtype, round_normed=round_normed)


def layer_norm_modulate(x, shift, scale, *, eps: float, out_dtype, normed_dtype=None, round_normed=True,
                        config: NormConfig = NormConfig(), interpret: bool = False) -> jax.Array:
    """`reference.layer_norm_modulate`: x [B, L, C], shift/scale [B, C] fp32 -> [B, L, C] out_dtype."""
    reference.check_modulation(x, shift, scale)
    static_flag, flag = _split_flag(round_normed)
    return _layer_norm(x, scale.astype(f32), shift.astype(f32), flag, eps=eps, out_dtype=out_dtype, modulation=True,
                       normed_dtype=normed_dtype, round_normed=static_flag, config=config, interpret=interpret)


def layer_norm_affine(x, weight, bias, *, eps: float, out_dtype, config: NormConfig = NormConfig(),
                      interpret: bool = False) -> jax.Array:
    """`reference.layer_norm_affine`: x [B, L, C], weight/bias [C] -> [B, L, C] out_dtype."""
    reference.check_rows(x)
    reference.check_channel_vector(x, weight=weight, bias=bias)
    return _layer_norm(x, weight.astype(f32), bias.astype(f32), None, eps=eps, out_dtype=out_dtype, modulation=False,
                       normed_dtype=None, round_normed=False, config=config, interpret=interpret)


def _rms_kernel(x_ref, w_ref, cos_ref, sin_ref, o_ref, *, c, width, rows, l, eps, head_dim, round_before_weight,
                norm_dtype, interpret):
    """x_ref, o_ref [B, L, C]; w_ref [C]; cos_ref, sin_ref [L, head_dim / 2] or None (no RoPE)."""
    b, i = pl.program_id(0), pl.program_id(1)
    x, row_ok, col_ok, mask, view = _row_block(x_ref, b, i, rows=rows, width=width, l=l, c=c)
    y = x * jax.lax.rsqrt(_mean(jnp.sum(x * x, axis=1), c, interpret) + eps)[:, None]
    y = round_to(y, round_before_weight, interpret)
    y = y * _load(w_ref.at[pl.ds(0, width)], col_ok, 0.0).astype(f32)[None, :]
    if cos_ref is not None:
        y = round_to(y, norm_dtype, interpret)
        half = head_dim // 2
        table = (pl.ds(i * rows, rows), pl.ds(0, half))
        tmask = None if row_ok is None else row_ok[:, None]
        cos = _load(cos_ref.at[table], tmask, 0.0)[:, None, :]  # [rows, 1, half]: one angle per pair, all heads
        sin = _load(sin_ref.at[table], tmask, 0.0)[:, None, :]
        re, im = jnp.unstack(y.reshape(rows, width // head_dim, half, 2), axis=-1)
        y = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1).reshape(rows, width)
    pltr.store(o_ref.at[view], y.astype(o_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "head_dim", "norm_dtype", "round_before_weight",
                                             "config", "interpret"))
def rms_norm_rope(x, weight, cos=None, sin=None, *, eps: float, out_dtype, head_dim: int | None = None,
                  norm_dtype=None, round_before_weight=None, config: NormConfig = NormConfig(),
                  interpret: bool = False) -> jax.Array:
    """`reference.rms_norm_rope`: x [B, L, C], weight [C] -> [B, L, C], or with cos/sin [L, head_dim / 2] ->
    [B, L, C / head_dim, head_dim], in out_dtype."""
    reference.check_rows(x)
    reference.check_channel_vector(x, weight=weight)
    rope = cos is not None or sin is not None
    if rope:
        if cos is None or sin is None or head_dim is None:
            raise ValueError("RoPE needs cos, sin and head_dim together; pass all three, or none for the plain norm")
        reference.check_rope(x, cos, sin, head_dim)
        if head_dim & (head_dim - 1):
            raise ValueError(f"the Triton RoPE kernel views rows as [heads, head_dim] blocks and needs a power-of-two "
                             f"head_dim, got {head_dim}; use implementation='reference'")
    tables = [cos.astype(f32), sin.astype(f32)] if rope else []

    def kernel(x_ref, w_ref, *rest, **kw):
        cos_ref, sin_ref = rest[:2] if rope else (None, None)
        _rms_kernel(x_ref, w_ref, cos_ref, sin_ref, rest[-1], **kw)

    out = _row_call(kernel, x, [weight.astype(f32), *tables], jax.ShapeDtypeStruct(x.shape, out_dtype), config,
                    interpret, "rms_norm_rope" if rope else "rms_norm", eps=eps, head_dim=head_dim,
                    round_before_weight=round_before_weight, norm_dtype=norm_dtype or out_dtype)
    b, l, c = x.shape
    return out.reshape(b, l, c // head_dim, head_dim) if rope else out


@functools.partial(jax.jit, static_argnames=("eps", "config", "interpret"))
def row_stats(x, *, eps: float, config: NormConfig = NormConfig(), interpret: bool = False):
    """x [B, L, C] -> (mean, rstd) [B, L] fp32: `layer_norm_modulate`'s statistics, bit for bit."""
    reference.check_rows(x)
    stats = jax.ShapeDtypeStruct(x.shape[:2], f32)
    return _row_call(_stats_kernel, x, [], [stats, stats], config, interpret, "layer_norm_stats", eps=eps)


def _quantize_tile_kernel(x_ref, mean_ref, rstd_ref, shift_ref, scale_ref, flag_ref, q_ref, s_ref, *, m, c, l,
                          out_dtype, normed_dtype, round_normed, interpret):
    """x_ref, q_ref [M, C]; mean_ref, rstd_ref [M]; shift_ref, scale_ref [B, C]; s_ref [M / 128, C / 128]."""
    i, j = pl.program_id(0), pl.program_id(1)
    row_ok, col_ok = _in_range(i * BLOCK, BLOCK, m), _in_range(j * BLOCK, BLOCK, c)
    mask = _and_masks(None if row_ok is None else row_ok[:, None], None if col_ok is None else col_ok[None, :])
    rows, cols = pl.ds(i * BLOCK, BLOCK), pl.ds(j * BLOCK, BLOCK)
    x = _load(x_ref.at[rows, cols], mask, 0.0).astype(f32)
    mean = _load(mean_ref.at[rows], row_ok, 0.0)[:, None]
    rstd = _load(rstd_ref.at[rows], row_ok, 0.0)[:, None]
    y = _round_normed((x - mean) * rstd, normed_dtype, _read_flag(flag_ref, round_normed), interpret)
    # A tile's rows may span samples (L is rarely a multiple of 128): modulate with one sample's row at a time,
    # over the samples the tile touches (at most two when L >= 128). Rows past M count as the last sample's.
    sample = jax.lax.div(jnp.minimum(i * BLOCK + jnp.arange(BLOCK), m - 1), l)[:, None]
    first, last = jax.lax.div(i * BLOCK, l), jax.lax.div(jnp.minimum(i * BLOCK + BLOCK - 1, m - 1), l)

    def modulate(s, z):
        scale = _load(scale_ref.at[s, cols], col_ok, 0.0)[None, :]
        shift = _load(shift_ref.at[s, cols], col_ok, 0.0)[None, :]
        return jnp.where(sample == s, y * (1.0 + scale) + shift, z)

    z = round_to(jax.lax.fori_loop(first, last + 1, modulate, jnp.zeros_like(y)), out_dtype, interpret)
    if mask is not None:
        z = jnp.where(mask, z, 0.0)  # a partial tile's missing elements count as 0 in amax, as in the quantiser
    amax = jnp.maximum(jnp.max(jnp.max(jnp.abs(z), axis=1, keepdims=True), axis=0, keepdims=True),
                       jnp.asarray(AMAX_FLOOR, f32))  # [1, 1]
    inv = divide(jnp.full_like(amax, 128.0), amax, interpret)
    q = _to_codes(z * inv, interpret)
    pltr.store(q_ref.at[rows, cols], q, mask=mask)
    pltr.store(s_ref.at[pl.ds(i, 1), pl.ds(j, 1)], amax / 128.0)


def layer_norm_modulate_quantize(x, shift, scale, *, eps: float, out_dtype=jnp.bfloat16, normed_dtype=None,
                                 round_normed=True, config: NormConfig = NormConfig(), interpret: bool = False):
    """`reference.layer_norm_modulate_quantize`: x [B, L, C], shift/scale [B, C] -> (q int8 [B * L, C], scale fp32
    [ceil(B * L / 128), ceil(C / 128)])."""
    reference.check_modulation(x, shift, scale)
    reference.check_quantized_dtype(out_dtype)
    static_flag, flag = _split_flag(round_normed)
    return _quantize(x, shift.astype(f32), scale.astype(f32), flag, eps=eps, out_dtype=out_dtype,
                     normed_dtype=normed_dtype, round_normed=static_flag, config=config, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "normed_dtype", "round_normed", "config",
                                             "interpret"))
def _quantize(x, shift, scale, flag, *, eps, out_dtype, normed_dtype, round_normed, config, interpret):
    b, l, c = x.shape
    m = b * l
    mean, rstd = row_stats(x, eps=eps, config=config, interpret=interpret)

    def kernel(*refs):
        _quantize_tile_kernel(*refs[:5], refs[5] if flag is not None else None, *refs[-2:], m=m, c=c, l=l,
                              out_dtype=out_dtype, normed_dtype=normed_dtype, round_normed=round_normed,
                              interpret=interpret)

    grid = (num_blocks(m), num_blocks(c))
    return pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=[jax.ShapeDtypeStruct((m, c), jnp.int8), jax.ShapeDtypeStruct(grid, f32)],
        compiler_params=pltr.CompilerParams(num_warps=config.tile_warps, num_stages=1),
        interpret=interpret,
        name="layer_norm_modulate_quantize",
    )(x.reshape(m, c), mean.reshape(m), rstd.reshape(m), shift, scale, *([] if flag is None else [flag]))


def _vae_rows_and_warps(config: NormConfig, c: int) -> tuple[int, int]:
    """The VAE norm's launch unless config sets it: 2048 elements of the padded row block per program (at least 8
    rows), 2 / 4 warps for widths 128 / 256 and 8 otherwise. The best of a rows x warps sweep at the decoder's
    (C, frames, H x W) on an H100: 96 at 720p 1.01 ms (the DiT norms' default launch: 1.14), 192 at 360p 0.65 ms,
    384 at 90p 0.13 ms."""
    width = _pow2_at_least(c)
    rows = config.block_rows or max(8, 2048 // width)
    return rows, config.num_warps or {128: 2, 256: 4}.get(width, 8)


def _vae_norm_kernel(prefix_ref, x_ref, g_ref, bias_ref, o_ref, *, p, n, c, width, rows, x_dtype, interpret):
    """prefix_ref [B, P, N, C] or None; x_ref [B, T, N, C]; g_ref, bias_ref [C] (bias_ref may be None);
    o_ref [B, P + T, N, C]. Program (b, f, i) writes rows i * rows ... of output frame f, read from the prefix
    (f < P) or from x (f >= P): a lax.cond, so only the frame's own source is loaded."""
    b, f, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    row_ok, col_ok = _in_range(i * rows, rows, n), _in_range(0, width, c)
    mask = _and_masks(None if row_ok is None else row_ok[:, None], None if col_ok is None else col_ok[None, :])
    block = (pl.ds(i * rows, rows), pl.ds(0, width))

    def from_x():
        v = _load(x_ref.at[(b, jnp.maximum(f - p, 0), *block)], mask, 0.0).astype(f32)
        if bias_ref is None:
            return v
        return round_to(v + _load(bias_ref.at[pl.ds(0, width)], col_ok, 0.0).astype(f32)[None, :], x_dtype,
                         interpret)

    def from_prefix():
        return _load(prefix_ref.at[(b, jnp.minimum(f, p - 1), *block)], mask, 0.0).astype(f32)

    v = from_x() if prefix_ref is None else jax.lax.cond(f < p, from_prefix, from_x)
    norm = jnp.maximum(jnp.sqrt(jnp.sum(v * v, axis=1)), reference.VAE_NORM_EPS)  # padded columns add zeros
    # One correctly rounded division per row, not per element: the per-element division and the exp leave the
    # kernel compute-bound at C = 96 (1 TB/s measured on an H100); x * (sqrt(C) / n) is within a few fp32 ulps of
    # the reference's x / n * sqrt(C).
    inv = divide(jnp.full_like(norm, float(c) ** 0.5), norm, interpret)
    gamma = _load(g_ref.at[pl.ds(0, width)], col_ok, 0.0).astype(f32)[None, :]
    y = v * inv[:, None] * gamma
    y = y / (1.0 + jnp.exp(-y))  # SiLU
    pltr.store(o_ref.at[(b, f, *block)], y.astype(o_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def vae_rms_norm_silu(x, gamma, *, out_dtype, prefix=None, bias=None, config: NormConfig = NormConfig(),
                      interpret: bool = False) -> jax.Array:
    """`reference.vae_rms_norm_silu`: x [B, T, ..., C], prefix [B, P, ..., C] or None, gamma and bias [C] ->
    [B, P + T, ..., C] out_dtype, in one pass: the time concatenation happens in the kernel's reads, so the
    normalised chunk is never written next to the prefix by a separate copy."""
    reference.check_vae_norm(x, gamma, prefix, bias)
    b, t, c = x.shape[0], x.shape[1], x.shape[-1]
    p = 0 if prefix is None else prefix.shape[1]
    n = x.size // (b * t * c)
    _check_offsets(out=(b * (p + t) * n, c))
    rows, warps = _vae_rows_and_warps(config, c)
    operands = ([] if prefix is None else [prefix.reshape(b, p, n, c)]) + [x.reshape(b, t, n, c),
                                                                         gamma.astype(f32)]
    if bias is not None:
        operands.append(bias.astype(f32))

    def kernel(*refs):
        prefix_ref = refs[0] if prefix is not None else None
        rest = refs[1:] if prefix is not None else refs
        _vae_norm_kernel(prefix_ref, rest[0], rest[1], rest[2] if bias is not None else None, refs[-1], p=p, n=n,
                         c=c, width=_pow2_at_least(c), rows=rows, x_dtype=x.dtype, interpret=interpret)

    out = pl.pallas_call(
        kernel,
        grid=(b, p + t, pl.cdiv(n, rows)),
        out_shape=jax.ShapeDtypeStruct((b, p + t, n, c), out_dtype),
        compiler_params=pltr.CompilerParams(num_warps=warps, num_stages=1),
        interpret=interpret,
        name="vae_rms_norm_silu",
    )(*operands)
    return out.reshape(b, p + t, *x.shape[2:])
