"""The Wan2.1 VAE in Flax NNX (wan-model.md section 7): causal 3-D convolutions, 4x temporal and 8x spatial compression.

Layouts: activations are channels-last [B, T, H, W, C] inside (encode/decode take and return PyTorch's
[B, C, T, H, W]); 3-D conv weights are [kt, kh, kw, in, out], 2-D ones [kh, kw, in, out]; RMS-norm gains are [C] and
kept in fp32. Convolutions run in the VAE's dtype; norm statistics, SiLU and the attention softmax in fp32.

Causal chunking. Every block is a pure function `f(module, x, cache) -> (y, cache')`. cache=None means "this chunk
starts the video": causal convolutions see zero frames before it and the temporal resamplers apply their first-frame
rules (spec 7.4). The cache it returns has the same structure and shapes as the one every later chunk of the same
size returns, so encode and decode run as one first chunk followed by a lax.scan over the remaining chunks: the body
is traced and compiled once and only one chunk's activations are alive at a time. The same functions called once with
cache=None on the whole sequence are the spec's full-sequence equivalent (`chunked=False`, a test oracle).

Convolution paths (`conv=`): "fold" folds the temporal taps of a 3-D convolution into the channels of one 2-D
convolution (or a matmul for 1x1 kernels). On Hopper XLA lays 2-D convolutions out NHWC for cuDNN but every 3-D one
NCDHW (xla/service/gpu/transforms/layout_assignment.cc, HeuristicLayoutAssignment), which costs transposes and the
slower channels-first kernels. "xla3d" is the plain lax.conv_general_dilated port, kept as the baseline. "ndhwc" is
that port compiled with xla_gpu_force_conv_nhwc, so cuDNN runs the 3-D convolutions channels-last without the fold's
3x copy of each input (XLA excludes 3-D convolutions from NHWC on Hopper for their narrower cuDNN support: measure it).

Norms. The residual blocks' causal convs and the output heads' read SiLU(RMS_norm(x)) of [their cached frames, the
chunk]: `normed_causal_conv` caches x before the norm and has `pallas_kernels.norms.vae_rms_norm_silu` (a Pallas-Triton
kernel on GPUs) write the conv's whole input in one pass, with the previous conv's bias added on the way. XLA would
write the normalised chunk, then copy it next to the cache: on an H100 that copy and the separate bias pass were a
sixth of the 720p decode.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import norms
from pallas_kernels.norms import reference as norm_ref
from turbojax.models.layers import precision

f32 = jnp.float32
CONV_IMPLS = ("fold", "xla3d", "ndhwc")
COMPILER_OPTIONS = {"ndhwc": {"xla_gpu_force_conv_nhwc": True}}

# Latent statistics of the Wan2.1 VAE (spec 7.3); pipelines normalise mu with them before the DiT.
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of a Wan2.1-style VAE (`WanVAE_` / diffusers `AutoencoderKLWan` without attn_scales)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self):
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(self.dim_mult) - 1} entries (one per downsampling), "
                             f"got {self.temporal_downsample}")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


def encoder_plan(cfg: VAEConfig) -> list[tuple]:
    """The encoder's flat `downsamples` list: ("res", c_in, c_out) and ("down2d" | "down3d", c) entries."""
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    plan = []
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            plan.append(("res", c_in, c_out))
            c_in = c_out
        if i < len(cfg.dim_mult) - 1:
            plan.append(("down3d" if cfg.temporal_downsample[i] else "down2d", c_out))
    return plan


def decoder_plan(cfg: VAEConfig) -> list[tuple]:
    """The decoder's flat `upsamples` list: ("res", c_in, c_out) and ("up2d" | "up3d", c) entries (c -> c/2)."""
    dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
    temporal_upsample = tuple(reversed(cfg.temporal_downsample))
    plan = []
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            c_in //= 2  # the previous stage's upsampling conv halved the channels
        for _ in range(cfg.num_res_blocks + 1):
            plan.append(("res", c_in, c_out))
            c_in = c_out
        if i < len(cfg.dim_mult) - 1:
            plan.append(("up3d" if temporal_upsample[i] else "up2d", c_out))
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Parameter containers
# ---------------------------------------------------------------------------------------------------------------


