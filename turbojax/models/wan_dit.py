"""The Wan DiT in Flax NNX, op for op as wan-model.md section 2 specifies.

Dtypes: matmul weights and activations in `dtype` (bf16 for real runs), with fp32 accumulation; norm statistics,
modulation, the time embedding and the head in fp32; the residual stream in `residual_dtype` (bf16 for
TurboDiffusion checkpoints, fp32 for stock Wan). Blocks are stacked on a leading layer axis and run with lax.scan,
so the program compiles one block whatever the depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import int8_matmul, norms
from turbojax.models import layers
from turbojax.models.attention import AttentionSpec, dense, self_attention
from turbojax.models.config import WanConfig

f32 = jnp.float32
LINEARS = ("float", "w8a8")
# The block Linears TurboDiffusion's -quant checkpoints hold as W8A8 (acceleration.md 5.4): every nn.Linear inside the
# blocks except SLA's proj_l. Paths inside a block.
QUANT_LINEARS = tuple((a, p) for a in ("self_attn", "cross_attn") for p in "qkvo") + (("ffn", "fc1"), ("ffn", "fc2"))


def _normal(rngs: nnx.Rngs, shape, std, dtype):
    return (std * jax.random.normal(rngs.params(), shape, f32)).astype(dtype)


class Linear(nnx.Module):
    """y = x W^T + b with W [out, in]; fp32 accumulation, one rounding to the requested dtype.

    quantized=True is TurboDiffusion's W8A8 Int8Linear (acceleration.md 5): int8_weight [out, in] with one fp32
    scale per 128 x 128 tile, scale [ceil(out/128), ceil(in/128)], and the bias in `dtype` (bf16/fp16). Each call
    quantises x in 128-token x 128-channel tiles and runs the block-scaled int8 GEMM (`pallas_kernels.int8_matmul`:
    the Mosaic GPU GEMM on Hopper, the Pallas-Triton kernels on other GPUs, the reference elsewhere); the result is
    rounded to `dtype` before the bias add, then cast to the requested dtype."""

    def __init__(self, n_in: int, n_out: int, *, dtype, rngs: nnx.Rngs, quantized: bool = False):
        w = _normal(rngs, (n_out, n_in), n_in**-0.5, dtype)
        if quantized:
            q, s = int8_matmul.quantize_blockwise(w)
            self.int8_weight, self.scale, self.weight = nnx.Param(q), nnx.Param(s), None
        else:
            self.weight, self.int8_weight, self.scale = nnx.Param(w), None, None
        self.bias = nnx.Param(_normal(rngs, (n_out,), 0.02, dtype))

    def __call__(self, x: jax.Array, out_dtype, *, activation=None) -> jax.Array:
        """The Linear of activation(x): None, or "gelu_tanh" (`layers.gelu_tanh`), which W8A8 applies inside its
        activation quantiser's pass instead of writing the activated tensor."""
        int8_matmul.reference.check_activation(activation)
        if self.weight is not None:
            x = layers.gelu_tanh(x) if activation == "gelu_tanh" else x
            return layers.linear(x, self.weight[...], self.bias[...], out_dtype)
        bias = self.bias[...]
        y = int8_matmul.int8_linear(x.astype(bias.dtype), self.int8_weight[...], self.scale[...], bias,
                                    activation=activation)
        return y.astype(out_dtype)

    def quantize_input(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """A W8A8 Linear's activation codes for x [..., K]: (int8 [M, K], scale), M the rows of x, for
        `from_codes` of every W8A8 Linear that takes the same x (the self-attention's q, k, v)."""
        return int8_matmul.quantize_blockwise(x.reshape(-1, x.shape[-1]).astype(self.bias.dtype))

    def from_codes(self, codes: tuple[jax.Array, jax.Array], lead_shape: tuple, out_dtype) -> jax.Array:
        """This W8A8 Linear of the x that `quantize_input` coded: [*lead_shape, N] in out_dtype."""
        bias = self.bias[...]
        y = int8_matmul.int8_block_matmul(*codes, self.int8_weight[...], self.scale[...], out_dtype=bias.dtype,
                                          bias=bias)
        return y.reshape(*lead_shape, -1).astype(out_dtype)


class Scale(nnx.Module):
    """A norm's elementwise weight (and optional bias), kept in fp32 like TurboDiffusion's fused norms."""

    def __init__(self, dim: int, *, bias: bool, rngs: nnx.Rngs):
        self.weight = nnx.Param(1.0 + _normal(rngs, (dim,), 0.02, f32))
        self.bias = nnx.Param(_normal(rngs, (dim,), 0.02, f32)) if bias else None


class MLP(nnx.Module):
    """linear_2(act(linear_1(x))): the text and time embedders."""

    def __init__(self, n_in: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.linear_1 = Linear(n_in, dim, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(dim, dim, dtype=dtype, rngs=rngs)


class CrossAttention(nnx.Module):
    """q, k, v, o projections and the q/k RMSNorm weights (over the full width, before the head split)."""

    def __init__(self, cfg: WanConfig, *, dtype, rngs: nnx.Rngs, quantized: bool = False):
        d = cfg.dim
        self.q, self.k, self.v, self.o = (Linear(d, d, dtype=dtype, rngs=rngs, quantized=quantized) for _ in range(4))
        self.norm_q = Scale(d, bias=False, rngs=rngs)
        self.norm_k = Scale(d, bias=False, rngs=rngs)


class SelfAttention(CrossAttention):
    """The cross-attention's parameters plus SLA's proj_l, shared by the heads of the layer."""

    def __init__(self, cfg: WanConfig, *, dtype, rngs: nnx.Rngs, quantized: bool = False):
        super().__init__(cfg, dtype=dtype, rngs=rngs, quantized=quantized)
        self.proj_l = Linear(cfg.head_dim, cfg.head_dim, dtype=dtype, rngs=rngs) if cfg.sla_proj else None


class FFN(nnx.Module):
    def __init__(self, cfg: WanConfig, *, dtype, rngs: nnx.Rngs, quantized: bool = False):
        self.fc1 = Linear(cfg.dim, cfg.ffn_dim, dtype=dtype, rngs=rngs, quantized=quantized)
        self.fc2 = Linear(cfg.ffn_dim, cfg.dim, dtype=dtype, rngs=rngs, quantized=quantized)


class WanBlock(nnx.Module):
    """One transformer block: modulated self-attention, cross-attention over the text, modulated FFN. quantized: the
    QUANT_LINEARS are W8A8."""

    def __init__(self, cfg: WanConfig, *, dtype, rngs: nnx.Rngs, quantized: bool = False):
        self.modulation = nnx.Param(_normal(rngs, (1, 6, cfg.dim), cfg.dim**-0.5, f32))
        self.self_attn = SelfAttention(cfg, dtype=dtype, rngs=rngs, quantized=quantized)
        self.norm3 = Scale(cfg.dim, bias=True, rngs=rngs)
        self.cross_attn = CrossAttention(cfg, dtype=dtype, rngs=rngs, quantized=quantized)
        self.ffn = FFN(cfg, dtype=dtype, rngs=rngs, quantized=quantized)


class Head(nnx.Module):
    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        self.modulation = nnx.Param(_normal(rngs, (1, 2, cfg.dim), cfg.dim**-0.5, f32))
        self.linear = Linear(cfg.dim, cfg.head_out_dim, dtype=f32, rngs=rngs)


class WanDiT(nnx.Module):
    """Wan DiT: dit(latents[B,C,T,H,W], timestep[B], context[B,512,text_dim], cond=None) -> velocity[B,16,T,H,W].

    cond is the I2V condition [B, in_dim - 16, T, H, W] (4 mask + 16 image-latent channels), concatenated after the
    noise channels. timestep is the value the net sees (the rCM sampler passes bf16(1000 t)). Output is fp32.

    linears="w8a8" makes the 10 block Linears of QUANT_LINEARS TurboDiffusion's W8A8 Int8Linear (int8 weights with
    128 x 128 tile scales, activations quantised per call; needs a bf16/fp16 dtype); "float" keeps them in dtype.
    Every other Linear (embeddings, time projection, head, SLA's proj_l) stays in float, as in TurboDiffusion.
    """

    def __init__(
        self,
        cfg: WanConfig,
        *,
        dtype=jnp.bfloat16,
        residual_dtype=None,
        attention: AttentionSpec = AttentionSpec(),
        linears: str = "float",
        rngs: nnx.Rngs,
    ):
        check_linears(linears, dtype)
        self.cfg = cfg
        self.dtype = dtype
        self.linears = linears
        self.residual_dtype = residual_dtype or (dtype if cfg.family == "turbodiffusion" else f32)
        self.attention = attention
        d = cfg.dim
        self.patch_embedding = Linear(cfg.patch_dim, d, dtype=dtype, rngs=rngs)
        self.text_embedding = MLP(cfg.text_dim, d, dtype=dtype, rngs=rngs)
        self.time_embedding = MLP(cfg.freq_dim, d, dtype=f32, rngs=rngs)
        self.time_projection = Linear(d, 6 * d, dtype=f32, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs):
            return WanBlock(cfg, dtype=dtype, rngs=rngs, quantized=linears == "w8a8")

        self.blocks = make_blocks(rngs)
        self.head = Head(cfg, rngs=rngs)

    def __call__(self, latents, timestep, context, cond=None):
        cfg = self.cfg
        if cond is not None:
            _check_cond(cfg, latents, cond)
            latents = jnp.concatenate([latents, cond.astype(latents.dtype)], axis=1)
        _check_inputs(cfg, latents, timestep, context)
        b, _, t, h, w = latents.shape
        pt, ph, pw = cfg.patch_size
        grid = (t // pt, h // ph, w // pw)

        tokens = layers.patchify(latents.astype(self.dtype), cfg.patch_size)
        x = self.patch_embedding(tokens, self.dtype).astype(self.residual_dtype)

        sinusoid = layers.timestep_sinusoid(timestep, cfg.freq_dim)
        e = self.time_embedding.linear_2(
            jax.nn.silu(self.time_embedding.linear_1(sinusoid, f32)), f32
        )  # [B, D] fp32
        e0 = self.time_projection(jax.nn.silu(e), f32).reshape(b, 6, cfg.dim)

        ctx = self.text_embedding.linear_1(context, self.dtype)
        ctx = self.text_embedding.linear_2(layers.gelu_tanh(ctx), self.dtype)

        cos, sin = layers.rope_tables(grid, cfg.head_dim)

        static = dict(cfg=cfg, dtype=self.dtype, attention=self.attention)

        block_def, block_states = nnx.split(self.blocks)

        def body(x, per_block):
            block_state, index = per_block
            blk = nnx.merge(block_def, block_state)
            return block_forward(blk, x, e0, ctx, cos, sin, first=index == 0, **static), None

        # A plain lax.scan over the stacked block state (not nnx.scan), so the model also runs inside other
        # transforms (the sampler's scan over steps) where the parameters are tracers of an outer level.
        x = jax.lax.scan(body, x, (block_states, jnp.arange(cfg.num_layers)))[0]

        head_mod = self.head.modulation[...] + e[:, None, :]  # [B, 2, D] fp32: shift, scale
        shift, scale = head_mod[:, 0], head_mod[:, 1]
        normed = layers.layer_norm(x, cfg.eps).astype(x.dtype)
        out = self.head.linear(layers.modulate(normed, shift, scale, f32), f32)
        return layers.unpatchify(out, grid, cfg.patch_size, cfg.out_dim)


def block_forward(blk: WanBlock, x, e0, ctx, cos, sin, *, first, cfg: WanConfig, dtype, attention: AttentionSpec):
    """One block. x [B, L, D] residual; e0 [B, 6, D] fp32; ctx [B, Lc, D]; cos/sin [L, head_dim/2]; first: whether
    this is block 0 (bool scalar)."""
    dt = dtype  # matmul/activation dtype
    b, l, _ = x.shape
    n, hd = cfg.num_heads, cfg.head_dim
    m = blk.modulation[...] + e0  # [B, 6, D] fp32: shift/scale/gate for attention, then for the FFN

    def gated_add(x, y, gate):
        return (x + y.astype(x.dtype) * gate[:, None, :].astype(x.dtype)).astype(x.dtype)

    # self-attention
    sa = blk.self_attn
    normed = layers.layer_norm(x, cfg.eps).astype(x.dtype)
    if cfg.family == "wan":
        # Stock Wan's residual is still the bf16 patch embedding when block 0's norm1 runs (it turns fp32 at the
        # first gated add), and WanLayerNorm returns its input's dtype: that one norm output is rounded to bf16.
        normed = jnp.where(first, layers.exact_f32(normed.astype(dt)), normed)
    hmod = layers.modulate(normed, m[:, 0], m[:, 1], dt)
    q, k, v = _shared_input_linears((sa.q, sa.k, sa.v), hmod, dt)
    q = _rms_rope(q, sa.norm_q, cos, sin, cfg, dt)
    k = _rms_rope(k, sa.norm_k, cos, sin, cfg, dt)
    v = v.reshape(b, l, n, hd)
    proj_w = sa.proj_l.weight[...] if sa.proj_l is not None else None
    proj_b = sa.proj_l.bias[...] if sa.proj_l is not None else None
    a = self_attention(q, k, v, attention, proj_w, proj_b)
    x = gated_add(x, sa.o(a.reshape(b, l, cfg.dim), dt), m[:, 2])

    # cross-attention: no modulation, no gate, no RoPE, no mask
    ca = blk.cross_attn
    hc = layers.layer_norm(x, cfg.eps, blk.norm3.weight[...], blk.norm3.bias[...]).astype(dt)
    qc = _rms(ca.q(hc, dt), ca.norm_q, cfg, dt).astype(dt).reshape(b, l, n, hd)
    kc = _rms(ca.k(ctx, dt), ca.norm_k, cfg, dt).astype(dt).reshape(b, -1, n, hd)
    vc = ca.v(ctx, dt).reshape(b, -1, n, hd)
    ac = dense(qc, kc, vc)
    x = (x + ca.o(ac.reshape(b, l, cfg.dim), dt).astype(x.dtype)).astype(x.dtype)

    # FFN
    hf = layers.modulate(layers.layer_norm(x, cfg.eps).astype(x.dtype), m[:, 3], m[:, 4], dt)
    y = blk.ffn.fc2(blk.ffn.fc1(hf, dt), dt, activation="gelu_tanh")
    return gated_add(x, y, m[:, 5])


def _shared_input_linears(linears: tuple, x: jax.Array, out_dtype) -> list:
    """[lin(x) for lin in linears], Linears of one kind that share the input x [B, L, K]: W8A8 ones quantise x once
    for all of them (TurboDiffusion quantises it per Linear, to the same codes)."""
    if linears[0].weight is not None:
        return [lin(x, out_dtype) for lin in linears]
    codes = linears[0].quantize_input(x)
    return [lin.from_codes(codes, x.shape[:-1], out_dtype) for lin in linears]


def check_linears(linears: str, dtype) -> None:
    """linears is one of LINEARS, and W8A8 gets the bf16/fp16 activations its quantiser takes."""
    if linears not in LINEARS:
        raise ValueError(f"linears must be one of {', '.join(map(repr, LINEARS))}, got {linears!r}")
    if linears == "w8a8" and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"W8A8 linears quantise bf16 or fp16 activations, but dtype is {jnp.dtype(dtype).name}; use "
                         "dtype=jnp.bfloat16, or linears='float' (a -quant checkpoint's int8 weights dequantised to "
                         "dtype)")


def _qk_rounding(cfg: WanConfig, dtype) -> tuple:
    """(dtype of the normalised q/k, rounding before the weight multiply) of the model family. TurboDiffusion's fused
    norm rounds once to dtype; stock WanRMSNorm rounds the normalised value to dtype and multiplies by its fp32
    weight, so its result stays fp32 (through RoPE, until the attention casts it)."""
    return (f32, dtype) if cfg.family == "wan" else (dtype, None)


def _rms(x, scale: Scale, cfg: WanConfig, dtype):
    """q/k RMSNorm over the full width, rounded as the family does (`_qk_rounding`)."""
    norm_dtype, before_weight = _qk_rounding(cfg, dtype)
    return layers.rms_norm(x, scale.weight[...], cfg.eps, norm_dtype, round_before_weight=before_weight)


def _rms_rope(x, scale: Scale, cos, sin, cfg: WanConfig, dtype):
    """Self-attention q/k: `_rms` then RoPE per head, [B, L, C] -> [B, L, heads, head_dim] dtype, as one fused
    kernel on a GPU (`pallas_kernels.norms`: XLA leaves the rotation at a third of the copy bandwidth)."""
    norm_dtype, before_weight = _qk_rounding(cfg, dtype)
    return norms.rms_norm_rope(x, scale.weight[...], cos, sin, eps=cfg.eps, out_dtype=dtype, head_dim=cfg.head_dim,
                               norm_dtype=norm_dtype, round_before_weight=before_weight)


def _check_cond(cfg: WanConfig, latents, cond):
    if not cfg.cond_dim:
        raise ValueError(f"this model takes no condition (in_dim {cfg.in_dim} = out_dim); pass cond=None")
    if latents.ndim != 5 or cond.ndim != 5:
        raise ValueError(f"latents and cond must be [B, C, T, H, W], got {latents.shape} and {cond.shape}")
    want = (latents.shape[0], cfg.in_dim - latents.shape[1], *latents.shape[2:])
    if tuple(cond.shape) != want:
        raise ValueError(f"cond must be [B, {cfg.in_dim} - {latents.shape[1]}, T, H, W] = {want} to go with latents "
                         f"{latents.shape}, got {cond.shape}")


def _check_inputs(cfg: WanConfig, latents, timestep, context):
    """Shape checks with messages that say what to change (shapes are static, so this runs at trace time)."""
    if latents.ndim != 5:
        raise ValueError(f"latents must be [B, C, T, H, W], got shape {latents.shape}")
    b, c, t, h, w = latents.shape
    if c != cfg.in_dim:
        need = f"{cfg.out_dim} noise channels + {cfg.cond_dim} cond channels" if cfg.cond_dim else f"{cfg.in_dim}"
        raise ValueError(f"the model takes {need} (in_dim {cfg.in_dim}) but got {c} channels; "
                         + ("pass cond=[B, %d, T, H, W]" % cfg.cond_dim if cfg.cond_dim else "pass cond=None"))
    pt, ph, pw = cfg.patch_size
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent T, H, W = {t}, {h}, {w} must be multiples of the patch size {cfg.patch_size} "
                         "(pixel H and W multiples of 16)")
    if timestep.shape != (b,):
        raise ValueError(f"timestep must have shape [B] = [{b}], got {timestep.shape}")
    if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
        raise ValueError(f"context must be [B, text_len, {cfg.text_dim}] with B = {b}, got {context.shape}")
