"""Wan2.1 VAE: both checkpoint layouts, converted without torch, reproduce diffusers' AutoencoderKLWan.

Oracles are the golden fixtures of tests/fixtures/make_vae_fixtures.py (diffusers 0.42.1, torch 2.13, fp32, tiny
config of wan-model.md 10): 13 frames of 16x24 pixels <-> 4 latent frames, so encode and decode cross three chunk
boundaries of the causal cache.
"""

import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import turbojax
from convert import sources
from convert.cli import convert, main as convert_main
from convert.errors import CheckpointError
from turbojax.bench import vae_decode
from turbojax.models import vae as vae_mod

FIXTURES = Path(__file__).parent / "fixtures" / "vae"
SOURCES = {"wan": FIXTURES / "wan" / "Wan2.1_VAE.pth", "diffusers": FIXTURES / "diffusers"}
TINY = vae_mod.VAEConfig(base_dim=8, z_dim=4)


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIXTURES / "io.npz"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    return {name: convert([str(src)], str(root / name), progress=False) for name, src in SOURCES.items()}


@pytest.fixture(scope="module")
def vae32(converted):
    return turbojax.load_vae(converted["wan"], dtype=jnp.float32)


@pytest.fixture(scope="module")
def wan_tensors():
    return dict(sources.read_tensors([SOURCES["wan"]]))


# ---------------------------------------------------------------------------------------------------------------
# parity and numerics
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(SOURCES))
def test_fp32_encode_and_decode_match_diffusers(converted, io, layout):
    vae = turbojax.load_vae(converted[layout], dtype=jnp.float32)
    mu = vae.encode(jnp.asarray(io["video"]))
    video = vae.decode(jnp.asarray(io["z"]))
    assert mu.shape == io["mu"].shape == (2, 4, 4, 2, 3) and mu.dtype == jnp.float32
    assert video.shape == io["decoded"].shape == (2, 3, 13, 16, 24) and video.dtype == jnp.float32
    assert rel_err(mu, io["mu"]) <= 1e-5
    assert rel_err(video, io["decoded"]) <= 1e-5
    assert float(jnp.max(jnp.abs(video))) == 1.0  # the oracle clamps 1.6% of its values


def test_full_sequence_equals_chunked_scan(vae32, io):
    """The spec's full-sequence equivalent (one call, no cache) and the production scan over chunks agree."""
    video, z = jnp.asarray(io["video"]), jnp.asarray(io["z"])
    assert rel_err(vae32.encode(video, chunked=False), np.asarray(vae32.encode(video))) <= 1e-5
    assert rel_err(vae32.decode(z, chunked=False), np.asarray(vae32.decode(z))) <= 1e-5


@pytest.mark.parametrize("size, tile, overlap", [(57, 32, 8), (45, 16, 4), (160, 32, 8), (8, 4, 1), (33, 32, 31),
                                                 (20, 32, 8)])
def test_tile_windows_cover_the_frame_with_the_overlap(size, tile, overlap):
    starts = vae_mod.tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == size
    assert all(a + tile - b >= overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
    if len(starts) > 2:  # the fewest windows: one less could not keep the overlap
        assert (len(starts) - 2) * (tile - overlap) + tile < size


def test_tiled_decode_blends_windows_into_the_whole_frame():
    """A spatially local decoder (8x nearest upsampling of 3 channels) decoded in windows and blended gives exactly
    its whole-frame output: the blend weights sum to one and every window lands in its place, at any tile size."""
    z = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 2, 23, 18)), jnp.float32)
    local = lambda x: jnp.repeat(jnp.repeat(x[:, :3], 8, -2), 8, -1).astype(jnp.bfloat16)
    for tile, overlap in [(8, 2), (5, 4), (7, 0), (40, 8)]:
        out = vae_mod.decode_tiled(local, z, tile, overlap, 8)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(local(z), np.float32))
    with pytest.raises(ValueError, match="0 <= tile_overlap < tile"):
        vae_mod.decode_tiled(local, z, 4, 4, 8)