def _init_weight(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> jax.Array:
    fan_in = math.prod(shape[:-1])
    return (jax.random.normal(rngs.params(), shape, f32) / math.sqrt(fan_in)).astype(dtype)


class Conv(nnx.Module):
    """A convolution's weight [*kernel, in, out] (kernel (kt, kh, kw) or (kh, kw)) and bias [out]."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, ...], *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_init_weight(rngs, (*kernel, c_in, c_out), dtype))
        self.bias = nnx.Param(jnp.zeros((c_out,), dtype))


class Norm(nnx.Module):
    """RMS_norm's gain gamma [C] (fp32)."""

    def __init__(self, dim: int):
        self.gamma = nnx.Param(jnp.ones((dim,), f32))


class ResBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = Norm(c_in)
        self.conv1 = Conv(c_in, c_out, (3, 3, 3), dtype=dtype, rngs=rngs)
        self.norm2 = Norm(c_out)
        self.conv2 = Conv(c_out, c_out, (3, 3, 3), dtype=dtype, rngs=rngs)
        self.shortcut = Conv(c_in, c_out, (1, 1, 1), dtype=dtype, rngs=rngs) if c_in != c_out else None


class Resample(nnx.Module):
    """down2d/down3d: a stride-2 3x3 conv (C -> C), plus a (3,1,1) stride-2 time conv (C -> C) for down3d.
    up2d/up3d: nearest x2 then a 3x3 conv (C -> C/2), preceded for up3d by a (3,1,1) time conv (C -> 2C)."""

    def __init__(self, mode: str, dim: int, *, dtype, rngs: nnx.Rngs):
        self.mode = mode
        c_out = dim // 2 if mode.startswith("up") else dim
        self.conv = Conv(dim, c_out, (3, 3), dtype=dtype, rngs=rngs)
        time_out = {"down3d": dim, "up3d": 2 * dim}.get(mode)
        self.time_conv = Conv(dim, time_out, (3, 1, 1), dtype=dtype, rngs=rngs) if time_out else None


class Attention(nnx.Module):
    """The middle block's single-head attention over the H*W positions of each frame."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.norm = Norm(dim)
        self.to_qkv = Conv(dim, 3 * dim, (1, 1), dtype=dtype, rngs=rngs)
        self.proj = Conv(dim, dim, (1, 1), dtype=dtype, rngs=rngs)


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.res0 = ResBlock(dim, dim, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, dtype=dtype, rngs=rngs)
        self.res1 = ResBlock(dim, dim, dtype=dtype, rngs=rngs)


def _stage(plan: list[tuple], *, dtype, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([ResBlock(e[1], e[2], dtype=dtype, rngs=rngs) if e[0] == "res"
                     else Resample(e[0], e[1], dtype=dtype, rngs=rngs) for e in plan])


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        top = cfg.base_dim * cfg.dim_mult[-1]
        self.conv_in = Conv(3, cfg.base_dim, (3, 3, 3), dtype=dtype, rngs=rngs)
        self.down = _stage(encoder_plan(cfg), dtype=dtype, rngs=rngs)
        self.mid = MidBlock(top, dtype=dtype, rngs=rngs)
        self.norm_out = Norm(top)
        self.conv_out = Conv(top, 2 * cfg.z_dim, (3, 3, 3), dtype=dtype, rngs=rngs)


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, rngs: nnx.Rngs):
        top = cfg.base_dim * cfg.dim_mult[-1]
        self.conv_in = Conv(cfg.z_dim, top, (3, 3, 3), dtype=dtype, rngs=rngs)
        self.mid = MidBlock(top, dtype=dtype, rngs=rngs)
        self.up = _stage(decoder_plan(cfg), dtype=dtype, rngs=rngs)
        self.norm_out = Norm(cfg.base_dim * cfg.dim_mult[0])
        self.conv_out = Conv(cfg.base_dim * cfg.dim_mult[0], 3, (3, 3, 3), dtype=dtype, rngs=rngs)


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------


def _add_bias(y: jax.Array, b: jax.Array | None, dtype) -> jax.Array:
    """A conv output plus its bias, added in fp32 and rounded once to dtype (b=None: no bias, the caller adds it
    later through `normed_causal_conv`'s x_bias)."""
    return y.astype(dtype) if b is None else norm_ref.add_bias(y, b, dtype)


def dense(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """A 1x1(x1) convolution as a matmul: x [..., C] @ w [C, O] (any leading kernel dims of size 1) + b [O]."""
    w2 = w.reshape(w.shape[-2], w.shape[-1])
    y = jax.lax.dot_general(x.astype(w2.dtype), w2, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=f32,
                            precision=precision(w2.dtype))
    return _add_bias(y, b, w2.dtype)


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, padding: tuple) -> jax.Array:
    """x [N, H, W, C], w [kh, kw, C, O] -> [N, H', W', O]; padding ((top, bottom), (left, right))."""
    y = jax.lax.conv_general_dilated(x.astype(w.dtype), w, (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision(w.dtype))
    return _add_bias(y, b, w.dtype)


def conv3d(seq: jax.Array, w: jax.Array, b: jax.Array | None, impl: str, stride_t: int = 1) -> jax.Array:
    """seq [B, Ti, H, W, C] (time already padded or cached), w [kt, kh, kw, C, O] -> [B, To, H, W, O], plus the
    bias b [O] (None: without it).

    Valid in time (To = (Ti - kt) // stride_t + 1), 'same' zero padding kh//2, kw//2 in space."""
    kt, kh, kw, c, o = w.shape
    seq = seq.astype(w.dtype)
    if impl in ("xla3d", "ndhwc"):
        y = jax.lax.conv_general_dilated(seq, w, (stride_t, 1, 1), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=precision(w.dtype))
        return _add_bias(y, b, w.dtype)
    if impl != "fold":
        raise ValueError(f"unknown conv implementation {impl!r}; choose one of {CONV_IMPLS}")
    bsz, ti, h, wd, _ = seq.shape
    to = (ti - kt) // stride_t + 1
    # Tap k of output frame t reads input frame t*stride_t + k; taps go tap-major into the channels.
    taps = [jax.lax.slice_in_dim(seq, k, k + stride_t * (to - 1) + 1, stride_t, axis=1) for k in range(kt)]
    folded = taps[0] if kt == 1 else jnp.concatenate(taps, axis=-1)  # [B, To, H, W, kt*C]
    w2 = w.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kt * c, o)
    if kh == kw == 1:
        return dense(folded, w2, b)
    y = conv2d(folded.reshape(bsz * to, h, wd, kt * c), w2, b, 1, ((kh // 2, kh // 2), (kw // 2, kw // 2)))
    return y.reshape(bsz, to, h, wd, o)


def _past_frames(x: jax.Array, cache, kt: int) -> jax.Array:
    """The kt-1 frames before chunk x [B, T, ...]: the cache, or zeros where the video starts (cache=None)."""
    return jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), x.dtype) if cache is None else cache


def causal_conv(conv: Conv, x: jax.Array, cache, impl: str):
    """CausalConv3d with kernel (kt, k, k): x [B, T, H, W, C] -> ([B, T, H, W, O], cache [B, kt-1, H, W, C]).

    The cache holds the last kt-1 frames of this conv's input so far; cache=None starts with zero frames."""
    w = conv.weight[...]
    seq = jnp.concatenate([_past_frames(x, cache, w.shape[0]), x], axis=1)
    return conv3d(seq, w, conv.bias[...], impl), seq[:, -(w.shape[0] - 1):]


def normed_causal_conv(conv: Conv, norm: Norm, x: jax.Array, cache, impl: str, dtype,
                       x_bias: jax.Array | None = None, add_bias: bool = True):
    """CausalConv3d on SiLU(RMS_norm(x)), the residual blocks' and the output head's conv:
    x [B, T, H, W, C] -> ([B, T, H, W, O], cache [B, kt-1, H, W, C]).

    The cache holds the last kt-1 frames of x before the norm (the norm is per frame and per pixel, so normalising
    them again in the next chunk gives the same values), and the norm kernel reads the cached frames and x in one
    pass (`norms.vae_rms_norm_silu`): no normalised chunk is written and then copied next to the cache. x_bias [C]:
    the previous conv's bias, not yet added to x, added in the same pass; add_bias=False leaves this conv's own bias
    out of its output, for the next normed conv's x_bias. cache=None starts
    with zero frames, which the norm maps to zero: the spec's zero padding of the conv input."""
    w = conv.weight[...]
    kt = w.shape[0]
    before = _past_frames(x, cache, kt)
    seq = norms.vae_rms_norm_silu(x, norm.gamma[...], out_dtype=dtype, prefix=before, bias=x_bias)
    x_final = x if x_bias is None else _add_bias(x, x_bias, x.dtype)
    new_cache = jnp.concatenate([before, x_final], axis=1)[:, -(kt - 1):]
    return conv3d(seq, w, conv.bias[...] if add_bias else None, impl), new_cache


def res_block(blk: ResBlock, x: jax.Array, cache, impl: str, dtype):
    """x [B, T, H, W, C_in] -> [B, T, H, W, C_out]; cache = (conv1's, conv2's). conv1's bias is added inside
    conv2's norm pass rather than by a pass of its own."""
    h = x if blk.shortcut is None else dense(x, blk.shortcut.weight[...], blk.shortcut.bias[...])
    a, c1 = normed_causal_conv(blk.conv1, blk.norm1, x, None if cache is None else cache[0], impl, dtype,
                               add_bias=False)
    a, c2 = normed_causal_conv(blk.conv2, blk.norm2, a, None if cache is None else cache[1], impl, dtype,
                               x_bias=blk.conv1.bias[...])
    return h + a, (c1, c2)


def attention(attn: Attention, x: jax.Array, dtype) -> jax.Array:
    """Single-head self-attention within each frame: x [B, T, H, W, C] -> x + proj(softmax(q k^T / sqrt(C)) v)."""
    b, t, h, w, c = x.shape
    a = norm_ref.vae_rms_norm(x, attn.norm.gamma[...]).astype(dtype).reshape(b * t, h * w, c)
    q, k, v = jnp.split(dense(a, attn.to_qkv.weight[...], attn.to_qkv.bias[...]), 3, axis=-1)
    prec = precision(q.dtype)
    scores = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=f32, precision=prec) * (c ** -0.5)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    o = jnp.einsum("nqk,nkc->nqc", probs, v, preferred_element_type=f32, precision=prec).astype(dtype)
    o = dense(o, attn.proj.weight[...], attn.proj.bias[...])
    return (x + o.reshape(b, t, h, w, c)).astype(dtype)


def mid_block(mid: MidBlock, x: jax.Array, cache, impl: str, dtype):
    x, c0 = res_block(mid.res0, x, None if cache is None else cache[0], impl, dtype)
    x = attention(mid.attn, x, dtype)
    x, c1 = res_block(mid.res1, x, None if cache is None else cache[1], impl, dtype)
    return x, (c0, c1)


def _per_frame_conv2d(conv: Conv, x: jax.Array, stride: int, padding: tuple) -> jax.Array:
    """A 2-D conv on every frame: [B, T, H, W, C] -> [B, T, H', W', O]."""
    b, t = x.shape[:2]
    y = conv2d(x.reshape(b * t, *x.shape[2:]), conv.weight[...], conv.bias[...], stride, padding)
    return y.reshape(b, t, *y.shape[1:])


def downsample(rs: Resample, x: jax.Array, cache, impl: str):
    """Zero-pad right/bottom by 1 and a stride-2 3x3 conv per frame; down3d then halves time with a stride-2 time conv.

    down3d's first chunk passes frame 0 through and convolves windows (x0,x1,x2), (x2,x3,x4), ...; later chunks
    prepend the last frame of the previous chunk (cache [B, 1, H/2, W/2, C])."""
    x = _per_frame_conv2d(rs.conv, x, 2, ((0, 1), (0, 1)))
    if rs.mode == "down2d":
        return x, ()
    w, b = rs.time_conv.weight[...], rs.time_conv.bias[...]
    if cache is None:  # a chunk of fewer than 3 frames has no complete window yet
        parts = [x[:, :1]] + ([conv3d(x, w, b, impl, stride_t=2)] if x.shape[1] >= 3 else [])
        out = jnp.concatenate(parts, axis=1)
    else:
        out = conv3d(jnp.concatenate([cache, x], axis=1), w, b, impl, stride_t=2)
    return out, x[:, -1:]


def upsample(rs: Resample, x: jax.Array, cache, impl: str):
    """up3d doubles time first: a causal (3,1,1) conv C -> 2C whose two halves become frames 2t and 2t+1. Its first
    chunk keeps frame 0 as one frame (the conv sees it as zeros, spec 7.4). Then nearest x2 in space and a 3x3 conv."""
    new_cache = ()
    if rs.mode == "up3d":
        b, t, h, w, c = x.shape
        if cache is None:
            conv_in = jnp.concatenate([jnp.zeros((b, 3, h, w, c), x.dtype), x[:, 1:]], axis=1)
        else:
            conv_in = jnp.concatenate([cache, x], axis=1)
        y = conv3d(conv_in, rs.time_conv.weight[...], rs.time_conv.bias[...], impl)  # [B, T, H, W, 2C]
        y = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        x = jnp.concatenate([x[:, :1], y[:, 2:]], axis=1) if cache is None else y
        new_cache = conv_in[:, -2:]
    b, t, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, :, None, :, None, :], (b, t, h, 2, w, 2, c)).reshape(b, t, 2 * h, 2 * w, c)
    return _per_frame_conv2d(rs.conv, x, 1, ((1, 1), (1, 1))), new_cache


