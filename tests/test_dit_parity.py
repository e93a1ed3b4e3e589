"""DiT parity: each upstream checkpoint layout, converted without torch, reproduces diffusers' WanTransformer3DModel.

Oracles are the golden fixtures of tests/fixtures/make_dit_fixtures.py (diffusers 0.42.1, torch 2.13, fp32). Their
`velocity` uses the float64 time sinusoid of stock Wan and TurboDiffusion (diffusers' own fp32 sinusoid is kept as
`velocity_diffusers`; see tests/fixtures/dit/README.md).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import turbojax
from convert.cli import convert

FIXTURES = Path(__file__).parent / "fixtures" / "dit"
CASES = {
    "diffusers_t2v": ["diffusers_t2v"],
    "wan_t2v_safetensors": ["wan_t2v/diffusion_pytorch_model.safetensors"],
    "wan_t2v_pth": ["wan_t2v/wan_t2v.pth"],
    "turbo_t2v": ["turbo_t2v/turbo_t2v.pth"],
    "turbo_t2v_quant": ["turbo_t2v_quant/turbo_t2v_quant.pth"],
    "turbo_i2v": ["turbo_i2v/turbo_i2v.pth"],
}
EXPECTED_LAYOUT = {
    "diffusers_t2v": "diffusers", "wan_t2v_safetensors": "wan", "wan_t2v_pth": "wan",
    "turbo_t2v": "turbodiffusion", "turbo_t2v_quant": "turbodiffusion", "turbo_i2v": "turbodiffusion",
}


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, srcs in CASES.items():
        out[name] = convert([str(FIXTURES / s) for s in srcs], str(root / name), progress=False)
    return out


def _io(name):
    return np.load(FIXTURES / CASES[name][0].split("/")[0] / "io.npz")


def _forward(ckpt, io, **kw):
    # fp32 parity runs -quant weights dequantised (the oracle's weights); W8A8 is tested in test_int8_matmul.py
    dit = turbojax.load_dit(ckpt, dtype=jnp.float32, linears="float", progress=False, **kw)
    cond = jnp.asarray(io["cond"]) if "cond" in io else None
    return np.asarray(jax.jit(dit.__call__)(jnp.asarray(io["latents"]), jnp.asarray(io["timestep"]),
                                            jnp.asarray(io["context"]), cond))


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_forward_matches_diffusers(converted, name):
    io = _io(name)
    out = _forward(converted[name], io)
    assert out.shape == io["velocity"].shape and out.dtype == np.float32
    assert rel_err(out, io["velocity"]) <= 1e-5
    # diffusers' fp32 sinusoid moves its output by ~1.5e-5; we follow stock Wan's float64 one.
    assert rel_err(out, io["velocity_diffusers"]) <= 5e-5


@pytest.mark.parametrize("name", list(CASES))
def test_conversion_metadata(converted, name):
    meta = turbojax.checkpoint.read_meta(converted[name])
    assert meta["source"]["layout"] == EXPECTED_LAYOUT[name]
    assert (meta["quantization"] is not None) == ("quant" in name)
    cfg = turbojax.checkpoint.config_from_meta(meta)
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim, cfg.text_dim) == (24, 2, 2, 32, 32)
    assert cfg.in_dim == (36 if "i2v" in name else 16)
    assert cfg.sla_proj == name.startswith("turbo")
    assert cfg.family == ("turbodiffusion" if name.startswith("turbo") else "wan")
    assert meta["preset"] == (None if "i2v" in name else "tiny")  # the fixtures use the tiny preset's sizes
    assert all(len(h) == 64 for h in meta["source"]["sha256"].values())


def test_three_layouts_convert_to_identical_parameters(converted):
    trees = [turbojax.checkpoint._restore_tree(converted[n] / "params" / "blocks" / "001")
             for n in ("diffusers_t2v", "wan_t2v_safetensors", "wan_t2v_pth")]
    flat = [jax.tree_util.tree_flatten_with_path(t)[0] for t in trees]
    assert [p for p, _ in flat[0]] == [p for p, _ in flat[1]] == [p for p, _ in flat[2]]
    for (_, a), (_, b), (_, c) in zip(*flat):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_turbo_checkpoint_keeps_file_dtypes(converted):
    block = turbojax.checkpoint._restore_tree(converted["turbo_t2v_quant"] / "params" / "blocks" / "000")
    assert block["self_attn"]["q"]["int8_weight"].dtype == np.int8
    assert block["self_attn"]["q"]["scale"].dtype == np.float32
    assert block["self_attn"]["q"]["bias"].dtype == jnp.bfloat16
    assert block["self_attn"]["norm_q"]["weight"].dtype == np.float32
    assert block["self_attn"]["proj_l"]["weight"].shape == (12, 12)


def test_i2v_needs_cond(converted):
    io = _io("turbo_i2v")
    dit = turbojax.load_dit(converted["turbo_i2v"], dtype=jnp.float32, progress=False)
    with pytest.raises(ValueError, match="cond"):
        dit(jnp.asarray(io["latents"]), jnp.asarray(io["timestep"]), jnp.asarray(io["context"]))


def test_bf16_forward_is_close(converted):
    """The production dtype path (bf16 matmuls, bf16 residual for TurboDiffusion) stays near the fp32 oracle."""
    io = _io("turbo_t2v")
    dit = turbojax.load_dit(converted["turbo_t2v"], progress=False)
    assert dit.residual_dtype == jnp.bfloat16
    out = np.asarray(dit(jnp.asarray(io["latents"]), jnp.asarray(io["timestep"]), jnp.asarray(io["context"])))
    assert out.dtype == np.float32
    assert rel_err(out, io["velocity"]) < 3e-2


def test_sla_reference_with_all_blocks_and_zero_proj_equals_dense(converted):
    """SLA selecting every key block, with proj_l zeroed, is exactly dense softmax attention."""
    io = _io("turbo_t2v")
    dense = _forward(converted["turbo_t2v"], io)
    dit = turbojax.load_dit(converted["turbo_t2v"], dtype=jnp.float32, progress=False,
                            attention=turbojax.AttentionSpec("sla", "reference", topk=1.0, block_q=4, block_k=4))
    dit.blocks.self_attn.proj_l.weight[...] = jnp.zeros_like(dit.blocks.self_attn.proj_l.weight[...])
    dit.blocks.self_attn.proj_l.bias[...] = jnp.zeros_like(dit.blocks.self_attn.proj_l.bias[...])
    out = np.asarray(dit(jnp.asarray(io["latents"]), jnp.asarray(io["timestep"]), jnp.asarray(io["context"])))
    assert rel_err(out, dense) <= 1e-5


def test_load_refuses_incomplete_or_extra_blocks(converted, tmp_path):
    import shutil

    from turbojax.checkpoint import CheckpointFormatError

    partial = tmp_path / "partial"
    shutil.copytree(converted["turbo_t2v"], partial)
    block = turbojax.checkpoint._restore_tree(partial / "params" / "blocks" / "001")
    del block["self_attn"]["proj_l"]
    shutil.rmtree(partial / "params" / "blocks" / "001")
    turbojax.checkpoint._save_tree((partial / "params" / "blocks" / "001").absolute(), block)
    with pytest.raises(CheckpointFormatError, match=r"proj_l\.(weight|bias) is in 1 of the 2 blocks"):
        turbojax.load_dit(partial, dtype=jnp.float32, progress=False)

    extra = tmp_path / "extra"
    shutil.copytree(converted["turbo_t2v"], extra)
    shutil.copytree(extra / "params" / "blocks" / "001", extra / "params" / "blocks" / "002")
    with pytest.raises(CheckpointFormatError, match="beyond the model's 2 blocks"):
        turbojax.load_dit(extra, dtype=jnp.float32, progress=False)

    missing = tmp_path / "missing"
    shutil.copytree(converted["turbo_t2v"], missing)
    shutil.rmtree(missing / "params" / "blocks" / "001")
    with pytest.raises(CheckpointFormatError, match="block 1 is missing"):
        turbojax.load_dit(missing, dtype=jnp.float32, progress=False)
