"""GPU-only checks (deselected by default; run on the device with `pytest -m gpu`): cuDNN attention and the bf16 DiT
at real shapes agree with the pure-XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import turbojax
from turbojax.models.attention import as_spec, dense, dense_xla

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _require_gpu():
    assert jax.default_backend() == "gpu", "GPU tests must run on a GPU (pytest -m gpu on the device machine)"


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_cudnn_attention_matches_xla_at_480p_tokens():
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (1, 32760, 12, 128), jnp.bfloat16) for kk in keys)
    ref = dense_xla(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    out = dense(q, k, v)  # auto: cuDNN for bf16 on GPU
    assert _rel(out, ref) < 1e-2


def test_bf16_dit_cudnn_vs_xla_attention_real_width():
    cfg = turbojax.get_preset("wan2.1-t2v-1.3b").replace(num_layers=2)
    dit = nnx.jit(lambda: turbojax.WanDiT(cfg, rngs=nnx.Rngs(0)))()
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (1, 16, 21, 60, 104), jnp.bfloat16)
    ctx = jax.random.normal(keys[1], (1, 512, 4096), jnp.bfloat16)
    t = jnp.array([988.0])
    outs = []
    for name in ("dense_cudnn", "dense_xla"):
        dit.attention = as_spec(name)
        outs.append(np.asarray(nnx.jit(lambda m, *a: m(*a))(dit, x, t, ctx)))
    assert np.isfinite(outs[0]).all()
    assert _rel(outs[0], outs[1]) < 3e-2