def _stage_forward(blocks: nnx.List, x: jax.Array, cache, impl: str, dtype):
    caches = []
    for i, blk in enumerate(blocks):
        c = None if cache is None else cache[i]
        if isinstance(blk, ResBlock):
            x, c = res_block(blk, x, c, impl, dtype)
        elif blk.mode.startswith("down"):
            x, c = downsample(blk, x, c, impl)
        else:
            x, c = upsample(blk, x, c, impl)
        caches.append(c)
    return x, caches


def encoder_forward(enc: Encoder, x: jax.Array, cache, impl: str, dtype):
    """Pixel chunk [B, T, H, W, 3] -> [B, T', H/8, W/8, 2z] (T' = 1 + (T-1)/4 on the first chunk, T/4 later)."""
    prev = {} if cache is None else cache
    x, c_in = causal_conv(enc.conv_in, x.astype(dtype), prev.get("conv_in"), impl)
    x, c_down = _stage_forward(enc.down, x, prev.get("down"), impl, dtype)
    x, c_mid = mid_block(enc.mid, x, prev.get("mid"), impl, dtype)
    x, c_out = normed_causal_conv(enc.conv_out, enc.norm_out, x, prev.get("conv_out"), impl, dtype)
    return x, {"conv_in": c_in, "down": c_down, "mid": c_mid, "conv_out": c_out}