def test_tiled_decode_of_the_vae(vae32, io):
    """One window covering the latents is the plain decode; 2 x 2 windows over the fixture's 3 x 2 latents decode
    to the plain decode's shape and range (how close depends on the context a window misses: the exact blend is
    the test above)."""
    z = jnp.asarray(io["z"])
    plain = np.asarray(vae32.decode(z))
    np.testing.assert_array_equal(np.asarray(vae32.decode(z, tile=max(z.shape[-2:]))), plain)
    tiled = np.asarray(vae32.decode(z, tile=2, tile_overlap=1))
    assert tiled.shape == plain.shape and np.abs(tiled).max() <= 1.0 and not np.array_equal(tiled, plain)


def test_chunked_paths_are_scans(vae32, io):
    """Production compiles one chunk body: decode scans T-1 latent frames after the first, encode k 4-frame groups."""
    graphdef, state = nnx.split(vae32)

    def scan_lengths(fn, x):
        jaxpr = jax.make_jaxpr(lambda s, x: fn(nnx.merge(graphdef, s), x))(state, x)
        return [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]

    assert scan_lengths(vae_mod.decode_latents, jnp.asarray(io["z"])) == [3]
    assert scan_lengths(vae_mod.encode_video, jnp.asarray(io["video"])) == [3]


def test_new_inputs_of_the_same_shape_do_not_recompile(vae32, io, caplog):
    z = jnp.asarray(io["z"])
    others = [z + 1.0, -z]
    vae32.decode(z)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        for other in others:
            vae32.decode(other)
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


def test_bf16_is_as_close_as_diffusers_bf16(converted, io):
    """bf16 weights and activations (TurboDiffusion's setting); fp32 norm statistics keep us at least as close to
    the fp32 oracle as diffusers' own bf16 run (io mu_bf16 / decoded_bf16)."""
    vae = turbojax.load_vae(converted["diffusers"])
    assert vae.encoder.conv_in.weight.dtype == jnp.bfloat16 and vae.encoder.norm_out.gamma.dtype == jnp.float32
    mu = vae.encode(jnp.asarray(io["video"]))
    video = vae.decode(jnp.asarray(io["z"]))
    assert mu.dtype == video.dtype == jnp.bfloat16
    assert rel_err(mu.astype(jnp.float32), io["mu"]) <= 1.5 * rel_err(io["mu_bf16"], io["mu"])
    assert rel_err(video.astype(jnp.float32), io["decoded"]) <= 1.5 * rel_err(io["decoded_bf16"], io["decoded"])


