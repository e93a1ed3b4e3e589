"""DiT structure: presets and parameter counts of the spec, input validation, dtype flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import turbojax
from turbojax.models.config import PRESETS, param_count

SPEC_COUNTS = {  # wan-model.md 1.1, without SLA's proj_l
    "wan2.1-t2v-1.3b": 1_418_996_800,
    "wan2.1-t2v-14b": 14_288_491_584,
    "wan2.2-i2v-a14b": 14_288_901_184,
}


@pytest.mark.parametrize("name", list(SPEC_COUNTS))
def test_preset_parameter_counts(name):
    cfg = PRESETS[name]
    assert param_count(cfg.replace(sla_proj=False)) == SPEC_COUNTS[name]
    assert param_count(cfg) == SPEC_COUNTS[name] + cfg.num_layers * (128 * 128 + 128)


@pytest.mark.parametrize("name", list(PRESETS))
def test_model_has_exactly_the_counted_parameters(name):
    cfg = PRESETS[name]
    abstract = nnx.eval_shape(lambda: turbojax.WanDiT(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(int(np.prod(x.shape)) for x in leaves) == param_count(cfg)


def test_preset_shapes():
    assert PRESETS["wan2.2-i2v-a14b"].in_dim == 36 and PRESETS["wan2.2-i2v-a14b"].cond_dim == 20
    assert all(c.head_dim == 128 for n, c in PRESETS.items() if n != "tiny")
    with pytest.raises(ValueError, match="unknown preset"):
        turbojax.get_preset("wan3")


@pytest.fixture(scope="module")
def tiny():
    cfg = turbojax.get_preset("tiny")
    return turbojax.WanDiT(cfg, rngs=nnx.Rngs(0)), cfg


def test_dtype_flow(tiny):
    dit, cfg = tiny
    assert dit.residual_dtype == jnp.bfloat16  # TurboDiffusion family
    assert dit.blocks.self_attn.q.weight[...].dtype == jnp.bfloat16
    assert dit.blocks.self_attn.norm_q.weight[...].dtype == jnp.float32
    assert dit.time_embedding.linear_1.weight[...].dtype == jnp.float32
    assert dit.head.linear.weight[...].dtype == jnp.float32
    out = dit(jnp.zeros((1, 16, 1, 2, 2)), jnp.array([500.0]), jnp.zeros((1, 512, cfg.text_dim)))
    assert out.dtype == jnp.float32 and out.shape == (1, 16, 1, 2, 2)
    stock = turbojax.WanDiT(cfg.replace(family="wan"), rngs=nnx.Rngs(0))
    assert stock.residual_dtype == jnp.float32


def test_any_valid_size_runs(tiny):
    """Token counts need not be multiples of anything (here 5 x 3 x 7 = 105 tokens)."""
    dit, cfg = tiny
    out = dit(jnp.ones((2, 16, 5, 6, 14)), jnp.array([988.0, 608.0]), jnp.ones((2, 512, cfg.text_dim)))
    assert out.shape == (2, 16, 5, 6, 14) and bool(jnp.isfinite(out).all())


@pytest.mark.parametrize("latents, t, ctx, match", [
    ((1, 17, 3, 4, 6), (1,), (1, 512, 32), "channels"),
    ((1, 16, 3, 5, 6), (1,), (1, 512, 32), "multiples of the patch size"),
    ((1, 16, 3, 4, 6), (2,), (1, 512, 32), "timestep"),
    ((1, 16, 3, 4, 6), (1,), (1, 512, 31), "context"),
    ((16, 3, 4, 6), (1,), (1, 512, 32), r"\[B, C, T, H, W\]"),
])
def test_bad_shapes_have_clear_errors(tiny, latents, t, ctx, match):
    dit, _ = tiny
    with pytest.raises(ValueError, match=match):
        dit(jnp.zeros(latents), jnp.zeros(t), jnp.zeros(ctx))


def test_t2v_model_rejects_cond(tiny):
    dit, cfg = tiny
    with pytest.raises(ValueError, match="cond=None"):
        dit(jnp.zeros((1, 16, 1, 2, 2)), jnp.zeros((1,)), jnp.zeros((1, 512, 32)), cond=jnp.zeros((1, 20, 1, 2, 2)))


def test_attention_spec_validation():
    with pytest.raises(ValueError, match="unknown attention"):
        turbojax.models.attention.as_spec("flash")
    with pytest.raises(ValueError, match="no implementation"):
        turbojax.AttentionSpec("dense", "pallas")
    with pytest.raises(ValueError, match="topk"):
        turbojax.AttentionSpec("sla", topk=0.0)