def decoder_forward(dec: Decoder, x: jax.Array, cache, impl: str, dtype):
    """Latent chunk [B, T, h, w, z] -> [B, T', 8h, 8w, 3] (T' = 4T - 3 on the first chunk, 4T later), unclamped."""
    prev = {} if cache is None else cache
    x, c_in = causal_conv(dec.conv_in, x.astype(dtype), prev.get("conv_in"), impl)
    x, c_mid = mid_block(dec.mid, x, prev.get("mid"), impl, dtype)
    x, c_up = _stage_forward(dec.up, x, prev.get("up"), impl, dtype)
    x, c_out = normed_causal_conv(dec.conv_out, dec.norm_out, x, prev.get("conv_out"), impl, dtype)
    return x, {"conv_in": c_in, "mid": c_mid, "up": c_up, "conv_out": c_out}


def run_causal(forward, x: jax.Array, first: int, step: int, chunked: bool) -> jax.Array:
    """Runs forward(x_chunk, cache) -> (y, cache) over time: frames [0, first) then chunks of `step` in a lax.scan.

    x [B, T, ...] with T = first + k*step; returns the outputs concatenated over time. chunked=False makes one call
    on the whole sequence (the full-sequence equivalent)."""
    if not chunked:
        return forward(x, None)[0]
    y0, cache = forward(x[:, :first], None)
    b, t = x.shape[:2]
    n = (t - first) // step
    if n == 0:
        return y0
    rest = jnp.moveaxis(x[:, first:].reshape(b, n, step, *x.shape[2:]), 1, 0)  # [n, B, step, ...]

    def body(cache, chunk):
        y, cache = forward(chunk, cache)
        return cache, y

    ys = jax.lax.scan(body, cache, rest)[1]  # [n, B, t_out, ...]
    ys = jnp.moveaxis(ys, 0, 1).reshape(b, n * ys.shape[2], *ys.shape[3:])
    return jnp.concatenate([y0, ys], axis=1)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class WanVAE(nnx.Module):
    """Wan2.1 VAE: encode(video[B,3,T,H,W]) -> mu[B,z,1+(T-1)/4,H/8,W/8]; decode(z) -> video[B,3,4T-3,8H,8W].

    Both take and return raw (un-normalised) latents, like diffusers' AutoencoderKLWan `_encode(x)[:, :z]` and
    `decode(z)`; pipelines apply `normalize_latents` / `denormalize_latents`. Pixels are in [-1, 1]; decode clamps.
    Weights and activations are in `dtype` (bf16 for TurboDiffusion, fp32 for parity); both methods are jitted and
    compile once per input shape. `conv` picks the convolution path (see the module docstring).
    """

    def __init__(self, cfg: VAEConfig = VAEConfig(), *, dtype=jnp.bfloat16, conv: str = "fold", rngs: nnx.Rngs):
        if conv not in CONV_IMPLS:
            raise ValueError(f"unknown conv implementation {conv!r}; choose one of {CONV_IMPLS}")
        self.cfg = cfg
        self.dtype = dtype
        self.conv = conv
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.quant_conv = Conv(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), dtype=dtype, rngs=rngs)
        self.post_quant_conv = Conv(cfg.z_dim, cfg.z_dim, (1, 1, 1), dtype=dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)

    def encode(self, video: jax.Array, *, chunked: bool = True) -> jax.Array:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 8 -> mu [B, z, 1 + k, H/8, W/8]."""
        check_video(self.cfg, video.shape)
        graphdef, state = nnx.split(self)
        return jitted(encode_video, self.conv)(graphdef, state, video, chunked)

    def decode(self, z: jax.Array, *, chunked: bool = True, tile: int | None = None,
               tile_overlap: int | None = None) -> jax.Array:
        """Raw latents z [B, z, T, h, w] -> video [B, 3, 4T - 3, 8h, 8w] in [-1, 1], in the VAE's dtype.

        tile (latent pixels, e.g. 32 = 256 output pixels): decode overlapping tile x tile windows one at a time and
        blend them (`decode_tiled`), for sizes whose whole-frame decode does not fit; tile_overlap defaults to
        tile // 4. The seams are blended, not exact: each window sees only its own latents."""
        check_latents(self.cfg, z.shape)
        graphdef, state = nnx.split(self)
        decode = functools.partial(jitted(decode_latents, self.conv), graphdef, state, chunked=chunked)
        if tile is None:
            return decode(z)
        return decode_tiled(decode, z, tile, tile // 4 if tile_overlap is None else tile_overlap,
                            self.cfg.spatial_factor)