def test_chunked_decode_memory_does_not_grow_with_frames():
    """Compiled temp memory of the scan decode is the same for 3 and 9 latent frames (the full-sequence graph's grows
    3.6x between them; at 480p, 81 frames, XLA CPU assigns it 64 GiB of temp against the scan's 5.5 GiB)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: vae_mod.WanVAE(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0))))

    def temp_bytes(frames, chunked):
        z = jax.ShapeDtypeStruct((1, TINY.z_dim, frames, 8, 8), jnp.float32)
        lowered = vae_mod.jitted(vae_mod.decode_latents, "fold").lower(graphdef, state, z, chunked)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(9, True) <= 1.1 * temp_bytes(3, True)


def test_latent_normalisation(io):
    mean, std = np.asarray(vae_mod.LATENTS_MEAN, np.float32), np.asarray(vae_mod.LATENTS_STD, np.float32)
    mu = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 3, 2, 3)), jnp.bfloat16)
    z = turbojax.normalize_latents(mu)
    want = (np.asarray(mu, np.float32) - mean[:, None, None, None]) * (1 / std)[:, None, None, None]
    assert z.dtype == jnp.float32 and np.array_equal(np.asarray(z), want)
    assert rel_err(turbojax.denormalize_latents(z), np.asarray(mu, np.float32)) <= 1e-6
    assert np.allclose(turbojax.normalize_latents(jnp.broadcast_to(mean[None, :, None, None, None], (1, 16, 1, 1, 1))),
                       0.0)
    with pytest.raises(ValueError, match=r"\[B, 16, T, h, w\]"):
        turbojax.normalize_latents(jnp.asarray(io["z"]))  # the tiny VAE's 4 channels


@pytest.mark.parametrize("shape, match", [
    ((1, 3, 12, 16, 24), r"12 frames; the VAE takes 1 \+ 4k frames \(e\.g\. 9 or 13\)"),
    ((1, 3, 13, 20, 24), r"\(20, 24\) must be multiples of 8"),
    ((1, 4, 13, 16, 24), r"\[B, 3, T, H, W\]"),
    ((3, 13, 16, 24), r"\[B, 3, T, H, W\]"),
])
def test_encode_rejects_bad_shapes(vae32, shape, match):
    with pytest.raises(ValueError, match=match):
        vae32.encode(jnp.zeros(shape))


def test_decode_rejects_bad_shapes(vae32):
    with pytest.raises(ValueError, match=r"latents must be \[B, 4, T, h, w\]"):
        vae32.decode(jnp.zeros((1, 16, 3, 2, 3)))


# ---------------------------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(SOURCES))
def test_conversion_metadata(converted, layout):
    meta = json.loads((converted[layout] / "config.json").read_text())
    assert meta["format"] == "turbojax-vae/1" and meta["component"] == "vae"
    assert meta["source"]["layout"] == layout
    assert vae_mod.VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()}) == TINY
    assert meta["source"]["dtypes"] == ({"float32": 194} if layout == "wan" else {"bfloat16": 194})


def _convert_variant(tmp_path, tensors, config=None):
    src = tmp_path / "src"
    src.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(src / "vae.safetensors"))
    if config is not None:
        (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        convert([str(src / "vae.safetensors")], str(out), progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing written
    return str(e.value)


def test_conversion_reports_missing_unexpected_and_misshapen_keys(tmp_path, wan_tensors):
    bad = dict(wan_tensors)
    del bad["decoder.upsamples.7.time_conv.bias"]
    bad["decoder.upsamples.7.extra.weight"] = np.zeros(3, np.float32)
    bad["encoder.middle.1.proj.weight"] = np.zeros((32, 32, 3, 3), np.float32)
    msg = _convert_variant(tmp_path, bad)
    assert "Wan2.1 VAE with base_dim 8, z_dim 4" in msg
    assert "1 missing: decoder.upsamples.7.time_conv.bias" in msg
    assert "1 unexpected: decoder.upsamples.7.extra.weight" in msg
    assert "encoder.middle.1.proj.weight: (32, 32, 3, 3) (expected (32, 32, 1, 1))" in msg


def test_conversion_refuses_the_wan22_vae(tmp_path, wan_tensors):
    bad = {k.replace("encoder.downsamples.0.", "encoder.downsamples.0.downsamples.0."): v
           for k, v in wan_tensors.items()}
    assert "Wan2.2 VAE" in _convert_variant(tmp_path, bad)


def test_conversion_checks_the_diffusers_config(tmp_path, wan_tensors, converted):
    config = json.loads((SOURCES["diffusers"] / "config.json").read_text())
    assert "z_dim 4 (config.json 16)" in _convert_variant(tmp_path, wan_tensors, {**config, "z_dim": 16})


def test_conversion_refuses_dit_options_and_loaders_check_the_component(tmp_path, converted):
    with pytest.raises(CheckpointError, match="describe a DiT; this checkpoint is a Wan VAE"):
        convert([str(SOURCES["wan"])], str(tmp_path / "x"), preset="tiny", progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(turbojax.CheckpointFormatError, match="turbojax-vae/1"):
        turbojax.load_dit(converted["wan"])


def test_cli_converts_a_vae(tmp_path, capsys):
    assert convert_main([str(SOURCES["diffusers"]), "--out", str(tmp_path / "v"), "--quiet"]) == 0
    assert re.search(r"wrote .*v \(Wan2\.1 VAE, layout diffusers, z_dim 4\)", capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------------------------


def test_benchmark_runs_tiny(capsys):
    """The GPU benchmark's CPU smoke run; in fp32 both conv paths must give the same video."""
    assert vae_decode.main(["--tiny", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["conv"] for r in rows] == ["fold", "xla3d"]
    assert rows[0]["frames"] == 9 and rows[1]["rel_diff_vs_first"] <= 1e-5
    assert "| 64x96 | 9 | fold |" in out and "| 64x96 | 9 | xla3d |" in out
