"""The embedded `tiny` preset: every pipeline component at toy size with random weights from a fixed seed.

It exercises the whole pipeline on a CPU in seconds (prompt -> umT5 -> rCM over the DiT -> VAE -> mp4); its output
is a smoke test, not a video of anything. The tokenizer is a small SentencePiece model (1000 pieces, trained on a
synthetic corpus, shipped in turbojax/assets); the umT5 (dim 32 = the tiny DiT's text_dim), the DiT (`tiny` preset;
in_dim 36 for I2V) and a Wan2.1-layout VAE with z_dim 16 (base width 8) are random.

Weights are drawn on the host with numpy rather than by the modules' jax initialisers: compiling those random
programs costs 5-17 s per model on a CPU, drawing the same shapes with numpy a few milliseconds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from turbojax.models.attention import AttentionSpec
from turbojax.models.config import get_preset
from turbojax.models.umt5 import UMT5_PRESETS, UMT5Encoder
from turbojax.models.vae import VAEConfig, WanVAE
from turbojax.models.wan_dit import WanDiT
from turbojax.text import TextEncoder, UMT5Tokenizer

TOKENIZER = Path(__file__).parent.parent / "assets" / "tiny_spiece.model"
VAE_CONFIG = VAEConfig(base_dim=8, z_dim=16)
I2V_IN_DIM = 36  # 16 noise + 4 mask + 16 image-latent channels, as Wan2.2 I2V-A14B
# Seed offsets per component, so that one user seed gives different weights to each of them.
OFFSETS = {"text": 0, "vae": 1, "high": 2, "low": 3}


def out_in_fan_in(shape: tuple[int, ...]) -> int:
    """Fan-in of Linear weights stored [..., out, in] (the DiT and umT5 layouts; a leading block axis is fine)."""
    return shape[-1]


def kernel_fan_in(shape: tuple[int, ...]) -> int:
    """Fan-in of convolution weights stored [*kernel, in, out] (the VAE layout)."""
    return math.prod(shape[:-1])


def _is_gain(path: tuple) -> bool:
    names = [str(k) for k in path]
    return names[-1] == "gamma" or (names[-1] == "weight" and any(n.startswith("norm") for n in names[:-1]))


def random_init(abstract: nnx.Module, seed: int, fan_in: Callable[[tuple[int, ...]], int]) -> nnx.Module:
    """The module of an abstract (eval_shape) module with host-drawn weights from numpy's generator `seed`: norm
    gains ("gamma", or "weight" under a norm*) 1, biases 0, everything else N(0, 1 / fan_in(shape))."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(abstract)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        shape, dtype = var.shape, var.dtype
        if _is_gain(path):
            value = np.ones(shape, np.float32)
        elif str(path[-1]) == "bias":
            value = np.zeros(shape, np.float32)
        else:
            value = rng.standard_normal(shape, np.float32) / np.float32(math.sqrt(fan_in(shape)))
        leaves.append((path, var.replace(jnp.asarray(value, dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def tiny_dit(seed: int, expert: str = "high", *, i2v: bool = False,
             attention: AttentionSpec = AttentionSpec()) -> WanDiT:
    """The `tiny` DiT preset (T2V, or I2V with in_dim 36); the two I2V experts ("high", "low") differ."""
    cfg = get_preset("tiny")
    if i2v:
        cfg = cfg.replace(in_dim=I2V_IN_DIM)
    abstract = nnx.eval_shape(lambda: WanDiT(cfg, attention=attention, rngs=nnx.Rngs(0)))
    return random_init(abstract, seed + OFFSETS[expert], out_in_fan_in)


def tiny_vae(seed: int) -> WanVAE:
    conv = "ndhwc" if jax.default_backend() == "gpu" else "fold"
    abstract = nnx.eval_shape(lambda: WanVAE(VAE_CONFIG, conv=conv, rngs=nnx.Rngs(0)))
    return random_init(abstract, seed + OFFSETS["vae"], kernel_fan_in)


def tiny_text_encoder(seed: int) -> TextEncoder:
    abstract = nnx.eval_shape(lambda: UMT5Encoder(UMT5_PRESETS["tiny"], rngs=nnx.Rngs(0)))
    return TextEncoder(random_init(abstract, seed + OFFSETS["text"], out_in_fan_in), UMT5Tokenizer(TOKENIZER))