def encode_video(vae: WanVAE, video: jax.Array, chunked: bool = True) -> jax.Array:
    """The traceable body of WanVAE.encode: 1 frame, then 4-frame chunks through the encoder; then mu."""
    tf = vae.cfg.temporal_factor
    x = jnp.moveaxis(video, 1, -1)  # [B, T, H, W, 3]
    forward = functools.partial(encoder_forward, vae.encoder, impl=vae.conv, dtype=vae.dtype)
    h = run_causal(forward, x, 1, tf, chunked)
    z = vae.cfg.z_dim
    mu = dense(h, vae.quant_conv.weight[..., :z], vae.quant_conv.bias[:z])
    return jnp.moveaxis(mu, -1, 1)


def decode_latents(vae: WanVAE, z: jax.Array, chunked: bool = True) -> jax.Array:
    """The traceable body of WanVAE.decode: post_quant_conv on all of z, then one latent frame per chunk, clamped."""
    x = jnp.moveaxis(z, 1, -1)  # [B, T, h, w, z]
    x = dense(x.astype(vae.dtype), vae.post_quant_conv.weight[...], vae.post_quant_conv.bias[...])
    forward = functools.partial(decoder_forward, vae.decoder, impl=vae.conv, dtype=vae.dtype)
    y = run_causal(forward, x, 1, 1, chunked)
    return jnp.moveaxis(jnp.clip(y, -1.0, 1.0), -1, 1)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest windows of `tile` that cover [0, size) with neighbours sharing at least
    `overlap`, spread evenly from 0 to size - tile (one window when tile >= size)."""
    if tile >= size:
        return [0]
    n = -(-(size - overlap) // (tile - overlap))
    return [i * (size - tile) // (n - 1) for i in range(n)]


def blend_ramp(length: int, start: int, end: int, ramp_lo: int, ramp_hi: int) -> np.ndarray:
    """Weights [length] of a window's pixels [start, end) of an axis: rising linearly over its first ramp_lo
    pixels and falling over its last ramp_hi (0 where the window has no neighbour on that side), 1 between."""
    w = np.zeros(length, np.float32)
    n = end - start
    ramp = np.ones(n, np.float32)
    if ramp_lo:
        ramp[:ramp_lo] = np.minimum(ramp[:ramp_lo], (np.arange(ramp_lo) + 0.5) / ramp_lo)
    if ramp_hi:
        ramp[n - ramp_hi:] = np.minimum(ramp[n - ramp_hi:], (np.arange(ramp_hi)[::-1] + 0.5) / ramp_hi)
    w[start:end] = ramp
    return w


def _axis_windows(size: int, tile: int, overlap: int, scale: int) -> list[tuple[int, int, np.ndarray]]:
    """(latent start, latent end, output-pixel weights [(end - start) * scale]) of each window along one axis: ramps
    across the pixels it shares with each neighbour, 1 elsewhere."""
    starts = tile_starts(size, tile, overlap)
    ends = [min(s + tile, size) for s in starts]
    out = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        lo = (ends[i - 1] - s) * scale if i > 0 else 0
        hi = (e - starts[i + 1]) * scale if i + 1 < len(starts) else 0
        out.append((s, e, blend_ramp((e - s) * scale, 0, (e - s) * scale, lo, hi)))
    return out


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _accumulate(total: jax.Array, weights: jax.Array, part: jax.Array, weight: jax.Array, y0, x0):
    """total[..., y0:, x0:] += part * weight and weights[y0:, x0:] += weight, in place (donated): total fp32
    [B, 3, T, H, W], weights [H, W], part [B, 3, T, th, tw], weight [th, tw]."""
    idx = (0, 0, 0, y0, x0)
    window = jax.lax.dynamic_slice(total, idx, part.shape) + part.astype(f32) * weight
    acc = jax.lax.dynamic_slice(weights, (y0, x0), weight.shape) + weight
    return (jax.lax.dynamic_update_slice(total, window, idx),
            jax.lax.dynamic_update_slice(weights, acc, (y0, x0)))


def decode_tiled(decode, z: jax.Array, tile: int, overlap: int, scale: int) -> jax.Array:
    """Spatially tiled decode: decode(z_window [B, z, T, th, tw]) -> [B, 3, T', scale*th, scale*tw] on overlapping
    windows of z [B, z, T, h, w], blended -> [B, 3, T', scale*h, scale*w] in decode's dtype.

    Windows of at most `tile` latent pixels overlap by at least `overlap`; the edge windows end at the frame's edge
    (so at most four window shapes compile). Each output pixel is the weighted mean of the windows covering it, with
    weights ramping linearly across every overlap, so seams fade instead of cutting. Device memory: one window's
    decode plus the fp32 output."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tile must be >= 1 and 0 <= tile_overlap < tile, got tile {tile}, overlap {overlap}")
    h, w = z.shape[-2:]
    total = weights = dtype = None
    for hs, he, wy in _axis_windows(h, tile, overlap, scale):
        for ws, we, wx in _axis_windows(w, tile, overlap, scale):
            part = decode(z[..., hs:he, ws:we])
            if total is None:
                dtype = part.dtype
                total = jnp.zeros((*part.shape[:3], h * scale, w * scale), f32)
                weights = jnp.zeros((h * scale, w * scale), f32)
            total, weights = _accumulate(total, weights, part, jnp.asarray(np.outer(wy, wx)), hs * scale, ws * scale)
    return (total / weights).astype(dtype)


@functools.cache
def jitted(body, conv: str):
    """body(vae, x, chunked) as jit(graphdef, state, x, chunked), with the XLA options the conv path needs."""
    return jax.jit(lambda graphdef, state, x, chunked: body(nnx.merge(graphdef, state), x, chunked),
                   static_argnums=(0, 3), compiler_options=COMPILER_OPTIONS.get(conv))


def check_video(cfg: VAEConfig, shape: tuple[int, ...]) -> None:
    """Shape checks for encode, with messages that say what to change."""
    if len(shape) != 5 or shape[1] != 3:
        raise ValueError(f"video must be [B, 3, T, H, W] (RGB in [-1, 1]), got shape {tuple(shape)}")
    _, _, t, h, w = shape
    tf, sf = cfg.temporal_factor, cfg.spatial_factor
    if (t - 1) % tf:
        raise ValueError(f"video has {t} frames; the VAE takes 1 + {tf}k frames (e.g. {1 + tf * ((t - 1) // tf)} "
                         f"or {1 + tf * ((t - 1) // tf + 1)})")
    if h % sf or w % sf:
        raise ValueError(f"video height and width ({h}, {w}) must be multiples of {sf}")


def check_latents(cfg: VAEConfig, shape: tuple[int, ...]) -> None:
    if len(shape) != 5 or shape[1] != cfg.z_dim:
        raise ValueError(f"latents must be [B, {cfg.z_dim}, T, h, w], got shape {tuple(shape)}")


def normalize_latents(mu: jax.Array, mean=LATENTS_MEAN, std=LATENTS_STD) -> jax.Array:
    """(mu - mean) * (1 / std) per channel in fp32, as stock Wan applies its scale = [mean, 1/std]: raw encoder
    output [B, 16, T, h, w] -> the DiT's latent space. (TurboDiffusion runs this inside its bf16 VAE with bf16
    constants; fp32 differs from that by bf16 rounding only.)"""
    inv_std = 1.0 / np.asarray(std, np.float32)
    return (mu.astype(f32) - _channel_vec(mean, mu)) * _channel_vec(inv_std, mu)


def denormalize_latents(z: jax.Array, mean=LATENTS_MEAN, std=LATENTS_STD) -> jax.Array:
    """z * std + mean per channel in fp32: the sampler's latents [B, 16, T, h, w] -> what decode takes."""
    return z.astype(f32) * _channel_vec(std, z) + _channel_vec(mean, z)


def _channel_vec(values, x: jax.Array) -> jax.Array:
    """16 per-channel constants as [1, C, 1, 1, 1] fp32, checked against x [B, C, T, h, w]."""
    v = np.asarray(values, np.float32)
    if x.ndim != 5 or x.shape[1] != v.shape[0]:
        raise ValueError(f"latents must be [B, {v.shape[0]}, T, h, w], got shape {tuple(x.shape)}")
    return jnp.asarray(v).reshape(1, -1, 1, 1, 1)
